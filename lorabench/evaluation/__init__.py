"""Scoring generated images: the metric interfaces shared by the mini world and the real models."""

from lorabench.evaluation.scores import ConceptScorer, ImageEmbedder, StyleScorer, TextImageEmbedder, pairwise_cosine

__all__ = ["ConceptScorer", "ImageEmbedder", "StyleScorer", "TextImageEmbedder", "pairwise_cosine"]
