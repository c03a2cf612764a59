"""Scoring generated images: the metric interfaces shared by the mini world and the real models."""

from lorabench.evaluation.eval_sets import ConceptEvalSet, StyleEvalSet, without_token
from lorabench.evaluation.scores import (
    ConceptScorer,
    ImageEmbedder,
    StyleScorer,
    TextImageEmbedder,
    pairwise_cosine,
    score_samples,
)

__all__ = [
    "ConceptEvalSet",
    "ConceptScorer",
    "ImageEmbedder",
    "StyleEvalSet",
    "StyleScorer",
    "TextImageEmbedder",
    "pairwise_cosine",
    "score_samples",
    "without_token",
]
