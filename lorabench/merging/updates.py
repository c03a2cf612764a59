"""Per-layer weight updates: what every merge method reads and writes.

An :class:`AdapterUpdate` is one trained adapter reduced to ``{layer: (up, down)}`` with
``dW = up @ down`` (scale and multiplier folded into ``up``), whatever it was trained as: LoRA,
OrthA, TriLoRA (folded), or a diffusers / kohya file. A merge returns ``{layer: LayerDelta}``: a
low-rank pair when the result is exactly low rank (sums), a dense matrix otherwise (TIES, DARE,
gradient fusion). Deltas are applied to a model's base weights, saved as an adapter file at a
chosen rank, or saved as a merged diffusers UNet folder.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping as MappingABC
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Iterator, Mapping, Optional, Sequence

import torch

from lorabench.adapters import load_adapter, lora_from_pairs, lora_pairs, read_safetensors, write_adapter_files
from lorabench.errors import ConfigError
from lorabench.utils.io import atomic_dir


@dataclass(frozen=True, eq=False)
class FactorStack:
    """The factors of several layers of one shape and rank, stacked: ``ups`` (L, out, r) and ``downs``
    (L, r, in), ``layers[i]``'s pair being ``(ups[i], downs[i])``. Sums and folds work on whole stacks,
    a few kernels per shape instead of a few per layer."""

    layers: tuple[str, ...]
    ups: torch.Tensor
    downs: torch.Tensor


def stack_factors(pairs: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> tuple[FactorStack, ...]:
    """``pairs`` (``{layer: (up, down)}``) grouped by (out, in, rank, device, dtype) and stacked, in the
    order of each group's first layer."""
    groups: dict[tuple, list[str]] = defaultdict(list)
    for layer, (up, down) in pairs.items():
        groups[up.shape[0], down.shape[1], up.shape[1], up.device, up.dtype].append(layer)
    return tuple(FactorStack(tuple(layers), torch.stack([pairs[k][0] for k in layers]),
                             torch.stack([pairs[k][1] for k in layers])) for layers in groups.values())


class LayerDelta:
    """One layer's merged update: ``up @ down`` or ``dense`` (shape (out, in), float32). A low-rank
    delta made by a stacked sum holds its ``stack`` and its slice ``index`` there instead of a pair: ``up``
    and ``down`` are made (views) when first read, and :func:`fold` applies the whole stack at once
    without them."""

    __slots__ = ("_up", "_down", "dense", "stack", "index")

    def __init__(self, up: Optional[torch.Tensor] = None, down: Optional[torch.Tensor] = None,
                 dense: Optional[torch.Tensor] = None, stack: Optional[FactorStack] = None,
                 index: Optional[int] = None):
        if (stack is None) != (index is None):
            raise ValueError("a stacked delta needs both its stack and its index")
        self._up, self._down, self.dense, self.stack, self.index = up, down, dense, stack, index

    @property
    def up(self) -> Optional[torch.Tensor]:
        """The (out, r) factor (None for a dense delta)."""
        if self._up is None and self.stack is not None:
            self._up = self.stack.ups[self.index]
        return self._up

    @property
    def down(self) -> Optional[torch.Tensor]:
        """The (r, in) factor (None for a dense delta)."""
        if self._down is None and self.stack is not None:
            self._down = self.stack.downs[self.index]
        return self._down

    def __repr__(self) -> str:
        kind = "dense" if self.dense is not None else f"rank {self.up.shape[1]}"
        return f"LayerDelta({kind}, shape={self.shape})"

    @property
    def shape(self) -> tuple[int, int]:
        """``(out, in)`` of the merged update."""
        return tuple(self.dense.shape) if self.dense is not None else (self.up.shape[0], self.down.shape[1])

    def to_dense(self) -> torch.Tensor:
        """The update as one (out, in) matrix."""
        return self.dense if self.dense is not None else self.up @ self.down

    @torch.no_grad()
    def add_to_(self, weight: torch.Tensor, alpha: float = 1.0) -> None:
        """``weight += alpha * delta`` in place, in the weight's dtype (2-D view of 1x1 convs)."""
        w = weight.view(weight.shape[0], -1)
        if self.dense is not None:
            w.add_(self.dense.to(w.device, w.dtype), alpha=alpha)
        else:
            w.addmm_(self.up.to(w.device, w.dtype), self.down.to(w.device, w.dtype), alpha=alpha)

    def low_rank(self, rank: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(up, down, dropped)``: the best rank-``rank`` approximation (``None``: exact, the pair's
        own rank or the dense matrix's numerical rank) and the share of squared Frobenius norm it
        drops (0 when exact)."""
        if self.dense is not None:
            u, s, vh = torch.linalg.svd(self.dense.double(), full_matrices=False)
        else:
            qu, ru = torch.linalg.qr(self.up.double())
            qd, rd = torch.linalg.qr(self.down.double().T)
            uc, s, vhc = torch.linalg.svd(ru @ rd.T)
            u, vh = qu @ uc, (qd @ vhc.T).T
        if rank is None:
            rank = int((s > s.max() * 1e-7).sum()) if len(s) and s.max() > 0 else 1
        rank = max(1, min(rank, len(s)))
        total = float((s ** 2).sum())
        dropped = float((s[rank:] ** 2).sum()) / total if total > 0 else 0.0
        up = (u[:, :rank] * s[:rank]).float()
        return up, vh[:rank].float().contiguous(), dropped


class StackedDeltas(MappingABC):
    """``{layer: LayerDelta}`` of a stacked sum, read-only: the merged :class:`FactorStack` s and the layers'
    order. Each layer's :class:`LayerDelta` (its stack and index) is made when first read; :func:`fold` applies
    the stacks whole, without visiting the layers one by one (the host's work per merge is what bounds a
    merge on a GPU, docs/benchmarks.md)."""

    def __init__(self, stacks: Sequence[FactorStack], order: Sequence[str]):
        self.stacks = tuple(stacks)
        self._where = {layer: (s, i) for s in self.stacks for i, layer in enumerate(s.layers)}
        self._order = tuple(order)
        if len(self._order) != len(self._where) or self._where.keys() != set(self._order):
            raise ValueError("the order must name every stacked layer once")
        self._made: dict[str, LayerDelta] = {}

    def __getitem__(self, layer: str) -> "LayerDelta":
        d = self._made.get(layer)
        if d is None:
            stack, index = self._where[layer]
            d = self._made[layer] = LayerDelta(stack=stack, index=index)
        return d

    def __iter__(self) -> Iterator[str]:
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._order)


@dataclass
class AdapterUpdate:
    """One adapter's per-layer updates, and where they came from.

    ``layers`` is read-only once built: the factors are stored stacked by shape (:attr:`stacks`) and
    each layer's pair is a view of its stack, so merges and folds take a few kernels per shape. Build a
    new update to change the layers."""

    name: str
    layers: Mapping[str, tuple[torch.Tensor, torch.Tensor]]  # {layer: (up, down)}, dW = up @ down
    base_model: str = ""
    base_fingerprint: str = ""
    adapter_type: str = "lora"
    config: dict = field(default_factory=dict)
    layer_metadata: dict = field(default_factory=dict)  # e.g. OrthA's basis rows per layer
    stacks: tuple[FactorStack, ...] = field(init=False, repr=False)

    def __post_init__(self):
        pairs = {k: (up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1)) for k, (up, down) in
                 self.layers.items()}
        self.stacks = stack_factors(pairs)
        views = {}
        for s in self.stacks:
            views.update(zip(s.layers, zip(s.ups.unbind(0), s.downs.unbind(0))))
        self.layers = MappingProxyType({k: views[k] for k in pairs})  # the given layer order
        self._shapes = MappingProxyType({k: (u.shape[0], d.shape[1]) for k, (u, d) in self.layers.items()})
        self._layout = tuple((s.layers, s.ups.shape[1], s.downs.shape[2]) for s in self.stacks)

    def delta(self, layer: str) -> torch.Tensor:
        """``up @ down`` of one layer."""
        up, down = self.layers[layer]
        return up @ down

    def deltas(self, weight: float = 1.0) -> dict[str, "LayerDelta"]:
        """The update as ``{layer: LayerDelta}`` (its pairs, ``up`` times ``weight``): what
        :func:`merged_into` adds to a model's weights."""
        return {k: LayerDelta(up=up * weight if weight != 1.0 else up, down=down)
                for k, (up, down) in self.layers.items()}

    def shapes(self) -> Mapping[str, tuple[int, int]]:
        """``{layer: (out, in)}`` (read-only)."""
        return self._shapes

    def layout(self) -> tuple:
        """Which layers each stack holds, with their (out, in): two updates of one layout sum stack by stack."""
        return self._layout


def updates_from_adapters(adapters, name: str, base_model: str = "") -> AdapterUpdate:
    """The updates of adapters injected in a model (unmerged)."""
    if adapters.merged:
        raise RuntimeError("unmerge the adapters before reading their updates")
    pairs = {k: (u.reshape(u.shape[0], -1).clone(), d.reshape(d.shape[0], -1).clone())
             for k, (u, d) in lora_pairs(adapters).items()}
    return AdapterUpdate(name, pairs, base_model, adapters.base_fingerprint(),
                         adapters.adapter_type, dict(adapters.config), adapters.layer_metadata())


def read_update(components, path, name: Optional[str] = None) -> AdapterUpdate:
    """Read an adapter file (lorabench, diffusers or kohya format) as updates of ``components``'s layers.

    The adapter is injected to resolve layer names and fold its factors, then removed again."""
    _, metadata = read_safetensors(path)
    adapters = load_adapter(components, path)
    try:
        upd = updates_from_adapters(adapters, name or Path(path).stem, base_model=metadata.get("base_model", ""))
    finally:
        adapters.remove()
    # The model it was trained on (lorabench files record it), not the one it was loaded into;
    # unknown for diffusers and kohya files.
    upd.base_fingerprint = metadata.get("base_fingerprint", "")
    if metadata.get("layers"):
        upd.layer_metadata = json.loads(metadata["layers"])
    return upd


def check_compatible(updates: Sequence[AdapterUpdate], field_name: str = "merge.inputs") -> None:
    """One-line errors for updates that cannot be merged: different base models, different layers
    or shapes, a name listed twice, OrthA disjoint adapters that share basis rows."""
    if not updates:
        raise ConfigError(field_name, "nothing to merge; give at least one adapter")
    names = [u.name for u in updates]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(field_name, f"adapter {dup[0]!r} is listed twice; each concept merges once")
    first = updates[0]
    for u in updates[1:]:
        # the layers first: a fingerprint hashes the base weights of the layers an adapter adapts, so adapters of
        # one model with other targets (text-encoder layers in one) were said to be of another base model
        if u.shapes() != first.shapes():
            extra = sorted(set(u.layers) ^ set(first.layers))
            what = (f"layer {extra[0]!r} is in one and not the other" if extra else
                    "the same layers have different shapes")
            raise ConfigError(field_name, f"{u.name!r} and {first.name!r} adapt different target modules ({what}); "
                              "merge adapters with the same targets")
        if u.base_fingerprint and first.base_fingerprint and u.base_fingerprint != first.base_fingerprint:
            raise ConfigError(field_name, f"{u.name!r} was trained on another base model than {first.name!r} "
                              f"(base weights {u.base_fingerprint} vs {first.base_fingerprint}); merge adapters "
                              "of one base model")
    check_disjoint_rows(updates, field_name)


def check_disjoint_rows(updates: Sequence[AdapterUpdate], field_name: str) -> None:
    """OrthA in disjoint mode promises non-overlapping rows; two adapters that share rows break it."""
    disjoint = [u for u in updates if u.adapter_type == "ortho" and u.config.get("row_mode") == "disjoint"]
    for a_i, a in enumerate(disjoint):
        for b in disjoint[a_i + 1:]:
            for layer, meta in a.layer_metadata.items():
                other = b.layer_metadata.get(layer)
                if other and set(meta["rows"]) & set(other["rows"]):
                    raise ConfigError(field_name, f"OrthA adapters {a.name!r} and {b.name!r} share basis rows in "
                                      f"disjoint mode (slots {a.config.get('slot')} and {b.config.get('slot')}); "
                                      "give each concept its own adapter.slot")


def _fold_stack(weights: list[torch.Tensor], stack: FactorStack, alpha: float) -> bool:
    """``weights[i] += alpha * ups[i] @ downs[i]`` for a whole stack (``weights`` in its layers' order, 2-D views
    of 1x1 convs taken here; :func:`fold` calls it under no_grad): one batched matmul and one multi-tensor add.
    False, and nothing done, where the weights differ in device or dtype or do not have the stack's shape."""
    device, dtype = weights[0].device, weights[0].dtype
    shape = (stack.ups.shape[1], stack.downs.shape[2])
    ws = []
    for w in weights:  # one pass, device and dtype read once: this check is a tenth of a merge's host work
        if w.dim() != 2:
            w = w.view(w.shape[0], -1)
        if w.shape != shape or w.dtype != dtype or w.device != device:
            return False
        ws.append(w)
    prod = torch.bmm(stack.ups.to(device, dtype), stack.downs.to(device, dtype)).unbind(0)
    torch._foreach_add_(ws, list(prod), alpha=alpha)
    return True


@torch.no_grad()
def fold(weights: Mapping[str, torch.Tensor], deltas: Mapping[str, LayerDelta], alpha: float = 1.0) -> None:
    """``weights[k] += alpha * deltas[k]`` for every layer, in place, in each weight's dtype, with few
    kernels: the low-rank deltas of one (shape, rank, device, dtype) in one batched matmul and one
    multi-tensor add, the dense deltas in one multi-tensor add. Each layer's result equals
    :meth:`LayerDelta.add_to_`'s to float tolerance (one more rounding of the product)."""
    groups: dict[tuple, list[tuple[torch.Tensor, LayerDelta]]] = defaultdict(list)
    stacked: dict[int, list[tuple[torch.Tensor, LayerDelta]]] = defaultdict(list)
    whole: list[tuple[FactorStack, list[torch.Tensor]]] = []  # stacks given whole, weights in the stack's order
    dense_w, dense_d = [], []
    if isinstance(deltas, StackedDeltas):  # whole stacks: no layer by layer grouping
        whole = [(st, [weights[k] for k in st.layers]) for st in deltas.stacks]
        deltas = {}
    for k, d in deltas.items():
        w = weights[k]
        if w.dim() != 2:
            w = w.view(w.shape[0], -1)
        if d.dense is not None:
            dense_w.append(w)
            dense_d.append(d.dense.to(w.device, w.dtype))
        elif d.stack is not None:
            stacked[id(d.stack)].append((w, d))
        else:
            groups[tuple(w.shape), d.up.shape[1], w.device, w.dtype].append((w, d))
    for items in stacked.values():
        stack = items[0][1].stack
        if len(items) == len(stack.layers):  # the whole stack: its weights in its order
            whole.append((stack, [w for w, _ in sorted(items, key=lambda item: item[1].index)]))
        else:  # part of a stack: the general path
            for w, d in items:
                groups[tuple(w.shape), d.up.shape[1], w.device, w.dtype].append((w, d))
    for stack, ws in whole:
        if not _fold_stack(ws, stack, alpha):  # weights of mixed dtypes or devices: the general path
            for i, w in enumerate(ws):
                w = w if w.dim() == 2 else w.view(w.shape[0], -1)
                d = LayerDelta(stack=stack, index=i)
                groups[tuple(w.shape), d.up.shape[1], w.device, w.dtype].append((w, d))
    for (_, _, device, dtype), items in groups.items():
        if len(items) == 1:
            items[0][1].add_to_(items[0][0], alpha)
            continue
        ups = torch.stack([d.up.to(device, dtype) for _, d in items])
        downs = torch.stack([d.down.to(device, dtype) for _, d in items])
        torch._foreach_add_([w for w, _ in items], list(torch.bmm(ups, downs).unbind(0)), alpha=alpha)
    if dense_w:
        torch._foreach_add_(dense_w, dense_d, alpha=alpha)


@contextmanager
def merged_into(adapted: Mapping[str, torch.Tensor], deltas: Mapping[str, LayerDelta]) -> Iterator[None]:
    """Add ``deltas`` to the weights ``adapted`` (``{layer: weight}``) for the ``with`` block, then put
    the exact original weights back (copies, not a subtraction, so nothing drifts)."""
    missing = sorted(set(deltas) - set(adapted))
    if missing:
        raise ConfigError("merge", f"layer {missing[0]!r} of the merge is not in the model ({len(missing)} such)")
    saved = {k: adapted[k].detach().clone() for k in deltas}
    try:
        fold({k: adapted[k].data for k in deltas}, deltas)
        yield
    finally:
        with torch.no_grad():
            for k, w in saved.items():
                adapted[k].data.copy_(w)


def model_weights(components, layer_names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The weights of ``layer_names`` (``unet.<path>``, ``text_encoder.<path>``) in a model without adapters."""
    roots = components.adaptable_modules()
    out = {}
    for name in layer_names:
        prefix, _, path = name.partition(".")
        if prefix not in roots:
            raise ConfigError("merge", f"layer {name!r}: unknown model part {prefix!r}")
        try:
            out[name] = roots[prefix].get_submodule(path).weight
        except AttributeError as exc:
            raise ConfigError("merge", f"layer {name!r} is not in the model") from exc
    return out


def merged_pairs(deltas: Mapping[str, LayerDelta], rank: Optional[int] = None
                 ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, float]]:
    """Each layer's merge as factors ``(up, down)`` at ``rank`` (``None``: exact), never above the layer's
    ``min(out, in)`` (a dense merge, e.g. TIES, is exact there); and ``{layer: share of energy dropped}``."""
    pairs, dropped = {}, {}
    for layer, d in deltas.items():
        up, down, lost = d.low_rank(rank)
        pairs[layer] = (up.cpu().contiguous(), down.cpu().contiguous())
        dropped[layer] = lost
    return pairs, dropped


def save_merged_adapter(components, deltas: Mapping[str, LayerDelta], folder, rank: Optional[int] = None,
                        exports: Sequence[str] = ("diffusers", "kohya"), base_model: str = "",
                        metadata: Optional[Mapping[str, str]] = None) -> tuple[list[Path], dict[str, float]]:
    """Write the merge as a LoRA into ``folder``: ``adapter.safetensors`` (lorabench's layout) and the
    ``exports`` (diffusers: ``pytorch_lora_weights.safetensors``, kohya: ``kohya_lora.safetensors``), each
    layer at its own rank (:func:`merged_pairs`), so lorabench, diffusers and kohya loaders read them all.
    Returns the paths and ``{layer: share of energy dropped}``."""
    pairs, dropped = merged_pairs(deltas, rank)
    adapters = lora_from_pairs(components, pairs, "merge")
    try:
        paths = write_adapter_files(adapters, folder, exports, base_model=base_model, extra=metadata)
    finally:
        adapters.remove()
    return paths, dropped


def save_merged_unet(components, deltas: Mapping[str, LayerDelta], folder) -> Path:
    """Write the UNet with the merge folded in as a diffusers folder (``UNet2DConditionModel.from_pretrained``)."""
    unet_layers = {k: v for k, v in deltas.items() if k.startswith("unet.")}
    if len(unet_layers) < len(deltas):
        raise ConfigError("merge.output", "the merge adapts text-encoder layers too; save it as an adapter file "
                          "(merge.save_as=adapter), a UNet folder would drop them")
    with merged_into(model_weights(components, list(unet_layers)), unet_layers):
        with atomic_dir(Path(folder)) as tmp:
            components.unet.save_pretrained(str(tmp), safe_serialization=True)
    return Path(folder)
