"""Merge methods, registered by name (``merge.name=<name>``), each one function of per-layer updates.

Every method takes the adapters' :class:`~lorabench.merging.updates.AdapterUpdate` s and returns
``{layer: LayerDelta}``, the merged update ``W - W0`` of every layer. ``W0`` itself is never needed:

- ``sum`` (FedAvg in Orthogonal Adaptation's table): ``dW = lam * sum_i dW_i`` (lam 0.6 as in the
  paper; the FedAvg weight and the LoRA scale folded together). Exact, kept low rank.
- ``task_arithmetic`` (Ilharco et al. 2023): ``lam * sum_i tau_i`` with the task vector
  ``tau_i = dW_i``: the same algebra as ``sum``, its own name for its own default (lam 1.0).
- ``ties`` (Yadav et al. 2023): on each full ``dW_i``, keep the ``density`` share of largest
  magnitudes (trim), elect each entry's sign as the sign of the trimmed sum, average the entries that
  agree with it (disjoint mean), times lam.
- ``dare`` (Yu et al. 2024): drop each entry of each ``dW_i`` with probability ``drop`` and
  rescale the rest by ``1 / (1 - drop)`` (seeded, per adapter and layer), then ``lam * sum``.
- ``svd``: the exact ``lam * sum``, truncated to its best rank-``rank`` approximation (rank null:
  the largest input rank), with the dropped energy reported.
- ``gradient_fusion`` (Mix-of-Show): per layer, ``W`` minimising
  ``sum_i ||(W0 + dW_i) X_i - W X_i||^2 + rho ||W - W0||^2`` on captured input statistics
  ``G_i = X_i X_i^T / n_i`` (see :mod:`lorabench.merging.capture`). In ``D = W - W0`` this is
  ``sum_i tr((dW_i - D) G_i (dW_i - D)^T) + rho ||D||^2``, minimised by
  ``D = (sum_i dW_i G_i) (sum_i G_i + rho I)^-1``. Solvers: ``closed_form`` (that formula by a
  Cholesky solve, no inverse formed) and ``lbfgs`` (the faithful iterative one, from D = 0, i.e.
  from W0, as Mix-of-Show starts). ``rho = ridge * mean_i tr(G_i) / in``.

  The ridge pulls W toward W0, not toward 0 as the literal ``(sum_i G_i + ridge)^-1`` does: the
  text-side Gram matrices have rank at most the number of prompt tokens, and a pull toward 0 would
  erase the base weights in every direction no prompt reaches. Where ``sum_i G_i`` is full rank the
  two agree as the ridge goes to 0.

- ``custom_diffusion`` (Kumari et al. 2023, eq. 5): per cross-attention K / V layer, the update ``D``
  that changes the outputs of regularisation text features least (``min ||D C_reg^T||``) while every
  concept's target-word features map exactly as in its own model (``D C_i^T = dW_i C_i^T``). With
  ``C`` the concepts' rows stacked (exact duplicates dropped, as the authors' merge does),
  ``M = C_reg^T C_reg + rho I`` and ``R = [dW_i C_i^T]_i``: ``D = R (C M^-1 C^T)^-1 C M^-1``. Its
  statistics per adapter and layer are ``{"rows": C_i, "reg": C_reg^T C_reg}``
  (:func:`lorabench.merging.capture.token_features`, :func:`~lorabench.merging.capture.text_gram`).

PEFT's ``add_weighted_adapter`` applies its non-SVD TIES / DARE modes to the A and B factors
separately, which changes what trimming and dropping mean; here they work on the full ``dW``.
"""

from __future__ import annotations

import atexit
import dataclasses
import inspect
import math
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from lorabench.errors import ConfigError, check_int, choice_error
from lorabench.merging.updates import AdapterUpdate, FactorStack, LayerDelta, StackedDeltas, check_compatible
from lorabench.utils.cpus import cpu_budget, spawn_pool
from lorabench.utils.registry import Registry
from lorabench.utils.seeding import generator

MergeFn = Callable[..., dict[str, LayerDelta]]


@dataclasses.dataclass
class MergeMethod:
    """A registered merge: its name, its function, and whether it reads captured input statistics."""
    name: str
    fn: MergeFn
    needs_stats: bool = False

    def options(self) -> frozenset[str]:
        """The options its config may set: the function's parameters but ``updates``, ``stats``, ``info``
        (read once: merging is fast enough that inspecting the signature every call showed in its time)."""
        if "_options" not in self.__dict__:
            self._options = frozenset(inspect.signature(self.fn).parameters) - {"updates", "stats", "info"}
        return self._options


MERGES: Registry[MergeMethod] = Registry("merge", "merge.name")
SOLVERS = ("closed_form", "lbfgs")
DTYPES = {"float64": torch.float64, "float32": torch.float32}


def register_merge(name: str, needs_stats: bool = False):
    """Function decorator: make a merge available under ``merge.name=<name>``."""

    def deco(fn: MergeFn) -> MergeFn:
        MERGES.add(name, MergeMethod(name, fn, needs_stats))
        return fn

    return deco


def get_merge(name: str) -> MergeMethod:
    """The merge registered as ``name`` (a one-line error listing the valid names)."""
    return MERGES.lookup(name)


@dataclasses.dataclass
class MergeResult:
    """What :func:`merge` returns: the merged update per layer, the merge's own time, method details."""
    deltas: Mapping[str, LayerDelta]  # read-only: a dict, or a stacked sum's StackedDeltas
    merge_s: float
    info: dict = dataclasses.field(default_factory=dict)


def _number(value, field: str, low: float, high: float, low_open: bool, high_open: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ConfigError(field, f"must be a number in {interval}, got {value!r}")


# Every option any merge takes, and what values it may have: checked before any work (check_merge).
OPTION_CHECKS: dict[str, Callable[[Any, str], Any]] = {
    "lam": lambda v, f: _number(v, f, -math.inf, math.inf, True, True),
    "density": lambda v, f: _number(v, f, 0.0, 1.0, True, False),
    "drop": lambda v, f: _number(v, f, 0.0, 1.0, False, True),
    "rank": lambda v, f: check_int(v, f, minimum=1, allow_none=True),
    "seed": lambda v, f: check_int(v, f),
    "solver": lambda v, f: _one_of(v, f, SOLVERS),
    "ridge": lambda v, f: _number(v, f, 0.0, math.inf, True, True),
    "max_iter": lambda v, f: check_int(v, f, minimum=1),
    "tolerance": lambda v, f: _number(v, f, 0.0, math.inf, True, True),
    "dtype": lambda v, f: _one_of(v, f, DTYPES),
    "workers": lambda v, f: _workers(v, f),
}


def _workers(value, field: str) -> None:
    if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(field, f"must be a positive integer or auto (one process a core), got {value!r}")


def _one_of(value, field: str, valid) -> None:
    if value not in valid:
        raise choice_error(field, value, valid)


def check_merge(config: Mapping, field: str = "merge") -> MergeMethod:
    """The merge ``config`` names (``{name, **options}``), with every option checked: a known option of
    that merge, with a valid value. One-line errors name ``<field>.<option>``; nothing is merged."""
    config = dict(config or {})
    method = MERGES.get(str(config.get("name")))
    if method is None:
        raise choice_error(f"{field}.name", config.get("name"), MERGES)
    options = method.options()
    for key, value in config.items():
        if key == "name":
            continue
        if key not in options:
            raise ConfigError(f"{field}.{key}",
                              f"not an option of merge {method.name!r}; valid: {', '.join(sorted(options))}")
        OPTION_CHECKS[key](value, f"{field}.{key}")
    return method


def merge(updates: Sequence[AdapterUpdate], config: Mapping, stats: Optional[Sequence[Mapping]] = None) -> MergeResult:
    """Merge ``updates`` as ``config`` says (``{name, **options}``); ``stats[i]`` are adapter i's
    captured statistics ``{layer: G}``, needed by gradient fusion. Times the merge itself."""
    method = check_merge(config)
    config = {k: v for k, v in dict(config).items() if k != "name"}
    check_compatible(updates)
    kwargs = {}
    if method.needs_stats:
        if stats is None or len(stats) != len(updates):
            raise ConfigError("merge.stats", f"{method.name} needs one statistics file per adapter "
                              f"({len(updates)}), got {0 if stats is None else len(stats)}")
        kwargs["stats"] = stats
    info: dict = {}
    t0 = time.perf_counter()
    deltas = method.fn(updates, info=info, **config, **kwargs)
    return MergeResult(deltas, time.perf_counter() - t0, info)


def _layers(updates: Sequence[AdapterUpdate]) -> list[str]:
    return list(updates[0].layers)


# -- sums ------------------------------------------------------------------------------------------
def weighted_sum(updates: Sequence[AdapterUpdate], lam: float) -> Mapping[str, LayerDelta]:
    """``lam * sum_i up_i @ down_i`` as one low-rank pair per layer: the factors concatenated. When the
    updates share one layout (the same model's layers, stacked alike) their stacks are concatenated
    whole, two kernels per stack, into a :class:`StackedDeltas` (each layer's pair a view of its slice,
    made when read), which :func:`fold` applies stack by stack in one batched matmul each. Otherwise layers
    of one shape are concatenated together."""
    layout = updates[0].layout()
    if all(u.layout() == layout for u in updates[1:]):
        stacks = []
        for g, stack in enumerate(updates[0].stacks):
            ups = torch.cat([u.stacks[g].ups for u in updates], dim=2)
            stacks.append(FactorStack(stack.layers, ups * float(lam) if lam != 1 else ups,  # (x * 1.0 is x)
                                      torch.cat([u.stacks[g].downs for u in updates], dim=1)))
        return StackedDeltas(stacks, _layers(updates))  # the model's layer order
    by_shape: dict[tuple, list[str]] = defaultdict(list)
    for layer in _layers(updates):
        up, down = updates[0].layers[layer]
        by_shape[up.shape[0], down.shape[1], up.device, up.dtype].append(layer)
    out = {}
    for layers in by_shape.values():
        ups = torch.cat([u.layers[layer][0] for layer in layers for u in updates], dim=1) * float(lam)
        downs = torch.cat([u.layers[layer][1] for layer in layers for u in updates], dim=0)
        start = 0
        for layer in layers:
            end = start + sum(u.layers[layer][0].shape[1] for u in updates)
            out[layer] = LayerDelta(up=ups[:, start:end], down=downs[start:end])
            start = end
    return {layer: out[layer] for layer in _layers(updates)}  # the model's layer order


@register_merge("sum")
def sum_merge(updates, lam: float = 0.6, info=None):
    """FedAvg in Orthogonal Adaptation's table: ``lam * sum_i dW_i`` (lam 0.6), kept low rank."""
    return weighted_sum(updates, lam)


@register_merge("task_arithmetic")
def task_arithmetic(updates, lam: float = 1.0, info=None):
    """Task arithmetic: ``lam * sum_i tau_i`` with ``tau_i = dW_i`` (lam 1.0), kept low rank."""
    return weighted_sum(updates, lam)


@register_merge("svd")
def svd_merge(updates, lam: float = 0.6, rank: Optional[int] = None, info=None):
    """The exact ``lam * sum`` truncated to its best rank-``rank`` approximation; reports the energy dropped."""
    rank = int(rank) if rank is not None else max(u.layers[k][1].shape[0] for u in updates for k in u.layers)
    out, dropped = {}, {}
    for layer, d in weighted_sum(updates, lam).items():
        up, down, dropped[layer] = d.low_rank(rank)
        out[layer] = LayerDelta(up=up, down=down)
    if info is not None:
        info["dropped_energy"] = dropped
        info["dropped_energy_mean"] = sum(dropped.values()) / max(1, len(dropped))
    return out


# -- element-wise merges on the full dW ---------------------------------------------------------------
def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``density`` share of entries with the largest magnitude (ties at the cut kept)."""
    k = max(1, int(round(density * delta.numel())))
    if k >= delta.numel():
        return delta
    cut = delta.abs().reshape(-1).kthvalue(delta.numel() - k + 1).values
    return torch.where(delta.abs() >= cut, delta, torch.zeros_like(delta))


@register_merge("ties")
def ties_merge(updates, lam: float = 1.0, density: float = 0.2, info=None):
    """TIES: trim each dW_i to its ``density`` largest entries, elect signs, average the agreeing entries."""
    density = float(density)
    out = {}
    for layer in _layers(updates):
        trimmed = torch.stack([trim(u.delta(layer), density) for u in updates])
        sign = torch.sign(trimmed.sum(0))
        agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
        count = agree.sum(0).clamp(min=1)
        out[layer] = LayerDelta(dense=(trimmed * agree).sum(0) / count * float(lam))
    return out


@register_merge("dare")
def dare_merge(updates, lam: float = 1.0, drop: float = 0.5, seed: int = 0, info=None):
    """DARE: drop entries with probability ``drop`` (seeded), rescale the rest, then ``lam * sum``."""
    drop = float(drop)
    out = {}
    for layer in _layers(updates):
        acc = None
        for i, u in enumerate(updates):
            d = u.delta(layer)
            g = generator("dare", seed, i, layer)
            keep = (torch.rand(d.shape, generator=g) >= drop).to(d.device)  # drawn on the CPU: same on any device
            d = d * keep / (1.0 - drop)
            acc = d if acc is None else acc + d
        out[layer] = LayerDelta(dense=acc * float(lam))
    return out


# -- gradient fusion ---------------------------------------------------------------------------------
def ridge_value(grams: Sequence[torch.Tensor], ridge: float) -> float:
    """``rho = ridge * mean_i tr(G_i) / in``: the ridge in the units of the statistics."""
    width = grams[0].shape[0]
    return float(ridge) * sum(float(torch.trace(g)) for g in grams) / (len(grams) * width)


def fusion_objective(d: torch.Tensor, deltas: Sequence[torch.Tensor], grams: Sequence[torch.Tensor],
                     rho: float) -> torch.Tensor:
    """``sum_i tr((dW_i - D) G_i (dW_i - D)^T) + rho ||D||_F^2``: gradient fusion's layer objective in
    ``D = W - W0`` (``sum_i ||(W0 + dW_i) X_i - W X_i||^2`` with ``G_i = X_i X_i^T``)."""
    total = rho * (d * d).sum()
    for dw, g in zip(deltas, grams):
        e = dw - d
        total = total + ((e @ g) * e).sum()
    return total


def fuse_closed_form(deltas: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], rho: float) -> torch.Tensor:
    """The minimiser ``(sum_i dW_i G_i)(sum_i G_i + rho I)^-1`` by one Cholesky factorisation."""
    a = sum(grams) + rho * torch.eye(grams[0].shape[0], dtype=grams[0].dtype, device=grams[0].device)
    b = sum(dw @ g for dw, g in zip(deltas, grams))
    chol, bad = torch.linalg.cholesky_ex(a)
    if int(bad):
        raise ConfigError("merge.ridge", f"sum of input statistics + ridge is not positive definite "
                          f"(ridge {rho:.3g}); raise merge.ridge")
    # W A = B  <=>  A W^T = B^T (A symmetric)
    return torch.cholesky_solve(b.T, chol).T


def fuse_lbfgs(deltas: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], rho: float, max_iter: int = 500,
               tolerance: float = 1e-10) -> tuple[torch.Tensor, int]:
    """Mix-of-Show's solver: LBFGS on the same objective, from D = 0 (W = W0). Returns (D, iterations).
    The objective is divided by its value at D = 0, so ``tolerance`` is relative. Each evaluation gives
    :func:`fusion_objective` from the residuals ``E_i = dW_i - D`` (exact near the minimum, where an
    expanded quadratic would cancel) and its gradient ``2 (rho D - sum_i E_i G_i)`` from the same
    products, without an autograd graph."""
    d = torch.zeros_like(deltas[0], requires_grad=True)
    norm = float(fusion_objective(d.detach(), deltas, grams, rho)) or 1.0
    opt = torch.optim.LBFGS([d], lr=1.0, max_iter=max_iter, tolerance_grad=tolerance, tolerance_change=tolerance ** 2,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        with torch.no_grad():
            loss, grad = rho * (d * d).sum(), rho * d
            for dw, g in zip(deltas, grams):
                e = dw - d
                eg = e @ g
                loss, grad = loss + (eg * e).sum(), grad - eg
            d.grad = grad * (2 / norm)
        return loss / norm

    opt.step(closure)
    return d.detach(), int(opt.state[d].get("n_iter", 0))


_POOLS: dict[int, ProcessPoolExecutor] = {}


def _pool_init(threads: int) -> None:
    torch.set_num_threads(threads)


def solver_pool(workers: int) -> ProcessPoolExecutor:
    """``workers`` spawned one-thread-per-core processes, kept for the life of the process (a protocol
    merges dozens of groups; spawning each time would cost more than a small merge)."""
    if workers not in _POOLS:
        threads = max(1, cpu_budget() // workers)
        _POOLS[workers] = spawn_pool(workers, _pool_init, (threads,))
    return _POOLS[workers]


@atexit.register
def _close_pools() -> None:
    for pool in _POOLS.values():
        pool.shutdown(cancel_futures=True)
    _POOLS.clear()


@register_merge("gradient_fusion", needs_stats=True)
def gradient_fusion(updates, stats, solver: str = "closed_form", ridge: float = 1e-4, max_iter: int = 500,
                    tolerance: float = 1e-10, dtype: str = "float64", workers: int | str = 1, info=None):
    """Mix-of-Show's gradient fusion on captured statistics, by the closed form or LBFGS (module docstring).

    ``workers`` > 1: the layers' independent LBFGS solves run in that many spawned processes, one thread
    each where there are as many cores; ``auto``: one per CPU the job is given
    (:func:`~lorabench.utils.cpus.cpu_budget`: ``$OMP_NUM_THREADS`` where set, else the CPUs it may run on:
    2 on a 2-core machine, 16 on a 16-core GPU host; each solve on one thread either way). Each layer's solve
    is the same function either way; LBFGS is bound by its own per-iteration Python work at the world's layer
    sizes, so on 2 cores two processes take about half the time (docs/benchmarks.md).
    LBFGS solves on the CPU wherever the factors are (its result is moved back to them): its iterations
    are Python, scalar reads and tiny products, which a GPU runs slower than a CPU (an H200 took 139 s for
    the world ED-LoRA's merge, one CPU process about 34 s). The closed form runs on the factors' device."""
    dt = DTYPES[dtype]
    out, iters, objective, problems = {}, {}, {}, {}
    for layer in _layers(updates):
        for i, s in enumerate(stats):
            if layer not in s:
                raise ConfigError("merge.stats", f"statistics of adapter {updates[i].name!r} lack layer {layer!r}")
        deltas = [u.delta(layer).to(dt) for u in updates]
        grams = [s[layer].to(deltas[0].device, dt) for s in stats]  # statistics move to the factors' device
        problems[layer] = deltas, grams, ridge_value(grams, ridge)
    cpu = {layer: ([x.cpu() for x in deltas], [g.cpu() for g in grams])
           for layer, (deltas, grams, _) in problems.items()} if solver == "lbfgs" else {}
    if workers == "auto":
        workers = cpu_budget()
    pooled = solver == "lbfgs" and workers > 1 and len(problems) > 1
    if pooled:
        pool = solver_pool(workers)
        futures = {layer: pool.submit(fuse_lbfgs, *cpu[layer], rho, int(max_iter), float(tolerance))
                   for layer, (_, _, rho) in problems.items()}
    for layer, (deltas, grams, rho) in problems.items():
        if solver == "closed_form":
            d = fuse_closed_form(deltas, grams, rho)
        else:
            d, iters[layer] = futures[layer].result() if pooled else \
                fuse_lbfgs(*cpu[layer], rho, int(max_iter), float(tolerance))
            d = d.to(deltas[0].device)
        objective[layer] = float(fusion_objective(d, deltas, grams, rho))
        out[layer] = LayerDelta(dense=d.float())
    if info is not None:
        info["objective"] = objective
        if iters:
            info["lbfgs_iterations"] = iters
    return out


@register_merge("custom_diffusion", needs_stats=True)
def custom_diffusion_merge(updates, stats, ridge: float = 1e-4, dtype: str = "float64", info=None):
    """Custom Diffusion's constrained closed form (module docstring); ``info["constraint_error"]``: per
    layer, the largest ``||D C_i^T - dW_i C_i^T|| / ||dW_i C_i^T||`` over the concepts (0 when exact)."""
    dt = DTYPES[dtype]
    out, err = {}, {}
    for layer in _layers(updates):
        for i, s in enumerate(stats):
            item = s.get(layer)
            if not isinstance(item, Mapping) or "rows" not in item or "reg" not in item:
                raise ConfigError("merge.stats", f"custom_diffusion needs target-word rows and a regularisation "
                                  f"Gram per layer; adapter {updates[i].name!r} has none for {layer!r}")
        deltas = [u.delta(layer).to(dt) for u in updates]
        dev = deltas[0].device
        rows = [s[layer]["rows"].to(dev, dt) for s in stats]
        reg = torch.stack([s[layer]["reg"].to(dev, dt) for s in stats]).mean(0)
        n_in = reg.shape[0]
        m = reg + ridge * torch.trace(reg) / n_in * torch.eye(n_in, dtype=dt, device=dev)
        c = torch.cat(rows)                                          # (n, in)
        targets = torch.cat([d @ r.T for d, r in zip(deltas, rows)], dim=1)  # R: (out, n)
        keep = [j for j in range(len(c)) if not any(torch.equal(c[j], c[i]) for i in range(j))]
        c, targets = c[keep], targets[:, keep]                        # a row twice would make K singular
        a = torch.linalg.solve(m, c.T).T                             # C M^-1, (n, in)
        k = c @ a.T                                                  # C M^-1 C^T, (n, n)
        k = k + 1e-10 * torch.trace(k) / len(k) * torch.eye(len(k), dtype=dt, device=dev)
        d = targets @ torch.linalg.solve(k, a)                       # R K^-1 C M^-1
        out[layer] = LayerDelta(dense=d.float())
        err[layer] = max(float(torch.linalg.norm(d @ r.T - dw @ r.T) / torch.linalg.norm(dw @ r.T).clamp_min(1e-30))
                         for dw, r in zip(deltas, rows))
    if info is not None:
        info["constraint_error"] = err
    return out
