"""Rendering mini-world scenes to small RGB images (numpy, deterministic).

Shapes and markings are drawn at 4x and box-filtered down (anti-aliasing); style textures
and outlines are applied at the final resolution so they survive the downsampling.
"""

from __future__ import annotations

import numpy as np

from lorabench.world.spec import BACKGROUNDS, COLOURS, POSITIONS, SIZES, Scene, Style

SUPERSAMPLE = 4


def _shape_mask(cls: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    if cls == "circle":
        return dx ** 2 + dy ** 2 < r ** 2
    if cls == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) < 0.85 * r
    if cls == "triangle":
        return (dy <= 0.8 * r) & (dy >= -r) & (np.abs(dx) <= (dy + r) / 1.8)
    if cls == "diamond":
        return np.abs(dx) + np.abs(dy) < 1.15 * r
    if cls == "cross":
        return ((np.abs(dx) < 0.36 * r) & (np.abs(dy) < r)) | ((np.abs(dy) < 0.36 * r) & (np.abs(dx) < r))
    raise ValueError(f"unknown class {cls!r}")


def _pattern_mask(pattern: str, cls: str, dx, dy, r) -> np.ndarray:
    u, v = dx / r, dy / r
    if pattern == "hstripes":
        return np.floor((v + 1) * 2.5) % 2 == 1
    if pattern == "vstripes":
        return np.floor((u + 1) * 2.5) % 2 == 1
    if pattern == "checker":
        return (np.floor((u + 1) * 2) + np.floor((v + 1) * 2)) % 2 == 1
    if pattern == "dot":
        return u ** 2 + v ** 2 < 0.4 ** 2
    if pattern == "ring":
        d = np.sqrt(u ** 2 + v ** 2)
        return (d > 0.42) & (d < 0.72)
    if pattern == "split":
        return u > 0
    if pattern == "diagonal":
        return np.floor((u + v + 2) * 1.6) % 2 == 1
    if pattern == "border":
        return ~_shape_mask(cls, dx, dy, 0.55 * r)
    raise ValueError(f"unknown pattern {pattern!r}")


def _luma(img: np.ndarray) -> np.ndarray:
    return img @ np.array([0.299, 0.587, 0.114])


def apply_palette(img: np.ndarray, palette: str) -> np.ndarray:
    if palette == "natural":
        return img
    if palette == "sepia":
        return _luma(img)[..., None] * np.array([1.0, 0.8, 0.55]) + np.array([0.1, 0.05, 0.0])
    if palette == "neon":
        boosted = np.clip(1.6 * (img - img.mean(axis=-1, keepdims=True)) + 0.5, 0, 1)
        return np.roll(boosted, 1, axis=-1)
    if palette == "pastel":
        return 0.5 * img + 0.45
    if palette == "inverted":
        return 1.0 - img
    if palette == "mono":
        return np.repeat(_luma(img)[..., None], 3, axis=-1)
    if palette == "warm":
        return img * np.array([1.15, 0.92, 0.65]) + np.array([0.05, 0.02, 0.0])
    if palette == "cold":
        return img * np.array([0.65, 0.92, 1.15]) + np.array([0.0, 0.02, 0.06])
    raise ValueError(f"unknown palette {palette!r}")


def apply_texture(img: np.ndarray, texture: str, rng: np.random.Generator) -> np.ndarray:
    h, w = img.shape[:2]
    yy, xx = np.mgrid[:h, :w]
    if texture == "flat":
        return img
    if texture == "scanlines":
        return img * np.where(yy % 2 == 1, 0.7, 1.0)[..., None]
    if texture == "grain":
        return img + rng.normal(0, 0.09, size=(h, w, 1))
    if texture == "dots":
        return img + np.where((yy % 3 == 1) & (xx % 3 == 1), 0.35, 0.0)[..., None]
    if texture == "weave":
        return img + np.where((yy // 2 + xx // 2) % 2 == 0, 0.1, -0.1)[..., None]
    raise ValueError(f"unknown texture {texture!r}")


def apply_outline(img: np.ndarray, mask: np.ndarray, outline: str) -> np.ndarray:
    if outline == "none":
        return img
    m = mask > 0.5
    grown = m.copy()
    grown[1:] |= m[:-1]
    grown[:-1] |= m[1:]
    grown[:, 1:] |= m[:, :-1]
    grown[:, :-1] |= m[:, 1:]
    edge = grown & ~m
    out = img.copy()
    out[edge] = 0.05 if outline == "dark" else 0.97
    return out


def render(scene: Scene, resolution: int = 16, rng: np.random.Generator | None = None) -> np.ndarray:
    """uint8 (res, res, 3) image of ``scene``."""
    rng = rng if rng is not None else np.random.default_rng(0)
    s = resolution * SUPERSAMPLE
    ys, xs = (np.mgrid[:s, :s] + 0.5) / s
    cx, cy = POSITIONS[scene.position]
    cx, cy = cx + scene.jitter[0], cy + scene.jitter[1]
    r = SIZES[scene.size]
    dx, dy = xs - cx, ys - cy
    mask = _shape_mask(scene.cls, dx, dy, r)
    img = np.empty((s, s, 3))
    img[:] = np.array(BACKGROUNDS[scene.background]) / 255.0
    body = scene.identity.body if scene.identity else scene.colour
    img[mask] = np.array(COLOURS[body]) / 255.0
    if scene.identity is not None:
        pm = mask & _pattern_mask(scene.identity.pattern, scene.cls, dx, dy, r)
        img[pm] = np.array(COLOURS[scene.identity.mark]) / 255.0
    # Box-filter down to the target resolution.
    img = img.reshape(resolution, SUPERSAMPLE, resolution, SUPERSAMPLE, 3).mean(axis=(1, 3))
    cover = mask.reshape(resolution, SUPERSAMPLE, resolution, SUPERSAMPLE).mean(axis=(1, 3))
    if scene.style is not None:
        img = style_image(img, cover, scene.style, rng)
    return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)


def style_image(img: np.ndarray, cover: np.ndarray, style: Style, rng: np.random.Generator) -> np.ndarray:
    img = apply_outline(img, cover, style.outline)
    img = apply_palette(img, style.palette)
    return np.clip(apply_texture(img, style.texture, rng), 0, 1)
