"""The merge job: merge adapter files (lorabench, diffusers or kohya) into one adapter file or a
merged diffusers UNet folder, with any registered method.

    lorabench experiment=merge_adapters model=sd15 protocol.inputs=[a.safetensors,b.safetensors]
    lorabench experiment=merge_adapters protocol.inputs=[a.safetensors,b.safetensors] protocol.weights=[0.7,0.3]
    lorabench experiment=merge_adapters merge=ties protocol.save_as=unet protocol.inputs=[...]
    lorabench experiment=merge_adapters merge=gradient_fusion protocol.inputs=[...] \
        protocol.prompts=["a photo of sks dog","a photo of zwz cat"]      # captures statistics first
    lorabench experiment=merge_adapters merge=gradient_fusion protocol.inputs=[...] protocol.stats=[a.st,b.st]

``protocol.weights`` (one number per input) scales each input's update before the method merges them
(as mergekit's per-model ``weight``); the method's own ``lam`` still applies. The merged adapter is
written in lorabench's layout (``adapter.safetensors``) and the layouts of ``protocol.exports``
(diffusers: ``pytorch_lora_weights.safetensors``, kohya: ``kohya_lora.safetensors``), each layer at
its own rank, never above what the layer allows (``min(out, in)``), so every loader reads them.

Gradient fusion reads one statistics file per input (``protocol.stats``), or captures them on the
spot from one prompt per input (``protocol.prompts``) and writes them into the run folder. An input run
folder with new tokens (``embeddings.safetensors``: LoRA with textual inversion or P+, Mix-of-Show's ED-LoRA)
has them in the model while its statistics are captured, as its prompt names its concept by them. Tokens are not
merged: each input's token file is copied under the run folder's ``embeddings/``, so the merge run folder samples
with every concept's tokens (``lorabench sample protocol.adapters=[<run folder>]``, or ``protocol.embeddings=[<run
folder>]`` beside a merged UNet), as Mix-of-Show's merged model keeps each concept's embeddings. Where two inputs
add the same token or bind the same word, one model cannot hold both: the run copies none and says which clash.
"""

from __future__ import annotations

import os
import shlex
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lorabench.adapters import EXPORT_FILES, load_adapter
from lorabench.adapters.tokens import load_tokens, token_clash
from lorabench.checks import EMBEDDINGS_DIR, adapter_file, check_weights, run_embeddings
from lorabench.errors import ConfigError, check_int, choice_error
from lorabench.merging import (
    capture_stats,
    check_compatible,
    check_merge,
    load_stats,
    merge,
    model_weights,
    read_update,
    save_merged_adapter,
    save_merged_unet,
    save_stats,
    size_summary,
    update_size,
)
from lorabench.protocols import sizes
from lorabench.sampling import eval_device
from lorabench.utils.console import quiet_cells
from lorabench.utils.io import atomic_path, write_json
from lorabench.utils.seeding import derive_seed_list

SAVE_AS = ("adapter", "unet")


def run(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Merge ``protocol.inputs`` with ``cfg.merge`` and write the result (and any statistics it captured)."""
    run_dir = Path(run_dir)
    t0 = time.perf_counter()
    p = cfg.protocol
    merge_cfg = OmegaConf.to_container(cfg.get("merge") or {}, resolve=True)
    if not merge_cfg:
        raise ConfigError("merge", "no merge method; pick one, e.g. merge=sum (valid: see conf/merge/)")
    method = check_merge(merge_cfg, "merge")
    inputs = [str(adapter_file(x, "protocol.inputs")) for x in (p.get("inputs") or [])]
    # an input run's new tokens (a LoRA trained with textual inversion or P+, Mix-of-Show's ED-LoRA): in the model
    # while its statistics are captured (its prompt names its concept by them); not merged, but copied
    tokens = [run_embeddings(x) for x in (p.get("inputs") or [])]
    clash = token_clash([f for own in tokens for f in own])
    if len(inputs) < 2:
        raise ConfigError("protocol.inputs", f"give at least two adapter files to merge, got {len(inputs)}")
    if len({os.path.realpath(f) for f in inputs}) < len(inputs):
        raise ConfigError("protocol.inputs", f"lists a file twice: {inputs}")
    save_as = str(p.get("save_as", "adapter"))
    if save_as not in SAVE_AS:
        raise choice_error("protocol.save_as", save_as, SAVE_AS)
    stats_files, prompts = list(p.get("stats") or []), list(p.get("prompts") or [])
    if method.needs_stats and len(stats_files) != len(inputs) and len(prompts) != len(inputs):
        raise ConfigError("protocol.stats", f"{method.name} needs one statistics file (protocol.stats) or one prompt "
                          f"(protocol.prompts) per input: {len(inputs)}")
    rank = check_int(p.get("rank"), "protocol.rank", minimum=1, allow_none=True)
    weights = check_weights(p.get("weights"), len(inputs))
    exports = list(p.get("exports") or [])
    for e in exports:
        if e not in EXPORT_FILES:
            raise choice_error("protocol.exports", e, EXPORT_FILES)
    cap = dict(OmegaConf.to_container(p.get("capture") or {}, resolve=True))
    n_capture = check_int(cap.pop("images_per_prompt", 4), "protocol.capture.images_per_prompt", minimum=1)

    with quiet_cells():  # the hub libraries' loading bars, as the other protocols load their model
        components = instantiate(cfg.model, _convert_="all")
    names = [Path(f).stem if Path(f).stem not in ("adapter", "pytorch_lora_weights") else Path(f).parent.name
             for f in inputs]
    names = [n if names.count(n) == 1 else f"{n}-{i}" for i, n in enumerate(names)]
    updates = [read_update(components, f, name) for f, name in zip(inputs, names)]
    check_compatible(updates, "protocol.inputs")  # here, naming the job's field, before any capture
    if weights is not None:
        updates = [replace(u, layers={k: (up * w, down) for k, (up, down) in u.layers.items()})
                   for u, w in zip(updates, weights)]
    stats = None
    if method.needs_stats:
        stats = []
        seeds = derive_seed_list("merge-capture", int(cfg.seed), n_capture)
        for i, f in enumerate(inputs):
            ad = load_adapter(components, f)
            own = []
            try:
                if len(stats_files) == len(inputs):
                    stats.append(load_stats(stats_files[i], ad))
                else:
                    for t in tokens[i]:
                        own.append(load_tokens(components, t))
                    grams, rows = capture_stats(components, ad, [prompts[i]], seeds, cap, eval_device(cfg))
                    save_stats(run_dir / f"stats-{names[i]}.safetensors", grams, rows, ad.base_fingerprint(),
                               [prompts[i]])
                    stats.append(grams)
            finally:
                ad.remove()
                for t in reversed(own):
                    t.remove()
    result = merge(updates, merge_cfg, stats=stats)
    base_weights = model_weights(components, list(updates[0].layers))
    size_log = sizes.SizeLog()  # each input against the base it sits on (on its inputs where captured)
    for i, u in enumerate(updates):
        per_layer = update_size(u, base_weights, stats[i] if stats else None)
        size_log.add(u.name, {"layers": per_layer, **size_summary(per_layer)})
    info = {k: v for k, v in result.info.items() if not isinstance(v, dict)}
    if save_as == "adapter":
        paths, dropped = save_merged_adapter(components, result.deltas, run_dir, rank=rank, exports=exports,
                                             base_model=components.model_id,
                                             metadata={"merge": merge_cfg, "inputs": inputs, "weights": weights})
        out_path = paths[0]
        info["dropped_energy_mean"] = sum(dropped.values()) / max(1, len(dropped))
        info["dropped_energy_max"] = max(dropped.values(), default=0.0)
    else:
        out_path = save_merged_unet(components, result.deltas, run_dir / "unet")
    sources = [str(t) for own in tokens for t in own]
    embeddings = [] if clash else _copy_tokens(tokens, names, run_dir / EMBEDDINGS_DIR)
    out = {"protocol": "merge_adapters", "model_id": components.model_id, "inputs": inputs,
           "embeddings": [str(t) for t in embeddings], "input_embeddings": sources, "weights": weights,
           "merge": merge_cfg, "merge_s": result.merge_s, "output": str(out_path),
           "files": [str(x) for x in (paths if save_as == "adapter" else [out_path])],
           "layers": len(result.deltas), "info": info, "update_size": size_log.results(),
           "total_s": time.perf_counter() - t0}
    write_json(run_dir / "results.json", out)
    extra = "".join(f"  {k}: {v:.4g}\n" for k, v in info.items() if isinstance(v, float))
    out["table"] = (f"  merged {len(inputs)} adapters with {method.name} in {result.merge_s * 1000:.1f} ms "
                    f"({len(result.deltas)} layers){' weights ' + str(weights) if weights else ''}\n"
                    + "".join(f"  wrote {f}\n" for f in out["files"]) + extra
                    + _how_to_sample(save_as, out_path, run_dir, embeddings, sources, clash)).rstrip("\n")
    return out


def _copy_tokens(tokens: list[list[Path]], names: list[str], folder: Path) -> list[Path]:
    """Each input's token files under ``folder``, named by the input (and the file, where an input has several)."""
    written = []
    for own, name in zip(tokens, names):
        for t in own:
            path = folder / (f"{name}.safetensors" if len(own) == 1 else f"{name}.{t.stem}.safetensors")
            with atomic_path(path) as tmp:
                shutil.copyfile(t, tmp)
            written.append(path)
    return written


def _model_args() -> str:
    """The model this job loaded as command-line arguments to repeat: its ``model`` choice and the command line's
    ``model.*`` settings (but ``model.unet``), quoted for a shell; ``model=...`` outside a Hydra run."""
    if not HydraConfig.initialized():
        return "model=..."
    hc = HydraConfig.get()
    choice = hc.runtime.choices.get("model")
    args = [f"model={choice}"] if choice else []
    args += [o for o in hc.overrides.task if o.startswith("model.") and not o.startswith("model.unet=")]
    return " ".join(shlex.quote(a) for a in args) or "model=..."


def _how_to_sample(save_as: str, out_path: Path, run_dir: Path, embeddings: list[Path], sources: list[str],
                   clash: Optional[str]) -> str:
    """The console's lines on how to sample the merge: the run folder (or its UNet) with the copied tokens, with
    the model this job merged on."""
    model = _model_args()
    if save_as == "unet":
        tokens = f" protocol.embeddings=[{run_dir}]" if embeddings else ""
        lines = (f"  use it in place of the model's UNet: model.unet={out_path} (e.g. lorabench sample {model} "
                 f"model.unet={out_path}{tokens} protocol.prompts=[...])\n")
    else:
        lines = (f"  sample it: lorabench sample {model} protocol.adapters=[{run_dir}] protocol.prompts=[...]"
                 + (" (with its tokens)" if embeddings else "") + "\n")
    if embeddings:
        lines += f"  copied the inputs' new tokens: {', '.join(str(t.relative_to(run_dir)) for t in embeddings)}\n"
    elif clash:
        lines += (f"  the inputs' new tokens are not in the run: {clash}, which one model cannot hold; sample with "
                  f"one input's: protocol.embeddings=[{sources[0]}]\n")
    return lines

