"""A training step captured once as a CUDA graph and replayed: no kernel launches from Python after that.

A LoRA step on an SD1.5-size UNet launches a few thousand kernels, and each adapted layer adds about a
dozen tiny ones (cast, two GEMMs, their backward, the accumulate); on a fast GPU the CPU issuing them, not
the GPU running them, sets the pace (``docs/benchmarks.md``). Capturing the whole step (forward, loss,
backward, optional gradient clipping, optimiser step) replays all of it with one launch, PyTorch's
"whole-network capture" (``torch.cuda.graphs``):

    step = CapturedStep(loss_fn, {"x": x, "t": t, "e": e, "target": y}, optimizer, autocast_dtype=torch.bfloat16)
    for batch in batches:
        loss = step(**batch)        # copied into the captured inputs, then one replay; loss stays on the GPU

What capture needs, checked here: CUDA tensors of fixed shapes (each call copies its tensors into the
captured ones), an optimiser built with ``capturable=True`` (AdamW: ``fused=True, capturable=True``), and
a loss function with no host synchronisation (no ``.item()``, no data-dependent Python branches). Autocast
runs with its weight cache off, as capture requires. Capture first runs ``warmup`` steps on a side stream
(what autograd and cuBLAS need to have set up); the parameters, their gradients and the optimiser's state
are put back afterwards, so the first call is the first training step, as in eager mode.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence

import torch


class CapturedStep:
    """``loss_fn(**inputs)`` -> scalar loss, then backward, clipping to ``clip_norm`` (over ``params``, or the
    optimiser's) and ``optimizer.step()``, captured as one CUDA graph. Call it with tensors shaped like
    ``inputs`` (any subset); it returns the step's loss (a tensor on the GPU, overwritten by the next call)."""

    def __init__(self, loss_fn: Callable[..., torch.Tensor], inputs: Mapping[str, torch.Tensor],
                 optimizer: Optional[torch.optim.Optimizer] = None, *, autocast_dtype: Optional[torch.dtype] = None,
                 clip_norm: Optional[float] = None, params: Optional[Sequence[torch.Tensor]] = None,
                 warmup: int = 3):
        if not torch.cuda.is_available():
            raise RuntimeError("CapturedStep needs a CUDA device (CUDA graphs); run the step eagerly elsewhere")
        not_cuda = [k for k, v in inputs.items() if not (torch.is_tensor(v) and v.is_cuda)]
        if not_cuda:
            raise ValueError(f"CapturedStep inputs must be CUDA tensors; not: {', '.join(not_cuda)}")
        if optimizer is not None and not all(g.get("capturable") for g in optimizer.param_groups):
            raise ValueError("CapturedStep needs an optimiser built with capturable=True "
                             "(e.g. torch.optim.AdamW(params, fused=True, capturable=True))")
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1, got {warmup}")
        self.optimizer = optimizer
        self.params = list(params) if params is not None else \
            [p for g in (optimizer.param_groups if optimizer is not None else []) for p in g["params"]]
        # the captured inputs: the graph reads these addresses at every replay
        self.inputs = {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in inputs.items()}
        self._leaves = [v for v in self.inputs.values() if v.requires_grad]
        dtype = autocast_dtype

        def run() -> torch.Tensor:
            with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None,
                                cache_enabled=False):
                loss = loss_fn(**self.inputs)
            loss.backward()
            if clip_norm is not None and self.params:
                torch.nn.utils.clip_grad_norm_(self.params, clip_norm, foreach=True)
            if optimizer is not None:
                optimizer.step()
            return loss.detach()

        saved = self._snapshot()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self._clear_grads()
                run()
        torch.cuda.current_stream().wait_stream(side)
        self._clear_grads()  # the graph's backward allocates the gradients from its own pool
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss = run()
        self._restore(saved)

    def _clear_grads(self) -> None:
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        for t in [*self.params, *self._leaves]:
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
