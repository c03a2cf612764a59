"""Orthogonal Adaptation: frozen orthogonal down rows chosen per concept, reproducibly."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from lorabench.adapters import Adapters
from lorabench.adapters.ortho import orthogonal_basis, select_rows
from lorabench.errors import ConfigError


def concept_adapter(key, width=64, rank=4, **kw):
    model = nn.Sequential()
    model.add_module("to_q", nn.Linear(width, 32))
    return Adapters.inject({"unet": model}, {"name": "ortho", "rank": rank, "concept_key": key,
                                             "target_modules": ["to_q"], **kw}).layers["unet.to_q"]


def test_basis_is_orthogonal():
    q = orthogonal_basis(0, 96).double()
    torch.testing.assert_close(q @ q.T, torch.eye(96, dtype=torch.float64), atol=1e-5, rtol=0)


def test_disjoint_slots_are_orthogonal():
    a = concept_adapter("a", row_mode="disjoint", slot=0, num_slots=16)
    b = concept_adapter("b", row_mode="disjoint", slot=1, num_slots=16)
    assert set(a.ortho_rows.tolist()).isdisjoint(b.ortho_rows.tolist())
    assert torch.linalg.matrix_norm(a.ortho_down @ b.ortho_down.T) <= 1e-5
    torch.testing.assert_close(a.ortho_down @ a.ortho_down.T, torch.eye(4), atol=1e-5, rtol=0)


def test_rows_depend_on_the_concept_not_a_constant_seed():
    rows = {tuple(select_rows(0, 320, 20, f"concept{i}").tolist()) for i in range(12)}
    assert len(rows) == 12, "every concept must get its own rows (the public re-implementation's bug)"
    assert torch.equal(select_rows(0, 320, 20, "x"), select_rows(0, 320, 20, "x"))


def test_down_is_frozen_up_is_trained():
    layer = concept_adapter("a")
    assert not any(p is layer.ortho_down for p in layer.parameters())
    assert [n for n, p in layer.named_parameters(recurse=False) if p.requires_grad] == ["ortho_up"]


@pytest.mark.integration
def test_same_rows_in_a_new_process():
    code = ("import torch; from lorabench.adapters.ortho import orthogonal_basis, select_rows;"
            "r = select_rows(7, 320, 20, 'dog'); b = orthogonal_basis(7, 320)[r];"
            "print(','.join(map(str, r.tolist()))); print(b.numpy().tobytes().hex())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    rows = select_rows(7, 320, 20, "dog")
    assert out[0] == ",".join(map(str, rows.tolist()))
    assert out[1] == orthogonal_basis(7, 320)[rows].numpy().tobytes().hex()  # bit-identical


def test_disjoint_overflow_is_an_error():
    with pytest.raises(ConfigError,
                       match=r"adapter.num_slots: rank \* num_slots = 4 \* 17 = 68 exceeds input width 64"):
        concept_adapter("a", row_mode="disjoint", slot=0, num_slots=17)


def test_disjoint_needs_slot():
    with pytest.raises(ConfigError, match=r"adapter.slot: disjoint mode needs an integer in \[0, 4\)"):
        concept_adapter("a", row_mode="disjoint", slot=None, num_slots=4)
