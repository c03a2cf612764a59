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

import dataclasses
import math
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lorabench.utils.seeding import derive_seed
from lorabench.world.datasets import random_scene
from lorabench.world.render import render
from lorabench.world.spec import (
    BACKGROUNDS,
    CAPTION_PARTS,
    CLASSES,
    COLOURS,
    OUTLINES,
    PALETTES,
    PATTERNS,
    POSITIONS,
    SIZES,
    TEXTURES,
    Identity,
    Scene,
    World,
)

# Every attribute a caption can state, with its values. The first five apply to every object; pattern
# and mark to objects with a marking; palette, texture and outline to styled objects.
ATTRIBUTES = {"size": list(SIZES), "colour": list(COLOURS), "cls": list(CLASSES), "position": list(POSITIONS),
              "background": list(BACKGROUNDS), "pattern": list(PATTERNS), "mark": list(COLOURS),
              "palette": list(PALETTES[1:]), "texture": list(TEXTURES), "outline": list(OUTLINES)}
MARKING_ATTRIBUTES, STYLE_ATTRIBUTES = ("pattern", "mark"), ("palette", "texture", "outline")
# The caption part (Scene.caption's ``drop``) that states each attribute; the class is always stated.
CAPTION_PART = {"size": "size", "colour": "colour", "cls": None, "position": "position", "background": "background",
                "pattern": "marking", "mark": "marking", "palette": "style", "texture": "style", "outline": "style"}
# The text-image evaluator's training captions: complete with probability COMPLETE_CAPTIONS, otherwise
# each part left out with probability PARTIAL_CAPTION_DROP, as CLIP's alt-texts mention only some things.
COMPLETE_CAPTIONS, PARTIAL_CAPTION_DROP = 0.5, 0.3


def applies(scene: Scene, attr: str) -> bool:
    if attr in MARKING_ATTRIBUTES:
        return scene.identity is not None
    if attr in STYLE_ATTRIBUTES:
        return scene.style is not None
    return True


def attribute_value(scene: Scene, attr: str) -> str:
    if attr in MARKING_ATTRIBUTES:
        return getattr(scene.identity, attr)
    if attr in STYLE_ATTRIBUTES:
        return getattr(scene.style, attr)
    return getattr(scene, attr)


def with_attribute(scene: Scene, attr: str, value: str) -> Scene:
    """``scene`` with one attribute changed (the caption variant zero-shot accuracy compares against)."""
    if attr in MARKING_ATTRIBUTES:
        return dataclasses.replace(scene, identity=dataclasses.replace(scene.identity, **{attr: value}))
    if attr in STYLE_ATTRIBUTES:
        return dataclasses.replace(scene, style=dataclasses.replace(scene.style, **{attr: value}))
    if attr == "colour" and scene.identity is not None:
        return dataclasses.replace(scene, colour=value, identity=dataclasses.replace(scene.identity, body=value))
    return dataclasses.replace(scene, **{attr: value})


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
    """Text tower: mean of word and word-pair embeddings over the world vocabulary, then an MLP.

    Word pairs (bigrams) carry the little word order the world's captions need: with words alone,
    "a red circle with green dot" and "a green circle with red dot" are the same bag."""

    def __init__(self, vocabulary: Sequence[str], dim: int = 64):
        super().__init__()
        self.vocabulary = list(vocabulary)
        self.index = {w: i + 1 for i, w in enumerate(self.vocabulary)}  # 0: unknown word
        n = len(self.vocabulary) + 1
        self.embed = nn.EmbeddingBag(n + n * n, 128, mode="mean")
        self.mlp = nn.Sequential(nn.GELU(), nn.Linear(128, dim))

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        ids, offsets = [], []
        n = len(self.vocabulary) + 1
        for t in texts:
            offsets.append(len(ids))
            words = [self.index.get(w, 0) for w in t.lower().split() or [""]]
            ids.extend(words)
            ids.extend(n + a * n + b for a, b in zip(words, words[1:]))
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


def batch_tensor(scenes: list[Scene], res: int, rng) -> torch.Tensor:
    """Render ``scenes`` at ``res`` px as one (N, 3, res, res) batch in [0, 1]."""
    return to_tensor([render(s, res, rng) for s in scenes])


def text_image_scenes(world: World, rng, n: int) -> list[Scene]:
    """Plain objects, objects with the markings of evaluator identities, and objects in evaluator styles
    (half of them marked), each described by its full caption (``Scene.caption``)."""
    out = []
    for _ in range(n):
        u = rng.random()
        marked = u < 0.35 or (u >= 0.6 and rng.random() < 0.5)
        ident = world.evaluator_identities[int(rng.integers(len(world.evaluator_identities)))] if marked else None
        style = world.evaluator_styles[int(rng.integers(len(world.evaluator_styles)))] if u >= 0.6 else None
        out.append(random_scene(rng, identity=ident, style=style))
    return out


def hard_negative(scene: Scene, drop: frozenset, rng) -> str:
    """The caption of ``scene`` (parts ``drop`` left out) with one stated attribute changed."""
    stated = [a for a in ATTRIBUTES if applies(scene, a) and CAPTION_PART[a] not in drop]
    attr = stated[int(rng.integers(len(stated)))]
    truth = attribute_value(scene, attr)
    options = [v for v in ATTRIBUTES[attr] if v != truth and not (attr == "mark" and v == scene.identity.body)]
    return with_attribute(scene, attr, options[int(rng.integers(len(options)))]).caption(drop)


def train_text_image(world: World, steps: int = 1500, batch: int = 256, seed: int = 0, log: Callable = print,
                     hard_negatives: int = 2):
    """Contrastive training on (render, caption) pairs. Half the captions are complete; the others leave
    each part out with probability PARTIAL_CAPTION_DROP, as CLIP's alt-texts mention only some of what
    an image shows: so "a circle at
    left on black" matches a striped circle there as well as a plain one (CLIP-T must measure whether
    the prompt is followed, not penalise details it does not mention). Each image also meets
    ``hard_negatives`` captions of itself with one stated attribute changed (as NegCLIP does): random
    captions in a batch almost never differ in a single attribute, so without them fine attributes
    (pattern, texture, outline) are not learnt."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(derive_seed("eval-text-image", world.seed, seed))
    model = TextImageEvaluator(world.vocabulary())
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    for step in range(steps):
        scenes = text_image_scenes(world, rng, batch)
        img = model.embed_images(batch_tensor(scenes, world.resolution, rng))
        drops = [frozenset() if rng.random() < COMPLETE_CAPTIONS else
                 frozenset(p for p in CAPTION_PARTS if rng.random() < PARTIAL_CAPTION_DROP) for _ in scenes]
        captions = [s.caption(d) for s, d in zip(scenes, drops)]
        texts = captions + [hard_negative(s, d, rng) for s, d in zip(scenes, drops) for _ in range(hard_negatives)]
        txt = model.embed_texts(texts)
        logits = model.logit_scale.exp().clamp(max=100) * img @ txt.T
        # Captions can repeat within a batch: every matching caption is a positive.
        same = torch.tensor([[a == b for b in texts] for a in captions], dtype=torch.float)
        target = same / same.sum(1, keepdim=True)
        # Image -> text over captions and hard negatives; text -> image over the batch's captions.
        square = same[:, :batch] / same[:, :batch].sum(1, keepdim=True)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits[:, :batch].T, square)) / 2
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
        logits = model.logits(batch_tensor(scenes, world.resolution, rng))
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
    gallery = embed(batch_tensor([g[0] for g in groups], res, rng))
    hits = total = 0
    for k, g in enumerate(groups):
        q = embed(batch_tensor(g[1:], res, rng))
        hits += int(((q @ gallery.T).argmax(1) == k).sum())
        total += len(g) - 1
    return hits / total


@torch.no_grad()
def attribute_accuracy(model: TextImageEvaluator, images: torch.Tensor, scenes: Sequence[Scene]) -> dict:
    """Zero-shot: for each attribute, is the caption variant closest to the image (that attribute set to
    each of its values, the rest as the scene's full caption says) the true one? Each attribute is
    scored on the scenes it applies to; ``mean`` is the mean over attributes, ``n`` the counts."""
    emb = model.embed_images(images)
    acc, counts = {}, {}
    for attr, values in ATTRIBUTES.items():
        correct = total = 0
        for e, s in zip(emb, scenes):
            if not applies(s, attr):
                continue
            truth = attribute_value(s, attr)
            options = [v for v in values if not (attr == "mark" and v == s.identity.body)]
            sims = model.embed_texts([with_attribute(s, attr, v).caption() for v in options]) @ e
            correct += int(options[int(sims.argmax())] == truth)
            total += 1
        if total:
            acc[attr], counts[attr] = correct / total, total
    acc["mean"] = float(np.mean([acc[a] for a in counts]))
    acc["n"] = counts
    return acc


@torch.no_grad()
def choose_threshold(embed: Callable, identities: list[Identity], res: int, rng, per: int = 6) -> dict:
    """Cosine-distance threshold for "same identity", at the equal-error point on held-out identities."""
    groups = [[random_scene(rng, identity=i) for _ in range(per)] for i in identities]
    emb = torch.stack([embed(batch_tensor(g, res, rng)) for g in groups])  # (I, per, d)
    flat = emb.reshape(-1, emb.shape[-1])
    dist = 1 - flat @ flat.T
    ids = torch.arange(len(identities)).repeat_interleave(per)
    same = (ids[:, None] == ids[None, :]) & ~torch.eye(len(ids), dtype=torch.bool)
    diff = ids[:, None] != ids[None, :]
    pos, neg = dist[same], dist[diff]
    best = min(((float(t), float((pos > t).float().mean()), float((neg <= t).float().mean()))
                for t in torch.linspace(0, 1, 201)), key=lambda x: abs(x[1] - x[2]))
    return {"threshold": best[0], "false_reject": best[1], "false_accept": best[2]}
