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
from contextlib import contextmanager
from typing import Any, ClassVar, Iterable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lorabench.adapters.fused import LowRankLinear, cast_together, compute_dtype
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
        alpha = self.alpha
        if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0):
            # 0: a scale of 0, so the adapter adds nothing and its gradients are 0 (a run that trained nothing)
            raise ConfigError("adapter.alpha", f"must be null (alpha = rank: scale 1) or a number > 0, got {alpha!r}")


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
        if self.merged or self.multiplier == 0.0:
            return self.base(x)
        if x.is_cuda and self.fusable():
            return self.fused_forward(x)
        return self.reference_forward(x)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``base(x) + adapter_forward(x)``: the reference arithmetic, the CPU's path."""
        out = self.base(x)
        return out + self.adapter_forward(x).to(out.dtype)

    def fusable(self) -> bool:
        """Whether :meth:`fused_forward` can compute this layer: a Linear without dropout."""
        return not self.is_conv and isinstance(self.dropout, nn.Identity)

    def castable_factors(self, device_type: str) -> Optional[tuple[torch.Tensor, ...]]:
        """``(up, down)`` for :func:`factors_cast_once` to cast, when this layer runs :meth:`fused_forward`
        (this class's own) on ``device_type``; None otherwise."""
        if (self.fusable() and not self.merged and self.multiplier != 0.0
                and type(self).fused_forward is AdapterLayer.fused_forward
                and self.base.weight.device.type == device_type):
            return self.factors()
        return None

    def fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``base(x) + dW x`` with few kernels, the path CUDA takes (Linear layers, no dropout): the frozen
        layer and the adapter run in one autograd function (:class:`LowRankLinear`) in the activations'
        dtype (under bf16 autocast the input is never copied to float32; the float32 factors are cast, a few
        KB), the up-projection adds itself to the base output inside one GEMM, the scale rides on the GEMMs'
        alpha, and the backward adds the adapter's input gradient into the base's in place. The CPU keeps
        :meth:`adapter_forward`'s reference arithmetic, so CPU results stay bit for bit."""
        w, b = self.base.weight, self.base.bias
        if w.requires_grad or (b is not None and b.requires_grad):  # a trained base: autograd's own path
            return self.reference_forward(x)
        dtype = compute_dtype(x.device.type, x.dtype)
        cast = cast_factors_of(self)
        up, down = cast[1:] if cast is not None and cast[0] == dtype else self.factors()
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


# {id(module): (dtype, *cast factors)} while a factors_cast_once block runs, else None. A module global, not a
# ContextVar: torch.compile traces a global that is None (no block runs in a compiled UNet's step) but breaks
# its graph at every ContextVar.get. One training step runs at a time in a process.
_CASTS: Optional[dict[int, tuple]] = None


def cast_factors_of(module: nn.Module) -> Optional[tuple]:
    """``(dtype, *factors)`` that :func:`factors_cast_once` cast for ``module`` in the running block, or None."""
    return _CASTS.get(id(module)) if _CASTS else None


@contextmanager
def factors_cast_once(modules: Iterable[nn.Module], device_type: str = "cuda") -> Iterator[None]:
    """For the ``with`` block (a training step's forward and loss, under ``device_type``'s autocast): the
    factors of every module among ``modules`` that has some to cast (``castable_factors``: an adapter layer
    on the fused path, :meth:`AdapterLayer.castable_factors`; K stacked ones on the batched path) cast to
    autocast's dtype together (:func:`~lorabench.adapters.fused.cast_together`: two kernels a shape each
    way), not layer by layer (two kernels a factor each way). Outside autocast it does nothing (the factors
    are used as they are). Gradients reach the factors through the cast as before; a layer run again after
    the block (a checkpointed block's recomputation) casts its own."""
    casts: dict[int, tuple] = {}
    dtype = compute_dtype(device_type, None)
    if dtype is not None:
        entries = []
        for m in modules:
            castable = getattr(m, "castable_factors", None)
            tensors = castable(device_type) if castable is not None else None
            if tensors:
                entries.append((m, tensors))
        if entries:
            cast = iter(cast_together([t for _, tensors in entries for t in tensors], dtype))
            casts = {id(m): (dtype, *(next(cast) for _ in tensors)) for m, tensors in entries}
    global _CASTS
    outer, _CASTS = _CASTS, casts or None
    try:
        yield
    finally:
        _CASTS = outer


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
