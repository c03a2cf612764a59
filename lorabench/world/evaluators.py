"""The mini world's metric models: stand-ins for CLIP, DINO/ArcFace, CSD and Inception.

Each is a small CNN trained by this project's code on the *evaluator* pools of the world
(identities and styles that no experiment uses), so, as with the real models, the concepts and
styles they score are new to them:

- ``text_image``: a contrastive text-image encoder (CLIP stand-in). Image and text embeddings give
  CLIP-T (text-image) and CLIP-I (image-image) similarities and zero-shot attribute accuracy; its
  image tower's pooled features serve as the FID feature space (Inception stand-in).
- ``identity``: an identity embedding (DINO / ArcFace stand-in), cosine-softmax over identities, with
  a distance threshold for "identity alignment" chosen on held-out evaluator identities.
- ``style``: a style embedding (CSD stand-in), cosine-softmax over styles.

All take float images in [0, 1], shape (N, 3, H, W), and return L2-normalised embeddings.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lorabench.utils.seeding import derive_seed
from lorabench.world.datasets import random_scene
from lorabench.world.render import render
from lorabench.world.spec import BACKGROUNDS, CLASSES, COLOURS, POSITIONS, SIZES, Identity, Scene, World

ATTRIBUTES = {"size": list(SIZES), "colour": list(COLOURS), "cls": list(CLASSES), "position": list(POSITIONS),
              "background": list(BACKGROUNDS)}


class ConvEncoder(nn.Module):
    """Small CNN: (N, 3, H, W) in [0, 1] -> (N, dim). Pools to 4x4, so any input size works (FID)."""

    def __init__(self, dim: int = 64, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.GELU(),
            nn.Conv2d(width, width, 3, padding=1), nn.GELU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.GELU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(2 * width * 16, 128), nn.GELU())
        self.head = nn.Linear(128, dim)
        self.num_features = 128

    def pooled(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images * 2 - 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.pooled(images)), dim=-1)


class BagOfWordsText(nn.Module):
    """Text tower: mean of word embeddings over the world vocabulary, then an MLP."""

    def __init__(self, vocabulary: Sequence[str], dim: int = 64):
        super().__init__()
        self.vocabulary = list(vocabulary)
        self.index = {w: i + 1 for i, w in enumerate(self.vocabulary)}  # 0: unknown word
        self.embed = nn.EmbeddingBag(len(self.vocabulary) + 1, 128, mode="mean")
        self.mlp = nn.Sequential(nn.GELU(), nn.Linear(128, dim))

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        ids, offsets = [], []
        for t in texts:
            offsets.append(len(ids))
            ids.extend(self.index.get(w, 0) for w in t.lower().split() or [""])
        dev = self.embed.weight.device
        x = self.embed(torch.tensor(ids, device=dev), torch.tensor(offsets, device=dev))
        return F.normalize(self.mlp(x), dim=-1)


class TextImageEvaluator(nn.Module):
    def __init__(self, vocabulary: Sequence[str], dim: int = 64):
        super().__init__()
        self.image = ConvEncoder(dim)
        self.text = BagOfWordsText(vocabulary, dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))

    def embed_images(self, images):
        return self.image(images)

    def embed_texts(self, texts):
        return self.text(texts)

    def fid_features(self, images):
        return self.image.pooled(images)


class EmbeddingEvaluator(nn.Module):
    """Identity or style embedding, trained with a cosine-softmax head that is dropped after training."""

    def __init__(self, num_classes: int, dim: int = 64):
        super().__init__()
        self.image = ConvEncoder(dim)
        self.classes = nn.Parameter(torch.randn(num_classes, dim) * 0.1)

    def embed_images(self, images):
        return self.image(images)

    def logits(self, images, scale: float = 16.0):
        return scale * self.embed_images(images) @ F.normalize(self.classes, dim=-1).T


# -- training data -------------------------------------------------------------------------------
def to_tensor(images: Sequence[np.ndarray]) -> torch.Tensor:
    """HWC uint8 images -> (N, 3, H, W) floats in [0, 1], what every evaluator takes."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0


def _batch(scenes: list[Scene], res: int, rng) -> torch.Tensor:
    return to_tensor([render(s, res, rng) for s in scenes])


def text_image_scenes(world: World, rng, n: int) -> list[Scene]:
    """Plain objects, evaluator identities and evaluator styles, each with its attribute caption."""
    out = []
    for _ in range(n):
        u = rng.random()
        ident = world.evaluator_identities[int(rng.integers(len(world.evaluator_identities)))] if u < 0.2 else None
        style = world.evaluator_styles[int(rng.integers(len(world.evaluator_styles)))] if 0.2 <= u < 0.45 else None
        out.append(random_scene(rng, identity=ident, style=style))
    return out


def _caption(scene: Scene) -> str:
    colour = scene.identity.body if scene.identity else scene.colour
    return f"a {scene.size} {colour} {scene.cls} at {scene.position} on {scene.background}"


def train_text_image(world: World, steps: int = 1500, batch: int = 256, seed: int = 0, log: Callable = print):
    torch.manual_seed(seed)
    rng = np.random.default_rng(derive_seed("eval-text-image", world.seed, seed))
    model = TextImageEvaluator(world.vocabulary())
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    for step in range(steps):
        scenes = text_image_scenes(world, rng, batch)
        img = model.embed_images(_batch(scenes, world.resolution, rng))
        txt = model.embed_texts([_caption(s) for s in scenes])
        logits = model.logit_scale.exp().clamp(max=100) * img @ txt.T
        # Captions can repeat within a batch: every matching caption is a positive.
        same = torch.tensor([[a == b for b in map(_caption, scenes)] for a in map(_caption, scenes)], dtype=torch.float)
        target = same / same.sum(1, keepdim=True)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        _optimise(opt, sched, loss, step, steps, log, "text-image")
    return model.eval()


def _optimise(opt, sched, loss, step: int, steps: int, log: Callable, label: str) -> None:
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    if step % 250 == 0 or step == steps - 1:
        log(f"{label} step {step}: loss {loss.item():.3f}")


def train_embedding(world: World, kind: str, steps: int = 1200, batch: int = 256, seed: int = 0,
                    log: Callable = print) -> EmbeddingEvaluator:
    """``kind``: identity (classes = evaluator identities) or style (classes = evaluator styles)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(derive_seed("eval", kind, world.seed, seed))
    pool = world.evaluator_identities if kind == "identity" else world.evaluator_styles
    model = EmbeddingEvaluator(len(pool))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    for step in range(steps):
        labels = rng.integers(len(pool), size=batch)
        scenes = [random_scene(rng, identity=pool[k]) if kind == "identity"
                  else random_scene(rng, style=pool[k], identity=_maybe_identity(world, rng)) for k in labels]
        logits = model.logits(_batch(scenes, world.resolution, rng))
        loss = F.cross_entropy(logits, torch.from_numpy(labels))
        _optimise(opt, sched, loss, step, steps, log, kind)
    return model.eval()


def _maybe_identity(world: World, rng) -> Optional[Identity]:
    if rng.random() < 0.3:
        return world.evaluator_identities[int(rng.integers(len(world.evaluator_identities)))]
    return None


# -- quality on held-out data --------------------------------------------------------------------
@torch.no_grad()
def retrieval_top1(embed: Callable, groups: list[list[Scene]], res: int, rng) -> float:
    """Gallery: the first image of every group; queries: the rest. Top-1 = nearest gallery item is its own."""
    gallery = embed(_batch([g[0] for g in groups], res, rng))
    hits = total = 0
    for k, g in enumerate(groups):
        q = embed(_batch(g[1:], res, rng))
        hits += int(((q @ gallery.T).argmax(1) == k).sum())
        total += len(g) - 1
    return hits / total


@torch.no_grad()
def attribute_accuracy(model: TextImageEvaluator, images: torch.Tensor, scenes: Sequence[Scene]) -> dict[str, float]:
    """Zero-shot: for each attribute, the caption variant (that attribute changed) closest to the image."""
    emb = model.embed_images(images)
    acc = {}
    for attr, values in ATTRIBUTES.items():
        correct = 0
        for e, s in zip(emb, scenes):
            fields = {"size": s.size, "colour": s.colour, "cls": s.cls, "position": s.position,
                      "background": s.background}
            options = [f"a {f['size']} {f['colour']} {f['cls']} at {f['position']} on {f['background']}"
                       for f in ({**fields, attr: v} for v in values)]
            sims = model.embed_texts(options) @ e
            correct += int(values[int(sims.argmax())] == fields[attr])
        acc[attr] = correct / len(scenes)
    acc["mean"] = float(np.mean([acc[a] for a in ATTRIBUTES]))
    return acc


@torch.no_grad()
def choose_threshold(embed: Callable, identities: list[Identity], res: int, rng, per: int = 6) -> dict:
    """Cosine-distance threshold for "same identity", at the equal-error point on held-out identities."""
    groups = [[random_scene(rng, identity=i) for _ in range(per)] for i in identities]
    emb = torch.stack([embed(_batch(g, res, rng)) for g in groups])  # (I, per, d)
    flat = emb.reshape(-1, emb.shape[-1])
    dist = 1 - flat @ flat.T
    ids = torch.arange(len(identities)).repeat_interleave(per)
    same = (ids[:, None] == ids[None, :]) & ~torch.eye(len(ids), dtype=torch.bool)
    diff = ids[:, None] != ids[None, :]
    pos, neg = dist[same], dist[diff]
    best = min(((float(t), float((pos > t).float().mean()), float((neg <= t).float().mean()))
                for t in torch.linspace(0, 1, 201)), key=lambda x: abs(x[1] - x[2]))
    return {"threshold": best[0], "false_reject": best[1], "false_accept": best[2]}
