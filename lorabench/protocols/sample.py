"""The sample job: images from a base model with adapter files applied (lorabench, diffusers or kohya
layouts), as one labelled grid, the way a user looks at what they trained or merged.

    lorabench sample model=sd15 protocol.adapters=[outputs/my_dog/adapter.safetensors] \\
        protocol.prompts=["a photo of sks dog","a sks dog on the beach"]
    lorabench sample ... protocol.adapters=[a.safetensors,b.safetensors] protocol.weights=[0.8,0.5]
    lorabench experiment=sample ...                      # the same job

Each adapter's update, times its weight (``protocol.weights``, 1 each by default), is added to the model's
weights while sampling (what diffusers' ``set_adapters(names, weights)`` does for LoRAs), then the exact
weights are put back. With no adapters the base model samples. Writes ``samples.png`` (one row per
prompt, one column per seed) and each image under ``images/``.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from lorabench.checks import adapter_file, check_validation, check_weights
from lorabench.errors import ConfigError
from lorabench.merging import merged_into, model_weights, read_update
from lorabench.sampling import eval_device, sample_prompts, save_grid, to_uint8
from lorabench.utils.console import quiet_cells
from lorabench.utils.io import atomic_path, write_json


def run(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Sample ``protocol.prompts`` from ``protocol.seeds`` with ``protocol.adapters`` applied."""
    run_dir = Path(run_dir)
    t0 = time.perf_counter()
    p = cfg.protocol
    files = [str(adapter_file(f, "protocol.adapters")) for f in (p.get("adapters") or [])]
    weights = check_weights(p.get("weights"), len(files), "protocol.adapters") or [1.0] * len(files)
    opts = OmegaConf.to_container(p, resolve=True)
    spec = check_validation({k: opts.get(k) for k in ("prompts", "seeds", "sampler")}, "protocol")
    if spec is None:
        raise ConfigError("protocol.prompts", "give at least one prompt, e.g. protocol.prompts=['a photo of sks dog']")
    with quiet_cells():  # the hub libraries' loading bars, as the other protocols load their model
        components = instantiate(cfg.model, _convert_="all")
    updates = [read_update(components, f) for f in files]
    device = eval_device(cfg)
    with contextlib.ExitStack() as stack:
        for u, w in zip(updates, weights):
            deltas = u.deltas(w)
            stack.enter_context(merged_into(model_weights(components, list(deltas)), deltas))
        images = sample_prompts(components, spec["sampler"], spec["prompts"], spec["seeds"], device).cpu()
    n = len(spec["seeds"])
    rows = [images[i * n:(i + 1) * n] for i in range(len(spec["prompts"]))]
    adapters = ", ".join(f"{Path(f).parent.name}/{Path(f).name} x{w:g}" for f, w in zip(files, weights)) or "none"
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
    out = {"protocol": "sample", "adapters": files, "weights": weights, "prompts": spec["prompts"],
           "seeds": spec["seeds"], "sampler": spec["sampler"], "grid": str(grid), "images": written,
           "total_s": time.perf_counter() - t0}
    write_json(run_dir / "results.json", out)
    out["table"] = (f"  {len(spec['prompts'])} prompts x {n} seeds with adapters: {adapters}\n  wrote {grid} "
                    f"and {len(written)} images in {run_dir / 'images'}")
    return out
