"""How many operators a call dispatches: on a GPU each is about one kernel launch, so the count says what a
training step launches on any device, and a CPU can check a change to the CUDA path's arithmetic
(``bench/bench_lora_overhead.py --count``, ``tests/test_adapters.py``)."""

from __future__ import annotations

from typing import Callable

from torch.utils._python_dispatch import TorchDispatchMode

# What launches nothing: views, metadata and allocations, and the profiler's record-function markers.
FREE = frozenset({
    "view", "_unsafe_view", "t", "transpose", "expand", "detach", "alias", "as_strided", "unsqueeze", "squeeze",
    "split", "split_with_sizes", "slice", "select", "permute", "reshape", "unbind", "empty", "empty_like",
    "empty_strided", "_reshape_alias", "lift_fresh", "_record_function_enter_new", "_record_function_exit"})


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func.overloadpacket.__name__ not in FREE
        return func(*args, **(kwargs or {}))


def count_ops(fn: Callable[[], object]) -> int:
    """The operators one call of ``fn`` dispatches (forward, backward and optimiser alike), those in
    :data:`FREE` aside. A fused optimiser's one operator launches a few kernels."""
    with _Count() as c:
        fn()
    return c.n
