from lorabench.models.components import ModelComponents, load_components, save_components
from lorabench.models.tiny import build_tiny_components, write_clip_tokenizer

__all__ = ["ModelComponents", "load_components", "save_components", "build_tiny_components",
           "write_clip_tokenizer"]
