"""What a protocol needs to score mini-world concepts and styles: prompts, the texts CLIP-T compares
them with, and reference images (fresh renders, never the training images)."""

from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np
import torch

from lorabench.errors import ConfigError, check_int, choice_error
from lorabench.evaluation.eval_sets import ConceptEvalSet, StyleEvalSet, without_token
from lorabench.utils.seeding import derive_seed
from lorabench.world.datasets import concept_items, random_scene, style_object
from lorabench.world.evaluators import to_tensor
from lorabench.world.render import render
from lorabench.world.spec import BACKGROUNDS, CLASSES, COLOURS, CONCEPT_PROMPT, POSITIONS, STYLE_PROMPT, make_world

DEFAULT_CONTEXTS = (("left", "black"), ("top", "gray"), ("right", "white"))


class WorldConceptEval:
    """Evaluation prompts and references for world concepts.

    Prompts: the training prompt ``a <token> <class>`` and, for each (position, background) context,
    ``a <token> <class> at <position> on <background>`` (does the concept keep obeying the prompt?).
    References: ``n_references`` renders of the identity from ``reference_seed`` (the training set
    uses ``data.data_seed``; keep them different).
    """

    def __init__(self, world_seed: int = 0, resolution: int = 16, n_references: int = 8,
                 reference_seed: int = 1000, contexts: Sequence[Sequence[str]] = DEFAULT_CONTEXTS):
        self.world = make_world(world_seed, resolution)
        for k, context in enumerate(contexts):
            pair = isinstance(context, Sequence) and not isinstance(context, str) and len(context) == 2
            if not pair:  # an unpacking ValueError, a traceback, before
                shown = list(context) if isinstance(context, Sequence) and not isinstance(context, str) else context
                raise ConfigError(f"eval.concepts.contexts[{k}]", "must be a [position, background] pair such as "
                                  f"[left, black], got {shown!r}")
            position, background = context
            if position not in POSITIONS:
                raise choice_error("eval.concepts.contexts", position, POSITIONS)
            if background not in BACKGROUNDS:
                raise choice_error("eval.concepts.contexts", background, BACKGROUNDS)
        self.n_references = check_int(n_references, "eval.concepts.n_references", minimum=1)
        self.reference_seed, self.contexts = reference_seed, [tuple(c) for c in contexts]

    def concept_class(self, concept: str) -> str:
        """The object class of a concept (merge groups prefer concepts of one class)."""
        return self.world.identity(concept).cls

    def __call__(self, concept: str) -> ConceptEvalSet:
        identity = self.world.identity(concept)
        base = CONCEPT_PROMPT.format(token=identity.token, cls=identity.cls)
        prompts = [base] + [f"{base} at {p} on {b}" for p, b in self.contexts]
        texts = without_token(prompts, identity.token)
        items = concept_items(self.world, identity, self.n_references, self.reference_seed)
        return ConceptEvalSet(prompts, texts, to_tensor([img for img, _ in items]))


class WorldStyleEval:
    """Evaluation prompts and a reference gallery for world styles.

    Prompts: ``n_objects`` (colour, class) objects other than the one the style's training images show,
    as ``<style> image of a <colour> <class>``. Gallery: ``n_references`` renders of random objects in
    each experiment style (``reference_seed``), against which samples are retrieved (the CSD stand-in).
    """

    def __init__(self, world_seed: int = 0, resolution: int = 16, n_objects: int = 4, n_references: int = 8,
                 reference_seed: int = 1000):
        self.world = make_world(world_seed, resolution)
        self.n_objects = check_int(n_objects, "eval.styles.n_objects", minimum=1)
        self.n_references = check_int(n_references, "eval.styles.n_references", minimum=1)
        self.reference_seed = reference_seed

    def __call__(self, style: str) -> StyleEvalSet:
        s = self.world.style(style)
        trained = style_object(self.world, s)
        rng = np.random.default_rng(derive_seed("style-eval", self.world.seed, style))
        objects = [o for o in itertools.product(COLOURS, CLASSES) if o != trained]
        picked = [objects[k] for k in rng.permutation(len(objects))[: self.n_objects]]
        prompts = [STYLE_PROMPT.format(style=style, object=f"a {c} {k}") for c, k in picked]
        return StyleEvalSet(style, prompts, [f"a {c} {k}" for c, k in picked])

    def references(self, style: str) -> torch.Tensor:
        """(n_references, 3, H, W): renders of random objects in ``style`` (its part of the gallery)."""
        s = self.world.style(style)
        rng = np.random.default_rng(derive_seed("style-gallery", self.world.seed, s.name, self.reference_seed))
        return to_tensor([render(random_scene(rng, style=s), self.world.resolution, rng)
                          for _ in range(self.n_references)])

    def gallery(self) -> dict[str, torch.Tensor]:
        """``{style: (n_references, 3, H, W)}`` for every experiment style."""
        return {s.name: self.references(s.name) for s in self.world.experiment_styles}
