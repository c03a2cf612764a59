"""lorabench: train, merge and continually stack adapters on text-to-image diffusion models."""

from omegaconf import OmegaConf

__version__ = "0.1.0"

# ${lb.first:a,b,...}: the first argument that is not null (oc.select falls back only on missing keys).
if not OmegaConf.has_resolver("lb.first"):
    OmegaConf.register_new_resolver("lb.first", lambda *args: next((a for a in args if a is not None), None))

# ${lb.mul:a,b}: a times b (e.g. a learning rate that keeps its ratio to another across a sweep).
if not OmegaConf.has_resolver("lb.mul"):
    OmegaConf.register_new_resolver("lb.mul", lambda a, b: float(a) * float(b))
