"""lorabench: train, merge and continually stack adapters on text-to-image diffusion models."""

__version__ = "0.1.0"
