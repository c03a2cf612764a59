from lorabench.training.callbacks import SaveArtifacts
from lorabench.training.module import DiffusionFineTuner, encode_prompts

__all__ = ["DiffusionFineTuner", "SaveArtifacts", "encode_prompts"]
