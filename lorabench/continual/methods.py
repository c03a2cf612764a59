"""Low-rank continual personalization (Staniszewski, Zaleska, Deja; arXiv 2410.04891): how knowledge
passes from task to task in the strict setting, where at most one adapter, or one merged model, is
handed on.

Every method is a small class behind one interface, registered by name (``protocol.method.name``):

- ``train_deltas()``: what is added to the base weights W0 while the next task trains;
- ``adapter_config(cfg, t, T)``: the adapter task ``t`` trains (default: ``cfg`` unchanged);
- ``start(adapters, t)``: initialise the freshly injected adapter before training;
- ``finish(adapters, t)``: fold the trained adapter into the carried state; returns the task vector
  (the dense change task ``t`` made) so the protocol can measure sign conflicts;
- ``eval_deltas()``: what the evaluated model adds to W0 after the task;
- ``state_dict()`` / ``load_state_dict()``: the carried state, all tensors (resume).

Methods (W0: base weights; dW_t = up_t @ down_t * scale, the adapter trained at task t):

- ``naive``: one adapter; task t starts from the adapter task t-1 ended with. Model: W0 + dW.
- ``merge_init``: after each task the adapter is fused into the base at scale ``lam`` (1); the next
  task trains a fresh adapter (its config's init, gaussian by default) on the fused model.
- ``ortho_init``: a running "continual" adapter (up_c, down_c). At task t > 0 the new ``down`` is
  built column by column: for every input feature j, the r-vector orthogonal to column j of down_c
  given by the last right-singular vector of that 1 x r matrix (``torch.linalg.svd``); ``up`` starts
  at 0. Task t trains on W0 + up_c @ down_c; afterwards the continual adapter becomes the element-wise
  sum (up_c + up_t, down_c + down_t), so the model is W0 + (sum up)(sum down), cross terms included,
  exactly as the reference code does. (Its evaluation script loads this method's output as a full
  pipeline, a bug not copied here: the evaluated model is the one described.)
- ``magmax`` (MagMax-light): each task trains a fresh adapter on the current merged model (the
  reference runs it through the merge & init script); the merged delta keeps, element by element,
  the value of largest magnitude among the per-task deltas, sign kept, ties to the newer task, and
  the model is W0 + lam * merged (lam 1.0 as in the reference; the original MagMax uses 0.5).
- ``merge:<name>``: any merge of :mod:`lorabench.merging` (ties, dare, task_arithmetic, sum, svd) of
  the running merged delta with the new task's delta; ``merge_options`` are its options.
- ``ortha``: Orthogonal Adaptation inside a sequence (a cross-paper row): task t trains an OrthA
  adapter on disjoint basis slot t of T (fresh rows per task, ``down`` frozen) on the running model,
  and its delta is added at scale ``lam``.

TriLoRA as the per-task adapter is ``merge_init`` (or ``magmax``) with ``adapter=trilora``.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar, Mapping, Optional

import torch

from lorabench.adapters import lora_pairs
from lorabench.errors import ConfigError, choice_error
from lorabench.merging.methods import MERGES, check_merge, merge
from lorabench.merging.updates import AdapterUpdate, LayerDelta, fold, model_weights
from lorabench.utils.registry import Registry

CONTINUAL: Registry[type["ContinualMethod"]] = Registry("continual method", "protocol.method.name")


def register_continual(name: str):
    """Class decorator: make a method available as ``protocol.method.name=<name>``."""
    return CONTINUAL.register(name, on_register=lambda cls, n: setattr(cls, "name", n))


def method_names() -> list[str]:
    """Every valid ``protocol.method.name``: the registered methods and ``merge:<name>`` for every merge
    that needs no input statistics."""
    return [*CONTINUAL, *(f"merge:{m}" for m, spec in MERGES.items() if not spec.needs_stats)]


def build_method(cfg: Mapping[str, Any]) -> "ContinualMethod":
    """A method from its config (``{name, **options}``); unknown names and options are one-line errors."""
    cfg = dict(cfg or {})
    name = str(cfg.pop("name", None))
    if name.startswith("merge:"):
        merge_name = name.split(":", 1)[1]
        if merge_name not in MERGES or MERGES[merge_name].needs_stats:
            raise choice_error("protocol.method.name", name, method_names())
        check_merge({"name": merge_name, **dict(cfg.get("merge_options") or {})}, "protocol.method.merge_options")
        cls, cfg = RegistryMerge, {"merge": merge_name, **cfg}
    elif name in CONTINUAL:
        cls = CONTINUAL[name]
    else:
        raise choice_error("protocol.method.name", name, method_names())
    valid = set(inspect.signature(cls.__init__).parameters) - {"self"}
    for key in cfg:
        if key not in valid:
            raise ConfigError(f"protocol.method.{key}", f"not an option of {name!r}; valid: "
                              f"{', '.join(sorted(valid)) or 'none'}")
    return cls(**cfg)


def dense_deltas(adapters) -> dict[str, torch.Tensor]:
    """``{layer: dW}`` (float32, (out, in)) of the injected adapters, scale and multiplier included."""
    return {k: (u.reshape(u.shape[0], -1) @ d.reshape(d.shape[0], -1)) for k, (u, d) in lora_pairs(adapters).items()}


def magmax_select(previous: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Element-wise value of larger magnitude, sign kept, ties to ``new`` (the newer task)."""
    return torch.where(new.abs() >= previous.abs(), new, previous)


def orthogonal_columns(down: torch.Tensor) -> torch.Tensor:
    """A (r, in) matrix whose column j is the unit r-vector orthogonal to column j of ``down``: the
    last right-singular vector of the 1 x r matrix ``down[:, j]^T`` (one batched SVD)."""
    _, _, vh = torch.linalg.svd(down.T.double()[:, None, :])  # (in, r, r)
    return vh[:, -1, :].T.to(down.dtype).contiguous()


def lora_params(adapters, t: int, method: str) -> dict[str, tuple[torch.nn.Parameter, torch.nn.Parameter]]:
    """``{layer: (lora_up, lora_down)}`` of a LoRA adapter; other adapter types are an error."""
    if adapters.adapter_type != "lora":
        raise ConfigError("adapter.name", f"{method} builds LoRA factors; got adapter {adapters.adapter_type!r} "
                          "(use adapter=lora)")
    return {k: (layer.lora_up, layer.lora_down) for k, layer in adapters.layers.items()}


class ContinualMethod:
    """The interface (see the module docstring). State tensors live on the CPU in float32."""

    name: ClassVar[str] = ""

    def train_deltas(self) -> dict[str, LayerDelta]:
        return {}

    def adapter_config(self, cfg: dict, t: int, num_tasks: int) -> dict:
        return cfg

    def start(self, adapters, t: int) -> None:
        pass

    def finish(self, adapters, t: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def eval_deltas(self) -> dict[str, LayerDelta]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        raise NotImplementedError


class RunningModel:
    """The model a sequence trains and scores: its adapted layers' weights are ``W0 + deltas``, always
    written from an exact copy of W0 (taken the first time, from weights still at W0), so nothing drifts
    over tasks."""

    def __init__(self, components):
        self.components, self.w0 = components, {}

    def set(self, weights: Mapping[str, torch.Tensor], deltas: Mapping[str, LayerDelta]) -> None:
        """``weights`` (a model's adapted layers) = W0 + ``deltas``."""
        with torch.no_grad():
            if not self.w0:
                self.w0 = {k: w.detach().cpu().clone() for k, w in weights.items()}
            for k, w in weights.items():
                w.copy_(self.w0[k].to(w.device, w.dtype).view_as(w))
            fold({k: weights[k].data for k in deltas}, deltas)

    def reset(self, deltas: Mapping[str, LayerDelta]) -> None:
        """The model without adapters: its adapted layers (before any task trained here: those of ``deltas``,
        e.g. a finished run started again) = W0 + ``deltas``."""
        self.set(model_weights(self.components, list(self.w0 or deltas)), deltas)


def _split(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v.clone() for k, v in state.items() if k.startswith(prefix)}


class MergedDelta(ContinualMethod):
    """Methods that hand on one merged model, W0 + lam * merged: the next task trains on it."""

    def __init__(self, lam: float = 1.0):
        self.lam = float(lam)
        if not self.lam > 0:
            raise ConfigError("protocol.method.lam", f"must be > 0, got {lam}")
        self.merged: dict[str, torch.Tensor] = {}

    def combine(self, previous: Optional[torch.Tensor], new: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def train_deltas(self):
        return {k: LayerDelta(dense=v * self.lam) for k, v in self.merged.items()}

    eval_deltas = train_deltas

    def finish(self, adapters, t):
        task = {k: v.detach().cpu().float() for k, v in dense_deltas(adapters).items()}
        self.merged = {k: self.combine(self.merged.get(k), v) for k, v in task.items()}
        return task

    def state_dict(self):
        return {f"merged.{k}": v.contiguous() for k, v in self.merged.items()}

    def load_state_dict(self, state):
        self.merged = _split(state, "merged.")


@register_continual("merge_init")
class MergeInit(MergedDelta):
    """Merge & Init: every task's adapter is added to the running model at ``lam``; the next starts fresh."""
    def combine(self, previous, new):
        return new.clone() if previous is None else previous + new


@register_continual("magmax")
class MagMax(MergedDelta):
    """MagMax-light: per element, the task delta of largest magnitude (ties to the newer task)."""
    def combine(self, previous, new):
        return new.clone() if previous is None else magmax_select(previous, new)


@register_continual("ortha")
class OrthASequence(MergeInit):
    """OrthA adapters on disjoint basis slots, one per task, summed into the running model."""

    def adapter_config(self, cfg, t, num_tasks):
        if cfg.get("name") != "ortho":
            raise ConfigError("protocol.adapter.name", f"method 'ortha' trains Orthogonal Adaptation adapters; got "
                              f"{cfg.get('name')!r} (use adapter@protocol.adapter=ortho)")
        return {**cfg, "row_mode": "disjoint", "slot": t, "num_slots": num_tasks, "concept_key": f"task{t}"}


class RegistryMerge(MergedDelta):
    """``merge:<name>``: a merge-registry method applied to (merged so far, new task delta)."""

    def __init__(self, merge: str, merge_options: Optional[Mapping] = None):
        super().__init__(1.0)
        self.merge_name, self.merge_options = merge, dict(merge_options or {})
        self.name = f"merge:{merge}"

    def finish(self, adapters, t):
        task = {k: v.detach().cpu().float() for k, v in dense_deltas(adapters).items()}

        def update(name, deltas):  # dense deltas as exact low-rank pairs, what merges read
            pairs = {}
            for k, d in deltas.items():
                up, down, _ = LayerDelta(dense=d).low_rank()
                pairs[k] = (up, down)
            return AdapterUpdate(name, pairs)

        ups = ([update("merged", self.merged)] if self.merged else []) + [update(f"task{t}", task)]
        result = merge(ups, {"name": self.merge_name, **self.merge_options})
        self.merged = {k: d.to_dense().float() for k, d in result.deltas.items()}
        return task


@register_continual("naive")
class Naive(ContinualMethod):
    """One adapter, trained on: its parameters (and buffers) pass from task to task."""

    def __init__(self):
        self.params: dict[str, torch.Tensor] = {}
        self.deltas: dict[str, torch.Tensor] = {}

    def start(self, adapters, t):
        if self.params:
            adapters.load_state_dict(self.params, source="the previous task's adapter")

    def finish(self, adapters, t):
        new = {k: v.detach().cpu().float() for k, v in dense_deltas(adapters).items()}
        task = {k: v - self.deltas[k] if k in self.deltas else v for k, v in new.items()}
        self.params = {k: v.detach().cpu().clone() for k, v in adapters.state_dict().items()}
        self.deltas = new
        return task

    def eval_deltas(self):
        return {k: LayerDelta(dense=v) for k, v in self.deltas.items()}

    def state_dict(self):
        return {**{f"params.{k}": v.contiguous() for k, v in self.params.items()},
                **{f"delta.{k}": v.contiguous() for k, v in self.deltas.items()}}

    def load_state_dict(self, state):
        self.params, self.deltas = _split(state, "params."), _split(state, "delta.")


@register_continual("ortho_init")
class OrthoInit(ContinualMethod):
    """Merge & Orthogonal Init: see the module docstring."""

    def __init__(self):
        self.up: dict[str, torch.Tensor] = {}
        self.down: dict[str, torch.Tensor] = {}
        self.scale: dict[str, float] = {}

    def _delta(self, k: str) -> torch.Tensor:
        return (self.up[k] @ self.down[k]) * self.scale[k]

    def train_deltas(self):
        return {k: LayerDelta(dense=self._delta(k)) for k in self.up}

    eval_deltas = train_deltas

    @torch.no_grad()
    def start(self, adapters, t):
        params = lora_params(adapters, t, "ortho_init")
        if not self.down:
            return  # the first task: the adapter's own (gaussian) init
        for k, (up, down) in params.items():
            down.copy_(orthogonal_columns(self.down[k]).to(down.device, down.dtype))
            up.zero_()

    def finish(self, adapters, t):
        params = lora_params(adapters, t, "ortho_init")
        task = {}
        for k, (up, down) in params.items():
            u, d = up.detach().cpu().float(), down.detach().cpu().float()
            self.scale[k] = float(adapters.layers[k].scale * adapters.layers[k].multiplier)
            task[k] = (u @ d) * self.scale[k]
            self.up[k] = self.up[k] + u if k in self.up else u.clone()
            self.down[k] = self.down[k] + d if k in self.down else d.clone()
        return task

    def state_dict(self):
        out = {f"up.{k}": v.contiguous() for k, v in self.up.items()}
        out.update({f"down.{k}": v.contiguous() for k, v in self.down.items()})
        out.update({f"scale.{k}": torch.tensor(v) for k, v in self.scale.items()})
        return out

    def load_state_dict(self, state):
        self.up, self.down = _split(state, "up."), _split(state, "down.")
        self.scale = {k: float(v) for k, v in _split(state, "scale.").items()}


def sign_conflict_ratio(task: Mapping[str, torch.Tensor], previous: Mapping[str, LayerDelta]) -> Optional[float]:
    """The paper's Fig. 2 diagnostic: ``||tau * [sign(tau) != sign(P)]|| / ||tau||`` over all layers, where
    ``tau`` is the change task t made and ``P`` the delta handed on before it (entries where both are
    non-zero and of opposite sign are "opposed"). ``None`` when nothing was handed on yet."""
    if not previous:
        return None
    opposed, total = 0.0, 0.0
    for k, tau in task.items():
        p = previous[k].to_dense() if k in previous else torch.zeros_like(tau)
        mask = (torch.sign(tau) * torch.sign(p)) < 0
        opposed += float((tau[mask].double() ** 2).sum())
        total += float((tau.double() ** 2).sum())
    return (opposed / total) ** 0.5 if total > 0 else 0.0
