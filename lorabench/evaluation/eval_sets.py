"""What a protocol scores a concept or a style with: its prompts, the texts CLIP-T compares the
images with, and reference images.

- :class:`ConceptEvalSet` and :class:`StyleEvalSet`: the sets themselves, whoever builds them;
- :class:`FolderConceptEval` and :class:`FolderStyleEval`: the real path's builders, from image
  folders (the mini world's are :class:`lorabench.world.tasks.WorldConceptEval` and
  :class:`~lorabench.world.tasks.WorldStyleEval`). ``FolderConceptEval(concepts)`` maps each concept
  name to its folder, token and class; calling it with a name gives the prompts (the instance prompt,
  then one per context template), the same prompts without the token and the folder's images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch

from lorabench.data.imagefolder import load_image, scan_folder
from lorabench.data.prepare import read_manifest
from lorabench.errors import ConfigError, check_int, choice_error


def without_token(prompts: Sequence[str], token: str) -> list[str]:
    """The prompts with the concept token removed: what CLIP-T compares the images with."""
    return [" ".join(w for w in p.split() if w != token) for p in prompts]


@dataclass
class ConceptEvalSet:
    prompts: list[str]       # what the model is asked, concept token included
    texts: list[str]         # the same prompts without the token (CLIP-T compares images with these)
    references: torch.Tensor  # (N, 3, H, W) in [0, 1]


@dataclass
class StyleEvalSet:
    style: str
    prompts: list[str]        # "<style> image of <object>", objects the style set never showed
    base_prompts: list[str]   # the same prompts without the style word (what the base model is asked)


DEFAULT_TEMPLATES = ("a photo of {token} {cls} on the beach", "a photo of {token} {cls} in a forest",
                     "a close-up photo of {token} {cls}, smiling")


def folder_images(path, n: int | None, resolution: int, field: str) -> torch.Tensor:
    """The first ``n`` images of a folder (all when ``None``), (N, 3, R, R) in [0, 1]."""
    items = scan_folder(Path(path), instance_prompt="", field=field)
    paths = [p for p, _ in items][: n or None]
    refs = torch.stack([load_image(p, resolution) for p in paths])
    return ((refs + 1) / 2).clamp(0, 1)  # the loader gives [-1, 1]; scorers take [0, 1]


class FolderConceptEval:
    """``concepts``: ``{name: {path, token, cls}}``; ``templates``: context prompts with ``{token}``
    and ``{cls}``; ``prompt``: the instance prompt template; ``n_references`` images per concept
    (all when null), resized to ``resolution``."""

    def __init__(self, concepts: Mapping[str, Mapping], resolution: int = 512, n_references: int | None = None,
                 prompt: str = "a photo of {token} {cls}", templates: Sequence[str] = DEFAULT_TEMPLATES):
        self.concepts = {k: dict(v) for k, v in (concepts or {}).items()}
        for name, c in self.concepts.items():
            for key in ("path", "token", "cls"):
                if not c.get(key):
                    raise ConfigError(f"eval.concepts.concepts.{name}.{key}", "missing; each concept needs path, "
                                      "token and cls")
        self.resolution = int(resolution)
        self.n_references = check_int(n_references, "eval.concepts.n_references", minimum=1, allow_none=True)
        self.prompt, self.templates = prompt, list(templates)
        if not prompt and not self.templates:
            raise ConfigError("eval.concepts.templates", "no prompt and no templates; give at least one")

    def concept_class(self, concept: str) -> str:
        return self._get(concept)["cls"]

    def _get(self, concept: str) -> dict:
        if concept not in self.concepts:
            raise choice_error("eval.concepts.concepts", concept, self.concepts)
        return self.concepts[concept]

    def __call__(self, concept: str) -> ConceptEvalSet:
        c = self._get(concept)
        refs = folder_images(c["path"], self.n_references, self.resolution, f"eval.concepts.concepts.{concept}.path")
        lead = [self.prompt] if self.prompt else []  # prompt: null scores the templates only
        prompts = [t.format(token=c["token"], cls=c["cls"]) for t in [*lead, *self.templates]]
        return ConceptEvalSet(prompts, without_token(prompts, c["token"]), refs)


DEFAULT_STYLE_OBJECTS = ("a dog", "a house", "a tree", "a car", "a person")


class FolderStyleEval:
    """Evaluation prompts and references for styles given as image folders (the real path), the
    counterpart of :class:`lorabench.world.tasks.WorldStyleEval`.

    ``styles``: ``{name: {path, word}}`` (the style's reference images, e.g. its UnlearnCanvas images,
    and the word the prompts use for it, the name when absent); ``manifest``: instead, a prepared
    dataset's config.json (``python -m lorabench.data.prepare continual-styles``): each style's metric
    folder (held-out objects drawn in that style) and its lower-cased word; ``prompt``: the template,
    ``{style} image of {object}`` as the continual paper trains; ``objects``: what the evaluation
    prompts ask for in the style."""

    def __init__(self, styles: Mapping[str, Mapping] | None = None, resolution: int = 1024,
                 n_references: int | None = None, prompt: str = "{style} image of {object}",
                 objects: Sequence[str] = DEFAULT_STYLE_OBJECTS, manifest: str | None = None):
        if manifest and styles:
            raise ConfigError("eval.styles.manifest", "give eval.styles.styles or a manifest, not both")
        if manifest:
            root, tasks = read_manifest(manifest, "eval.styles.manifest")
            styles = {t["name"]: {"path": str(root / t["metric_path"]), "word": t["style"]} for t in tasks}
        self.styles = {k: dict(v) for k, v in (styles or {}).items()}
        for name, st in self.styles.items():
            if not st.get("path"):
                raise ConfigError(f"eval.styles.styles.{name}.path", "missing; each style needs its reference folder")
        self.resolution = int(resolution)
        self.n_references = check_int(n_references, "eval.styles.n_references", minimum=1, allow_none=True)
        self.prompt, self.objects = prompt, list(objects)

    def _get(self, style: str) -> dict:
        if style not in self.styles:
            raise choice_error("eval.styles.styles", style, self.styles)
        return self.styles[style]

    def __call__(self, style: str) -> StyleEvalSet:
        word = self._get(style).get("word") or style
        prompts = [self.prompt.format(style=word, object=o) for o in self.objects]
        return StyleEvalSet(style, prompts, list(self.objects))

    def references(self, style: str) -> torch.Tensor:
        return folder_images(self._get(style)["path"], self.n_references, self.resolution,
                             f"eval.styles.styles.{style}.path")
