"""Training: the Lightning module that fine-tunes a diffusers UNet with adapters, and its callbacks."""

from lorabench.training.callbacks import (
    AdapterEMA,
    CheckpointEvaluation,
    LossHistory,
    QuietSpawnedWorkers,
    SaveArtifacts,
    StepProgressBar,
    ValidationSamples,
)
from lorabench.training.module import DiffusionFineTuner, check_optim

__all__ = ["AdapterEMA", "CheckpointEvaluation", "DiffusionFineTuner", "LossHistory", "QuietSpawnedWorkers",
           "SaveArtifacts", "StepProgressBar", "ValidationSamples", "check_optim"]
