"""Adapters: one module per method, registered by name, behind one small interface.

from lorabench.adapters import inject_adapters
adapters = inject_adapters(components, {"name": "lora", "rank": 4})
adapters.trainable_parameters(); adapters.delta_weights(); adapters.merge(); adapters.unmerge()
"""

# Importing the modules registers the adapters.
from lorabench.adapters import custom_diffusion, lora, ortho, trilora  # noqa: F401
from lorabench.adapters.base import ADAPTERS, AdapterLayer, AdapterOptions, get_adapter_class, register_adapter
from lorabench.adapters.injection import DEFAULT_UNET_TARGETS, Adapters, base_fingerprint, inject_adapters
from lorabench.adapters.io import (
    ADAPTER_FILE,
    EXPORT_FILES,
    export_diffusers,
    export_kohya,
    import_lora,
    load_adapter,
    load_init_adapter,
    lora_from_pairs,
    lora_pairs,
    read_safetensors,
    save_adapter,
    write_adapter_files,
)

__all__ = [
    "ADAPTERS",
    "ADAPTER_FILE",
    "EXPORT_FILES",
    "AdapterLayer",
    "AdapterOptions",
    "Adapters",
    "DEFAULT_UNET_TARGETS",
    "base_fingerprint",
    "export_diffusers",
    "export_kohya",
    "get_adapter_class",
    "import_lora",
    "inject_adapters",
    "load_adapter",
    "load_init_adapter",
    "lora_from_pairs",
    "lora_pairs",
    "read_safetensors",
    "register_adapter",
    "save_adapter",
    "write_adapter_files",
]
