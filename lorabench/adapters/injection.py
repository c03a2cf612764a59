"""Inject adapters into the target layers of a model, and act on all of them at once."""

from __future__ import annotations

import dataclasses
import hashlib
import re
from typing import Iterator, Mapping, Optional, Sequence

import torch
from torch import nn

from lorabench.adapters.base import AdapterLayer, get_adapter_class, parse_options
from lorabench.errors import ConfigError

DEFAULT_UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# Keys of the adapter config that are about placement, not the adapter's own options.
PLACEMENT_KEYS = ("name", "target_modules", "text_encoder_targets", "rank_pattern")


def matches(name: str, targets: Sequence[str]) -> bool:
    """PEFT semantics: a target matches a module path equal to it or ending in ``.<target>``;
    ``re:<pattern>`` matches the full path by regex."""
    for t in targets:
        if t.startswith("re:"):
            if re.fullmatch(t[3:], name):
                return True
        elif name == t or name.endswith("." + t):
            return True
    return False


def base_fingerprint(weights: Mapping[str, torch.Tensor]) -> str:
    """A short hash of base weights: names, shapes and a strided sample of their float32 values.

    Two adapters (or a statistics file and a model) with different fingerprints were made on
    different base models. The sample (up to 4096 values a layer) keeps it fast on SD-sized UNets."""
    h = hashlib.sha256()
    for name in sorted(weights):
        w = weights[name].detach().float().reshape(-1)
        step = max(1, w.numel() // 4096)
        h.update(f"{name}:{tuple(weights[name].shape)}".encode())
        h.update(w[::step].cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, leaf, new)


class Adapters:
    """All adapter layers of one adapter config in one model (UNet and optional text encoders).

    Layer names are ``<prefix>.<module path>``, prefix ``unet``, ``text_encoder`` or
    ``text_encoder_2``: the same names the adapter files use.
    """

    def __init__(self, adapter_type: str, config: dict, layers: dict[str, AdapterLayer],
                 roots: dict[str, nn.Module]):
        self.adapter_type = adapter_type
        self.config = config
        self.layers = layers
        self._roots = roots

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def inject(cls, roots: Mapping[str, nn.Module], config: Mapping) -> "Adapters":
        """Wrap every target layer of every root (``{"unet": unet, "text_encoder": te}``).

        ``config``: ``name`` (registered adapter), ``target_modules`` (UNet targets),
        ``text_encoder_targets`` (optional; text encoders are left alone when empty), the
        adapter's own options (rank, alpha, ...) and ``rank_pattern`` (optional, PEFT's name:
        ``{layer: rank}`` for layers whose rank differs from ``rank``, e.g. a merge's factors; each keeps
        the adapter's scale ``alpha / rank``).
        """
        config = dict(config)
        adapter_cls = get_adapter_class(config.get("name"))
        if config.get("target_modules") is not None and not list(config["target_modules"]):
            # it took the default targets without a word (a text-encoder-only adapter is not what it trained)
            raise ConfigError("adapter.target_modules", "empty; give the UNet layers to adapt, or null for the "
                              f"default ({', '.join(DEFAULT_UNET_TARGETS)})")
        targets = {"unet": list(config.get("target_modules") or DEFAULT_UNET_TARGETS)}
        te_targets = list(config.get("text_encoder_targets") or [])
        options = {k: v for k, v in config.items() if k not in PLACEMENT_KEYS}
        opts = parse_options(adapter_cls, options)
        pattern = config.get("rank_pattern") or {}
        if not isinstance(pattern, Mapping) or not all(isinstance(r, int) and not isinstance(r, bool)
                                                       for r in pattern.values()):
            raise ConfigError("adapter.rank_pattern", "must map full layer names to ranks, e.g. {unet.down_blocks.0."
                              f"attentions.0.transformer_blocks.0.attn1.to_q: 8}}, got {pattern!r}")
        pattern = dict(pattern)
        layers: dict[str, AdapterLayer] = {}
        used_roots = {}
        for prefix, root in roots.items():
            tgt = targets["unet"] if prefix == "unet" else te_targets
            if not tgt or root is None:
                continue
            used_roots[prefix] = root
            names = [n for n, m in root.named_modules()
                     if n and matches(n, tgt) and not isinstance(m, AdapterLayer)]
            if any(isinstance(m, AdapterLayer) for m in root.modules()):
                raise ConfigError("adapter", f"{prefix} already carries adapters; remove or merge them first")
            for n in names:
                own = opts
                if f"{prefix}.{n}" in pattern:  # the same scale at its own rank
                    r = pattern[f"{prefix}.{n}"]
                    own = dataclasses.replace(opts, rank=r, alpha=None if opts.alpha is None
                                              else float(opts.alpha) * r / opts.rank)
                    try:
                        own.validate()
                    except ConfigError as err:  # its rank, named by the key that gave it (adapter.rank before)
                        raise ConfigError(f"adapter.rank_pattern.{prefix}.{n}", err.message) from None
                layer = adapter_cls(root.get_submodule(n), f"{prefix}.{n}", own)
                layers[f"{prefix}.{n}"] = layer
            field = "adapter.target_modules" if prefix == "unet" else "adapter.text_encoder_targets"
            if not names:
                raise ConfigError(field, f"no layer of {prefix} matches {tgt}; e.g. to_q, to_k, to_v, to_out.0 "
                                  "(UNet) or q_proj, k_proj, v_proj, out_proj (CLIP text encoder)")
        unknown = sorted(set(pattern) - set(layers))
        if unknown:
            raise ConfigError("adapter.rank_pattern", f"names no targeted layer: {unknown[:3]}; its keys are full "
                              f"layer names, e.g. {next(iter(layers), 'unet.<module path>')!r}")
        # Replace only after every layer was built, so a bad config leaves the model untouched.
        for full, layer in layers.items():
            prefix, _, path = full.partition(".")
            _set_module(used_roots[prefix], path, layer)
            ref = layer.base.weight
            layer.to(device=ref.device)
        record = {"name": adapter_cls.adapter_type, "target_modules": targets["unet"],
                  "text_encoder_targets": te_targets, **options, **({"rank_pattern": pattern} if pattern else {})}
        return cls(adapter_cls.adapter_type, record, layers, used_roots)

    def remove(self) -> None:
        """Unmerge and put the original base layers back."""
        self.unmerge()
        for full, layer in self.layers.items():
            prefix, _, path = full.partition(".")
            _set_module(self._roots[prefix], path, layer.base)
        self.layers = {}

    # -- parameters -----------------------------------------------------------------------------
    def parameters(self, prefix: Optional[str] = None) -> Iterator[nn.Parameter]:
        """The adapter layers' own parameters (optionally only those under ``prefix``: unet, text_encoder)."""
        for full, layer in self.layers.items():
            if prefix is None or full.startswith(prefix + "."):
                for p in layer.parameters(recurse=False):
                    yield p

    def trainable_parameters(self, prefix: Optional[str] = None) -> list[nn.Parameter]:
        """What the optimiser sees: the parameters that require grad (OrthA: ``up`` only)."""
        return [p for p in self.parameters(prefix) if p.requires_grad]

    def num_trainable(self) -> int:
        """The number of trainable values."""
        return sum(p.numel() for p in self.trainable_parameters())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Adapter tensors only (parameters and persistent buffers), keyed ``<layer>.<tensor>``."""
        out = {}
        for full, layer in self.layers.items():
            for n, t in layer.named_parameters(recurse=False):
                out[f"{full}.{n}"] = t.detach()
            for n, t in layer.named_buffers(recurse=False):
                out[f"{full}.{n}"] = t.detach()
        return out

    @torch.no_grad()
    def load_state_dict(self, tensors: Mapping[str, torch.Tensor], source: str = "state dict") -> None:
        """Copy tensors in, checking that every key exists and every shape fits."""
        own = self.state_dict()
        missing = sorted(set(own) - set(tensors))
        unexpected = sorted(set(tensors) - set(own))
        if unexpected:
            raise ConfigError(source, f"tensor {unexpected[0]!r} has no matching layer in the model "
                              f"({len(unexpected)} such); was it trained on another base model or targets?")
        if missing:
            raise ConfigError(source, f"tensor {missing[0]!r} is missing ({len(missing)} missing)")
        for key, value in tensors.items():
            if tuple(value.shape) != tuple(own[key].shape):
                raise ConfigError(source, f"tensor {key!r} has shape {tuple(value.shape)} but the model's layer "
                                  f"needs {tuple(own[key].shape)}")
        was_merged = self.merged
        self.unmerge()
        for key, value in tensors.items():
            own[key].copy_(value.to(own[key].dtype))
        if was_merged:
            self.merge()

    # -- the base weights under the adapters ---------------------------------------------------------
    def base_weights(self) -> dict[str, torch.Tensor]:
        """The base weight under every adapter layer, by layer name (2-D views, shared with the model)."""
        return {name: layer.base.weight.view(layer.base.weight.shape[0], -1) for name, layer in self.layers.items()}

    def base_fingerprint(self) -> str:
        """:func:`base_fingerprint` of :meth:`base_weights`: which base model these adapters sit on."""
        return base_fingerprint(self.base_weights())

    # -- deltas and merging ---------------------------------------------------------------------
    def delta_weights(self) -> dict[str, torch.Tensor]:
        """``{layer: dW}`` of every adapted layer (float32, shaped like a Linear weight)."""
        return {name: layer.delta_weight() for name, layer in self.layers.items()}

    @property
    def merged(self) -> bool:
        """Whether any layer has its update folded into the base weight."""
        return any(layer.merged for layer in self.layers.values())

    def merge(self) -> None:
        """Fold every layer's update into its base weight."""
        for layer in self.layers.values():
            layer.merge()

    def unmerge(self) -> None:
        """Take every folded update back out."""
        for layer in self.layers.values():
            layer.unmerge()

    def set_multiplier(self, value: float) -> None:
        """Scale every layer's update by ``value`` (a merge coefficient, an inference LoRA scale)."""
        if self.merged:
            raise RuntimeError("unmerge before changing the multiplier")
        for layer in self.layers.values():
            layer.multiplier = float(value)

    def layer_metadata(self) -> dict[str, dict]:
        """``{layer: facts}`` worth saving beside the weights (e.g. OrthA's basis rows)."""
        return {name: meta for name, layer in self.layers.items() if (meta := layer.adapter_metadata())}

    def __len__(self) -> int:
        return len(self.layers)

    def __repr__(self) -> str:
        return (f"Adapters(type={self.adapter_type!r}, layers={len(self.layers)}, "
                f"trainable={self.num_trainable():,})")


def inject_adapters(components, config: Mapping) -> Adapters:
    """Inject into a :class:`~lorabench.models.ModelComponents` (UNet and, if asked, text encoders)."""
    return Adapters.inject(components.adaptable_modules(), config)
