"""Mini-world datasets, written in the imagefolder + metadata.jsonl format users use.

- pretraining corpus: plain, patterned and styled objects with captions in plain world words (no rare
  token, no style word), some of them partial; the experiment identities' markings, the experiment
  styles and a held-out share of every kind of combination never appear;
- concept sets: a few images of one identity, prompt ``a <token> <class>`` (DreamBooth-like), or
  per-image captions that add the image's own position and background (Mix-of-Show-like);
- style sets: one object rendered in one style, prompt ``<style> image of a <colour> <class>``;
- caption sets: many objects in one style with their plain captions (TriLoRA-like style fine-tune).

Every set is a pure function of (world, kind, its arguments, seed): the same seed gives
byte-identical files.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
from PIL import Image

from lorabench.errors import ConfigError, choice_error
from lorabench.utils.io import write_folder
from lorabench.utils.seeding import derive_seed
from lorabench.world.render import render
from lorabench.world.spec import (
    BACKGROUNDS,
    CAPTION_PARTS,
    CLASSES,
    COLOURS,
    CONCEPT_PROMPT,
    POSITIONS,
    SIZES,
    STYLE_PROMPT,
    Identity,
    Scene,
    Style,
    World,
)

# The pretraining corpus's mix: shares of plain, patterned (a marking) and styled objects (a styled
# object carries a marking half of the time), and how often each caption part is left out.
CORPUS_MIX = {"plain": 0.4, "patterned": 0.35, "styled": 0.25}
CAPTION_DROP = {"size": 0.2, "colour": 0.2, "position": 0.2, "background": 0.2, "style": 0.1}
CAPTION_MODES = ("fixed", "context")

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


def _marking(key: tuple[str, str, str, str]) -> Identity:
    """An unnamed identity: a marking the corpus describes in words (it has no token)."""
    return Identity("", *key)


def corpus_scene(world: World, rng: np.random.Generator, markings: Optional[list] = None,
                 styles: Optional[list] = None) -> Scene:
    """One pretraining scene: plain, patterned or styled (CORPUS_MIX), never a held-out combination,
    an experiment identity's marking or an experiment style. ``markings`` / ``styles``: the world's
    ``pretraining_markings()`` / ``pretraining_styles()``, passed in when drawing many scenes."""
    markings = markings if markings is not None else world.pretraining_markings()
    styles = styles if styles is not None else world.pretraining_styles()
    while True:
        u = rng.random()
        identity = style = None
        if u >= CORPUS_MIX["plain"]:
            if u < CORPUS_MIX["plain"] + CORPUS_MIX["patterned"] or rng.random() < 0.5:
                identity = _marking(markings[int(rng.integers(len(markings)))])
            if u >= CORPUS_MIX["plain"] + CORPUS_MIX["patterned"]:
                style = Style("", *styles[int(rng.integers(len(styles)))])
        scene = random_scene(rng, identity=identity, style=style)
        if scene.combo not in world.heldout_combos:
            return scene


def pretrain_items(world: World, n: int, seed: int = 0) -> list[Item]:
    """The pretraining corpus (see ``corpus_scene``), captions partly dropped (CAPTION_DROP)."""
    rng = _rng(world, "pretrain", seed)
    markings, styles = world.pretraining_markings(), world.pretraining_styles()
    out = []
    for _ in range(n):
        scene = corpus_scene(world, rng, markings, styles)
        drop = frozenset(part for part, p in CAPTION_DROP.items() if rng.random() < p)
        out.append((render(scene, world.resolution, rng), scene.caption(drop)))
    return out


def heldout_scenes(world: World, n: int, seed: int = 0) -> list[Scene]:
    """Scenes whose combinations the model never saw (attribute accuracy): in turn a plain object of a
    held-out (size, colour, class, position, background), an object with a held-out marking, and an
    object in a held-out style."""
    rng = _rng(world, "heldout", seed)
    combos, markings = sorted(world.heldout_combos), sorted(world.heldout_markings)
    styles = sorted(world.heldout_styles)
    out = []
    for k in range(n):
        if k % 3 == 0:
            size, colour, cls, position, background = combos[int(rng.integers(len(combos)))]
            out.append(random_scene(rng, cls=cls, colour=colour, size=size, position=position, background=background))
        elif k % 3 == 1:
            out.append(random_scene(rng, identity=_marking(markings[int(rng.integers(len(markings)))])))
        else:
            out.append(random_scene(rng, style=Style("", *styles[int(rng.integers(len(styles)))])))
    return out


def concept_items(world: World, identity: Identity, n: int = 8, seed: int = 0, caption_mode: str = "fixed",
                  exclude_contexts: Sequence[Sequence[str]] = ()) -> list[Item]:
    """``n`` images of one identity, varied in size, position and background.

    ``caption_mode``: ``fixed`` gives every image the concept prompt ``a <token> <class>`` (DreamBooth,
    the papers' setting); ``context`` gives every other image its own placement, ``a <token> <class> at
    <position> on <background>`` (Mix-of-Show's per-image captions). With ``context``, no image is placed
    in one of ``exclude_contexts`` ((position, background) pairs): those are the evaluated contexts, which
    must stay out of training so the context scores measure composition, not memorised prompts.
    """
    if caption_mode not in CAPTION_MODES:
        raise choice_error("data.caption_mode", caption_mode, CAPTION_MODES)
    excluded = {tuple(c) for c in exclude_contexts} if caption_mode == "context" else set()
    if excluded >= {(p, b) for p in POSITIONS for b in BACKGROUNDS}:
        raise ConfigError("data.exclude_contexts", "excludes every (position, background) pair; leave some to train on")
    rng = _rng(world, "concept", identity.name, seed)
    prompt = CONCEPT_PROMPT.format(token=identity.token, cls=identity.cls)
    out = []
    while len(out) < n:
        scene = random_scene(rng, identity=identity)
        if (scene.position, scene.background) in excluded:
            continue
        in_context = caption_mode == "context" and len(out) % 2
        text = f"{prompt} at {scene.position} on {scene.background}" if in_context else prompt
        out.append((render(scene, world.resolution, rng), text))
    return out


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


def caption_items(world: World, style: Style, n: int = 100, seed: int = 0, drop: Sequence[str] = ()) -> list[Item]:
    """Many plain objects rendered in one style, each with its plain attribute caption; ``drop``: caption
    parts left out (CAPTION_PARTS; ``[style]`` leaves the style phrase out, so the captions describe the
    objects only, as BLIP captions describe a Pokemon and not the drawing style)."""
    bad = sorted(set(drop) - set(CAPTION_PARTS))
    if bad:
        raise choice_error("data.caption_drop", bad[0], CAPTION_PARTS)
    rng = _rng(world, "captions", style.name, seed)
    out = []
    for _ in range(n):
        scene = random_scene(rng, style=style)
        out.append((render(scene, world.resolution, rng), scene.caption(frozenset(drop))))
    return out


def png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def write_imagefolder(folder, items: Iterable[Item], extra: Optional[dict] = None) -> Path:
    """Write ``items`` as ``00000.png`` ... plus ``metadata.jsonl`` (and ``world.json`` if ``extra``) into
    ``folder`` with :func:`~lorabench.utils.io.write_folder`: atomically, and a folder that already holds
    exactly these files (another ddp rank's, an earlier run's) is left as it is."""
    files, rows = {}, []
    for i, (img, text) in enumerate(items):
        name = f"{i:05d}.png"
        files[name] = png_bytes(img)
        rows.append(json.dumps({"file_name": name, "text": text}))
    files["metadata.jsonl"] = "".join(r + "\n" for r in rows).encode()
    if extra is not None:
        files["world.json"] = (json.dumps(extra, indent=1, sort_keys=True) + "\n").encode()
    return write_folder(folder, files)
