"""TriLoRA: dW = U diag(Sigma) V^T, zero at init, all three factors train."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorabench.adapters import Adapters


def tri(rank=4, **kw):
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("to_q", nn.Linear(24, 16))
    w0 = model.to_q.weight.detach().clone()
    adapters = Adapters.inject({"unet": model}, {"name": "trilora", "rank": rank, "target_modules": ["to_q"], **kw})
    return model, adapters.layers["unet.to_q"], w0


def test_zero_delta_at_init_and_sigma_from_w0():
    _, layer, w0 = tri()
    assert layer.delta_weight().abs().max() == 0
    assert layer.tri_vt.abs().max() == 0 and layer.tri_u.abs().max() > 0
    torch.testing.assert_close(layer.tri_sigma.detach(), torch.linalg.svdvals(w0)[:4])


@pytest.mark.parametrize("sigma_init,normalize", [("svd_w0", False), ("svd_w0", True), ("identity", False),
                                                  ("svd_u", False)])
def test_all_factors_move_after_two_steps(sigma_init, normalize):
    model, layer, _ = tri(sigma_init=sigma_init, sigma_normalize=normalize)
    start = {n: p.detach().clone() for n, p in layer.named_parameters(recurse=False)}
    opt = torch.optim.AdamW([p for p in layer.parameters(recurse=False)], lr=1e-2, weight_decay=0.0)
    x, y = torch.randn(8, 24), torch.randn(8, 16)
    for step in range(2):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        if step == 0:  # with V = 0 only V gets gradient at first (why Sigma must not start at 0)
            assert layer.tri_u.grad.abs().max() == 0 and layer.tri_sigma.grad.abs().max() == 0
            assert layer.tri_vt.grad.abs().max() > 0
        opt.step()
    for n, p in layer.named_parameters(recurse=False):
        assert not torch.equal(p.detach(), start[n]), f"{n} did not move"


def test_sigma_variants():
    _, layer, w0 = tri(sigma_init="svd_w0", sigma_normalize=True)
    assert layer.tri_sigma.max().item() == pytest.approx(1.0)
    _, layer, _ = tri(sigma_init="identity")
    assert torch.equal(layer.tri_sigma.detach(), torch.ones(4))
    _, layer, _ = tri(sigma_init="svd_u")
    torch.testing.assert_close(layer.tri_sigma.detach(), torch.linalg.svdvals(layer.tri_u.detach()))


def test_export_folds_to_up_down():
    from lorabench.adapters import lora_pairs

    model, layer, _ = tri()
    with torch.no_grad():
        layer.tri_vt.normal_()
    adapters = Adapters("trilora", {}, {"unet.to_q": layer}, {"unet": model})
    up, down = lora_pairs(adapters)["unet.to_q"]
    torch.testing.assert_close(up @ down, layer.delta_weight())
