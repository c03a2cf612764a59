"""Single-concept scores, as the personalisation papers report them.

Every metric model is used through one small interface, so the mini world's evaluators and the real
models (CLIP, DINO, ArcFace, CSD) are interchangeable:

- ``ImageEmbedder.embed_images(images)``: float images in [0, 1], (N, 3, H, W) -> (N, d), L2-normalised;
- ``TextImageEmbedder`` adds ``embed_texts(texts)`` -> (N, d), L2-normalised, in the same space.

Scores (each a mean, in [-1, 1]; the papers print cosine similarities, not 100x):

- ``text_alignment`` (CLIP-T): cosine of each image with its prompt's text (the concept token removed);
- ``image_alignment`` (CLIP-I): mean cosine over all (generated, reference) pairs, image tower;
- ``identity_similarity`` (DINO): mean cosine over all (generated, reference) pairs, identity embedding;
- ``identity_alignment``: share of generated images whose mean cosine distance to the references is
  below the identity threshold (ArcFace distance < 0.68 in Orthogonal Adaptation; the world's
  evaluator records its own threshold, chosen at the equal-error point of same/other pairs).
"""

from __future__ import annotations

from typing import Optional, Protocol, Sequence

import torch

from lorabench.errors import ConfigError


class ImageEmbedder(Protocol):
    def embed_images(self, images: torch.Tensor) -> torch.Tensor: ...


class TextImageEmbedder(ImageEmbedder, Protocol):
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor: ...


def embed_batched(fn, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``fn`` (an ``embed_images``) over ``images`` in batches of ``batch_size``, concatenated."""
    return torch.cat([fn(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


def pairwise_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, d), (M, d) normalised embeddings -> (N, M) cosine similarities."""
    return a.float() @ b.float().T


class ConceptScorer:
    """Scores samples of one concept against reference images of it.

    Args:
        text_image: CLIP (or its stand-in) for text and image alignment.
        identity: DINO / ArcFace (or its stand-in) for identity similarity and alignment.
        identity_threshold: cosine distance below which an image counts as the identity.
        batch_size: images per embedder call.
    """

    def __init__(self, text_image: TextImageEmbedder, identity: ImageEmbedder, identity_threshold: float,
                 batch_size: int = 256):
        if not 0.0 < identity_threshold < 2.0:
            raise ConfigError("eval.identity_threshold",
                              f"must be a cosine distance in (0, 2), got {identity_threshold}")
        self.text_image, self.identity = text_image, identity
        self.identity_threshold, self.batch_size = float(identity_threshold), batch_size

    def _embed(self, fn, images: torch.Tensor) -> torch.Tensor:
        return embed_batched(fn, images, self.batch_size)

    @torch.no_grad()
    def embed_references(self, references: torch.Tensor) -> dict[str, torch.Tensor]:
        """Both embeddings of the reference images; pass the result to ``__call__`` to reuse them."""
        if references.ndim != 4 or len(references) == 0:
            raise ValueError(f"expected non-empty (N, 3, H, W) references, got {tuple(references.shape)}")
        return {"text_image": self._embed(self.text_image.embed_images, references),
                "identity": self._embed(self.identity.embed_images, references)}

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, references: torch.Tensor | dict[str, torch.Tensor],
                 texts: Optional[Sequence[str]] = None) -> dict[str, float]:
        """``references``: images, or their ``embed_references`` output."""
        if images.ndim != 4 or len(images) == 0:
            raise ValueError(f"expected non-empty (N, 3, H, W) images, got {tuple(images.shape)}")
        refs = references if isinstance(references, dict) else self.embed_references(references)
        out: dict[str, float] = {}
        img_ti = self._embed(self.text_image.embed_images, images)
        out["image_alignment"] = float(pairwise_cosine(img_ti, refs["text_image"]).mean())
        if texts is not None:
            if len(texts) != len(images):
                raise ValueError(f"{len(texts)} texts for {len(images)} images")
            txt = self.text_image.embed_texts(list(texts))
            out["text_alignment"] = float((img_ti.float() * txt.float()).sum(-1).mean())
        sim = pairwise_cosine(self._embed(self.identity.embed_images, images), refs["identity"])
        out["identity_similarity"] = float(sim.mean())
        out["identity_alignment"] = float(((1 - sim.mean(1)) < self.identity_threshold).float().mean())
        return out


def score_samples(scorer: ConceptScorer, images: torch.Tensor, eval_set, n_img: int,
                  references: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
    """Scores of one replicate of a :class:`~lorabench.evaluation.eval_sets.ConceptEvalSet`: the first
    prompt's ``n_img`` images (the concept prompt) and the context prompts' images (keys prefixed
    ``context_``). ``images`` is prompt-major, as ``sampling.sample_prompts`` draws them.
    ``references``: the set's reference embeddings (``scorer.embed_references``), if already made."""
    texts = [t for t in eval_set.texts for _ in range(n_img)]
    refs = references if references is not None else scorer.embed_references(eval_set.references)
    out = scorer(images[:n_img], refs, texts[:n_img])
    if len(eval_set.prompts) > 1:
        ctx = scorer(images[n_img:], refs, texts[n_img:])
        out.update({f"context_{k}": v for k, v in ctx.items()})
    return out


class StyleScorer:
    """Scores samples of one style against a gallery of reference images of every candidate style,
    with a style embedding (CSD, or the world's style evaluator):

    - ``style_similarity``: mean cosine over all (generated, reference of the target style) pairs;
    - ``style_top1``: share of samples whose nearest style centroid (mean reference embedding, normalised)
      is the target, a retrieval among all gallery styles (chance = 1 / number of styles).
    """

    def __init__(self, style: ImageEmbedder, gallery: dict[str, torch.Tensor], batch_size: int = 256):
        if not gallery:
            raise ValueError("empty style gallery")
        self.style, self.batch_size = style, batch_size
        self.names = list(gallery)
        with torch.no_grad():
            self.references = {k: self._embed(v) for k, v in gallery.items()}
            self.centroids = torch.nn.functional.normalize(
                torch.stack([self.references[k].float().mean(0) for k in self.names]), dim=-1)

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        return embed_batched(self.style.embed_images, images, self.batch_size)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, target: str) -> dict[str, float]:
        if target not in self.references:
            raise ValueError(f"style {target!r} is not in the gallery ({', '.join(self.names)})")
        emb = self._embed(images).float()
        nearest = (emb @ self.centroids.T).argmax(1)
        return {"style_similarity": float(pairwise_cosine(emb, self.references[target]).mean()),
                "style_top1": float((nearest == self.names.index(target)).float().mean())}
