"""The sample job: images from a base model with adapter files applied (lorabench, diffusers or kohya
layouts) and new tokens added (textual inversion, P+), as one labelled grid, the way a user looks at what
they trained or merged.

    lorabench sample model=sd15 protocol.adapters=[outputs/my_dog/adapter.safetensors] \\
        protocol.prompts=["a photo of sks dog","a sks dog on the beach"]
    lorabench sample ... protocol.adapters=[a.safetensors,b.safetensors] protocol.weights=[0.8,0.5]
    lorabench experiment=sample ...                      # the same job
    lorabench sample ... protocol.adapters=[outputs/ti_run] protocol.prompts=["a photo of <sks> dog"]
    lorabench sample ... protocol.embeddings=[learned_embeds.safetensors]   # a diffusers textual inversion

A run folder stands for its ``adapter.safetensors`` and its new tokens, whichever it holds: a run that trained both
(LoRA with textual inversion) samples with both, a textual-inversion run with its tokens, a merge run with its
merged adapter and every input's tokens (its ``embeddings/``). Tokens bound to a word (the concept's word) replace
it in the prompts, as in training.

Each adapter's update, times its weight (``protocol.weights``, 1 each by default), is added to the model's
weights while sampling (what diffusers' ``set_adapters(names, weights)`` does for LoRAs), then the exact
weights are put back. With no adapters the base model samples. Writes ``samples.png`` (one row per
prompt, one column per seed) and each image under ``images/``.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from lorabench.adapters.tokens import load_tokens
from lorabench.checks import (
    ADAPTER_FILE,
    DIFFUSERS_EMBEDDINGS_FILE,
    EMBEDDINGS_DIR,
    EMBEDDINGS_FILE,
    adapter_file,
    check_validation,
    check_weights,
    folder_adapter,
    run_embeddings,
)
from lorabench.errors import ConfigError
from lorabench.merging import merged_into, model_weights, read_update
from lorabench.sampling import eval_device, sample_prompts, save_grid, to_uint8
from lorabench.utils.console import quiet_cells
from lorabench.utils.io import atomic_path, write_json


def sample_inputs(p: DictConfig) -> tuple[list[str], list[float], list[tuple[Path, str]]]:
    """The job's adapter files with their weights, and its token files with the field that gave each:
    ``protocol.adapters``' files, and its run folders' ``adapter.safetensors`` and ``embeddings.safetensors``
    (whichever each holds; a merge run's token files); ``protocol.embeddings``' token files (or run folders' token
    files). Checked before a model loads."""
    entries = list(p.get("adapters") or [])
    weights = check_weights(p.get("weights"), len(entries), "protocol.adapters") or [1.0] * len(entries)
    files, scales, tokens = [], [], []
    for entry, w in zip(entries, weights):
        if own := run_embeddings(entry):
            tokens += [(t, "protocol.adapters") for t in own]
            if folder_adapter(entry) is None:  # a run of new tokens alone
                if w != 1.0:
                    raise ConfigError("protocol.weights", f"{w:g} for {str(entry)!r}, a run of new tokens alone (no "
                                                          f"{ADAPTER_FILE}): tokens take no weight; give 1")
                continue
        files.append(str(adapter_file(entry, "protocol.adapters")))
        scales.append(w)
    for entry in p.get("embeddings") or []:
        paths = run_embeddings(entry) or [Path(os.path.expanduser(str(entry)))]  # a run folder: its token files
        if not paths[0].is_file():
            raise ConfigError("protocol.embeddings", f"{str(entry)!r}: no such token file; give an embeddings "
                                                     f".safetensors or a folder that holds {EMBEDDINGS_FILE} (a "
                                                     f"training run's), {EMBEDDINGS_DIR}/ (a merge run's) or "
                                                     f"{DIFFUSERS_EMBEDDINGS_FILE} (diffusers')")
        tokens += [(path, "protocol.embeddings") for path in paths]
    return files, scales, tokens


def run(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Sample ``protocol.prompts`` from ``protocol.seeds`` with ``protocol.adapters`` applied and the new tokens of
    its runs and of ``protocol.embeddings`` added."""
    run_dir = Path(run_dir)
    t0 = time.perf_counter()
    p = cfg.protocol
    files, weights, token_files = sample_inputs(p)
    opts = OmegaConf.to_container(p, resolve=True)
    spec = check_validation({k: opts.get(k) for k in ("prompts", "seeds", "sampler")}, "protocol")
    if spec is None:
        raise ConfigError("protocol.prompts", "give at least one prompt, e.g. protocol.prompts=['a photo of sks dog']")
    with quiet_cells():  # the hub libraries' loading bars, as the other protocols load their model
        components = instantiate(cfg.model, _convert_="all")
    updates = [read_update(components, f) for f in files]
    for path, field in token_files:
        try:
            load_tokens(components, path)
        except ConfigError as err:  # named where the job was given the file
            raise ConfigError(field, f"{str(path)!r}: {err.field}: {err.message}") from err
    device = eval_device(cfg)
    with contextlib.ExitStack() as stack:
        for u, w in zip(updates, weights):
            deltas = u.deltas(w)
            stack.enter_context(merged_into(model_weights(components, list(deltas)), deltas))
        images = sample_prompts(components, spec["sampler"], spec["prompts"], spec["seeds"], device).cpu()
    n = len(spec["seeds"])
    rows = [images[i * n:(i + 1) * n] for i in range(len(spec["prompts"]))]
    adapters = ", ".join([*(f"{Path(f).parent.name}/{Path(f).name} x{w:g}" for f, w in zip(files, weights)),
                          *(f"{t.parent.name}/{t.name}" for t, _ in token_files)]) or "none"
    grid = run_dir / "samples.png"
    save_grid(grid, rows, labels=spec["prompts"], title=f"adapters: {adapters}\ncolumns: seeds {spec['seeds']}")
    written = []
    for i, prompt_images in enumerate(rows):
        for seed, img in zip(spec["seeds"], prompt_images):
            path = run_dir / "images" / f"prompt{i}_seed{seed}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                Image.fromarray(to_uint8(img[None])[0].numpy()).save(tmp, format="PNG")
            written.append(str(path.relative_to(run_dir)))
    out = {"protocol": "sample", "model_id": components.model_id, "adapters": files, "weights": weights,
           "embeddings": [str(t) for t, _ in token_files], "prompts": spec["prompts"],
           "seeds": spec["seeds"], "sampler": spec["sampler"], "grid": str(grid), "images": written,
           "total_s": time.perf_counter() - t0}
    write_json(run_dir / "results.json", out)
    out["table"] = (f"  {len(spec['prompts'])} prompts x {n} seeds with adapters: {adapters}\n  wrote {grid} "
                    f"and {len(written)} images in {run_dir / 'images'}")
    return out
