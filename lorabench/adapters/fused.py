"""The arithmetic of the adapter layers' CUDA path: few kernels a layer.

On a GPU a LoRA training step is launch-bound: each adapted layer adds a dozen tiny kernels to the frozen
model's. :class:`LowRankLinear` computes a frozen Linear and its low-rank update as one autograd function
with a hand-written backward; :func:`cast_together` casts many tensors (every layer's factors) to one
dtype in one go, so the per-layer casts of a bf16 step become a few kernels for the whole model
(:func:`lorabench.adapters.base.factors_cast_once`). The CPU keeps the reference arithmetic
(:meth:`lorabench.adapters.base.AdapterLayer.adapter_forward`); ``tests/test_adapters.py`` checks that the
two agree, and counts the operators (:func:`lorabench.utils.launches.count_ops`).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Optional, Sequence

import torch


def compute_dtype(device_type: str, default: Optional[torch.dtype]) -> Optional[torch.dtype]:
    """The dtype an op computes in on ``device_type``: autocast's when it is on there, else ``default``."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else default


def _scaled_mm(a: torch.Tensor, b: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """``scale * a @ b`` in ``dtype``: one GEMM (the scale its alpha; ``beta=0`` reads no input), and one
    cast when ``dtype`` is not the operands'."""
    y = a @ b if scale == 1.0 else torch.addmm(a.new_empty(()), a, b, beta=0, alpha=scale)
    return y if y.dtype == dtype else y.to(dtype)


class LowRankLinear(torch.autograd.Function):
    """``x W^T + b + s (x D^T) U^T`` for a frozen Linear ``(W, b)`` and factors ``(U, D)``, computed in
    ``dtype`` with a hand-written backward. Over the frozen layer's own operators (kernels, on a GPU) in a
    training step it adds ten, nine where the input needs no gradient: casting D and U, ``x D^T``, the
    ``addmm_`` of the update into the output; ``g U``, the input gradient's ``addmm_``, and the two factor
    gradients, each a GEMM with the scale as its alpha and a cast into the factor's dtype. Given factors
    already in ``dtype`` (:func:`cast_together`) it adds six. Autograd's graph of the same arithmetic
    dispatched 14.3 a layer in SD1.5's UNet (the input gradients summed apart, the clone and copies of an
    in-place update on a view; ``bench/bench_lora_overhead.py --count``). Gradients flow to ``x``, ``U``
    and ``D`` only: the frozen weight and bias get none (the caller checks they are frozen)."""

    @staticmethod
    def forward(ctx, x, weight, bias, up, down, scale: float, dtype: torch.dtype):
        """The layer's output in ``dtype``; saves the input, the cast weight and factors and ``x D^T``."""
        # every operand is in ``dtype`` (autocast's, when it is on), so autocast casts nothing here
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
            gdown = _scaled_mm(gu.t(), x2, s, ctx.down_dtype)
        if need_up:
            gup = _scaled_mm(g.t(), h, s, ctx.up_dtype)
        return gx, None, None, gup, gdown, None, None


def _by_shape(tensors: Sequence[torch.Tensor]) -> list[list[int]]:
    """The indices of ``tensors``, grouped by shape (first appearance order)."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        groups[t.shape].append(i)
    return list(groups.values())


def _cast_stacked(tensors: Sequence[torch.Tensor], groups: list[list[int]], dtype: torch.dtype) -> list:
    """``tensors`` in ``dtype``: each group of one shape stacked and cast (two kernels), then unbound."""
    out: list = [None] * len(tensors)
    for index in groups:
        for i, c in zip(index, torch.stack([tensors[i] for i in index]).to(dtype).unbind(0)):
            out[i] = c
    return out


class CastTensors(torch.autograd.Function):
    """Tensors of one dtype cast to ``dtype`` together: those of one shape stacked and cast in two kernels
    forward, their gradients likewise back (the outputs and the gradients are slices of one stack per
    shape: a few Python calls a shape, not a few a tensor), where casting each alone costs a kernel each way
    per tensor."""

    @staticmethod
    def forward(ctx, dtype: torch.dtype, *tensors):
        """The tensors in ``dtype``."""
        ctx.groups, ctx.dtype = _by_shape(tensors), tensors[0].dtype
        return tuple(_cast_stacked(tensors, ctx.groups, dtype))

    @staticmethod
    def backward(ctx, *grads):
        """The gradients in the tensors' own dtype (an output left unused gets zeros)."""
        return (None, *_cast_stacked(grads, ctx.groups, ctx.dtype))


def cast_together(tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """``[t.to(dtype) for t in tensors]`` with a few kernels instead of one per tensor (two per shape, device
    and source dtype): those that need gradients through one :class:`CastTensors`, the others without a
    graph. Tensors already in ``dtype`` come back as they are."""
    out: list = list(tensors)
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        if t.dtype != dtype:
            groups[t.device, t.dtype, t.requires_grad and torch.is_grad_enabled()].append(i)
    for (_, _, grad), index in groups.items():
        group = [tensors[i] for i in index]
        if grad:
            cast = CastTensors.apply(dtype, *group)
        else:
            with torch.no_grad():
                cast = _cast_stacked(group, _by_shape(group), dtype)
        for i, c in zip(index, cast):
            out[i] = c
    return out
