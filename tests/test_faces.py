"""Face detection and alignment before ArcFace (lorabench/evaluation/faces.py): the similarity
transform onto the ArcFace template, the warp, SCRFD's pre- and post-processing on a tiny ONNX model
built here, and the rule for frames without a face."""

import math

import numpy as np
import pytest
import torch

from helpers import scrfd_outputs, write_tiny_scrfd
from lorabench.errors import ConfigError
from lorabench.evaluation.faces import ARCFACE_TEMPLATE, FaceDetector, align_face, similarity_transform, warp_affine


def similarity(scale, angle, tx, ty):
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[scale * c, -scale * s, tx], [scale * s, scale * c, ty]])


def apply(m, pts):
    return pts @ m[:, :2].T + m[:, 2]


def test_similarity_transform_inverts_a_known_similarity():
    """Landmarks = the template moved by a known similarity: the estimate maps them back exactly, and
    with noise it is the least-squares fit (no other similarity does better)."""
    move = similarity(2.7, 0.4, 130.0, -35.0)
    landmarks = apply(move, ARCFACE_TEMPLATE)
    m = similarity_transform(landmarks, ARCFACE_TEMPLATE)
    np.testing.assert_allclose(apply(m, landmarks), ARCFACE_TEMPLATE, atol=1e-9)
    full = np.vstack([move, [0, 0, 1]])
    np.testing.assert_allclose(np.vstack([m, [0, 0, 1]]) @ full, np.eye(3), atol=1e-9)
    noisy = landmarks + np.random.default_rng(0).normal(0, 1.5, landmarks.shape)
    best = similarity_transform(noisy, ARCFACE_TEMPLATE)
    err = ((apply(best, noisy) - ARCFACE_TEMPLATE) ** 2).sum()
    for delta in (similarity(1.01, 0.0, 0, 0), similarity(1.0, 0.01, 0, 0), similarity(1.0, 0.0, 0.3, 0)):
        moved = np.vstack([delta, [0, 0, 1]]) @ np.vstack([best, [0, 0, 1]])
        assert ((apply(moved[:2], noisy) - ARCFACE_TEMPLATE) ** 2).sum() > err
    # a mirrored point set still gets a rotation, never a reflection
    mirrored = landmarks * np.array([-1.0, 1.0])
    assert np.linalg.det(similarity_transform(mirrored, ARCFACE_TEMPLATE)[:, :2]) > 0


def test_align_face_puts_the_landmarks_on_the_template():
    """A frame with bright dots at 5 landmarks (a face moved by a similarity): after alignment, the dots
    sit at the template's pixels of the 112 x 112 crop; the warp reads M^-1 (x, y) bilinearly (cv2's rule)."""
    move = similarity(1.8, -0.3, 60.0, 90.0)
    landmarks = apply(move, ARCFACE_TEMPLATE)
    frame = torch.zeros(3, 300, 320)
    ys, xs = torch.meshgrid(torch.arange(300.0), torch.arange(320.0), indexing="ij")
    for x, y in landmarks:
        frame[0] += torch.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * 3.0 ** 2)) * 255
    crop = align_face(frame, landmarks)
    assert crop.shape == (3, 112, 112)
    for x, y in ARCFACE_TEMPLATE:
        xi, yi = int(round(x)), int(round(y))
        patch = crop[0, yi - 6:yi + 7, xi - 6:xi + 7]
        py, px = np.unravel_index(int(patch.argmax()), patch.shape)
        assert abs(px - 6) <= 1 and abs(py - 6) <= 1
    # the warp on an integer translation is an exact shift, zeros outside
    img = torch.arange(3 * 10 * 12, dtype=torch.float32).view(3, 10, 12)
    out = warp_affine(img, np.array([[1.0, 0, -2], [0, 1.0, -3]]), 6)
    torch.testing.assert_close(out, img[:, 3:9, 2:8])
    shifted = warp_affine(img, np.array([[1.0, 0, 4], [0, 1.0, 0]]), 6)
    assert float(shifted[:, :, :4].abs().max()) < 1e-3   # source x < 0 (fp32 grid rounding at the edge)




def test_scrfd_pre_and_post_processing(tmp_path):
    pytest.importorskip("onnxruntime")
    det = FaceDetector(str(write_tiny_scrfd(tmp_path / "det.onnx", 32, scrfd_outputs())))
    assert det.size == 32 and det.strides == (8, 16, 32) and det.anchors == 2
    # preprocessing: a 64 x 48 (W x H) frame fits 32 x 24, zero-padded below; (RGB - 127.5) / 128
    frame = torch.full((3, 48, 64), 255.0)
    blob, scale = det.preprocess(frame)
    assert blob.shape == (1, 3, 32, 32) and scale == 0.5
    np.testing.assert_allclose(blob[0, :, :24], (255 - 127.5) / 128, atol=1e-6)
    np.testing.assert_allclose(blob[0, :, 24:], -127.5 / 128, atol=1e-6)
    # post-processing: distances x stride around the anchor centre, / scale; NMS drops the overlap
    boxes, landmarks = det.detect(frame)
    assert len(boxes) == 2
    np.testing.assert_allclose(boxes[0], [(8 - 4) / 0.5, (8 - 4) / 0.5, (8 + 8) / 0.5, (8 + 8) / 0.5, 0.9], atol=1e-5)
    np.testing.assert_allclose(boxes[1], [(16 - 4) / 0.5, (16 - 4) / 0.5, (16 + 8) / 0.5, (16 + 8) / 0.5, 0.7],
                               atol=1e-5)
    np.testing.assert_allclose(landmarks[0], (np.array([[10, 8], [14, 8], [12, 12], [10, 14], [14, 14]])) / 0.5,
                               atol=1e-5)


def test_arcface_on_detected_faces_counts_frames_without_one(tmp_path, tiny_arcface):
    """With a detector, ArcFace embeds the aligned best face; a frame with no detection embeds as zeros
    (cosine 0: never the identity) and is counted."""
    from lorabench.evaluation.hf import ArcFaceEmbedder

    no_face = scrfd_outputs()
    for s in range(3):
        no_face[s] = np.full_like(no_face[s], 0.1)
    with_face = ArcFaceEmbedder(str(tiny_arcface), detector=str(write_tiny_scrfd(tmp_path / "d.onnx", 32,
                                                                                 scrfd_outputs())))
    without = ArcFaceEmbedder(str(tiny_arcface), detector=str(write_tiny_scrfd(tmp_path / "n.onnx", 32, no_face)))
    images = torch.rand(2, 3, 48, 64)
    emb = with_face.embed_images(images)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))
    frame = images[0] * 255
    _, lm = with_face.detector.detect(frame)
    expected = with_face.session.run(None, {with_face.input_name: ((align_face(frame, lm[0])[None] - with_face.mean)
                                                                   / with_face.std).numpy()})[0]
    torch.testing.assert_close(emb[0], torch.nn.functional.normalize(torch.from_numpy(expected), dim=-1)[0])
    assert with_face.face_counts == {"frames": 2, "no_face": 0}
    assert float(without.embed_images(images).abs().sum()) == 0.0
    assert without.face_counts == {"frames": 2, "no_face": 2}


def test_a_detector_file_that_is_not_onnx_is_one_line(tmp_path, tiny_arcface):
    pytest.importorskip("onnxruntime")
    bad = tmp_path / "det.onnx"
    bad.write_text("not a model")
    with pytest.raises(ConfigError, match=r"eval.scorer.face_detector: .*det.onnx is not an ONNX model"):
        FaceDetector(str(bad))
    with pytest.raises(ConfigError, match="eval.scorer.face_detector: .*missing.onnx is not a file"):
        FaceDetector(str(tmp_path / "missing.onnx"))
    with pytest.raises(ConfigError, match="has 1 outputs; an SCRFD detector with landmarks has 9 or 15"):
        FaceDetector(str(tiny_arcface))
