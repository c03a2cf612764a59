"""Adapter files: lorabench's own format, and exports the ecosystem loads.

- Native (:func:`save_adapter` / :func:`load_adapter`): every adapter tensor under
  its layer name (``unet.<path>.lora_down``), plus metadata: adapter type, rank,
  alpha, targets, base model id and the full adapter config, so the file alone
  rebuilds the adapter.
- diffusers (:func:`export_diffusers`): ``<prefix>.<path>.lora_A.weight`` (down) and
  ``.lora_B.weight`` (up), the keys ``save_lora_weights`` writes and
  ``load_lora_weights`` reads. The whole scale is folded into ``up``, so the file
  loads at scale 1 with no alphas.
- kohya (:func:`export_kohya`): ``lora_unet_<path with _>.lora_down.weight``,
  ``.lora_up.weight`` and ``.alpha`` (= rank, scale 1), read by A1111 and ComfyUI.

Imported (:func:`import_lora`), as diffusers' ``load_lora_weights`` reads them: diffusers files in PEFT's names
and in the names before PEFT (``attn1.processor.to_q_lora.down``, ``q_proj.lora_linear_layer.down``), at the
scales of the LoraConfig a file stores (``lora_adapter_metadata``: alpha / r per layer, rsLoRA); kohya files
with the UNet's layers in diffusers' names or in the original LDM / SGM UNet's (:func:`ldm_names`; kohya's SDXL).

Text-encoder layers are always named as in the published CLIP checkpoints
(``text_encoder.text_model.encoder.layers.0...``), also under transformers >= 5,
whose ``CLIPTextModel`` dropped the ``text_model`` level: files written with one
transformers version load with the other, and into diffusers and kohya tools.

Every adapter exports as plain up/down pairs: TriLoRA folds to
``up = U``, ``down = diag(Sigma) V^T``; OrthA to its trained ``up`` and frozen ``down``.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from lorabench.adapters.base import get_adapter_class, parse_options
from lorabench.adapters.injection import PLACEMENT_KEYS, Adapters
from lorabench.checks import ADAPTER_FILE, DIFFUSERS_LORA_FILE
from lorabench.errors import ConfigError
from lorabench.utils.io import atomic_path

FORMAT_VERSION = "1"
KOHYA_PREFIX = {"unet": "lora_unet", "text_encoder": "lora_te", "text_encoder_2": "lora_te2"}
KOHYA_PREFIX_SDXL = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}


def _has_text_model(root) -> bool:
    return hasattr(root, "text_model")


def to_file_name(layer: str, roots: Mapping) -> str:
    """Layer name in a model -> the canonical name used in files."""
    prefix, _, path = layer.partition(".")
    if prefix != "unet" and not _has_text_model(roots[prefix]) and not path.startswith("text_model."):
        path = "text_model." + path
    return f"{prefix}.{path}"


def from_file_name(name: str, roots: Mapping) -> str:
    """Canonical name in a file -> the layer name in this model."""
    prefix, _, path = name.partition(".")
    if prefix != "unet" and prefix in roots:
        if _has_text_model(roots[prefix]):
            path = path if path.startswith("text_model.") else "text_model." + path
        else:
            path = path.removeprefix("text_model.")
    return f"{prefix}.{path}"


def _write(tensors: dict[str, torch.Tensor], path, metadata: dict[str, str]) -> Path:
    path = Path(path)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def read_safetensors(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file, with a one-line error for a bad file."""
    path = str(path)
    if not os.path.isfile(path):
        raise ConfigError(f"adapter file {path!r}", "does not exist")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ConfigError(f"adapter file {path!r}", f"is not a readable safetensors file ({exc})") from exc
    return tensors, metadata


# -- native ------------------------------------------------------------------------------------------
def save_adapter(adapters: Adapters, path, *, base_model: str = "", extra: Mapping | None = None) -> Path:
    """Write the adapters in lorabench's format: every tensor under its canonical layer name, and the
    metadata that rebuilds them."""
    cfg = adapters.config
    metadata = {
        "lorabench_format": FORMAT_VERSION,
        "adapter_type": adapters.adapter_type,
        "rank": str(cfg.get("rank")),
        "alpha": str(cfg.get("alpha") if cfg.get("alpha") is not None else cfg.get("rank")),
        "target_modules": json.dumps(cfg.get("target_modules")),
        "text_encoder_targets": json.dumps(cfg.get("text_encoder_targets")),
        "base_model": base_model,
        "config": json.dumps(cfg),
        "layers": json.dumps(adapters.layer_metadata()),
    }
    if not adapters.merged:  # the base weights it was trained on, so merges can refuse other models
        metadata["base_fingerprint"] = adapters.base_fingerprint()
    if extra:
        metadata["extra"] = json.dumps(dict(extra), default=str)
    roots = adapters._roots
    tensors = {}
    for key, value in adapters.state_dict().items():
        layer, _, tensor = key.rpartition(".")
        tensors[f"{to_file_name(layer, roots)}.{tensor}"] = value
    return _write(tensors, path, metadata)


def load_state_from_file(adapters: Adapters, tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Load a native file's tensors (canonical names) into injected adapters."""
    roots = adapters._roots
    mapped = {}
    for key, value in tensors.items():
        layer, _, tensor = key.rpartition(".")
        mapped[f"{from_file_name(layer, roots) if layer.partition('.')[0] in roots else layer}.{tensor}"] = value
    adapters.load_state_dict(mapped, source=source)


def load_init_adapter(adapters: Adapters, path, field: str = "init_adapter") -> None:
    """Copy the weights of a lorabench adapter file (``adapter.safetensors``, of the same adapter type, rank and
    targets) into ``adapters``: a run's ``init_adapter``. Its layers are named as in the file (text-encoder layers
    with the published ``text_model`` level), so a file loads under either transformers version."""
    tensors, metadata = read_safetensors(path)
    where = f"{field} {str(path)!r}"
    if not metadata.get("lorabench_format"):
        raise ConfigError(field, f"{str(path)!r} is not a lorabench adapter file (a diffusers or kohya export?): "
                                 "start from lorabench's adapter.safetensors of the same adapter type, rank and "
                                 "targets, or merge foreign files with experiment=merge_adapters")
    theirs = metadata.get("adapter_type"), metadata.get("rank")
    mine = adapters.adapter_type, str(adapters.config.get("rank"))
    if theirs != mine:
        raise ConfigError(field, f"{str(path)!r} holds a {theirs[0]} adapter of rank {theirs[1]}, this run trains "
                                 f"{mine[0]} of rank {mine[1]}: set adapter={theirs[0]} adapter.rank={theirs[1]}")
    load_state_from_file(adapters, tensors, where)


def load_adapter(components, path) -> Adapters:
    """Inject the adapter stored in ``path`` (native, diffusers or kohya format) into a model."""
    tensors, metadata = read_safetensors(path)
    source = f"adapter file {str(path)!r}"
    if metadata.get("lorabench_format"):
        config = json.loads(metadata["config"])
        try:  # its options first: a file whose config lorabench now refuses (alpha 0, from before the check) fits
            # no model, and "does not fit the model" would send the user after the wrong cause
            parse_options(get_adapter_class(config.get("name")),
                          {k: v for k, v in config.items() if k not in PLACEMENT_KEYS})
        except ConfigError as exc:
            raise ConfigError(source, f"holds an adapter config lorabench refuses ({exc}); train it again with a "
                                      "valid one") from exc
        trained_on = metadata.get("base_model", "")
        # layers that do not match: most often a file of another model (its base_model says which)
        elsewhere = f" (trained on {trained_on!r}, loaded into {components.model_id!r})" if trained_on and \
            components.model_id and trained_on != components.model_id else ""
        try:
            adapters = Adapters.inject(components.adaptable_modules(), config)
        except ConfigError as exc:
            raise ConfigError(source, f"does not fit the model{elsewhere}: {exc}") from exc
        try:
            load_state_from_file(adapters, tensors, source)
        except ConfigError as exc:
            adapters.remove()
            raise ConfigError(exc.field, exc.message + elsewhere) from exc
        except Exception:
            adapters.remove()
            raise
        return adapters
    return import_lora(components, tensors, metadata, source)


# -- plain up/down pairs -----------------------------------------------------------------------------
def lora_pairs(adapters: Adapters, file_names: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{layer: (up, down)}`` with ``up @ down`` equal to the layer's whole delta (scale folded into up),
    shaped for the base layer (4-D for 1x1 convs); keyed by canonical file names if ``file_names``."""
    out = {}
    for name, layer in adapters.layers.items():
        up, down = layer.factors()
        up = up.detach().float() * (layer.scale * layer.multiplier)
        down = down.detach().float()
        if layer.is_conv:
            up, down = up[:, :, None, None], down[:, :, None, None]
        out[to_file_name(name, adapters._roots) if file_names else name] = (up, down)
    return out


def export_diffusers(adapters: Adapters, path) -> Path:
    """Write ``lora_A`` / ``lora_B`` pairs at scale 1, the file ``pipe.load_lora_weights`` reads."""
    tensors = {}
    for name, (up, down) in lora_pairs(adapters, file_names=True).items():
        tensors[f"{name}.lora_A.weight"] = down
        tensors[f"{name}.lora_B.weight"] = up
    return _write(tensors, path, {"format": "pt"})


def _kohya_prefixes(adapters_or_components) -> dict[str, str]:
    roots = getattr(adapters_or_components, "_roots", None)
    if roots is None:
        roots = adapters_or_components.adaptable_modules()
    return KOHYA_PREFIX_SDXL if "text_encoder_2" in roots else KOHYA_PREFIX


def kohya_name(layer: str, prefixes: Mapping[str, str]) -> str:
    """A canonical layer name as kohya writes it (``lora_unet_<path with _>``)."""
    prefix, _, path = layer.partition(".")
    return f"{prefixes[prefix]}_{path.replace('.', '_')}"


def export_kohya(adapters: Adapters, path) -> Path:
    """Write ``lora_down`` / ``lora_up`` / ``alpha`` (alpha = rank, scale 1), the file A1111 and ComfyUI read."""
    prefixes = _kohya_prefixes(adapters)
    tensors = {}
    rank = None
    for name, (up, down) in lora_pairs(adapters, file_names=True).items():
        key = kohya_name(name, prefixes)
        rank = down.shape[0]
        tensors[f"{key}.lora_down.weight"] = down
        tensors[f"{key}.lora_up.weight"] = up
        tensors[f"{key}.alpha"] = torch.tensor(float(rank))
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(rank)}
    return _write(tensors, path, metadata)


# The files a trained (or merged) adapter is written as: lorabench's own (ADAPTER_FILE, named in the torch-free
# checks that find it in a run folder), and the exports by layout name.
EXPORT_FILES = {"diffusers": (DIFFUSERS_LORA_FILE, export_diffusers),
                "kohya": ("kohya_lora.safetensors", export_kohya)}


def write_adapter_files(adapters: Adapters, folder, exports=("diffusers", "kohya"), *, base_model: str = "",
                        extra: Mapping | None = None, export_files: Mapping | None = None) -> list[Path]:
    """``adapter.safetensors`` (lorabench's layout) and each export of ``exports`` (:data:`EXPORT_FILES`, or
    ``export_files``) into ``folder``, each written atomically; returns the paths."""
    table = export_files or EXPORT_FILES
    folder = Path(folder)
    paths = [save_adapter(adapters, folder / ADAPTER_FILE, base_model=base_model, extra=extra)]
    for e in exports:
        filename, fn = table[e]
        paths.append(fn(adapters, folder / filename))
    return paths


# -- importing diffusers / kohya LoRA files -----------------------------------------------------------
# Within a ResNet block, the original LDM UNet's names (``in_layers = (norm, SiLU, conv)``, ``emb_layers = (SiLU,
# Linear)``, ``out_layers = (norm, SiLU, Dropout, conv)``) of diffusers' modules; the UNet's own top-level modules.
_LDM_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_LDM_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
            "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
            "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}


def ldm_names(unet) -> dict[str, str]:
    """Each module of a diffusers UNet under the name the original LDM / SGM ``UNetModel`` gives it
    (``down_blocks.1.attentions.0.proj_in`` -> ``input_blocks.4.1.proj_in`` on SDXL): the names kohya's SDXL trainer
    writes its files with (its UNet is SGM's). The blocks are numbered as that model builds them: ``input_blocks``
    one per ResNet (with its attention beside it) and one per downsampler, after ``conv_in``; ``middle_block``'s
    ResNets and attentions in turn; ``output_blocks`` one per ResNet, the upsampler after its last."""
    blocks: dict[str, str] = {}
    n = 1
    for b, blk in enumerate(unet.down_blocks):
        for i in range(len(blk.resnets)):
            blocks[f"down_blocks.{b}.resnets.{i}"] = f"input_blocks.{n}.0"
            if getattr(blk, "attentions", None):
                blocks[f"down_blocks.{b}.attentions.{i}"] = f"input_blocks.{n}.1"
            n += 1
        if getattr(blk, "downsamplers", None):
            blocks[f"down_blocks.{b}.downsamplers.0.conv"] = f"input_blocks.{n}.0.op"
            n += 1
    mid = getattr(unet, "mid_block", None)
    if mid is not None:
        attentions = len(getattr(mid, "attentions", None) or [])
        for i in range(len(mid.resnets)):
            blocks[f"mid_block.resnets.{i}"] = f"middle_block.{2 * i if attentions else i}"
        for i in range(attentions):
            blocks[f"mid_block.attentions.{i}"] = f"middle_block.{2 * i + 1}"
    n = 0
    for b, blk in enumerate(unet.up_blocks):
        attends = bool(getattr(blk, "attentions", None))
        for i in range(len(blk.resnets)):
            blocks[f"up_blocks.{b}.resnets.{i}"] = f"output_blocks.{n}.0"
            if attends:
                blocks[f"up_blocks.{b}.attentions.{i}"] = f"output_blocks.{n}.1"
            n += 1
        if getattr(blk, "upsamplers", None):
            blocks[f"up_blocks.{b}.upsamplers.0.conv"] = f"output_blocks.{n - 1}.{2 if attends else 1}.conv"
    names = {}
    for name, _ in unet.named_modules():
        parts = name.split(".")
        if name in _LDM_TOP:
            names[name] = _LDM_TOP[name]
            continue
        for k in (5, 4, 3):
            block = ".".join(parts[:k])
            if block in blocks:
                rest = parts[k:]
                if ".resnets." in f".{block}." and rest:
                    if rest[0] not in _LDM_RESNET:
                        break
                    rest = [_LDM_RESNET[rest[0]], *rest[1:]]
                names[name] = ".".join([blocks[block], *rest])
                break
    return names


def _parse_foreign(components, tensors: Mapping[str, torch.Tensor], source: str):
    """``{layer: {"down", "up", "alpha"?}}`` from diffusers (PEFT or legacy) or kohya keys."""
    parts: dict[str, dict] = {}
    kohya = any(k.startswith("lora_") and ".lora_down." in k for k in tensors)
    if kohya:
        prefixes = _kohya_prefixes(components)
        lookup = {}
        roots = components.adaptable_modules()
        for prefix, root in roots.items():
            for n, _ in root.named_modules():
                if n:
                    lookup[kohya_name(to_file_name(f"{prefix}.{n}", roots), prefixes)] = f"{prefix}.{n}"
        # kohya's SDXL files name the UNet's layers as SGM's UNet does (input_blocks.4.1...), others as diffusers'
        ldm = ldm_names(components.unet)
        lookup.update({kohya_name(f"unet.{name}", prefixes): f"unet.{n}" for n, name in ldm.items()})
        for key, t in tensors.items():
            stem, _, kind = key.partition(".")
            if stem not in lookup:
                raise ConfigError(source, f"kohya key {key!r} names no layer of this model")
            slot = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}.get(kind)
            if slot is None:
                raise ConfigError(source, f"unsupported kohya tensor {key!r} (only LoRA up/down/alpha)")
            parts.setdefault(lookup[stem], {})[slot] = t
        return parts
    # diffusers' names before PEFT (attention processors' ``attn1.processor.to_q_lora.down``, the text encoders'
    # ``q_proj.lora_linear_layer.down``: files of diffusers < 0.21) as diffusers' loader renames them, to PEFT's
    # (diffusers imported here: reading a foreign file alone pays for it, not every import of the adapters)
    from diffusers.utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft  # noqa: PLC0415
    from diffusers.utils.state_dict_utils import StateDictType  # noqa: PLC0415

    unet = {k: t for k, t in tensors.items() if k.startswith("unet.")}
    rest = {k: t for k, t in tensors.items() if not k.startswith("unet.")}
    tensors = {**convert_unet_state_dict_to_peft(unet), **convert_state_dict_to_peft(rest, StateDictType.DIFFUSERS_OLD)}
    suffixes = {".lora_A.weight": "down", ".lora_B.weight": "up", ".lora.down.weight": "down",
                ".lora.up.weight": "up", ".alpha": "alpha"}
    roots = components.adaptable_modules()
    for key, t in tensors.items():
        for suffix, slot in suffixes.items():
            if key.endswith(suffix):
                parts.setdefault(from_file_name(key[: -len(suffix)], roots), {})[slot] = t
                break
        else:
            raise ConfigError(source, f"tensor {key!r} is neither lorabench, diffusers nor kohya LoRA format")
    return parts


def import_lora(components, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                source: str = "adapter file") -> Adapters:
    """Inject a diffusers or kohya LoRA file's pairs as a lorabench LoRA (scale from its alphas folded in)."""
    parts = _parse_foreign(components, tensors, source)
    if not parts:
        raise ConfigError(source, "holds no LoRA tensors")
    for layer, p in parts.items():
        if "down" not in p or "up" not in p:
            raise ConfigError(source, f"layer {layer!r} lacks its {'up' if 'down' in p else 'down'} tensor")
    configs = _peft_configs(metadata, source)
    pairs = {}
    for layer, p in parts.items():
        down, up = p["down"].float(), p["up"].float()
        if "alpha" in p:  # kohya's (and diffusers' network alphas)
            scale = float(p["alpha"]) / down.shape[0]
        else:
            scale = _peft_scale(configs.get(layer.partition(".")[0]), layer.partition(".")[2], down.shape[0])
        pairs[layer] = (up.reshape(up.shape[0], -1) * scale, down.reshape(down.shape[0], -1))
    return lora_from_pairs(components, pairs, source)


def _peft_configs(metadata: Mapping[str, str], source: str) -> dict[str, dict]:
    """The LoraConfig of each model part that diffusers stores in a file it saves with its adapters' metadata
    (``lora_adapter_metadata``: ``{"unet.r": 4, "unet.lora_alpha": 8, ...}``), by part; {} without."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except ValueError as exc:
        raise ConfigError(source, f"its lora_adapter_metadata is not JSON ({exc})") from exc
    configs: dict[str, dict] = {}
    for key, value in flat.items():
        part, _, option = key.partition(".")
        configs.setdefault(part, {})[option] = value
    for part, cfg in configs.items():
        if cfg.get("use_dora"):
            raise ConfigError(source, f"its {part} adapter is DoRA (use_dora), whose update is not up @ down: "
                                      "lorabench loads LoRA files only")
    return configs


def _peft_scale(config: Mapping | None, module: str, rank: int) -> float:
    """PEFT's scale of one layer: its alpha (``alpha_pattern``'s entry for it, else ``lora_alpha``) over its rank, or
    over the rank's square root with rsLoRA; the patterns match the module's name in this model as PEFT's
    ``get_pattern_key`` matches it in the model diffusers loads the file into (the pattern, after a dot or from the
    start, to the end). 1 without a config (diffusers' default)."""
    if not config or config.get("lora_alpha") is None:
        return 1.0
    alpha = float(config["lora_alpha"])
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = float(value)
            break
    return alpha / (rank ** 0.5 if config.get("use_rslora") else rank)


def lora_from_pairs(components, pairs: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                    source: str = "adapter") -> Adapters:
    """Inject a LoRA holding ``pairs`` (``{layer: (up, down)}``, 2-D, dW = up @ down, scale 1) into a model:
    the layers' own ranks (the most common one as ``rank``, the others in ``rank_pattern``)."""
    ranks = Counter(down.shape[0] for _, down in pairs.values())
    rank = max(ranks, key=lambda r: (ranks[r], r))
    roots = components.adaptable_modules()
    by_prefix: dict[str, list[str]] = {}
    for layer in pairs:
        prefix, _, path = layer.partition(".")
        if prefix not in roots:
            raise ConfigError(source, f"layer {layer!r}: unknown model part {prefix!r}; valid: {', '.join(roots)}")
        by_prefix.setdefault(prefix, []).append(path)
    te_paths = sorted({p for pre, ps in by_prefix.items() if pre != "unet" for p in ps})
    config = {"name": "lora", "rank": rank, "alpha": float(rank),
              "target_modules": [f"re:{re.escape(p)}" for p in by_prefix.get("unet", [])],
              "text_encoder_targets": [f"re:{re.escape(p)}" for p in te_paths]}
    pattern = {layer: down.shape[0] for layer, (_, down) in pairs.items() if down.shape[0] != rank}
    if pattern:
        config["rank_pattern"] = pattern
    use_roots = {k: v for k, v in roots.items() if k in by_prefix}
    try:
        adapters = Adapters.inject(use_roots, config)
    except ConfigError as exc:
        raise ConfigError(source, f"does not fit the model: {exc}") from exc
    state = {}
    for layer, (up, down) in pairs.items():
        if layer not in adapters.layers:
            adapters.remove()
            raise ConfigError(source, f"layer {layer!r} not found in the model")
        state[f"{layer}.lora_down"] = down
        state[f"{layer}.lora_up"] = up
    try:
        adapters.load_state_dict(state, source=source)
    except Exception:
        adapters.remove()
        raise
    return adapters
