"""lorabench: train, merge and continually stack adapters on text-to-image diffusion models."""

from omegaconf import OmegaConf

__version__ = "0.1.0"

# ${lb.first:a,b,...}: the first argument that is not null (oc.select falls back only on missing keys).
if not OmegaConf.has_resolver("lb.first"):
    OmegaConf.register_new_resolver("lb.first", lambda *args: next((a for a in args if a is not None), None))

# ${lb.mul:a,b}: a times b (e.g. a learning rate that keeps its ratio to another across a sweep).
if not OmegaConf.has_resolver("lb.mul"):
    OmegaConf.register_new_resolver("lb.mul", lambda a, b: float(a) * float(b))

# ${lb.device:${trainer.accelerator}}: the torch device of a trainer's accelerator (gpu -> cuda), without importing
# torch: where the real path's scorers run, beside the samples they score.
if not OmegaConf.has_resolver("lb.device"):
    OmegaConf.register_new_resolver("lb.device", lambda accel: {"gpu": "cuda", "cuda": "cuda", "mps": "mps"}.get(
        str(accel), "cpu"))
