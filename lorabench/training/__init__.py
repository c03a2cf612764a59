from lorabench.training.callbacks import SaveAdapter
from lorabench.training.module import DiffusionFineTuner, encode_prompts

__all__ = ["DiffusionFineTuner", "SaveAdapter", "encode_prompts"]
