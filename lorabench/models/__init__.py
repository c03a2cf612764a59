from lorabench.models.components import ModelComponents, load_components, save_components
from lorabench.models.tiny import build_scaled_down, build_tiny_components, write_clip_tokenizer

__all__ = ["ModelComponents", "load_components", "save_components", "build_tiny_components", "build_scaled_down",
           "write_clip_tokenizer"]
