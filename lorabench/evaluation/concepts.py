"""Evaluation prompts and references for concepts given as image folders (the real path).

The counterpart of :class:`lorabench.world.tasks.WorldConceptEval`: ``FolderConceptEval(concepts)``
maps each concept name to its folder, token and class; calling it with a name gives the prompts
(the instance prompt, then one per context template), the same prompts without the token (what
CLIP-T compares the images with) and the folder's images as references.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import torch

from lorabench.errors import ConfigError, choice_error
from lorabench.world.tasks import ConceptEvalSet, without_token

DEFAULT_TEMPLATES = ("a photo of {token} {cls} on the beach", "a photo of {token} {cls} in a forest",
                     "a close-up photo of {token} {cls}, smiling")


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
        self.resolution, self.n_references = int(resolution), n_references
        self.prompt, self.templates = prompt, list(templates)

    def concept_class(self, concept: str) -> str:
        return self._get(concept)["cls"]

    def _get(self, concept: str) -> dict:
        if concept not in self.concepts:
            raise choice_error("eval.concepts.concepts", concept, self.concepts)
        return self.concepts[concept]

    def __call__(self, concept: str) -> ConceptEvalSet:
        from lorabench.data.imagefolder import load_image, scan_folder

        c = self._get(concept)
        items = scan_folder(Path(c["path"]), instance_prompt="", field=f"eval.concepts.concepts.{concept}.path")
        paths = [p for p, _ in items][: self.n_references or None]
        refs = torch.stack([load_image(p, self.resolution) for p in paths])
        refs = (refs + 1) / 2  # the loader gives [-1, 1]; scorers take [0, 1]
        prompts = [t.format(token=c["token"], cls=c["cls"]) for t in [self.prompt, *self.templates]]
        return ConceptEvalSet(prompts, without_token(prompts, c["token"]), refs.clamp(0, 1))
