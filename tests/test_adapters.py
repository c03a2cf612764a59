"""The adapter interface, for every registered adapter on Linear and 1x1 Conv2d layers."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from lorabench.adapters import ADAPTERS, Adapters, get_adapter_class
from lorabench.errors import ConfigError

ADAPTER_NAMES = sorted(ADAPTERS)


class Toy(nn.Module):
    """A model with the layer kinds adapters must handle: Linear, 1x1 conv, and a ModuleList slot."""

    def __init__(self):
        super().__init__()
        self.to_q = nn.Linear(12, 10)
        self.proj_in = nn.Conv2d(12, 12, 1)
        self.to_out = nn.ModuleList([nn.Linear(10, 12), nn.Dropout(0.0)])
        self.conv3 = nn.Conv2d(12, 12, 3, padding=1)

    def forward(self, x):  # x: (B, 12, H, W)
        h = self.proj_in(x).permute(0, 2, 3, 1)
        return self.to_out[0](self.to_q(h))


def inject(model, name, **kw):
    # custom_diffusion trains whole weights: no rank, no alpha
    own = {"rank": 3} if name != "custom_diffusion" else {}
    if name == "custom_diffusion":
        kw.pop("alpha", None)
    cfg = {"name": name, **own, "target_modules": ["to_q", "proj_in", "to_out.0"], **kw}
    return Adapters.inject({"unet": model}, cfg)


def randomize(adapters, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapters.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("name", ADAPTER_NAMES)
def test_zero_delta_at_init_and_targets(name):
    torch.manual_seed(0)
    model = Toy()
    x = torch.randn(2, 12, 4, 4)
    ref = model(x)
    adapters = inject(model, name)
    assert set(adapters.layers) == {"unet.to_q", "unet.proj_in", "unet.to_out.0"}
    assert torch.allclose(model(x), ref, atol=0, rtol=0)
    for delta in adapters.delta_weights().values():
        assert delta.abs().max() == 0
    assert adapters.num_trainable() > 0
    for layer in adapters.layers.values():
        assert not any(p.requires_grad for p in layer.base.parameters())


@pytest.mark.parametrize("name", ADAPTER_NAMES)
def test_forward_equals_merged_weights_and_unmerge_restores(name):
    torch.manual_seed(0)
    model = Toy()
    originals = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randn(2, 12, 4, 4)
    adapters = inject(model, name)
    randomize(adapters)
    y_adapter = model(x)
    adapters.merge()
    assert adapters.merged
    y_merged = model(x)
    torch.testing.assert_close(y_merged, y_adapter, atol=1e-5, rtol=1e-5)
    # The dense delta is what forward adds.
    for lname, layer in adapters.layers.items():
        w = layer.base.weight.detach().reshape(layer.out_features, layer.in_features)
        w0 = originals[lname.split(".", 1)[1] + ".weight"].reshape(w.shape)
        torch.testing.assert_close(w - w0, layer.delta_weight(), atol=1e-6, rtol=1e-5)
    adapters.unmerge()
    for lname, layer in adapters.layers.items():
        w0 = originals[lname.split(".", 1)[1] + ".weight"]
        assert (layer.base.weight - w0).abs().max() <= 1e-6
    adapters.remove()
    assert isinstance(model.to_q, nn.Linear) and isinstance(model.to_out[0], nn.Linear)


@pytest.mark.parametrize("name", ADAPTER_NAMES)
def test_multiplier_scales_delta(name):
    model = Toy()
    adapters = inject(model, name)
    randomize(adapters)
    before = adapters.delta_weights()
    adapters.set_multiplier(0.6)
    for k, d in adapters.delta_weights().items():
        torch.testing.assert_close(d, 0.6 * before[k])


@pytest.mark.parametrize("name", ADAPTER_NAMES)
def test_state_dict_round_trip(name):
    a_model, b_model = Toy(), Toy()
    b_model.load_state_dict(a_model.state_dict())
    a = inject(a_model, name)
    randomize(a, seed=1)
    b = inject(b_model, name)
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 12, 3, 3)
    torch.testing.assert_close(a_model(x), b_model(x))


@pytest.mark.parametrize("name", [n for n in ADAPTER_NAMES if n != "custom_diffusion"])
def test_rank_above_min_dim_is_an_error(name):
    with pytest.raises(ConfigError, match=r"adapter.rank: 11 exceeds min\(in, out\) = 10"):
        inject(Toy(), name, rank=11)


def test_custom_diffusion_has_no_rank():
    with pytest.raises(ConfigError, match="adapter.rank: custom_diffusion trains each weight whole"):
        Adapters.inject({"unet": Toy()}, {"name": "custom_diffusion", "rank": 4, "target_modules": ["to_q"]})


def test_rank_error_leaves_model_untouched():
    model = Toy()
    with pytest.raises(ConfigError):
        inject(model, "lora", rank=11)
    assert isinstance(model.to_q, nn.Linear) and isinstance(model.proj_in, nn.Conv2d)


def test_unknown_adapter_and_option():
    with pytest.raises(ConfigError,
                       match="adapter.name: unknown value 'dora'; valid: custom_diffusion, lora, ortho, trilora"):
        get_adapter_class("dora")
    with pytest.raises(ConfigError, match="adapter.sigma_init: not an option of adapter 'lora'"):
        inject(Toy(), "lora", sigma_init="identity")


def test_non_1x1_conv_and_no_match_are_errors():
    with pytest.raises(ConfigError, match="Conv2d with kernel"):
        Adapters.inject({"unet": Toy()}, {"name": "lora", "rank": 2, "target_modules": ["conv3"]})
    with pytest.raises(ConfigError, match="no layer of unet matches"):
        Adapters.inject({"unet": Toy()}, {"name": "lora", "rank": 2, "target_modules": ["to_z"]})


def test_lora_inits():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("to_q", nn.Linear(256, 256))
    g = Adapters.inject({"unet": model}, {"name": "lora", "rank": 8, "target_modules": ["to_q"]})
    down = g.layers["unet.to_q"].lora_down
    assert abs(down.std().item() - 1 / 8) < 0.01  # diffusers/PEFT gaussian: std = 1/r
    assert g.layers["unet.to_q"].lora_up.abs().max() == 0
    g.remove()
    k = Adapters.inject({"unet": model}, {"name": "lora", "rank": 8, "init": "kaiming", "target_modules": ["to_q"]})
    assert k.layers["unet.to_q"].lora_down.abs().max() <= 1 / 16 + 1e-6  # kaiming_uniform(a=sqrt 5): bound 1/sqrt(in)


@pytest.mark.parametrize("name", ADAPTER_NAMES)
def test_fused_forward_equals_the_reference_arithmetic(name):
    """The path CUDA takes (AdapterLayer.fused_forward), run here on the CPU: the same output and the same
    gradients (the factors' and the input's) as ``base(x) + adapter_forward(x)`` to float32 rounding, with a
    scale != 1 and an input that does or does not require grad; under bf16 autocast, to bf16 rounding."""
    torch.manual_seed(0)
    model = Toy()
    ad = inject(model, name, target_modules=["to_q"], alpha=2.0)  # (custom_diffusion: no alpha)
    layer = ad.layers["unet.to_q"]
    with torch.no_grad():
        for p in layer.parameters(recurse=False):
            p.normal_()
    for autocast, tol in ((False, 1e-5), (True, 3e-2)):
        for needs_grad in (True, False):
            x = torch.randn(2, 3, 12, requires_grad=needs_grad)
            g = torch.randn(2, 3, 10)
            outs, grads = [], []
            for fused in (False, True):
                for t in [*layer.parameters(), x]:
                    t.grad = None
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    out = layer.fused_forward(x) if fused else layer.base(x) + layer.adapter_forward(x)
                out.float().backward(g)
                outs.append(out.detach().float())
                grads.append([t.grad.clone() for t in [*layer.parameters(recurse=False), x] if t.grad is not None])
            scale = outs[0].abs().max() if autocast else 1.0
            assert outs[0].dtype == outs[1].dtype
            assert torch.allclose(outs[0], outs[1], atol=tol * scale, rtol=tol)
            assert len(grads[0]) == len(grads[1]) == sum(p.requires_grad for p in layer.parameters()) + needs_grad
            assert all(torch.allclose(a, b, atol=10 * tol * a.abs().max(), rtol=tol) for a, b in zip(*grads))


def test_fused_forward_without_a_bias():
    """A Linear without bias (SDXL's and SD's attention projections): the fused path equals the reference."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10, bias=False))
    layer = Adapters.inject({"unet": model}, {"name": "lora", "rank": 3, "target_modules": ["0"]}).layers["unet.0"]
    with torch.no_grad():
        layer.lora_up.normal_()
    x = torch.randn(2, 5, 12, requires_grad=True)
    fused, ref = layer.fused_forward(x), layer.base(x) + layer.adapter_forward(x)
    torch.testing.assert_close(fused, ref)
    (gf,), (gr,) = torch.autograd.grad(fused.sum(), [x]), torch.autograd.grad(ref.sum(), [x])
    torch.testing.assert_close(gf, gr)


def test_fused_forward_adds_ten_kernels_to_the_frozen_layer():
    """What the fused LoRA layer costs over its frozen Linear in one forward and backward, counted as the
    operators it dispatches (each a kernel on a GPU, views aside): ten, under bf16 autocast with float32
    factors and an input that needs its gradient, as :class:`LowRankLinear` says."""
    from lorabench.utils.launches import count_ops

    def kernels(fn):
        x = torch.randn(2, 3, 12, dtype=torch.bfloat16, requires_grad=True)

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = fn(x)
            out.backward(torch.ones_like(out))
        return count_ops(step)

    torch.manual_seed(0)
    model = Toy().to(torch.bfloat16)
    layer = inject(model, "lora", target_modules=["to_q"]).layers["unet.to_q"]
    assert layer.lora_up.dtype == torch.float32
    assert kernels(layer.fused_forward) - kernels(layer.base) == 10


@pytest.mark.parametrize("name,alpha", [("lora", None), ("lora", 8.0), ("ortho", None), ("trilora", 8.0)])
def test_factors_cast_once_trains_as_each_layer_casting_its_own(name, alpha):
    """Under bf16 autocast, factors_cast_once casts every fused layer's factors together: the same outputs
    and the same float32 gradients bit for bit as each layer casting its own (scale 1 or 2), frozen factors
    (OrthA's down) cast apart without a graph, a cast each way per factor saved against the block's two
    operators a factor shape each way, and nothing left behind after the block, an error included;
    outside autocast it does nothing."""
    from lorabench.adapters.base import cast_factors_of, factors_cast_once
    from lorabench.utils.launches import count_ops

    n = 6
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(16, 16) for _ in range(n))).to(torch.bfloat16)
    cfg = {"name": name, "rank": 4, "target_modules": ["re:[0-9]+"], **({"alpha": alpha} if alpha else {})}
    if name == "ortho":
        cfg["concept_key"] = "c0"
    ad = Adapters.inject({"unet": model}, cfg)
    randomize(ad)
    for layer in ad.layers.values():
        layer.forward = layer.fused_forward  # the CUDA path, here on the CPU
    x = torch.randn(3, 5, 16, dtype=torch.bfloat16, requires_grad=True)

    def step(once):
        for t in [*ad.parameters(), x]:
            t.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with factors_cast_once(ad.layers.values(), "cpu") if once else contextlib.nullcontext():
                out = model(x)
        out.float().square().sum().backward()
        return out, [t.grad for t in [*ad.parameters(), x] if t.grad is not None]

    (y0, g0), (y1, g1) = step(False), step(True)
    assert torch.equal(y0, y1) and len(g0) == len(g1) == len(ad.trainable_parameters()) + 1
    assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(g0, g1))
    # per layer: the two casts forward and one per trained factor backward; the block: a stack and a cast per
    # factor shape (here one shape per factor), each way for trained factors, forward for frozen ones (OrthA's)
    trained = sum(t.requires_grad for t in next(iter(ad.layers.values())).factors())
    saved = n * (2 + trained) - (4 * trained + 2 * (2 - trained))
    assert count_ops(lambda: step(False)) - count_ops(lambda: step(True)) == saved
    assert all(cast_factors_of(layer) is None for layer in ad.layers.values())
    with pytest.raises(RuntimeError, match="boom"), torch.autocast("cpu", dtype=torch.bfloat16):
        with factors_cast_once(ad.layers.values(), "cpu"):
            assert all(cast_factors_of(layer) is not None for layer in ad.layers.values())
            raise RuntimeError("boom")
    assert all(cast_factors_of(layer) is None for layer in ad.layers.values())
    with factors_cast_once(ad.layers.values(), "cpu"):  # no autocast: nothing to cast
        assert all(cast_factors_of(layer) is None for layer in ad.layers.values())


@pytest.mark.parametrize("reentrant", [False, True])
def test_factors_cast_once_under_gradient_checkpointing(reentrant):
    """A checkpointed block recomputes its forward after factors_cast_once's block has ended (its layers cast
    their own factors then): the gradients are those of a run without checkpointing, bit for bit."""
    from torch.utils.checkpoint import checkpoint

    from lorabench.adapters.base import factors_cast_once

    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(16, 16) for _ in range(4))).to(torch.bfloat16)
    ad = Adapters.inject({"unet": model}, {"name": "lora", "rank": 4, "target_modules": ["re:[0-9]+"]})
    randomize(ad)
    for layer in ad.layers.values():
        layer.forward = layer.fused_forward
    x = torch.randn(3, 16, dtype=torch.bfloat16, requires_grad=True)
    grads = []
    for ckpt in (False, True):
        for p in ad.parameters():
            p.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16), factors_cast_once(ad.layers.values(), "cpu"):
            h = checkpoint(model[:2], x, use_reentrant=reentrant) if ckpt else model[:2](x)
            out = model[2:](h)
        out.float().square().sum().backward()
        grads.append([p.grad.clone() for p in ad.trainable_parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_the_fused_path_compiles_into_one_graph():
    """torch.compile traces the fused layers (LowRankLinear, the cast lookup) without a graph break: a
    compiled UNet (module.compile) stays one graph per forward, not one per adapted layer."""
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(16, 16) for _ in range(3)))
    ad = Adapters.inject({"unet": model}, {"name": "lora", "rank": 4, "target_modules": ["re:[0-9]+"]})
    for layer in ad.layers.values():
        layer.forward = layer.fused_forward

    def loss(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x).float().sum()

    explained = torch._dynamo.explain(loss)(torch.randn(2, 16))
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]


def test_a_trained_base_layer_takes_autograds_path():
    """fused_forward gives the frozen weight no gradient; a base weight that trains gets autograd's."""
    torch.manual_seed(0)
    layer = inject(Toy(), "lora", target_modules=["to_q"]).layers["unet.to_q"]
    layer.base.weight.requires_grad_(True)
    x = torch.randn(2, 3, 12)
    layer.fused_forward(x).sum().backward()
    ref = layer.base.weight.grad.clone()
    layer.base.weight.grad = None
    (layer.base(x) + layer.adapter_forward(x)).sum().backward()
    assert ref.abs().sum() > 0 and torch.allclose(ref, layer.base.weight.grad)


def test_the_cpu_keeps_the_reference_path():
    """On the CPU forward() is base(x) + adapter_forward(x), bit for bit."""
    torch.manual_seed(0)
    model = Toy()
    layer = inject(model, "lora", target_modules=["to_q"]).layers["unet.to_q"]
    with torch.no_grad():
        layer.lora_up.normal_()
    x = torch.randn(2, 3, 12)
    assert torch.equal(layer(x), layer.base(x) + layer.adapter_forward(x))
