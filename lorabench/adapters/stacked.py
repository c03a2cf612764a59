"""K adapters of one type stacked in one model, each sample routed through its own.

Training many small adapters one after another leaves a GPU idle: each step is a few hundred tiny
kernels. Stacking them is what serving systems do for inference (S-LoRA, Punica): the K adapters'
tensors are stacked along a new leading dimension, the batch holds every adapter's samples, and each
adapted layer applies sample ``i``'s own factors to it,

    y_i = W0 x_i + scale * up[a_i] @ (down[a_i] @ x_i),

in two batched matrix products (``torch.bmm``). The factors come from the adapter class's own
:meth:`~lorabench.adapters.base.AdapterLayer.factors`, vectorised over the K stacked tensors with
``torch.func.vmap``, so every factors-based adapter (LoRA, OrthA, TriLoRA) stacks without code of its
own; an adapter that trains a dense update (Custom Diffusion) has it applied directly. Gradients reach
only the slice of the adapter a sample was routed to.

- :class:`Router` holds the routing of the current batch: how many samples each adapter has (the batch
  holds them adapter by adapter), or an explicit per-sample index. Every stacked layer of one model
  shares it.
- :class:`StackedLayer` replaces one adapted layer.
- :class:`StackedAdapters` stacks K :class:`~lorabench.adapters.injection.Adapters` of one config
  (built and initialised one by one, exactly as K separate runs build them) and gives each back, its
  layers holding their trained values, by :meth:`StackedAdapters.unstack`.
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from lorabench.adapters.base import AdapterLayer, cast_factors_of
from lorabench.adapters.fused import compute_dtype
from lorabench.adapters.injection import Adapters, _set_module
from lorabench.errors import ConfigError


class Router:
    """Which stacked adapter each sample of the current batch goes through. ``counts[k]`` samples of
    adapter ``k``, adapter by adapter (the common case: equal counts use one reshaped batch and no
    gather); or ``index``, one adapter per sample, in any order."""

    def __init__(self, k: int):
        self.k = k
        self.counts: Optional[list[int]] = None
        self.index: Optional[torch.Tensor] = None
        self._rows: dict = {}  # member_rows of the current route, by (batch size, device)

    @contextmanager
    def route(self, counts: Optional[Sequence[int]] = None, index: Optional[torch.Tensor] = None) -> Iterator[None]:
        """Route the forward passes of the ``with`` block: ``counts`` per adapter, or ``index`` per sample."""
        if (counts is None) == (index is None):
            raise ValueError("give counts or index")
        if counts is not None and (len(counts) != self.k or min(counts) < 0):
            raise ValueError(f"counts needs {self.k} non-negative entries, got {list(counts)}")
        old = self.counts, self.index, self._rows
        self.counts = list(counts) if counts is not None else None
        self.index, self._rows = index, {}
        try:
            yield
        finally:
            self.counts, self.index, self._rows = old

    def sample_index(self, n: int, device) -> torch.Tensor:
        """The adapter of each of ``n`` rows. ``n`` may be a multiple of the routed samples: the batch then
        holds them that many times, copy after copy (how layer-wise tokens encode a prompt once per UNet
        layer, :func:`lorabench.models.encode_prompts`)."""
        if self.index is None and self.counts is None:
            raise RuntimeError("a stacked adapter ran outside Router.route(): say which adapter each sample uses")
        index = self.index.to(device) if self.index is not None else torch.repeat_interleave(
            torch.arange(self.k, device=device), torch.tensor(self.counts, device=device))
        if len(index) == 0 or n % len(index):
            raise RuntimeError(f"the router routes {len(index)} samples, the layer got a batch of {n}")
        return index.repeat(n // len(index))

    def member_rows(self, n: int, device) -> list:
        """Each adapter's rows of a batch of ``n``: a slice where the batch is routed adapter by adapter,
        else an index tensor; None for an adapter with no rows. Worked out once per route and batch size,
        not in every adapted layer."""
        key = (n, str(device))
        if key not in self._rows:
            if self.counts is not None and sum(self.counts) == n:
                starts = [0, *itertools.accumulate(self.counts)]
                rows = [slice(a, a + c) if c else None for a, c in zip(starts, self.counts)]
            else:
                idx = self.sample_index(n, device)
                rows = [r if len(r) else None for r in ((idx == k).nonzero().squeeze(1) for k in range(self.k))]
            self._rows[key] = rows
        return self._rows[key]


class _Factors(nn.Module):
    """Calls a layer's ``factors()`` as ``forward``, so ``torch.func.functional_call`` can swap its tensors."""

    def __init__(self, layer: AdapterLayer):
        super().__init__()
        self.layer = layer

    def forward(self):
        return self.layer.factors()


class _AdapterOutput(nn.Module):
    """Calls a layer's ``adapter_forward`` as ``forward`` (for ``torch.func.functional_call``)."""

    def __init__(self, layer: AdapterLayer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer.adapter_forward(x)


class StackedLayer(nn.Module):
    """K adapter layers of one type on one base layer. Their parameters and buffers are stacked
    (``lora_up``: (K, out, r), ...) under the same names; ``forward`` routes each sample through its own."""

    def __init__(self, layers: Sequence[AdapterLayer], router: Router):
        super().__init__()
        first = layers[0]
        for layer in layers:
            if layer.base is not first.base or type(layer) is not type(first):
                raise ValueError("stacked layers must be of one type on one base layer")
            if layer.scale != first.scale or layer.multiplier != first.multiplier:
                raise ConfigError("adapter.alpha", "stacked adapters need one scale (alpha / rank)")
            if not isinstance(layer.dropout, nn.Identity):
                raise ConfigError("adapter.dropout", "stacked adapters need dropout 0 (each sample would draw "
                                  "its mask from one shared generator, not its own run's)")
        self.base, self.router, self.name = first.base, router, first.name
        self.is_conv, self.scale, self.k = first.is_conv, first.scale * first.multiplier, len(layers)
        self.dense = type(first).dense_update  # the parameter holding a dense dW, applied directly
        # adapters whose forward is the base class's (LoRA, OrthA) run it here on stacked factors
        self.plain = type(first).adapter_forward is AdapterLayer.adapter_forward and not self.dense
        self.in_features, self.out_features = first.in_features, first.out_features
        # in a list, not a submodule: the template's own tensors stay out of the model's
        self._template_list = [_Factors(first), _AdapterOutput(first)]
        self.param_names = [n for n, _ in first.named_parameters(recurse=False)]
        self.buffer_names = [n for n, _ in first.named_buffers(recurse=False)]
        for n, p in first.named_parameters(recurse=False):
            stacked = torch.stack([layer.get_parameter(n).detach() for layer in layers]).clone()
            self.register_parameter(n, nn.Parameter(stacked, requires_grad=p.requires_grad))
        for n in self.buffer_names:
            self.register_buffer(n, torch.stack([layer.get_buffer(n) for layer in layers]).clone())

    def stacked_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(up, down)`` of every adapter, stacked: (K, out, r) and (K, r, in)."""
        template = self._template_list[0]
        names = self.param_names + self.buffer_names
        tensors = tuple(getattr(self, n) for n in names)

        def one(*ts):
            return torch.func.functional_call(template, {f"layer.{n}": t for n, t in zip(names, ts)}, ())

        return torch.func.vmap(one)(*tensors)

    def member_tensors(self, k: int) -> dict[str, torch.Tensor]:
        """Adapter ``k``'s tensors (slices of the stacked ones, so gradients reach the stack)."""
        return {f"layer.{n}": getattr(self, n)[k] for n in self.param_names + self.buffer_names}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.batched_forward(x) if x.is_cuda else self.member_forward(x)

    def chain(self) -> list[torch.Tensor]:
        """Each adapter's chain of matrices, stacked, applied right to left: ``[down, up]``, or the dense dW
        alone."""
        return [getattr(self, self.dense)] if self.dense else list(reversed(self.stacked_factors()))

    def castable_factors(self, device_type: str) -> Optional[tuple[torch.Tensor, ...]]:
        """:meth:`chain` for :func:`~lorabench.adapters.base.factors_cast_once` to cast, for
        :meth:`batched_forward` (what CUDA runs) on ``device_type``; None for layers elsewhere."""
        return tuple(self.chain()) if self.base.weight.device.type == device_type else None

    def batched_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The accelerator's arithmetic: every adapter at once in two batched products (equal to
        :meth:`member_forward` up to rounding), in the activations' dtype as :meth:`AdapterLayer.fused_forward`
        computes: the factors are cast to it (under bf16 autocast the input is never copied to float32 and
        back), and the scale multiplies the rank-r tensor, not the output (not at all when it is 1)."""
        out = self.base(x)
        cast, autocast = cast_factors_of(self), compute_dtype(x.device.type, None)
        if cast is not None and cast[0] == autocast:
            dtype, chain = cast[0], list(cast[1:])  # cast by factors_cast_once
        else:
            chain = self.chain()
            dtype = autocast or chain[0].dtype
        n = x.shape[0]
        if self.is_conv:  # (B, C, H, W) -> (B, HW, C)
            xs = x.flatten(2).transpose(1, 2)
        else:
            xs = x.reshape(n, -1, x.shape[-1])
        y = xs.to(dtype)
        counts = self.router.counts
        if counts is not None and len(set(c for c in counts if c)) == 1 and sum(counts) == n:
            # every adapter in use has the same number of samples, adapter by adapter: one reshape, no gather
            used = [k for k, c in enumerate(counts) if c]
            y = y.reshape(len(used), -1, y.shape[-1])
            mats = [m[used] if len(used) < self.k else m for m in chain]
        else:
            idx = self.router.sample_index(n, x.device)
            mats = [m[idx] for m in chain]
        for i, m in enumerate(mats):
            y = torch.bmm(y, m.to(dtype).transpose(1, 2))
            if i == 0 and self.scale != 1.0:  # on the rank-r tensor (the dense dW's output, alone)
                y = y * self.scale
        y = y.reshape(n, -1, self.out_features)
        y = y.transpose(1, 2).reshape(out.shape) if self.is_conv else y.reshape(out.shape)
        return out + y.to(out.dtype)

    def member_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reference arithmetic (the CPU's): each adapter's own ``adapter_forward`` on its own rows, in
        the order they have in the batch. A member's rows are the tensor its own run would see, so the
        same kernels on the same shapes give its run's outputs and gradients bit for bit, not merely to
        rounding (which AdamW's normalised steps would amplify over a run)."""
        out = self.base(x)
        rows = self.router.member_rows(x.shape[0], x.device)
        if self.plain:  # the base class's adapter_forward: scale * up(down(x)), on one vmapped factors() call
            up, down = self.stacked_factors()
            project = self._template_list[0].layer._project  # the members' own (Linear or 1x1 conv)
            member = lambda k, xk: project(project(xk.to(down.dtype), down[k]), up[k]) * self.scale  # noqa: E731
        else:
            member = lambda k, xk: torch.func.functional_call(  # noqa: E731
                self._template_list[1], self.member_tensors(k), (xk,))
        if all(r is None or isinstance(r, slice) for r in rows):  # the members' outputs, in batch order
            return out + torch.cat([member(k, x[r]).to(out.dtype) for k, r in enumerate(rows) if r is not None])
        delta = torch.zeros_like(out)
        for k, r in enumerate(rows):
            if r is not None:
                delta = delta.index_copy(0, r, member(k, x[r]).to(out.dtype))
        return out + delta

    @torch.no_grad()
    def write_back(self, k: int, layer: AdapterLayer) -> None:
        """Copy adapter ``k``'s trained tensors into ``layer`` (its own, unstacked layer), in the stack's dtype:
        the members were taken out before Lightning cast the model (``trainer.precision=64-true``), and a
        member's files hold what a run of its own would, float64 there."""
        own = [*((n, layer.get_parameter(n)) for n in self.param_names),
               *((n, layer.get_buffer(n)) for n in self.buffer_names)]
        for n, t in own:
            src = getattr(self, n)[k]
            if t.dtype != src.dtype:
                t.data = t.data.to(src.dtype)
            t.copy_(src)

    def extra_repr(self) -> str:
        return f"k={self.k}, in={self.in_features}, out={self.out_features}, scale={self.scale:g}"


def take_out(adapters: Adapters) -> None:
    """Put the base layers back in place of ``adapters``' layers, keeping the layers themselves (to
    stack them; :meth:`Adapters.remove` would also forget them)."""
    for full, layer in adapters.layers.items():
        prefix, _, path = full.partition(".")
        root = adapters._roots[prefix]
        parent_path, _, leaf = path.rpartition(".")
        if getattr(root.get_submodule(parent_path) if parent_path else root, leaf) is layer:
            _set_module(root, path, layer.base)


class StackedAdapters:
    """K injected :class:`Adapters` of one type and targets, stacked into one model.

    Build each member exactly as its own run would (inject, initialise, load an initial state), then
    stack them: each is taken out of the model again and every adapted layer is replaced by one
    :class:`StackedLayer`. :meth:`trainable_parameters` is what one optimiser trains (stacked tensors:
    element-wise optimisers such as AdamW then update every member as its own run would);
    :meth:`unstack` gives member ``k`` back as plain :class:`Adapters`, holding its trained values.
    """

    def __init__(self, members: Sequence[Adapters]):
        if not members:
            raise ValueError("nothing to stack")
        first = members[0]
        for m in members:
            if m.adapter_type != first.adapter_type or list(m.layers) != list(first.layers):
                raise ConfigError("adapter", "stacked adapters need one type and the same target layers")
            if m.merged:
                raise ValueError("unmerge adapters before stacking them")
        self.members = list(members)
        self.adapter_type = first.adapter_type
        self.config = first.config
        self.router = Router(len(members))
        self._roots = first._roots
        for m in members:  # every member wraps the same base layers
            take_out(m)
        self.layers: dict[str, StackedLayer] = {}
        for full in first.layers:
            stacked = StackedLayer([m.layers[full] for m in members], self.router)
            prefix, _, path = full.partition(".")
            _set_module(self._roots[prefix], path, stacked)
            self.layers[full] = stacked

    def __len__(self) -> int:
        return len(self.members)

    def parameters(self, prefix: Optional[str] = None) -> Iterator[nn.Parameter]:
        """The stacked tensors (optionally only those under ``prefix``: unet, text_encoder)."""
        for full, layer in self.layers.items():
            if prefix is None or full.startswith(prefix + "."):
                yield from layer.parameters(recurse=False)

    def trainable_parameters(self, prefix: Optional[str] = None) -> list[nn.Parameter]:
        """The stacked tensors the optimiser trains, in the order one member's own would be listed."""
        return [p for p in self.parameters(prefix) if p.requires_grad]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The stacked tensors, keyed ``<layer>.<tensor>`` (each with the members along dim 0)."""
        return {f"{full}.{n}": t.detach() for full, layer in self.layers.items()
                for n, t in [*layer.named_parameters(recurse=False), *layer.named_buffers(recurse=False)]}

    def member_grads(self, k: int) -> list[torch.Tensor]:
        """Member ``k``'s slices of the trainable tensors' gradients (views: scaling them scales the grads)."""
        return [p.grad[k] for p in self.trainable_parameters() if p.grad is not None]

    def unstack(self, k: int) -> Adapters:
        """Member ``k`` as plain :class:`Adapters` (not in the model) holding its current values."""
        member = self.members[k]
        for full, layer in member.layers.items():
            self.layers[full].write_back(k, layer)
        return member

    @contextmanager
    def member_in_model(self, k: int) -> Iterator[Adapters]:
        """Member ``k`` alone in the model for the ``with`` block, holding its current values (to sample,
        score or measure it as its own run would); the stacked layers come back afterwards."""
        member = self.unstack(k)
        for full, layer in member.layers.items():
            prefix, _, path = full.partition(".")
            layer.to(device=self.layers[full].base.weight.device)
            _set_module(self._roots[prefix], path, layer)
        try:
            yield member
        finally:
            for full, layer in self.layers.items():
                prefix, _, path = full.partition(".")
                _set_module(self._roots[prefix], path, layer)

    def remove(self) -> None:
        """Put the base layers back."""
        for full, layer in self.layers.items():
            prefix, _, path = full.partition(".")
            _set_module(self._roots[prefix], path, layer.base)
        self.layers = {}

    def __repr__(self) -> str:
        return f"StackedAdapters(type={self.adapter_type!r}, k={len(self)}, layers={len(self.layers)})"
