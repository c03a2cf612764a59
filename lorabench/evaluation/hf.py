"""The real metric models behind the same interface as the mini world's evaluators.

- ``CLIPEmbedder``: CLIP image and text features (CLIP-T, CLIP-I), e.g. openai/clip-vit-base-patch32
  (the continual paper) or openai/clip-vit-large-patch14 (torchmetrics' CLIPScore default).
- ``DINOEmbedder``: the self-supervised DINO ViT's CLS token, e.g. facebook/dino-vits16 (DreamBooth's
  DINO metric; not a supervised ViT).

Both take float images in [0, 1], (N, 3, H, W), resize them (bicubic, antialiased) to the model's input
size, normalise with the model's mean/std, and return L2-normalised features. Hub ids or local folders.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from lorabench.errors import ConfigError

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _load(cls, model_id: str, field: str):
    from lorabench.models.components import explain_load_error

    try:
        return cls.from_pretrained(model_id)
    except Exception as exc:  # noqa: BLE001 - one line naming the field
        raise ConfigError(field, f"could not load {model_id!r}: {explain_load_error(exc)}") from exc


def _features(out) -> torch.Tensor:
    # transformers >= 5 returns a model output whose pooler_output is the projected feature; 4.x a tensor.
    return out.pooler_output if hasattr(out, "pooler_output") else out


class _Preprocess:
    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float], device: str):
        self.size, self.device = size, torch.device(device)
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected (N, 3, H, W) images in [0, 1], got {tuple(images.shape)}")
        x = images.to(self.device, torch.float32)
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", antialias=True, align_corners=False)
        return (x.clamp(0, 1) - self.mean) / self.std


class CLIPEmbedder:
    def __init__(self, model_id: str = "openai/clip-vit-base-patch32", device: str = "cpu",
                 field: str = "eval.clip"):
        from transformers import CLIPModel, CLIPTokenizer

        self.model = _load(CLIPModel, model_id, field).eval().to(device)
        self.tokenizer = _load(CLIPTokenizer, model_id, field)
        self.pre = _Preprocess(self.model.config.vision_config.image_size, CLIP_MEAN, CLIP_STD, device)

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(_features(self.model.get_image_features(pixel_values=self.pre(images))).float(), dim=-1)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        tok = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt").to(self.pre.device)
        out = self.model.get_text_features(input_ids=tok.input_ids, attention_mask=tok.attention_mask)
        return F.normalize(_features(out).float(), dim=-1)


class DINOEmbedder:
    def __init__(self, model_id: str = "facebook/dino-vits16", device: str = "cpu", image_size: Optional[int] = None,
                 field: str = "eval.dino"):
        from transformers import ViTModel

        self.model = _load(ViTModel, model_id, field).eval().to(device)
        self.pre = _Preprocess(image_size or self.model.config.image_size, IMAGENET_MEAN, IMAGENET_STD, device)

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=self.pre(images), interpolate_pos_encoding=True)
        return F.normalize(out.last_hidden_state[:, 0].float(), dim=-1)  # the CLS token


def concept_scorer(clip: str = "openai/clip-vit-base-patch32", identity: str = "facebook/dino-vits16",
                   identity_threshold: float = 0.5, device: str = "cpu"):
    """A ConceptScorer on real models: CLIP for text/image alignment, DINO for identity."""
    from lorabench.evaluation.scores import ConceptScorer

    return ConceptScorer(CLIPEmbedder(clip, device, field="eval.scorer.clip"),
                         DINOEmbedder(identity, device, field="eval.scorer.identity"), identity_threshold)
