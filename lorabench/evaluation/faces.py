"""Face detection and 5-point alignment before ArcFace, as insightface's pipeline does it.

- :class:`FaceDetector`: insightface's SCRFD detector from its ONNX file (``buffalo_l/det_10g.onnx``),
  run by onnxruntime, with SCRFD's own pre- and post-processing (``insightface/model_zoo/scrfd.py``):
  the image is resized into the square input keeping its aspect ratio (bilinear, zero padding at the
  bottom and right), normalised as ``(RGB - 127.5) / 128``; each stride's anchor centres decode box
  distances and 5 landmark offsets (times the stride), scores below ``threshold`` (0.5) are dropped,
  greedy NMS at IoU ``nms`` (0.4), coordinates divided by the resize scale.
- :func:`similarity_transform`: the least-squares similarity (Umeyama 1991, as
  ``skimage.transform.SimilarityTransform.estimate``) taking the 5 landmarks onto
  :data:`ARCFACE_TEMPLATE`, insightface's ``arcface_dst`` for 112 x 112 crops.
- :func:`warp_affine`: ``cv2.warpAffine(image, M, (112, 112), borderValue=0)`` (bilinear, the
  destination pixel ``(x, y)`` reads the source at ``M^-1 (x, y)``), with torch's ``grid_sample``.
- :func:`align_face`: both, insightface's ``face_align.norm_crop``.

Which face, and what when there is none (:class:`lorabench.evaluation.hf.ArcFaceEmbedder` applies it):
the highest-scoring detection of a frame is its face; a frame with no detection above the threshold
gets a zero embedding, so its cosine with every reference is 0 (distance 1 > 0.68): it never counts as
the identity and pulls the mean similarity down. Such frames are counted and reported.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lorabench.errors import ConfigError

# insightface/utils/face_align.py: arcface_dst, the 5 landmarks (eyes, nose, mouth corners) of a 112 x 112 crop
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)
# SCRFD's output layouts: number of outputs -> (strides, anchors per position); only those with landmarks
SCRFD_LAYOUTS = {9: ((8, 16, 32), 2), 15: ((8, 16, 32, 64, 128), 1)}


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2 x 3 similarity (rotation, uniform scale, translation) minimising ``sum ||M src_i - dst_i||^2``
    (Umeyama's closed form; a reflection is never returned)."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or len(src) < 2:
        raise ValueError(f"expected two (N >= 2, 2) point sets, got {src.shape} and {dst.shape}")
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s0, d0 = src - mu_s, dst - mu_d
    cov = d0.T @ s0 / len(src)
    u, sv, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[1] = -1.0
    rot = u @ np.diag(d) @ vt
    var = s0.var(0).sum()
    if var <= 0:
        raise ValueError("the source points coincide")
    scale = float(sv @ d) / var
    m = np.zeros((2, 3))
    m[:, :2] = scale * rot
    m[:, 2] = mu_d - scale * rot @ mu_s
    return m


def warp_affine(image: torch.Tensor, m: np.ndarray, size: int) -> torch.Tensor:
    """(C, H, W) float image -> (C, size, size): destination pixel (x, y) samples the source bilinearly at
    ``M^-1 (x, y)`` in pixel coordinates, zeros outside (``cv2.warpAffine`` with a constant border)."""
    c, h, w = image.shape
    full = np.vstack([np.asarray(m, np.float64), [0.0, 0.0, 1.0]])
    inv = np.linalg.inv(full)[:2]
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    pts = np.stack([xs.ravel(), ys.ravel(), np.ones(xs.size)])
    sx, sy = inv @ pts
    # pixel coordinates -> grid_sample's [-1, 1] with align_corners=True (pixel i at -1 + 2 i / (n - 1))
    gx = 2.0 * sx / max(w - 1, 1) - 1.0
    gy = 2.0 * sy / max(h - 1, 1) - 1.0
    grid = torch.from_numpy(np.stack([gx, gy], -1).reshape(1, size, size, 2)).to(image.dtype)
    return F.grid_sample(image[None].float(), grid.float(), mode="bilinear", padding_mode="zeros",
                         align_corners=True)[0]


def align_face(image: torch.Tensor, landmarks: np.ndarray, size: int = 112) -> torch.Tensor:
    """insightface's ``norm_crop``: the face of ``image`` (C, H, W) whose 5 landmarks are ``landmarks``,
    warped onto the ArcFace template at ``size`` (112: the template itself; else scaled)."""
    if size % 112 == 0:
        template = ARCFACE_TEMPLATE * (size / 112.0)
    else:  # insightface's estimate_norm for 128-based sizes
        template = ARCFACE_TEMPLATE * (size / 128.0) + np.array([8.0 * size / 128.0, 0.0])
    return warp_affine(image, similarity_transform(landmarks, template), size)


def nms(dets: np.ndarray, iou: float) -> list[int]:
    """Greedy non-maximum suppression of ``(x1, y1, x2, y2, score)`` rows sorted by score (insightface's
    areas count the end pixel: ``(x2 - x1 + 1) (y2 - y1 + 1)``)."""
    x1, y1, x2, y2 = dets[:, 0], dets[:, 1], dets[:, 2], dets[:, 3]
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order, keep = np.arange(len(dets)), []
    while order.size:
        i = order[0]
        keep.append(int(i))
        xx1, yy1 = np.maximum(x1[i], x1[order[1:]]), np.maximum(y1[i], y1[order[1:]])
        xx2, yy2 = np.minimum(x2[i], x2[order[1:]]), np.minimum(y2[i], y2[order[1:]])
        inter = np.maximum(0.0, xx2 - xx1 + 1) * np.maximum(0.0, yy2 - yy1 + 1)
        ovr = inter / (areas[i] + areas[order[1:]] - inter)
        order = order[1:][ovr <= iou]
    return keep


class FaceDetector:
    """insightface's SCRFD face detector from an ONNX file (see the module docstring).

    ``detect(image)``: ``image`` (3, H, W) float RGB in [0, 255] -> ``(boxes, landmarks)``, boxes
    ``(n, 5)`` (x1, y1, x2, y2, score) and landmarks ``(n, 5, 2)`` in the image's pixels, best first."""

    def __init__(self, onnx_file: str, field: str = "eval.scorer.face_detector", det_size: int = 640,
                 threshold: float = 0.5, nms_iou: float = 0.4):
        path = Path(str(onnx_file))
        if not path.is_file():
            raise ConfigError(field, f"{onnx_file} is not a file; give insightface's SCRFD detector ONNX "
                              "(e.g. buffalo_l/det_10g.onnx)")
        try:  # optional dependencies: pip install 'lorabench[arcface]'
            import onnx  # noqa: PLC0415
            import onnxruntime as ort  # noqa: PLC0415
        except ImportError as exc:
            raise ConfigError(field, "face detection needs onnxruntime and onnx (pip install 'lorabench[arcface]')") \
                from exc
        try:
            onnx.load(str(path))
            self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - protobuf and onnxruntime raise their own kinds
            raise ConfigError(field, f"{onnx_file} is not an ONNX model ({type(exc).__name__})") from exc
        n_out = len(self.session.get_outputs())
        if n_out not in SCRFD_LAYOUTS:
            raise ConfigError(field, f"{onnx_file} has {n_out} outputs; an SCRFD detector with landmarks has 9 or 15")
        self.strides, self.anchors = SCRFD_LAYOUTS[n_out]
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        fixed = [d for d in inp.shape[2:4] if isinstance(d, int)]
        self.size = int(fixed[0]) if len(fixed) == 2 and fixed[0] == fixed[1] else int(det_size)
        self.threshold, self.nms_iou = float(threshold), float(nms_iou)

    def preprocess(self, image: torch.Tensor) -> tuple[np.ndarray, float]:
        """The network's input blob (1, 3, S, S) and the resize scale: aspect kept, zero padding."""
        _, h, w = image.shape
        if h / w > 1.0:
            nh, nw = self.size, int(self.size / (h / w))
        else:
            nw, nh = self.size, int(self.size * (h / w))
        scale = nh / h
        resized = F.interpolate(image[None].float(), size=(nh, nw), mode="bilinear", align_corners=False)[0]
        canvas = torch.zeros(3, self.size, self.size)
        canvas[:, :nh, :nw] = resized
        return ((canvas - 127.5) / 128.0)[None].numpy().astype(np.float32), scale

    def postprocess(self, outputs: list[np.ndarray], scale: float) -> tuple[np.ndarray, np.ndarray]:
        """Boxes and landmarks from the raw outputs (scores, then boxes, then landmarks, per stride)."""
        outs = [o[0] if o.ndim == 3 else o for o in outputs]  # batched exports carry a batch axis
        fmc = len(self.strides)
        scores, boxes, kps = [], [], []
        for i, stride in enumerate(self.strides):
            n = self.size // stride
            centres = np.stack(np.mgrid[:n, :n][::-1], axis=-1).astype(np.float32).reshape(-1, 2) * stride
            centres = np.repeat(centres, self.anchors, axis=0)
            s = outs[i].reshape(-1)
            d = outs[i + fmc].reshape(-1, 4) * stride
            k = outs[i + 2 * fmc].reshape(-1, 10) * stride
            if len(s) != len(centres):
                raise ValueError(f"stride {stride}: {len(s)} scores for {len(centres)} anchors; not an SCRFD layout")
            keep = s >= self.threshold
            scores.append(s[keep])
            boxes.append(np.concatenate([centres - d[:, :2], centres + d[:, 2:]], 1)[keep])
            kps.append((np.tile(centres, 5) + k).reshape(-1, 5, 2)[keep])
        s, b, k = np.concatenate(scores), np.concatenate(boxes), np.concatenate(kps)
        order = np.argsort(-s, kind="stable")
        dets = np.concatenate([b / scale, s[:, None]], 1)[order]
        k = k[order] / scale
        keep = nms(dets, self.nms_iou) if len(dets) else []
        return dets[keep], k[keep]

    def detect(self, image: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        blob, scale = self.preprocess(image)
        return self.postprocess(self.session.run(None, {self.input_name: blob}), scale)

