"""K runs trained in one pass: K adapters stacked in one model, each run's samples routed through its own.

:class:`BatchedFineTuner` is :class:`~lorabench.training.module.DiffusionFineTuner` over
:class:`~lorabench.adapters.stacked.StackedAdapters`, with what makes each member train exactly as its
own run would:

- **data**: each member's own loader (its shuffling generator), one batch of each per step, walked
  through its epochs by Lightning as a run's own loader is (:func:`member_loaders`); each member's loader
  draws from its own copy of the global torch RNG (a sampler without a generator, random flips and crops in
  worker processes: :class:`MemberLoader`), its dataset's own augmentation generator in this process;
- **noise**: each member's own noise stream (``generator("noise", seed)``), drawn in its run's order;
- **loss**: each member's loss is its own batch's mean (prior examples weighted as in its run); the
  step minimises their sum, and a member's tensors get gradient from its own samples only;
- **optimiser**: one AdamW over the stacked tensors. AdamW is element-wise, so every member's moments
  and update are its own run's; the schedule is shared (members of a batch share the optimiser config);
- **clipping**: each member's gradient norm is clipped on its own (:meth:`configure_gradient_clipping`).

- **tokens**: each member's new tokens (textual inversion, P+) sit side by side in the text encoders
  (:class:`MemberTokens`), under names of their own (:func:`lorabench.run.member_tokens`: one concept's
  seeds can share a pass); a member's prompts are rewritten to its own, so its rows learn from its
  samples only.

What stays out (such runs train one by one, :func:`lorabench.protocols.cells.batch_key`): adapter
dropout (masks would come from one shared generator), 8-bit AdamW (its quantisation blocks span
members), full fine-tuning, text-encoder training, several devices.
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from functools import partial
from types import SimpleNamespace
from typing import Any, Iterator, Mapping, Optional, Sequence

import lightning as L
import torch
from lightning.fabric.utilities.seed import pl_worker_init_function
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader

from lorabench.adapters.stacked import StackedAdapters
from lorabench.adapters.tokens import ConceptTokens
from lorabench.models.components import rewrite_prompt
from lorabench.training.module import DiffusionFineTuner, unique_mean
from lorabench.utils.seeding import generator


class MemberLoader:
    """Member ``k``'s loader, walked under the member's own copy of the global torch RNG state
    (``states[k]``, saved back after each call): creating an iterator (a loader without a generator draws
    its workers' base seed from the global RNG) and each batch (a sampler without a generator, a dataset's
    random flips and crops in a worker process) draw what they would in the member's own run, whatever the other
    members draw in between. The loader itself is the member's own: same sampler, workers and collate."""

    def __init__(self, loader: DataLoader, states: list[torch.Tensor], k: int):
        self.loader, self.states, self.k = loader, states, k
        if loader.num_workers and loader.worker_init_fn is None and int(os.environ.get("PL_SEED_WORKERS", 0)):
            loader.worker_init_fn = partial(pl_worker_init_function, rank=0)  # as Lightning gives a run's loader

    def __len__(self) -> int:
        return len(self.loader)

    @contextmanager
    def _own_rng(self) -> Iterator[None]:
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states[self.k])
        try:
            yield
        finally:
            self.states[self.k] = torch.get_rng_state()
            torch.set_rng_state(outer)

    def __iter__(self) -> Iterator:
        with self._own_rng():
            it = iter(self.loader)
        while True:
            with self._own_rng():
                try:
                    batch = next(it)
                except StopIteration:
                    return
            yield batch


def member_loaders(loaders: Sequence[DataLoader], states: list[torch.Tensor], train: bool) -> CombinedLoader:
    """Every member's loader (:class:`MemberLoader`) in one Lightning ``CombinedLoader``: a step's batch is
    the list of the members' batches, and each loader is walked through its epochs as a run walks its own.
    Training needs loaders of one length (a shorter one would restart mid-epoch) and uses ``max_size``, not
    Lightning's training default ``max_size_cycle``: at an epoch's end that mode restarts the loaders that
    ran out first and draws a batch from them before it sees that all ran out, which moves those members'
    shuffling generators and RNG ahead of their own runs'. Validation gives None for a member whose
    batches ran out."""
    if train and len({len(dl) for dl in loaders}) > 1:
        raise ValueError(f"members' loaders have different numbers of batches: {[len(dl) for dl in loaders]}")
    return CombinedLoader([MemberLoader(dl, states, k) for k, dl in enumerate(loaders)], mode="max_size")


class MemberTokens:
    """Every member's new tokens (or None), side by side in the text encoders: each member's prompts name
    its own tokens (the members of a batch learn different concepts), so its rows get gradient from its
    own samples only."""

    def __init__(self, members: Sequence[Optional[ConceptTokens]]):
        self.members = list(members)

    def member_parameters(self, k: int) -> list[torch.nn.Parameter]:
        return self.members[k].parameters() if self.members[k] is not None else []

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for k in range(len(self.members)) for p in self.member_parameters(k)]


class MemberEpochCallbacks(L.Callback):
    """Each member's own epoch-end callbacks (e.g. :class:`~lorabench.training.callbacks.CheckpointEvaluation`),
    called with that member alone in the model (:meth:`BatchedFineTuner.as_member`), as its own run calls
    them. Only ``on_train_epoch_end`` is forwarded."""

    def __init__(self, per_member: Sequence[Sequence[L.Callback]]):
        self.per_member = [list(cbs) for cbs in per_member]

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        for k, callbacks in enumerate(self.per_member):
            if callbacks:
                with pl_module.as_member(k) as member:
                    for cb in callbacks:
                        cb.on_train_epoch_end(trainer, member)


class BatchedFineTuner(DiffusionFineTuner):
    """Train K runs at once: the members of ``stacked`` (None: the runs train new tokens alone) and their
    ``tokens`` (one entry per member, None where it has none), seeds ``seeds``; ``module`` options and
    ``optim`` as :class:`DiffusionFineTuner`'s, shared by the members."""

    def __init__(self, components, stacked: Optional[StackedAdapters], tokens: Sequence[Optional[ConceptTokens]],
                 optim, seeds: Sequence[int], rewrites: Optional[Sequence[Mapping[str, str]]] = None, **module):
        if (stacked is not None and len(seeds) != len(stacked)) or len(tokens) != len(seeds):
            raise ValueError(f"{len(seeds)} seeds for {len(tokens)} members")
        if stacked is None and not any(t is not None for t in tokens):
            raise ValueError("a batched run trains adapters or tokens")
        member_tokens = MemberTokens(tokens) if any(t is not None for t in tokens) else None
        super().__init__(components, adapter=None, optim=optim, seed=int(seeds[0]),
                         injected=(stacked, member_tokens), **module)
        self.seeds = [int(s) for s in seeds]
        self.rewrites = [dict(r) for r in rewrites] if rewrites is not None else [{} for _ in seeds]
        self._gens: list[Optional[torch.Generator]] = [None] * len(seeds)
        # each step's member losses and gradient norms, kept on the device as one (K,) tensor and read
        # back to Python floats in one transfer when asked (member_losses, member_grad_norms): on a GPU a
        # float() per member and step would wait for the device K times a step
        self._losses: list[list[float]] = [[] for _ in seeds]
        self._pending_losses: list[torch.Tensor] = []
        self._grad_norms: Optional[torch.Tensor] = None
        self.member_val: list[list[float]] = [[] for _ in seeds]
        self.step_loggers: list[list] = [[] for _ in seeds]  # each member's own loggers (its CSV)
        self._val_parts: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (member, losses, indices)

    def route(self, counts: list[int]):
        """The ``with`` block's forward passes take ``counts[k]`` samples of member ``k``, member by member."""
        return self.adapters.router.route(counts=counts) if self.adapters is not None else nullcontext()

    def member_grads(self, k: int) -> list[torch.Tensor]:
        """Member ``k``'s gradients, in its own run's order: its adapter slices (UNet, then text encoders),
        then its token rows."""
        grads = self.adapters.member_grads(k) if self.adapters is not None else []
        if self.tokens is not None:
            grads += [p.grad for p in self.tokens.member_parameters(k) if p.grad is not None]
        return grads

    @contextmanager
    def as_member(self, k: int) -> Iterator[SimpleNamespace]:
        """Member ``k`` alone in the model for the ``with`` block: its adapter (with its current values) in
        place of the stacked layers, its word bound to its tokens. Yields what a callback reads of a module:
        ``components``, ``adapters``, ``current_epoch``, ``train()``."""
        rewrites = self.components.prompt_rewrites
        # its word first, then every token to all its vectors (the order rewrites apply in)
        self.components.prompt_rewrites = {**self.rewrites[k], **rewrites}
        try:
            with (self.adapters.member_in_model(k) if self.adapters is not None else nullcontext()) as adapters:
                yield SimpleNamespace(components=self.components, adapters=adapters, current_epoch=self.current_epoch,
                                      train=self.train)
        finally:
            self.components.prompt_rewrites = rewrites

    def member_prompts(self, k: int, prompts: Sequence[str]) -> list[str]:
        """Member ``k``'s prompts with its word rewritten to its own token (:func:`lorabench.run.member_tokens`),
        which the model then reads as all its vectors."""
        if not self.rewrites[k]:
            return list(prompts)
        return [rewrite_prompt(p, self.rewrites[k]) for p in prompts]

    def member_generator(self, k: int) -> torch.Generator:
        if self._gens[k] is None:
            self._gens[k] = generator("noise", self.seeds[k], self.global_rank)
        return self._gens[k]

    def training_step(self, batch: list, batch_idx):
        if self.cuda_graph:
            return self.captured_training_step(batch)
        counts, n_priors, prompts, time_ids, latents, noise, timesteps = self.draw_members(batch)
        with self.route(counts), self.factor_casts():
            per_example = self.diffusion_loss({"prompts": prompts, "time_ids": time_ids}, noise, timesteps, latents,
                                              reduce=False)
        losses = self.member_losses_of(per_example, counts, n_priors)
        self._pending_losses.append(losses.detach())
        loss = losses.sum()
        self.log("train/loss", loss / len(counts), on_step=True, prog_bar=True, batch_size=sum(counts))
        return loss

    def draw_members(self, batch: list) -> tuple[list[int], list[int], list[str], Optional[torch.Tensor],
                                                 torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every member's draws from its own noise stream (:meth:`draw`), joined member by member:
        ``(counts, n_priors, prompts, time_ids, latents, noise, timesteps)``, each member's prompts naming its
        own tokens; ``time_ids``: SDXL's per-example size conditioning when the data carries it, else None."""
        parts = [self.draw(b, self.member_generator(k)) for k, b in enumerate(batch)]
        counts = [part[1].shape[0] for part in parts]
        n_priors = [int(b.get("num_prior", 0)) for b in batch]
        prompts = [p for k, (b, *_) in enumerate(parts) for p in self.member_prompts(k, b["prompts"])]
        time_ids = torch.cat([b["time_ids"] for b in batch]) if all("time_ids" in b for b in batch) else None
        latents, noise, timesteps = (torch.cat([part[i] for part in parts]) for i in (1, 2, 3))
        return counts, n_priors, prompts, time_ids, latents, noise, timesteps

    def member_losses_of(self, per_example: torch.Tensor, counts: list[int], n_priors: list[int]) -> torch.Tensor:
        """Each member's loss, (K,): its own examples' mean, prior examples weighted as in its run."""
        return torch.stack([self.reduce_loss(chunk, n)[0] for chunk, n in zip(per_example.split(counts), n_priors)])

    def captured_member_loss(self, counts: list[int], n_priors: list[int],
                             **inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The captured step's loss from tensors alone (the sum of the members' losses) and the members'
        losses, as :meth:`training_step` computes them."""
        with self.route(counts), self.factor_casts():
            cond = self.encode_step_tokens(inputs)
            per_example = self.noise_loss(cond, inputs["noise"], inputs["timesteps"], inputs["latents"],
                                          reduce=False)
        losses = self.member_losses_of(per_example, counts, n_priors)
        return losses.sum(), losses.detach()

    def captured_training_step(self, batch: list):
        """:meth:`training_step` under ``module.cuda_graph``: each member's draws and prompts as there, the
        forward-to-clipping part through a :class:`~lorabench.training.cuda_graph.CapturedStep`."""
        counts, n_priors, prompts, time_ids, latents, noise, timesteps = self.draw_members(batch)
        inputs = self.step_inputs(latents, noise, timesteps, prompts, time_ids)
        step = self.run_captured((tuple(counts), tuple(n_priors)),
                                 partial(self.captured_member_loss, counts, n_priors), inputs,
                                 lambda: self.clip_members(*self.graph_clip))
        losses = step.aux.clone()
        self._pending_losses.append(losses)
        if step.hook_out is not None:
            self._grad_norms = step.hook_out.clone()
        loss = losses.sum()
        self.log("train/loss", loss / len(counts), on_step=True, prog_bar=True, batch_size=sum(counts))
        return loss

    @property
    def member_losses(self) -> list[list[float]]:
        """Each member's training loss at every step so far (its own batch's mean, as its run logs it)."""
        if self._pending_losses:
            for step in torch.stack(self._pending_losses).cpu().tolist():
                for k, v in enumerate(step):
                    self._losses[k].append(v)
            self._pending_losses = []
        return self._losses

    @property
    def member_grad_norms(self) -> list[Optional[float]]:
        """Each member's gradient norm before clipping at the last step (None before the first)."""
        if self._grad_norms is None:
            return [None] * len(self.seeds)
        return [None if v != v else float(v) for v in self._grad_norms.cpu().tolist()]

    def on_train_batch_end(self, outputs, batch, batch_idx):
        step = self.trainer.global_step
        every = max(1, int(self.trainer.log_every_n_steps or 1))
        if step % every:
            return
        if not any(self.step_loggers):
            return
        lr = self.trainer.optimizers[0].param_groups[0]["lr"]
        losses, norms = self.member_losses, self.member_grad_norms
        for k, loggers in enumerate(self.step_loggers):
            metrics = {"train/loss": losses[k][-1], "train/lr": float(lr)}
            if norms[k] is not None:
                metrics["train/grad_norm"] = norms[k]
            for lg in loggers:
                lg.log_metrics(metrics, step=step - 1)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """Each member's gradient clipped by its own norm, as its own run clips it."""
        norms = self.clip_members(gradient_clip_val, gradient_clip_algorithm)
        if norms is not None:
            self._grad_norms = norms

    def clip_members(self, gradient_clip_val=None, gradient_clip_algorithm=None) -> Optional[torch.Tensor]:
        """Clip each member's gradient by its own norm; returns the members' norms before clipping (NaN for a
        member without gradient; None when clipping by value). Tensor arithmetic only: it also runs inside a
        captured step."""
        if gradient_clip_val and (gradient_clip_algorithm or "norm") == "value":
            params = [p for g in self.trainer.optimizers[0].param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)  # element-wise: per member as it is
            return None
        max_norm = float(gradient_clip_val) if gradient_clip_val else float("inf")
        stacked = [p for p in (self.adapters.trainable_parameters() if self.adapters is not None else [])
                   if p.grad is not None]
        if stacked and self.tokens is None and all(p.is_cuda for p in stacked):
            # the accelerator's arithmetic: every member's norm from one reduction per stacked tensor, and
            # one scaling of each (equal to the loop below up to rounding; the CPU keeps the loop, so its
            # members' gradients are those of their own runs bit for bit)
            k = len(self.seeds)
            total = torch.stack([p.grad.reshape(k, -1).float().pow(2).sum(1) for p in stacked]).sum(0).sqrt()
            coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
            for p in stacked:
                p.grad.mul_(coef.view(k, *([1] * (p.grad.dim() - 1))).to(p.grad.dtype))
            return total.detach()
        norms = []
        for k in range(len(self.seeds)):
            grads = self.member_grads(k)
            if not grads:
                norms.append(None)
                continue
            total = torch.nn.utils.get_total_norm(grads)
            coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
            for g in grads:
                g.mul_(coef)
            norms.append(total.detach())
        if not any(n is not None for n in norms):
            return None
        like = next(n for n in norms if n is not None)  # nan: a member with no gradient this step
        return torch.stack([n if n is not None else torch.full_like(like, float("nan")) for n in norms])

    # -- validation: every member's fixed-noise loss, all members in one forward pass ----------------
    def validation_step(self, batch: list, batch_idx):
        inputs, counts = [], []
        for k, b in enumerate(batch):
            if b is None:
                counts.append(0)
                continue
            inputs.append((k, b, self.val_inputs(b, self.seeds[k])))
            counts.append(inputs[-1][2][1].shape[0])
        rep = {"prompts": [p for k, _, x in inputs for p in self.member_prompts(k, x[0]["prompts"])]}
        noise, t, latents = (torch.cat([x[i] for *_, x in inputs]) for i in (1, 2, 3))
        with self.route(counts):
            per = self.val_example_losses(rep, noise, t, latents)
        examples = [len(b["index"]) for _, b, _ in inputs]
        for (k, b, _), chunk in zip(inputs, per.split(examples)):
            self._val_parts.append((k, chunk.detach(), b["index"]))

    def on_validation_epoch_start(self):
        self._val_parts = []

    def on_validation_epoch_end(self):
        for k in range(len(self.seeds)):
            mine = [(loss, index) for j, loss, index in self._val_parts if j == k]
            if mine:
                self.member_val[k].append(unique_mean(torch.cat([m[0] for m in mine]).cpu(),
                                                      torch.cat([m[1] for m in mine]).cpu()))
        self._val_parts = []

    def member_results(self) -> list[dict[str, Any]]:
        """Per member: its per-step losses and its validation losses (before, after)."""
        return [{"losses": self.member_losses[k], "val": self.member_val[k]} for k in range(len(self.seeds))]
