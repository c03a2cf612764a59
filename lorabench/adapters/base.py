"""The adapter interface and the registry.

Every adapter wraps one frozen base layer (``nn.Linear`` or a 1x1 ``nn.Conv2d``)
and adds a low-rank update that can always be written as

    dW = scale * multiplier * (up @ down),   up: (out, r), down: (r, in)

Subclasses create their parameters and say how to compute ``(up, down)``; the
base class derives the delta weight, merge/unmerge, the forward pass and the
export to plain up/down pairs from that. ``scale`` is ``alpha / rank``;
``multiplier`` is a runtime knob (the merge coefficient lambda, a LoRA scale at
inference) that is 1 unless a merge protocol sets it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lorabench.errors import ConfigError
from lorabench.utils.registry import Registry

ADAPTERS: Registry[type["AdapterLayer"]] = Registry("adapter", "adapter.name")


def register_adapter(name: str):
    """Class decorator: make an adapter available under ``adapter.name=<name>``."""
    return ADAPTERS.register(name, on_register=lambda cls, n: setattr(cls, "adapter_type", n))


def get_adapter_class(name: str) -> type["AdapterLayer"]:
    """The adapter class registered as ``name`` (a one-line error listing the valid names)."""
    return ADAPTERS.lookup(name)


@dataclasses.dataclass
class AdapterOptions:
    """Options every adapter takes. Subclasses extend this with their own fields."""

    rank: int = 4
    alpha: Optional[float] = None  # None: alpha = rank, i.e. scale 1
    dropout: float = 0.0

    @property
    def scale(self) -> float:
        """``alpha / rank`` (1 when alpha is unset)."""
        return (self.rank if self.alpha is None else float(self.alpha)) / self.rank

    def validate(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError("adapter.rank", f"must be a positive integer, got {self.rank!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("adapter.dropout", f"must be in [0, 1), got {self.dropout!r}")


def layer_shape(base: nn.Module, name: str) -> tuple[int, int]:
    """(in_features, out_features) of a supported base layer, or a ConfigError."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    if isinstance(base, nn.Conv2d):
        pointwise = base.kernel_size == (1, 1) and base.stride == (1, 1) and base.groups == 1
        if not pointwise or base.padding not in ((0, 0), "valid"):
            raise ConfigError("adapter.target_modules",
                              f"layer {name!r} is a Conv2d with kernel {base.kernel_size}; adapters support "
                              "Linear layers and 1x1 Conv2d projections only")
        return base.in_channels, base.out_channels
    raise ConfigError("adapter.target_modules",
                      f"layer {name!r} is a {type(base).__name__}; adapters support Linear and 1x1 Conv2d")


class LowRankLinear(torch.autograd.Function):
    """``x W^T + b + s (x D^T) U^T`` for a frozen Linear ``(W, b)`` and factors ``(U, D)``, computed in
    ``dtype`` with a hand-written backward: ten operators (kernels, on a GPU) a layer over the frozen layer's
    own in a training step, nine where the input needs no gradient (casting D and U, ``x D^T``, the
    ``addmm_`` of the update into the output; ``g U``, the input gradient's ``addmm_``, and the two factor
    gradients, each a GEMM and one scale-and-cast into the factor's dtype). Autograd's graph of the same
    arithmetic dispatched 14.3 a layer in SD1.5's UNet (the input gradients summed apart, the clone and
    copies of an in-place update on a view; ``bench/bench_lora_overhead.py --count``). Gradients flow to
    ``x``, ``U`` and ``D`` only: the frozen weight and bias get none (the caller checks they are frozen)."""

    @staticmethod
    def forward(ctx, x, weight, bias, up, down, scale: float, dtype: torch.dtype):
        """The layer's output in ``dtype``; saves the input, the cast weight and factors and ``x D^T``."""
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            w, u, d = weight.to(dtype), up.to(dtype), down.to(dtype)
            out = torch.addmm(bias.to(dtype), x2, w.t()) if bias is not None else x2 @ w.t()
            h = x2 @ d.t()
            out.addmm_(h, u.t(), alpha=scale)
        ctx.save_for_backward(x2, w, u, d, h)
        ctx.scale, ctx.x_dtype, ctx.up_dtype, ctx.down_dtype = scale, x.dtype, up.dtype, down.dtype
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        """Gradients for ``x`` (in its dtype), ``U`` and ``D`` (in theirs), only those asked for."""
        x2, w, u, d, h = ctx.saved_tensors
        s = ctx.scale
        g = grad.reshape(-1, grad.shape[-1]).to(h.dtype)
        need_x, _, _, need_up, need_down = ctx.needs_input_grad[:5]
        gx = gup = gdown = None
        gu = g @ u if need_x or need_down else None
        if need_x:
            gx = (g @ w).addmm_(gu, d, alpha=s).view(*grad.shape[:-1], w.shape[1]).to(ctx.x_dtype)
        if need_down:
            gdown = torch.mul(gu.t() @ x2, s, out=torch.empty(d.shape, dtype=ctx.down_dtype, device=d.device))
        if need_up:
            gup = torch.mul(g.t() @ h, s, out=torch.empty(u.shape, dtype=ctx.up_dtype, device=u.device))
        return gx, None, None, gup, gdown, None, None


class AdapterLayer(nn.Module):
    """One adapted layer. Subclasses implement :meth:`factors` and create parameters in ``__init__``."""

    adapter_type: ClassVar[str] = ""
    Options: ClassVar[type[AdapterOptions]] = AdapterOptions
    # For an adapter that trains a dense update (Custom Diffusion): the parameter that holds it. K stacked
    # layers (lorabench.adapters.stacked) apply it directly, not its factors with an identity.
    dense_update: ClassVar[Optional[str]] = None

    def __init__(self, base: nn.Module, name: str, opts: AdapterOptions, context: Optional[dict] = None):
        super().__init__()
        self.in_features, self.out_features = layer_shape(base, name)
        if opts.rank > min(self.in_features, self.out_features):
            raise ConfigError("adapter.rank",
                              f"{opts.rank} exceeds min(in, out) = {min(self.in_features, self.out_features)} "
                              f"of layer {name!r} ({self.in_features} -> {self.out_features})")
        self.base = base
        self.base.requires_grad_(False)
        self.name = name
        self.opts = opts
        self.rank = opts.rank
        self.scale = opts.scale
        self.multiplier = 1.0
        self.merged = False
        self.is_conv = isinstance(base, nn.Conv2d)
        self.dropout = nn.Dropout(opts.dropout) if opts.dropout > 0 else nn.Identity()

    # -- what a subclass provides ------------------------------------------------------------
    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(up, down)`` with ``dW = scale * multiplier * up @ down``."""
        raise NotImplementedError

    def adapter_metadata(self) -> dict[str, Any]:
        """Per-layer facts worth saving beside the weights (e.g. OrthA's basis rows)."""
        return {}

    # -- derived -------------------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """The dense update in float32, shaped like a Linear weight (out, in)."""
        up, down = self.factors()
        return (up.float() @ down.float()) * (self.scale * self.multiplier)

    def _project(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.is_conv:
            return F.conv2d(x, weight[:, :, None, None])
        return F.linear(x, weight)

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's own output ``scale * multiplier * up(down(dropout(x)))``, without the base layer's."""
        up, down = self.factors()
        h = self._project(self.dropout(x.to(down.dtype)), down)
        return self._project(h, up) * (self.scale * self.multiplier)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.multiplier == 0.0:
            return self.base(x)
        if x.is_cuda and not self.is_conv and isinstance(self.dropout, nn.Identity):
            return self.fused_forward(x)
        out = self.base(x)
        return out + self.adapter_forward(x).to(out.dtype)

    def fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``base(x) + dW x`` with few kernels, the path CUDA takes (Linear layers, no dropout): the frozen
        layer and the adapter run in one autograd function (:class:`LowRankLinear`) in the activations'
        dtype (under bf16 autocast the input is never copied to float32; the float32 factors are cast, a few
        KB), the up-projection adds itself to the base output inside one GEMM, the scale rides on the GEMMs'
        alpha, and the backward adds the adapter's input gradient into the base's in place. The CPU keeps
        :meth:`adapter_forward`'s reference arithmetic, so CPU results stay bit for bit."""
        w, b = self.base.weight, self.base.bias
        if w.requires_grad or (b is not None and b.requires_grad):  # a trained base: autograd's own path
            out = self.base(x)
            return out + self.adapter_forward(x).to(out.dtype)
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        up, down = self.factors()
        return LowRankLinear.apply(x, w, b, up, down, self.scale * self.multiplier, dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight (``W0 += dW``); the forward pass then skips the adapter."""
        if self.merged:
            return
        w = self.base.weight
        w.data += self.delta_weight().reshape(w.shape).to(w.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the folded update back out of the base weight."""
        if not self.merged:
            return
        w = self.base.weight
        w.data -= self.delta_weight().reshape(w.shape).to(w.dtype)
        self.merged = False

    def extra_repr(self) -> str:
        return (f"type={self.adapter_type}, rank={self.rank}, scale={self.scale:g}, "
                f"in={self.in_features}, out={self.out_features}, merged={self.merged}")


def parse_options(cls: type[AdapterLayer], cfg: dict) -> AdapterOptions:
    """Build ``cls.Options`` from a config dict; unknown keys are an error that lists the valid ones."""
    valid = {f.name for f in dataclasses.fields(cls.Options)}
    unknown = sorted(set(cfg) - valid)
    if unknown:
        raise ConfigError(f"adapter.{unknown[0]}",
                          f"not an option of adapter {cls.adapter_type!r}; valid: {', '.join(sorted(valid))}")
    opts = cls.Options(**cfg)
    opts.validate()
    return opts
