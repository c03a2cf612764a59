"""Training: the Lightning module that fine-tunes a diffusers UNet with adapters, and its callbacks."""

from lorabench.training.callbacks import (
    AdapterEMA,
    CheckpointEvaluation,
    LossHistory,
    QuietSpawnedWorkers,
    SaveArtifacts,
    ShuffleState,
    StepProgressBar,
    ValidationSamples,
)
from lorabench.training.module import DiffusionFineTuner, check_optim

__all__ = ["AdapterEMA", "CheckpointEvaluation", "DiffusionFineTuner", "LossHistory", "QuietSpawnedWorkers",
           "SaveArtifacts", "ShuffleState", "StepProgressBar", "ValidationSamples", "check_optim"]
