"""What a protocol needs to score a mini-world concept: prompts, the texts CLIP-T compares them with,
and reference images of the identity (fresh renders, never the training images)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from lorabench.errors import choice_error
from lorabench.world.datasets import concept_items
from lorabench.world.evaluators import to_tensor
from lorabench.world.spec import BACKGROUNDS, CONCEPT_PROMPT, POSITIONS, make_world

DEFAULT_CONTEXTS = (("left", "black"), ("top", "gray"), ("right", "white"))


@dataclass
class ConceptEvalSet:
    prompts: list[str]       # what the model is asked, concept token included
    texts: list[str]         # the same prompts without the token (CLIP-T compares images with these)
    references: torch.Tensor  # (N, 3, H, W) in [0, 1]


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
        for position, background in contexts:
            if position not in POSITIONS:
                raise choice_error("eval.concepts.contexts", position, POSITIONS)
            if background not in BACKGROUNDS:
                raise choice_error("eval.concepts.contexts", background, BACKGROUNDS)
        self.n_references, self.reference_seed = n_references, reference_seed
        self.contexts = [tuple(c) for c in contexts]

    def __call__(self, concept: str) -> ConceptEvalSet:
        identity = self.world.identity(concept)
        base = CONCEPT_PROMPT.format(token=identity.token, cls=identity.cls)
        prompts = [base] + [f"{base} at {p} on {b}" for p, b in self.contexts]
        texts = [" ".join(w for w in p.split() if w != identity.token) for p in prompts]
        items = concept_items(self.world, identity, self.n_references, self.reference_seed)
        return ConceptEvalSet(prompts, texts, to_tensor([img for img, _ in items]))
