"""Orthogonal Adaptation (Po et al., CVPR 2024): dW = up @ down, down FROZEN.

``down`` holds ``rank`` rows of a shared orthogonal basis of the input space, one
basis per input width, regenerated from ``(basis_seed, width)``. Only ``up`` is
trained. Two concepts whose rows differ have ``down_i down_j^T = 0``, so their
updates read disjoint input subspaces and can be merged by summation with little
crosstalk.

Row choice (the public re-implementation's bug is that every concept gets the
same rows, because it reseeds the RNG with a constant just before choosing;
here the choice always depends on the concept):

- ``row_mode: random``: ``rank`` rows drawn from a generator seeded by
  ``(basis_seed, width, concept_key)``. Different concepts overlap rarely when
  ``rank << width`` (the paper's setting).
- ``row_mode: disjoint``: concept ``slot`` in ``[0, num_slots)`` takes rows
  ``perm[slot*rank:(slot+1)*rank]`` of one shared seeded permutation, so slots
  never overlap; needs ``rank * num_slots <= width``.

The same rows are used by every layer of a given input width.

Reproducibility: the basis is the Q factor (signs fixed so diag(R) > 0) of a
matrix of integers drawn from torch's CPU Mersenne-Twister generator (exact in
float64, no transcendental functions), orthogonalised in float64 and rounded to
float32. The same torch build gives bit-identical rows in any process; the rows
actually used are also saved in the adapter file.
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache
from typing import Mapping, Optional, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lorabench.adapters.base import AdapterLayer, AdapterOptions, register_adapter
from lorabench.errors import ConfigError, check_int, choice_error
from lorabench.utils.seeding import derive_seed

ROW_MODES = ("random", "disjoint")


def _seed(*parts) -> int:
    return derive_seed("lorabench-ortho", *parts)


@lru_cache(maxsize=16)
def orthogonal_basis(seed: int, width: int) -> torch.Tensor:
    """A (width, width) orthogonal matrix, a pure function of (seed, width). Rows are the basis."""
    g = torch.Generator().manual_seed(_seed("basis", seed, width))
    a = torch.randint(-(1 << 20), 1 << 20, (width, width), generator=g, dtype=torch.int64).double()
    q, r = torch.linalg.qr(a)
    q = q * torch.sign(torch.diagonal(r))[None, :]
    return q.T.contiguous().float()  # rows orthonormal


def select_rows(seed: int, width: int, rank: int, concept_key: str, row_mode: str = "random",
                slot: Optional[int] = None, num_slots: Optional[int] = None) -> torch.Tensor:
    """Indices of the basis rows concept ``concept_key`` uses at input width ``width``."""
    if row_mode == "random":
        g = torch.Generator().manual_seed(_seed("rows", seed, width, concept_key))
        return torch.randperm(width, generator=g)[:rank].sort().values
    if row_mode == "disjoint":
        if rank * num_slots > width:
            raise ConfigError("adapter.num_slots",
                              f"rank * num_slots = {rank} * {num_slots} = {rank * num_slots} exceeds input width "
                              f"{width}; disjoint mode needs rank * num_slots <= the smallest adapted input width")
        g = torch.Generator().manual_seed(_seed("slots", seed, width))
        perm = torch.randperm(width, generator=g)
        return perm[slot * rank:(slot + 1) * rank].sort().values
    raise choice_error("adapter.row_mode", row_mode, ROW_MODES)


def concept_options(adapter: Mapping, concepts: Sequence[str], slots: Optional[Mapping] = None,
                    key: str = "ortho") -> dict[str, dict]:
    """What each concept's adapter config gains when concepts train apart to be merged: an OrthA adapter
    draws its rows by ``concept_key`` (the concept), and in disjoint mode takes a slot (``slots``, default
    the concept's index) of ``num_slots``; two concepts on one slot would share rows: an error naming
    ``protocol.slots``. Other adapters gain nothing."""
    if adapter.get("name") != "ortho":
        return {c: {} for c in concepts}
    if adapter.get("row_mode") != "disjoint":
        return {c: {"concept_key": c} for c in concepts}
    if slots and not hasattr(slots, "items"):  # a list: dict() raised a TypeError, a traceback
        raise ConfigError("protocol.slots", f"must map each concept to its slot (an integer >= 0), e.g. "
                          f"{{{concepts[0]}: 0}}, or be null (each concept's index), got {slots!r}")
    slots = dict(slots) if slots else {c: i for i, c in enumerate(concepts)}
    missing = [c for c in concepts if c not in slots]
    if missing:
        raise ConfigError("protocol.slots", f"no slot for concept {missing[0]!r}")
    for c in concepts:  # a slot of -1 failed as adapter.slot in the first cell, after the others trained
        check_int(slots[c], f"protocol.slots.{c}", minimum=0)
    seen: dict[int, str] = {}
    for c in concepts:
        if slots[c] in seen:
            raise ConfigError("protocol.slots", f"concepts {seen[slots[c]]!r} and {c!r} share slot {slots[c]}: "
                              f"OrthA adapter {key!r} is in disjoint mode, each concept needs its own rows")
        seen[slots[c]] = c
    num = int(adapter.get("num_slots") or max(len(concepts), max(slots.values()) + 1))
    return {c: {"concept_key": c, "slot": int(slots[c]), "num_slots": num} for c in concepts}


def concept_configs(adapter: DictConfig, concepts: Sequence[str], slots: Optional[Mapping] = None,
                    key: str = "ortho") -> dict[str, DictConfig]:
    """Each concept's adapter config: ``adapter`` with the concept's :func:`concept_options` (OrthA's rows)."""
    options = concept_options(adapter, concepts, slots, key)
    return {c: OmegaConf.create({**OmegaConf.to_container(adapter, resolve=False), **options[c]}) for c in concepts}


@dataclasses.dataclass
class OrthoOptions(AdapterOptions):
    """OrthA's options: the shared basis, and how a concept's rows are picked from it."""
    basis_seed: int = 0
    concept_key: str = "concept"
    row_mode: str = "random"
    slot: Optional[int] = None
    num_slots: Optional[int] = None

    def validate(self) -> None:
        super().validate()
        if self.row_mode not in ROW_MODES:
            raise choice_error("adapter.row_mode", self.row_mode, ROW_MODES)
        if self.row_mode == "disjoint":
            if not isinstance(self.num_slots, int) or self.num_slots < 1:
                raise ConfigError("adapter.num_slots",
                                  "disjoint mode needs a positive integer (the number of concepts), "
                                  f"got {self.num_slots!r}")
            if not isinstance(self.slot, int) or not 0 <= self.slot < self.num_slots:
                raise ConfigError("adapter.slot",
                                  f"disjoint mode needs an integer in [0, {self.num_slots}), got {self.slot!r}")


@register_adapter("ortho")
class OrthoLayer(AdapterLayer):
    """``dW = up @ down * scale`` with ``down`` frozen rows of a shared orthogonal basis; only ``up`` trains."""
    Options = OrthoOptions

    def __init__(self, base, name, opts: OrthoOptions, context=None):
        super().__init__(base, name, opts, context)
        rows = select_rows(opts.basis_seed, self.in_features, opts.rank, opts.concept_key,
                           opts.row_mode, opts.slot, opts.num_slots)
        self.register_buffer("ortho_rows", rows)
        self.register_buffer("ortho_down", orthogonal_basis(opts.basis_seed, self.in_features)[rows].clone())
        self.ortho_up = nn.Parameter(torch.zeros(self.out_features, opts.rank))

    def factors(self):
        return self.ortho_up, self.ortho_down

    def adapter_metadata(self):
        return {"width": self.in_features, "rows": self.ortho_rows.tolist()}
