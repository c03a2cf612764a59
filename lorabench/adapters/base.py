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
        out = self.base(x)
        if self.merged or self.multiplier == 0.0:
            return out
        if x.is_cuda and not self.is_conv and isinstance(self.dropout, nn.Identity):
            return self.fused_forward(x, out)
        return out + self.adapter_forward(x).to(out.dtype)

    def fused_forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out + dW x`` with few kernels, the path CUDA takes (Linear layers, no dropout): the adapter
        runs in the activations' dtype (under bf16 autocast the input is never copied to float32; the
        float32 factors are cast, a few KB), the scale multiplies the rank-r tensor, not the output,
        and the up-projection adds itself to the base output inside one GEMM (``addmm_``). The CPU
        keeps :meth:`adapter_forward`'s reference arithmetic, so CPU results stay bit for bit."""
        up, down = self.factors()
        h = F.linear(x.to(out.dtype), down.to(out.dtype))
        s = self.scale * self.multiplier
        if s != 1.0:
            h = h * s
        out.view(-1, out.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), up.to(out.dtype).t())
        return out

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
