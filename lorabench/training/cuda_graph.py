"""A training step captured once as a CUDA graph and replayed: no kernel launches from Python after that.

A LoRA step on an SD1.5-size UNet launches a few thousand kernels, and each adapted layer adds about a
dozen tiny ones (cast, two GEMMs, their backward, the accumulate); on a fast GPU the CPU issuing them, not
the GPU running them, sets the pace (``docs/benchmarks.md``: on an H200 a captured LoRA step took 0.29x
the eager step's time). Capturing the whole step (forward, loss, backward, gradient clipping, optimiser
step) replays all of it with one launch, PyTorch's "whole-network capture" (``torch.cuda.graphs``):

    step = CapturedStep(loss_fn, {"x": x, "t": t, "e": e, "target": y}, optimizer)
    for batch in batches:
        loss = step(**batch)        # copied into the captured inputs, then one replay; loss stays on the GPU

What capture needs, checked here: CUDA tensors of fixed shapes (each call copies its tensors into the
captured ones), an optimiser built with ``capturable=True`` (AdamW: ``fused=True, capturable=True``), and
a loss function with no host synchronisation (no ``.item()``, no data-dependent Python branches). Autocast
(the caller's, or ``autocast_dtype``) runs with its weight cache off, as capture requires. Capture first
runs ``warmup`` steps on a side stream (what autograd and cuBLAS need to have set up); the parameters and
the optimiser's state are put back afterwards, so the first call is the first training step, as in eager
mode.

``graph=False`` runs the same step eagerly (zero the gradients, loss, backward, hook, optimiser step) on
any device: the path a CPU takes, so a training loop written around a step has one code path, and tests
on the CPU check everything but the capture.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Mapping, Optional, Sequence, Union

import torch

LossOutput = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]


class CapturedStep:
    """``loss_fn(**inputs)`` -> a scalar loss (or ``(loss, aux)``: a tensor the caller wants back, e.g.
    per-run losses), then backward, ``after_backward()`` (e.g. gradient clipping; it may return a tensor,
    e.g. the norms, kept as :attr:`hook_out`), clipping to ``clip_norm`` over ``params`` (or the optimiser's),
    and ``optimizer.step()``, captured as one CUDA graph. Call it with tensors shaped like ``inputs`` (any
    subset); it returns the step's loss. With a graph, the loss, :attr:`aux` and :attr:`hook_out` are the
    captured tensors: the next call overwrites them (clone what you keep)."""

    def __init__(self, loss_fn: Callable[..., LossOutput], inputs: Mapping[str, torch.Tensor],
                 optimizer: Optional[torch.optim.Optimizer] = None, *, autocast_dtype: Optional[torch.dtype] = None,
                 clip_norm: Optional[float] = None, params: Optional[Sequence[torch.Tensor]] = None,
                 after_backward: Optional[Callable[[], Optional[torch.Tensor]]] = None, warmup: int = 3,
                 graph: Optional[bool] = None):
        tensors = [v for v in inputs.values() if torch.is_tensor(v)]
        if len(tensors) != len(inputs):
            raise ValueError(f"CapturedStep inputs must be tensors; not: "
                             f"{', '.join(k for k, v in inputs.items() if not torch.is_tensor(v))}")
        on_cuda = all(v.is_cuda for v in tensors)
        self.graphed = on_cuda if graph is None else bool(graph)
        if self.graphed:
            if not torch.cuda.is_available():
                raise RuntimeError("CapturedStep needs a CUDA device (CUDA graphs); run the step eagerly elsewhere "
                                   "(graph=False)")
            if not on_cuda:
                raise ValueError(f"CapturedStep inputs must be CUDA tensors; not: "
                                 f"{', '.join(k for k, v in inputs.items() if not v.is_cuda)}")
            if optimizer is not None and not all(g.get("capturable") for g in optimizer.param_groups):
                raise ValueError("CapturedStep needs an optimiser built with capturable=True "
                                 "(e.g. torch.optim.AdamW(params, fused=True, capturable=True))")
            if warmup < 1:
                raise ValueError(f"warmup must be >= 1, got {warmup}")
        self.loss_fn, self.optimizer, self.clip_norm = loss_fn, optimizer, clip_norm
        self.after_backward = after_backward
        self.params = list(params) if params is not None else \
            [p for g in (optimizer.param_groups if optimizer is not None else []) for p in g["params"]]
        self.autocast_dtype = autocast_dtype
        self.device_type = "cuda" if on_cuda else "cpu"
        self.loss: Optional[torch.Tensor] = None
        self.aux: Optional[torch.Tensor] = None
        self.hook_out: Optional[torch.Tensor] = None
        if not self.graphed:
            return
        # the captured inputs: the graph reads these addresses at every replay
        self.inputs = {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in inputs.items()}
        self._leaves = [v for v in self.inputs.values() if v.requires_grad]
        saved = self._snapshot()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self._clear_grads()
                self._run(self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        self._clear_grads()  # the graph's backward allocates the gradients from its own pool
        torch.clear_autocast_cache()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss, self.aux, self.hook_out = self._run(self.inputs)
        self._restore(saved)

    def _autocast(self):
        """The step's autocast: ``autocast_dtype`` if given, else the caller's (e.g. Lightning's bf16-mixed),
        in either case without the weight cache (a cast cached outside a capture would be replayed stale)."""
        if self.autocast_dtype is not None:
            return torch.autocast(self.device_type, dtype=self.autocast_dtype, cache_enabled=False)
        if self.graphed and torch.is_autocast_enabled("cuda"):
            return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)
        return nullcontext()

    def _run(self, inputs: Mapping[str, torch.Tensor]):
        with self._autocast():
            out = self.loss_fn(**inputs)
        loss, aux = out if isinstance(out, tuple) else (out, None)
        loss.backward()
        hook_out = self.after_backward() if self.after_backward is not None else None
        if self.clip_norm is not None and self.params:
            torch.nn.utils.clip_grad_norm_([p for p in self.params if p.grad is not None], self.clip_norm,
                                           foreach=self.graphed or None)
        if self.optimizer is not None:
            self.optimizer.step()
        return (loss.detach(), None if aux is None else aux.detach(),
                None if hook_out is None else hook_out.detach())

    def _clear_grads(self) -> None:
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        for t in [*self.params, *getattr(self, "_leaves", [])]:
            t.grad = None

    def _snapshot(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(tensor, copy) of every parameter and optimiser-state tensor the warm-up steps change."""
        tensors = list(self.params)
        if self.optimizer is not None:
            tensors += [v for state in self.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
        return [(t, t.detach().clone()) for t in tensors]

    @torch.no_grad()
    def _restore(self, saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Undo the warm-up: parameters back in place (the graph holds their addresses); optimiser state
        created during warm-up (AdamW's moments and step count) zeroed, as before a first step."""
        known = {id(t) for t, _ in saved}
        for t, copy in saved:
            t.copy_(copy)
        if self.optimizer is not None:
            for state in self.optimizer.state.values():
                for v in state.values():
                    if torch.is_tensor(v) and id(v) not in known:
                        v.zero_()

    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor:
        if not self.graphed:
            self._clear_grads()
            self.loss, self.aux, self.hook_out = self._run(inputs)
            return self.loss
        with torch.no_grad():
            for k, v in inputs.items():
                if k not in self.inputs:
                    raise KeyError(f"{k!r} is not an input of this step; its inputs: {', '.join(self.inputs)}")
                if v.shape != self.inputs[k].shape:
                    raise ValueError(f"input {k!r} has shape {tuple(v.shape)}; the step was captured with "
                                     f"{tuple(self.inputs[k].shape)}")
                self.inputs[k].copy_(v, non_blocking=True)
        self.graph.replay()
        return self.loss
