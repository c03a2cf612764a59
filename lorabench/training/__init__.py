"""Training: the Lightning module that fine-tunes a diffusers UNet with adapters, and its callbacks."""

from lorabench.training.callbacks import CheckpointEvaluation, LossHistory, SaveArtifacts
from lorabench.training.module import DiffusionFineTuner, check_optim

__all__ = ["CheckpointEvaluation", "DiffusionFineTuner", "LossHistory", "SaveArtifacts", "check_optim"]
