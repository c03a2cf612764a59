"""Image-set scores of a style fine-tune, as TriLoRA reports them: FID, KID and CLIP score.

Everything statistical is torchmetrics': ``FrechetInceptionDistance`` and ``KernelInceptionDistance``
with a feature extractor passed in (the mini world's text-image evaluator features, or Inception
from a local torch-fidelity weights file at full scale), and CLIP score with torchmetrics'
``CLIPScore`` conventions (100 x cosine of each image with its prompt, averaged, then clamped at 0).

:class:`FidelityScorer` holds the reference set's features once (``reset_real_features=False``), so
the base model and every method are compared with the same reference statistics, the same feature
extractor and the same resizing: what Normalized FID (FID(method) / FID(base)) needs. Images are
floats in [0, 1], (N, 3, H, W), as the sampler returns them.
"""

from __future__ import annotations

import importlib
import warnings
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import nn
from torchmetrics import Metric
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance
from torchmetrics.multimodal.clip_score import CLIPScore
from transformers import CLIPModel, CLIPProcessor

from lorabench.errors import ConfigError
from lorabench.evaluation.hf import CLIPEmbedder, load_pretrained, tensor_features
from lorabench.evaluation.scores import TextImageEmbedder, embed_batched

KID_SEED = 0  # the seed of KID's subset draws


class FeatureExtractor(nn.Module):
    """A FID feature extractor from any ``fn(images in [0, 1]) -> (N, d)``, as torchmetrics takes it
    (``num_features`` set, so torchmetrics does not probe it with a 299 px dummy image)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], num_features: int, owner: nn.Module | None = None,
                 batch_size: int = 256):
        super().__init__()
        self.fn, self.num_features, self.owner, self.batch_size = fn, int(num_features), owner, batch_size

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # Features land where the metric's states are (the images' device), wherever ``fn``'s model
        # runs (e.g. a CLIPEmbedder built for another device).
        return embed_batched(self.fn, images.float(), self.batch_size).to(images.device)


class EmbeddingCLIPScore(Metric):
    """torchmetrics' CLIP score on any :class:`TextImageEmbedder` (the world's CLIP stand-in):
    ``max(100 * mean_i cos(image_i, text_i), 0)``, summed over updates and synced like CLIPScore."""

    higher_is_better = True
    full_state_update = False

    def __init__(self, embedder: TextImageEmbedder, batch_size: int = 256, **kwargs):
        super().__init__(**kwargs)
        self.embedder, self.batch_size = embedder, batch_size
        self.add_state("score", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n_samples", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    @torch.no_grad()
    def update(self, images: torch.Tensor, texts: Sequence[str]) -> None:
        if len(texts) != len(images):
            raise ValueError(f"{len(texts)} texts for {len(images)} images")
        img = embed_batched(self.embedder.embed_images, images.float(), self.batch_size).float()
        txt = embed_batched(lambda t: self.embedder.embed_texts(list(t)), list(texts), self.batch_size).float()
        cos = torch.nn.functional.normalize(img, dim=-1) @ torch.nn.functional.normalize(txt, dim=-1).T
        self.score += 100 * cos.diagonal().double().sum()
        self.n_samples += len(images)

    def compute(self) -> torch.Tensor:
        return torch.clamp(self.score / self.n_samples, min=0.0)


class UInt8CLIPScore(Metric):
    """torchmetrics' own ``CLIPScore`` fed images in [0, 1]: it expects the uint8 range (a float image
    in [0, 1] would be divided by 255 a second time), so images are scaled to [0, 255] first."""

    higher_is_better = True
    full_state_update = False

    def __init__(self, clip_score: Metric, **kwargs):
        super().__init__(**kwargs)
        self.inner = clip_score

    def update(self, images: torch.Tensor, texts: Sequence[str]) -> None:
        self.inner.update((images.clamp(0, 1) * 255).round().to(torch.uint8), list(texts))

    def compute(self) -> torch.Tensor:
        return self.inner.compute()

    def reset(self) -> None:
        super().reset()
        self.inner.reset()


class FidelityScorer:
    """FID, KID and CLIP score of generated images against one reference set.

    Args:
        features: the feature extractor (an ``nn.Module`` with ``num_features``) or an Inception
            feature size (64, 192, 768, 2048; needs torch-fidelity and ``feature_extractor_weights_path``).
        clip_score: a metric whose ``update(images in [0, 1], texts)`` / ``compute()`` give CLIP score.
        kid_subset_size: KID's subset size, lowered to the smaller set's size when a set is smaller.
        kid_subsets: number of KID subsets.
        batch_size: images per feature-extractor call (a 512 px set is fed in pieces, never whole).
    """

    def __init__(self, features: nn.Module | int, clip_score: Metric, kid_subset_size: int = 100,
                 kid_subsets: int = 100, feature_extractor_weights_path: Optional[str] = None, batch_size: int = 64):
        if kid_subset_size < 2:
            raise ConfigError("eval.fidelity.kid_subset_size", f"must be >= 2, got {kid_subset_size}")
        kw = {"feature_extractor_weights_path": feature_extractor_weights_path} if isinstance(features, int) else {}
        self.fid = FrechetInceptionDistance(features, reset_real_features=False, normalize=True, **kw)
        # KID shares FID's extractor (one Inception, not two). It keeps every feature, as it must: the
        # sets here are hundreds of images, so its memory warning is silenced.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*will save all extracted features in buffer.*")
            self.kid = KernelInceptionDistance(self.fid.inception, subsets=kid_subsets, subset_size=kid_subset_size,
                                               reset_real_features=False, normalize=True)
        self.kid.used_custom_model = self.fid.used_custom_model
        self.clip_score, self.kid_subset_size, self.batch_size = clip_score, int(kid_subset_size), int(batch_size)
        self.n_references = 0

    def to(self, device) -> "FidelityScorer":
        """Move the feature extractor and CLIP model (the protocol scores where it samples)."""
        for metric in (self.fid, self.kid, self.clip_score):
            metric.to(device)
        return self

    @torch.no_grad()
    def set_references(self, images: torch.Tensor | Iterable[torch.Tensor]) -> "FidelityScorer":
        """The reference set (e.g. every dataset image), embedded once for every later call: one
        (N, 3, H, W) tensor, or an iterable of such batches (a large set need not fit in memory)."""
        for metric in (self.fid, self.kid):
            metric.reset_real_features = True
            metric.reset()
            metric.reset_real_features = False
        n = 0
        for batch in ([images] if isinstance(images, torch.Tensor) else images):
            if batch.ndim != 4:
                raise ValueError(f"expected (N, 3, H, W) reference images, got {tuple(batch.shape)}")
            for i in range(0, len(batch), self.batch_size):
                chunk = batch[i:i + self.batch_size].to(self.fid.device, torch.float32)
                self.fid.update(chunk, real=True)
                self.kid.update(chunk, real=True)
            n += len(batch)
        if n < 2:
            raise ValueError(f"expected at least 2 reference images, got {n}")
        self.n_references = n
        return self

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, texts: Sequence[str]) -> dict[str, float]:
        """``{fid, kid, kid_std, clip_score}`` of ``images`` (generated for ``texts``)."""
        if not self.n_references:
            raise RuntimeError("FidelityScorer: set_references first")
        if images.ndim != 4 or len(images) < 2:
            raise ValueError(f"expected at least 2 images (N, 3, H, W), got {tuple(images.shape)}")
        if len(texts) != len(images):
            raise ValueError(f"{len(texts)} texts for {len(images)} images")
        for metric in (self.fid, self.kid, self.clip_score):
            metric.reset()
        for i in range(0, len(images), self.batch_size):
            chunk = images[i:i + self.batch_size].to(self.fid.device, torch.float32)
            self.fid.update(chunk, real=False)
            self.kid.update(chunk, real=False)
            self.clip_score.update(chunk, list(texts[i:i + self.batch_size]))
        self.kid.subset_size = min(self.kid_subset_size, len(images), self.n_references)
        with torch.random.fork_rng(devices=[]):  # KID draws its subsets from the global RNG: the same images, the
            torch.manual_seed(KID_SEED)          # same KID, and the caller's random stream left as it was
            kid_mean, kid_std = self.kid.compute()
        return {"fid": float(self.fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std),
                "clip_score": float(self.clip_score.compute())}


def inception_scorer(feature_extractor_weights_path: Optional[str], clip: str, kid_subset_size: int = 100,
                     kid_subsets: int = 100, feature: int = 2048) -> FidelityScorer:
    """The full-scale scorer: torch-fidelity's Inception (FID / KID) from a local weights file, and
    torchmetrics' CLIPScore on a local CLIP folder (or a hub id where the hub is reachable)."""
    if not feature_extractor_weights_path:
        raise ConfigError("eval.fidelity.feature_extractor_weights_path",
                          "not set; download torch-fidelity's weights-inception-2015-12-05-6726825d.pth and give "
                          "its path")
    if not Path(feature_extractor_weights_path).is_file():
        raise ConfigError("eval.fidelity.feature_extractor_weights_path",
                          f"{str(feature_extractor_weights_path)!r} does not exist (torch-fidelity's Inception "
                          "weights file)")
    try:
        importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")
    except (ImportError, RuntimeError) as exc:  # torchvision built for another torch raises RuntimeError
        raise ConfigError("eval.fidelity", "Inception FID needs torch-fidelity and a torchvision built for this torch "
                          f"(pip install 'lorabench[fid]'): {type(exc).__name__}: {exc}"[:300]) from exc
    return FidelityScorer(feature, hf_clip_score(clip), kid_subset_size, kid_subsets, feature_extractor_weights_path)


class _TensorFeatures(nn.Module):
    """A transformers CLIPModel whose ``get_*_features`` return tensors: transformers 5 returns a model
    output there, which torchmetrics' CLIPScore (1.9) cannot normalise."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return tensor_features(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return tensor_features(self.model.get_text_features(*args, **kwargs))


def hf_clip_score(clip: str, field: str = "eval.fidelity.clip") -> UInt8CLIPScore:
    """torchmetrics' CLIPScore on a transformers CLIP model (hub id or local folder), loaded here so a
    missing model fails as one line naming ``field``."""
    model = _TensorFeatures(load_pretrained(CLIPModel, clip, field).eval())
    processor = load_pretrained(CLIPProcessor, clip, field)
    return UInt8CLIPScore(CLIPScore(model_name_or_path=lambda: (model, processor)))


def clip_feature_scorer(clip: str, kid_subset_size: int = 100, kid_subsets: int = 100,
                        device: str = "cpu") -> FidelityScorer:
    """FID / KID on CLIP image embeddings (FD_CLIP, Kynkaanniemi et al. 2023) and torchmetrics' CLIPScore,
    both from one local CLIP folder: for machines without torch-fidelity or Inception weights. Its FIDs
    are not comparable with Inception FIDs (NFID, a ratio within one tool, is the comparable number)."""
    embedder = CLIPEmbedder(clip, device=device, field="eval.fidelity.clip")
    features = FeatureExtractor(embedder.embed_images, embedder.model.config.projection_dim)
    return FidelityScorer(features, hf_clip_score(clip), kid_subset_size, kid_subsets)
