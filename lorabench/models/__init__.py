from lorabench.models.components import (
    ModelComponents,
    denoise,
    encode_prompts,
    encode_tokens,
    load_components,
    save_components,
    tokenize_prompts,
)
from lorabench.models.tiny import build_scaled_down, build_tiny_components, write_clip_tokenizer

__all__ = ["ModelComponents", "build_scaled_down", "build_tiny_components", "denoise", "encode_prompts",
           "encode_tokens", "load_components", "save_components", "tokenize_prompts", "write_clip_tokenizer"]
