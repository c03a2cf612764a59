"""Mini-world datasets, written in the imagefolder + metadata.jsonl format users use.

- pretraining corpus: plain objects with attribute captions (no rare token, no style word);
- concept sets: a few images of one identity, prompt ``a <token> <class>`` (DreamBooth-like);
- style sets: one object rendered in one style, prompt ``<style> image of a <colour> <class>``;
- caption sets: many objects in one style with their plain captions (TriLoRA-like style fine-tune).

Every set is a pure function of (world, kind, its arguments, seed): the same seed gives
byte-identical files.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
from PIL import Image

from lorabench.utils.io import atomic_dir
from lorabench.utils.seeding import derive_seed
from lorabench.world.render import render
from lorabench.world.spec import (BACKGROUNDS, CLASSES, COLOURS, CONCEPT_PROMPT, POSITIONS, SIZES, STYLE_PROMPT,
                                  Identity, Scene, Style, World)

Item = tuple[np.ndarray, str]


def _rng(world: World, *parts) -> np.random.Generator:
    return np.random.default_rng(derive_seed("world", world.seed, *parts))


def random_scene(rng: np.random.Generator, *, identity: Optional[Identity] = None, style: Optional[Style] = None,
                 cls: Optional[str] = None, colour: Optional[str] = None, size: Optional[str] = None,
                 position: Optional[str] = None, background: Optional[str] = None) -> Scene:
    pick = lambda options: options[int(rng.integers(len(options)))]  # noqa: E731
    cls = identity.cls if identity else (cls or pick(CLASSES))
    colour = identity.body if identity else (colour or pick(list(COLOURS)))
    return Scene(cls=cls, colour=colour, size=size or pick(list(SIZES)), position=position or pick(list(POSITIONS)),
                 background=background or pick(list(BACKGROUNDS)), identity=identity, style=style,
                 jitter=tuple(rng.uniform(-0.04, 0.04, size=2).round(4)))


def pretrain_items(world: World, n: int, seed: int = 0) -> list[Item]:
    """The pretraining corpus: plain objects whose attribute combination is not held out."""
    rng = _rng(world, "pretrain", seed)
    out = []
    while len(out) < n:
        scene = random_scene(rng)
        if scene.combo not in world.heldout_combos:
            out.append((render(scene, world.resolution, rng), scene.caption()))
    return out


def heldout_scenes(world: World, n: int, seed: int = 0) -> list[Scene]:
    """Plain scenes whose attribute combinations the model never saw (for attribute accuracy)."""
    rng = _rng(world, "heldout", seed)
    combos = sorted(world.heldout_combos)
    out = []
    for k in rng.integers(len(combos), size=n):
        size, colour, cls, position, background = combos[int(k)]
        out.append(random_scene(rng, cls=cls, colour=colour, size=size, position=position, background=background))
    return out


def concept_items(world: World, identity: Identity, n: int = 8, seed: int = 0) -> list[Item]:
    """``n`` images of one identity, varied in size, position and background."""
    rng = _rng(world, "concept", identity.name, seed)
    prompt = CONCEPT_PROMPT.format(token=identity.token, cls=identity.cls)
    return [(render(random_scene(rng, identity=identity), world.resolution, rng), prompt) for _ in range(n)]


def style_object(world: World, style: Style) -> tuple[str, str]:
    """The one object a style task shows (as in the continual protocol: 5 images of one object)."""
    rng = _rng(world, "style-object", style.name)
    return list(COLOURS)[int(rng.integers(len(COLOURS)))], CLASSES[int(rng.integers(len(CLASSES)))]


def style_items(world: World, style: Style, n: int = 5, seed: int = 0) -> list[Item]:
    rng = _rng(world, "style", style.name, seed)
    colour, cls = style_object(world, style)
    prompt = STYLE_PROMPT.format(style=style.name, object=f"a {colour} {cls}")
    return [(render(random_scene(rng, style=style, cls=cls, colour=colour), world.resolution, rng), prompt)
            for _ in range(n)]


def caption_items(world: World, style: Style, n: int = 100, seed: int = 0) -> list[Item]:
    """Many plain objects rendered in one style, each with its plain attribute caption."""
    rng = _rng(world, "captions", style.name, seed)
    out = []
    for _ in range(n):
        scene = random_scene(rng, style=style)
        out.append((render(scene, world.resolution, rng), scene.caption()))
    return out


def png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def write_imagefolder(folder, items: Iterable[Item], extra: Optional[dict] = None) -> Path:
    """Write ``items`` as ``00000.png`` ... plus ``metadata.jsonl`` (and ``world.json`` if ``extra``),
    into a temporary folder renamed into place at the end."""
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        rows = []
        for i, (img, text) in enumerate(items):
            name = f"{i:05d}.png"
            (tmp / name).write_bytes(png_bytes(img))
            rows.append(json.dumps({"file_name": name, "text": text}))
        (tmp / "metadata.jsonl").write_text("".join(r + "\n" for r in rows))
        if extra is not None:
            (tmp / "world.json").write_text(json.dumps(extra, indent=1, sort_keys=True) + "\n")
    return folder
