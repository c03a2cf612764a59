"""Seeds derived from named parts, so every random stream is reproducible and independent."""

from __future__ import annotations

import hashlib

import torch


def derive_seed(*parts) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (stable across processes and machines)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generator(*parts, device="cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(derive_seed(*parts))
