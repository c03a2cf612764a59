"""A few procedurally drawn images with captions, in imagefolder format.

Enough for the smoke run (experiment=quickstart) and the tests to fine-tune a
tiny model end to end through the real loader; experiments use the mini world
(lorabench/world/).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from lorabench.data.imagefolder import ImageFolderDataModule
from lorabench.errors import check_int
from lorabench.utils.io import atomic_path

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 220), "yellow": (230, 210, 40)}
SHAPES = ("square", "circle")


def _draw(shape: str, colour, size: int, rng: np.random.Generator) -> np.ndarray:
    img = np.full((size, size, 3), 235, dtype=np.uint8)
    yy, xx = np.mgrid[:size, :size]
    r = size * rng.uniform(0.25, 0.35)
    cy, cx = size / 2 + rng.uniform(-1, 1) * size * 0.1, size / 2 + rng.uniform(-1, 1) * size * 0.1
    if shape == "square":
        mask = (np.abs(yy - cy) < r) & (np.abs(xx - cx) < r)
    else:
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
    img[mask] = colour
    return img


def write_toy_dataset(folder, n: int = 8, resolution: int = 16, seed: int = 0,
                      prompt_template: str = "a {colour} {shape}") -> Path:
    """Write ``n`` images and metadata.jsonl into ``folder`` (deterministic in ``seed``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    names = list(COLOURS)
    for i in range(n):
        colour, shape = names[i % len(names)], SHAPES[(i // len(names)) % len(SHAPES)]
        img = _draw(shape, COLOURS[colour], resolution, rng)
        name = f"{i:04d}.png"
        with atomic_path(folder / name) as tmp:
            Image.fromarray(img).save(tmp, format="PNG")
        rows.append({"file_name": name, "text": prompt_template.format(colour=colour, shape=shape)})
    with atomic_path(folder / "metadata.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def toy_datamodule(folder: str, n: int = 8, resolution: int = 16, seed: int = 0, **kwargs) -> ImageFolderDataModule:
    """Write the toy images into ``folder`` and return a datamodule reading them."""
    check_int(n, "data.n", minimum=1)  # 0 wrote an empty metadata.jsonl that the loader then named as data.path
    write_toy_dataset(folder, n=n, resolution=resolution, seed=seed)
    return ImageFolderDataModule(path=str(folder), resolution=resolution, seed=seed, **kwargs)
