"""What a protocol scores with: the eval sets, scorer, sampler and device from ``cfg.eval``, built
before any training, the initial-latent seeds every concept protocol shares, :class:`EvalBatch`, which
samples many settings (a trained cell, a merge) in one pass, and :func:`compare_with_base`, the single-item
protocols' rows (the base model, then every trained cell)."""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterator, Mapping, NamedTuple, Optional, Sequence

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lorabench.adapters.base import AdapterLayer
from lorabench.merging import (
    InputStats,
    LayerDelta,
    fold,
    merged_into,
    model_weights,
    setting_grams,
    updates_from_adapters,
)
from lorabench.protocols import sizes
from lorabench.protocols.cells import (
    Cell,
    base_model,
    capacity_from,
    cell_config,
    check_batch_cells,
    check_count_or_auto,
    loaded_cell,
    run_cells,
)
from lorabench.protocols.sizes import row_fields
from lorabench.sampling import Sampler, eval_device, eval_mode, per_setting_ready, sample_prompts
from lorabench.utils.console import quiet_cells
from lorabench.utils.seeding import derive_seed_list


class EvalSetup(NamedTuple):
    """What a protocol scores with, built from ``cfg.eval`` before any training."""

    eval_sets: Any          # callable: item name -> its eval set (prompts, references)
    sets: dict[str, Any]    # {item: eval set}
    scorer: Any
    sampler: dict
    images_per_prompt: int
    device: torch.device


def eval_setup(cfg: DictConfig, items: Sequence[str], sets_key: str, scorer_key: str) -> EvalSetup:
    """Instantiate ``eval.<sets_key>`` and ``eval.<scorer_key>`` and build every item's eval set, so an
    unknown item name fails here, before any training."""
    ev = cfg.eval
    eval_sets = instantiate(ev[sets_key])
    sets = {i: eval_sets(i) for i in items}
    return EvalSetup(eval_sets, sets, instantiate(ev[scorer_key]), OmegaConf.to_container(ev.sampler, resolve=True),
                     int(ev.images_per_prompt), eval_device(cfg))


def concept_seeds(seed: int, n: int) -> list[int]:
    """The initial-latent seeds of replicate ``seed`` in the concept protocols (single concept and
    Orthogonal Adaptation): the same for every prompt, every method, alone and merged."""
    return derive_seed_list("single-concept-samples", seed, n)


# ``eval_batch: auto`` on a GPU: at most this many settings a pass, and what the memory holds (a probe of one
# UNet call at one and two settings, extrapolated). On a CPU ``auto`` is 1: there a pass of 28 settings was no
# faster than the same settings one after another, 0.87x to 1.00x (docs/benchmarks.md, "Evaluation in batches").
GPU_AUTO_MAX_SETTINGS = 64


def check_eval_batch(value: Any, field: str = "protocol.eval_batch") -> int | str:
    """``protocol.eval_batch``: a positive integer (1: every setting sampled alone, bit for bit as before) or
    ``auto``."""
    return check_count_or_auto(value, field, "every setting sampled alone")


@dataclass
class _Pending:
    key: Hashable
    cond: dict
    latents: torch.Tensor
    seeds: list[int]  # each image's (its latents', and a stochastic scheduler's steps')
    deltas: dict[str, LayerDelta]  # the UNet's part, keyed ``unet.<path>``
    inputs: Optional[InputStats] = None  # the setting's input statistics, its UNet layers recorded by the pass


class EvalBatch:
    """Sample many settings of one model, each its own prompts and seeds and its own weight updates.

    ``add(key, prompts, seeds, deltas)`` takes a setting while the model is in its state (tokens loaded,
    adapters injected), ``deltas`` (``{layer: LayerDelta}``, ``unet.<path>`` / ``text_encoder.<path>``) merged
    into its weights; :meth:`images` returns every setting's images, prompt-major (as
    :func:`lorabench.sampling.sample_prompts`). With ``size`` 1 each setting is sampled in ``add``, exactly as
    before. With more, ``add`` encodes the prompts there (text-side deltas merged) and keeps the UNet's part of
    ``deltas``; :meth:`sample` (when :attr:`full`) and :meth:`images` then sample ``size`` settings a pass
    (:meth:`Sampler.sample_settings`), each updated Linear holding one weight per setting, equal to the
    one-by-one images to float rounding. Call them with no adapter injected in the UNet: a setting's UNet
    update must be in its ``deltas``. A setting whose UNet update is not on plain Linear layers is sampled
    alone in ``add``. A batched setting's images go through the UNet in one call (``sampler.batch_size`` splits
    only a setting sampled alone). A setting given ``inputs`` has its layers' input statistics recorded while it
    is sampled (the capture of gradient fusion's ``X^T X``), alone or in a pass.
    """

    def __init__(self, components, sampler_cfg: Mapping, device: torch.device, size: int | str = 1):
        self.components, self.sampler_cfg, self.device = components, dict(sampler_cfg), device
        self.size = 1 if size == "auto" and device.type != "cuda" else check_eval_batch(size)
        self.sampler: Optional[Sampler] = None
        self.pending: list[_Pending] = []
        self.done: dict[Hashable, torch.Tensor] = {}
        self.passes: list[int] = []  # settings per batched pass
        self.alone = 0  # settings sampled alone
        self.sample_s = 0.0  # time spent sampling
        self._auto: dict[int, int] = {}  # auto: settings a pass, by images a setting
        self._queue: list[tuple[Hashable, Optional[Callable[[torch.Tensor], None]]]] = []  # not yet handed over

    def add(self, key: Hashable, prompts: Sequence[str], seeds: Sequence[int],
            deltas: Optional[Mapping[str, LayerDelta]] = None, injected: bool = False,
            then: Optional[Callable[[torch.Tensor], None]] = None, inputs: Optional[InputStats] = None) -> None:
        """Take the setting ``key``: every prompt from every seed, with ``deltas`` merged into the weights, or,
        ``injected``, computed by adapters injected in the model now (``deltas`` then need hold only the UNet's
        part: what a batch folds into the setting's own weights). ``then(images)``, if given, is called once the
        images are drawn, the settings' calls in the order they were added (alone: here); else :meth:`images`
        returns them. ``inputs``: :class:`~lorabench.merging.InputStats` hooked on the injected adapter's layers
        for the duration of ``add``, complete when ``then`` is called: sampled alone, the hooks record every layer
        here; in a pass, they record the text-encoder layers when ``add`` encodes the prompts, and the pass
        records the setting's rows of each of its UNet layers (:func:`~lorabench.merging.setting_grams`)."""
        if key in self.done or any(k == key for k, _ in self._queue):  # the queue holds every waiting setting
            raise ValueError(f"setting {key!r} added twice")
        self._queue.append((key, then))
        deltas = dict(deltas or {})
        unet = {k: d for k, d in deltas.items() if k.startswith("unet.")}
        text = {} if injected else {k: d for k, d in deltas.items() if k not in unet}
        if self.size == 1 or not all(per_setting_ready(self._base_layer(k)) for k in unet):
            merge = {} if injected else deltas
            t0 = time.perf_counter()
            with merged_into(model_weights(self.components, list(merge)), merge):
                self.done[key] = sample_prompts(self.components, self.sampler_cfg, prompts, seeds, self.device)
            self.sample_s += time.perf_counter() - t0
            self.alone += 1
            self._deliver()
            return
        eval_mode(self.components, self.device)
        if self.sampler is None:
            self.sampler = Sampler(self.components, **self.sampler_cfg)
        with merged_into(model_weights(self.components, list(text)), text):
            cond = self.sampler.conditions([p for p in prompts for _ in seeds])
        image_seeds = [int(s) for _ in prompts for s in seeds]
        self.pending.append(_Pending(key, cond, self.sampler.initial_latents(image_seeds), image_seeds, unet, inputs))

    def capture(self, key: Hashable, adapters, prompts: Sequence[str], seeds: Sequence[int],
                deltas: Mapping[str, LayerDelta], then: Callable[[tuple[dict, dict]], None]) -> None:
        """Capture the input statistics of ``adapters`` (injected now; ``deltas`` their UNet update): :meth:`add`
        with an :class:`~lorabench.merging.InputStats` on their layers for its duration, and ``then((grams, rows))``
        (:meth:`InputStats.result`) once the setting is sampled, alone or in a pass."""
        inputs = InputStats(adapters)
        try:
            self.add(key, prompts, seeds, deltas, injected=True, inputs=inputs,
                     then=lambda imgs: then(inputs.result()))
        finally:
            inputs.remove()

    def _base_layer(self, name: str) -> torch.nn.Module:
        """The model's own module at ``unet.<path>`` (an injected adapter's base layer)."""
        module = self.components.adaptable_modules()["unet"].get_submodule(name.partition(".")[2])
        return module.base if isinstance(module, AdapterLayer) else module

    @property
    def full(self) -> bool:
        """Whether a pass's worth of settings waits (``size``; ``auto``: :data:`GPU_AUTO_MAX_SETTINGS`): the
        caller calls :meth:`sample` then, where no adapter is injected, so that few settings wait at once."""
        return len(self.pending) >= (GPU_AUTO_MAX_SETTINGS if self.size == "auto" else self.size)

    def sample(self) -> None:
        """Sample the waiting settings, ``size`` a pass (``auto``: what the GPU's memory holds)."""
        t0 = time.perf_counter()
        groups: dict[int, list[_Pending]] = {}
        for p in self.pending:  # settings sampled together draw as many images each
            groups.setdefault(len(p.latents), []).append(p)
        self.pending = []
        for n, group in groups.items():
            if self.size == "auto" and n not in self._auto and len(group) > 1:
                self._auto[n] = self._auto_size(group)
            size = self._auto.get(n, 1) if self.size == "auto" else self.size
            for start in range(0, len(group), size):
                part = group[start:start + size]
                with self._recording(part):
                    imgs = self.sampler.sample_settings([p.cond for p in part], [p.latents for p in part],
                                                        self._weights(part), seeds=[p.seeds for p in part])
                self.done.update({p.key: x for p, x in zip(part, imgs)})
                self.passes.append(len(part))
        self.sample_s += time.perf_counter() - t0
        self._deliver()

    def _deliver(self) -> None:
        """Hand the drawn settings' images to their ``then``, in the order the settings were added."""
        while self._queue and self._queue[0][0] in self.done:
            key, then = self._queue.pop(0)
            if then is not None:
                then(self.done.pop(key))

    def images(self) -> dict[Hashable, torch.Tensor]:
        """The images of every setting taken since the last call, by key (the waiting ones sampled now); the
        batch keeps none of them."""
        self.sample()
        done, self.done = self.done, {}
        return done

    def log(self) -> dict[str, Any]:
        """What the sampling cost: ``sampling_s``, settings sampled ``alone``, and ``passes`` (settings each)."""
        return {"sampling_s": self.sample_s, "alone": self.alone, "passes": list(self.passes)}

    @contextlib.contextmanager
    def _recording(self, part: Sequence[_Pending], deliver: bool = True) -> Iterator[None]:
        """For the ``with`` block (a pass of ``part``): a forward hook on each UNet layer some setting captures
        the inputs of, which sums the pass's per-setting ``X^T X`` (one batched product a call); after the block,
        each setting's sums go into its :class:`InputStats` (not when ``deliver`` is false: a memory probe, whose
        peak counts the sums, which grow with the settings)."""
        watched: dict[str, list[int]] = {}  # unet.<path> -> the settings that capture it
        for i, p in enumerate(part):
            for name in p.inputs.names if p.inputs is not None else ():
                if name.startswith("unet."):
                    watched.setdefault(name, []).append(i)
        sums: dict[str, list] = {}  # name -> [(settings, in, in) float64, rows a setting]

        def hook(name: str, module, args, output) -> None:
            grams, rows = setting_grams(args[0], len(part))
            acc = sums.get(name)
            sums[name] = [grams, rows] if acc is None else [acc[0] + grams, acc[1] + rows]

        unet = self.components.adaptable_modules()["unet"]
        handles = [unet.get_submodule(name[5:]).register_forward_hook(functools.partial(hook, name))
                   for name in watched]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
        if not deliver:
            return
        for name, settings in watched.items():
            if name in sums:
                grams, rows = sums[name]
                for i in settings:
                    part[i].inputs.record(name, grams[i], rows)

    def _weights(self, part: Sequence[_Pending]) -> dict[str, torch.Tensor]:
        """``{path: (settings, out, in)}``: each updated layer's base weight once per setting, each setting's
        update folded into its own (as :func:`lorabench.merging.merged_into` folds it)."""
        layers = sorted({k for p in part for k in p.deltas})
        base = model_weights(self.components, layers)
        stacks = {k: base[k].detach().unsqueeze(0).repeat(len(part), *([1] * base[k].dim())) for k in layers}
        with torch.no_grad():
            for i, p in enumerate(part):
                fold({k: stacks[k][i] for k in p.deltas}, p.deltas)
        return {k[5:]: w for k, w in stacks.items()}

    def _auto_size(self, group: Sequence[_Pending]) -> int:
        """Settings a pass on the GPU: one UNet call's peak memory at one and at two settings (with the sums of
        the captures' ``X^T X``, float64 (in, in) a layer and setting), extrapolated to the free memory
        (:func:`lorabench.protocols.cells.capacity_from`), at most :data:`GPU_AUTO_MAX_SETTINGS`."""
        peaks = []  # above what is already held (the model, the waiting settings), which the free memory excludes
        for k in (1, 2):
            torch.cuda.empty_cache()
            held = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            part = group[:k]
            with self._recording(part, deliver=False):
                self.sampler.probe([p.cond for p in part], [p.latents for p in part], self._weights(part))
            peaks.append(torch.cuda.max_memory_allocated(self.device) - held)
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info(self.device)
        return min(GPU_AUTO_MAX_SETTINGS, capacity_from(peaks[0], peaks[1], free))


@dataclass
class Evaluation:
    """How a single-item protocol evaluates a (method, item, seed): ``prompts(item, seed, method)`` gives the
    prompts and the initial-latent seeds it samples (every prompt from every seed), ``score(images, item, seed,
    method)`` its scores; sampled with ``sampler`` on ``device``, ``batch`` settings a pass (:class:`EvalBatch`)."""

    prompts: Callable[[str, int, str], tuple[Sequence[str], Sequence[int]]]
    score: Callable[[torch.Tensor, str, int, str], dict]
    sampler: Mapping
    device: torch.device
    batch: int | str = 1


def cell_line(template: str, row: dict) -> str:
    """The line a finished cell prints: ``template`` filled from the row, then `` (400 steps, 55 s)`` for a
    trained cell (nothing for the base model's)."""
    return template.format(**row) + (f" ({row['steps']} steps, {row['train_s']:.0f} s)" if "train_s" in row else "")


def compare_with_base(session, data_key: str, items: Sequence[str], seeds: Sequence[int],
                      adapters: Mapping[str, Any], evaluation: Evaluation, line: str,
                      size_prompts: Optional[Callable[[str], Sequence[str]]] = None,
                      ) -> tuple[list[dict], dict[str, list[torch.Tensor]], dict]:
    """The rows of a single-item protocol, ``method`` "base" first, each item's sample-grid images, and what the
    sampling cost (:meth:`EvalBatch.log`, the update sizes' captures under ``capture``):
    the base model on every (item, seed), then every (adapter, item, seed) cell, trained (:func:`run_cells`,
    ``protocol.batch_cells`` at a time) into ``<run>/cells/<adapter>-<item>-seed<seed>``, loaded into the base
    model, sampled (``evaluation.batch`` settings a pass) and scored. ``session``: the run
    (:class:`lorabench.protocols.report.Session`); the first seed's images of every method go to the item's
    grid; ``size_prompts(item)``, if given, the prompts whose first one each cell's update size is measured on
    (:func:`lorabench.protocols.sizes.measure`'s capture, as many a pass as the samplings; its ``size_*`` fields
    join the row, the session's size log keeps it); ``line`` is the template of a finished cell's line
    (:func:`cell_line`)."""
    cfg, cells_dir = session.cfg, session.run_dir / "cells"
    rows: list[dict] = []
    grids: dict[str, list[torch.Tensor]] = {item: [] for item in items}
    keys = [(a, item, seed) for a in adapters for item in items for seed in seeds]
    cells = [Cell(cell_config(cfg, adapters[a], {data_key: item}, seed, cells_dir / f"{a}-{item}-seed{seed}"),
                  cells_dir / f"{a}-{item}-seed{seed}", f"{a}/{item}", source=f"protocol.adapters.{a}")
             for a, item, seed in keys]
    base = base_model(cfg, [(c.source, c.config.adapter) for c in cells])  # before the progress bar and scores
    session.count(len(items) * len(seeds) * (1 + len(adapters)))
    extra: dict[tuple, dict] = {}  # what each trained cell's row adds

    def score(key: tuple, imgs: torch.Tensor) -> None:  # a setting's row, once its images are drawn
        method, item, seed = key
        if seed == seeds[0]:
            grids[item].append(imgs)
        rows.append({"method": method, data_key: item, "seed": seed, **evaluation.score(imgs, item, seed, method),
                     **extra.get(key, {})})
        session.done(cell_line(line, rows[-1]))

    def sized(key: tuple, update, weights: Mapping[str, torch.Tensor], fields: dict,
              stats: tuple[dict, dict]) -> None:  # a cell's update size, once its inputs are captured
        measured = sizes.measure_update(update, weights, stats[0])
        session.size_log.add(key[0], measured)
        extra[key] = {**row_fields(measured), **fields}

    with quiet_cells():
        evals = EvalBatch(base, evaluation.sampler, evaluation.device, evaluation.batch)
        captures = EvalBatch(base, sizes.capture_sampler(evaluation.sampler), evaluation.device, evaluation.batch)
        for item in items:
            for seed in seeds:
                key = ("base", item, seed)
                evals.add(key, *evaluation.prompts(item, seed, "base"), then=functools.partial(score, key))
        trained = run_cells(cells, check_batch_cells((cfg.get("protocol") or {}).get("batch_cells", 1)))
        for key, t in zip(keys, trained):
            a, item, seed = key
            with loaded_cell(base, t.cell.folder) as (ad, _):
                timings = t.results["timings"]
                fields = {"steps": t.results["metrics"]["steps"], "train_s": timings["fit_s"],
                          "s_per_step": timings["s_per_step"]}
                update = updates_from_adapters(ad, a) if ad is not None else None
                deltas = update.deltas() if update is not None else None  # for a pass's own weights
                if update is not None and size_prompts is not None:  # measured once its inputs are captured
                    captures.capture(key, ad, list(size_prompts(item))[:1], sizes.capture_seeds(seed), deltas,
                                     functools.partial(sized, key, update, ad.base_weights(), fields))
                else:
                    extra[key] = fields
                # alone: sampled here through the injected adapter; in a batch: its tokens and text encoder read
                # here, its UNet update folded into a weight of its own when the batch samples
                evals.add(key, *evaluation.prompts(item, seed, a), deltas, injected=True,
                          then=functools.partial(score, key))
            if evals.full:  # the cell is out of the model again; its row needs its update size first
                captures.sample()
                evals.sample()
        captures.sample()
        evals.sample()
    return rows, grids, {**evals.log(), "capture": captures.log()}
