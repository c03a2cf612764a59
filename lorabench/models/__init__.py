from lorabench.models.components import ModelComponents, denoise, encode_prompts, load_components, save_components
from lorabench.models.tiny import build_scaled_down, build_tiny_components, write_clip_tokenizer

__all__ = ["ModelComponents", "build_scaled_down", "build_tiny_components", "denoise", "encode_prompts",
           "load_components", "save_components", "write_clip_tokenizer"]
