"""Seeds derived from named parts, so every random stream is reproducible and independent, and the
global RNG state (Python, NumPy, torch) saved and restored for resumable runs."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def derive_seed(*parts) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (stable across processes and machines)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def derive_seed_list(tag: str, seed: int, n: int) -> list[int]:
    """``n`` seeds of replicate ``seed`` under ``tag`` (e.g. initial-latent seeds shared by every prompt)."""
    return [derive_seed(tag, seed, k) for k in range(n)]


def generator(*parts, device="cpu") -> torch.Generator:
    """A torch generator on ``device`` seeded with :func:`derive_seed` of ``parts``."""
    return torch.Generator(device=device).manual_seed(derive_seed(*parts))


def rng_state(cuda_device: torch.device | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """The global RNG states: ``(JSON-able Python and NumPy states, {"torch": CPU state tensor})``, with
    ``"cuda"``: ``cuda_device``'s state, when given."""
    version, state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"torch": torch.get_rng_state()}
    if cuda_device is not None:
        tensors["cuda"] = torch.cuda.get_rng_state(cuda_device)
    return ({"python": [version, list(state), gauss],
             "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}, tensors)


def set_rng_state(meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Restore what :func:`rng_state` returned (a CUDA state into the current CUDA device, where there is one)."""
    version, state, gauss = meta["python"]
    random.setstate((version, tuple(state), gauss))
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"], torch.cuda.current_device())
