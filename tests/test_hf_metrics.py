"""The real metric models' plumbing: tiny random CLIP and DINO-style ViT, saved and loaded back through
the same loaders users point at hub ids, scored through the same ConceptScorer as the world."""

from __future__ import annotations

import pytest
import torch

from lorabench.errors import ConfigError


@pytest.fixture(scope="module")
def tiny_clip_and_vit(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel

    from lorabench.models.tiny import write_clip_tokenizer

    root = tmp_path_factory.mktemp("metric-models")
    torch.manual_seed(0)
    clip_dir = root / "clip"
    write_clip_tokenizer(str(clip_dir), words=["a", "red", "circle", "square"], max_length=16)
    from transformers import CLIPTokenizer

    vocab = len(CLIPTokenizer.from_pretrained(str(clip_dir)).get_vocab())
    cfg = CLIPConfig(text_config=dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                      num_hidden_layers=2, max_position_embeddings=16),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                        num_hidden_layers=2, image_size=32, patch_size=8),
                     projection_dim=16)
    CLIPModel(cfg).save_pretrained(str(clip_dir))
    vit_dir = root / "vit"
    ViTModel(ViTConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                       image_size=32, patch_size=8), add_pooling_layer=False).save_pretrained(str(vit_dir))
    return clip_dir, vit_dir


def test_real_embedders_give_normalised_features_and_score(tiny_clip_and_vit):
    from lorabench.evaluation.hf import CLIPEmbedder, DINOEmbedder, concept_scorer

    clip_dir, vit_dir = tiny_clip_and_vit
    clip, dino = CLIPEmbedder(str(clip_dir)), DINOEmbedder(str(vit_dir))
    images = torch.rand(3, 3, 16, 16)
    texts = ["a red circle", "a square", "a"]
    for emb in (clip.embed_images(images), clip.embed_texts(texts), dino.embed_images(images)):
        assert emb.shape[0] == 3 and torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    # batch-invariant: an image's feature does not depend on its batch mates
    torch.testing.assert_close(dino.embed_images(images[:1]), dino.embed_images(images)[:1], atol=1e-5, rtol=0)
    scores = concept_scorer(str(clip_dir), str(vit_dir), identity_threshold=0.5)(images, images, ["a red circle"] * 3)
    assert set(scores) == {"image_alignment", "text_alignment", "identity_similarity", "identity_alignment"}
    assert scores["identity_alignment"] == 1.0  # identical images are within any threshold of themselves


def test_unreachable_metric_model_is_one_line(tmp_path):
    from lorabench.evaluation.hf import DINOEmbedder

    with pytest.raises(ConfigError, match="eval.dino: could not load") as err:
        DINOEmbedder(str(tmp_path / "nowhere"))
    assert "\n" not in str(err.value)


def test_identical_images_give_cosine_one_and_value_ranges_are_checked(tiny_clip_and_vit):
    """Every real backend on one pair: an image against itself is cosine 1.0; uint8 0-255 and float 0-1
    give the same features; float 0-255 (the usual slip) is refused; any size is resized to the input."""
    from lorabench.evaluation.hf import CLIPEmbedder, DINOEmbedder

    clip_dir, vit_dir = tiny_clip_and_vit
    torch.manual_seed(0)
    images = torch.rand(2, 3, 48, 40)
    u8 = (images * 255).round().to(torch.uint8)
    for emb in (CLIPEmbedder(str(clip_dir)), DINOEmbedder(str(vit_dir))):
        a, b = emb.embed_images(images), emb.embed_images(images.clone())
        torch.testing.assert_close((a * b).sum(-1), torch.ones(2), atol=1e-5, rtol=0)
        torch.testing.assert_close(emb.embed_images(u8), emb.embed_images(u8.float() / 255), atol=1e-6, rtol=0)
        assert emb.pre(images).shape[-2:] == (32, 32)  # the tiny models' input size
        with pytest.raises(ValueError, match=r"must be in \[0, 1\].*uint8"):
            emb.embed_images(images * 255)


def test_arcface_onnx_follows_insightface_preprocessing(tmp_path, tiny_arcface, tiny_metric_models):
    """The ONNX file runs through onnxruntime with insightface's convention: RGB at 112 x 112, (x - 127.5) /
    127.5 in 0-255 units, unless the graph starts with Sub and Mul (then raw 0-255). A graph that normalises
    itself gives the same features as the plain one fed the normalised input."""
    import numpy as np

    from helpers import write_tiny_arcface
    from lorabench.evaluation.hf import ArcFaceEmbedder, concept_scorer

    arc = ArcFaceEmbedder(str(tiny_arcface))
    assert (arc.mean, arc.std, arc.size) == (127.5, 127.5, (112, 112))
    torch.manual_seed(0)
    faces = torch.rand(3, 3, 112, 112)
    expected = (faces.numpy() * 255.0 - 127.5) / 127.5  # insightface: blobFromImages(1/127.5, mean 127.5, RGB)
    np.testing.assert_allclose(arc.preprocess(faces), expected, atol=1e-5)
    assert arc.preprocess(torch.rand(2, 3, 64, 80)).shape == (2, 3, 112, 112)
    feats = arc.embed_images(faces)
    assert feats.shape == (3, 16) and torch.allclose(feats.norm(dim=-1), torch.ones(3), atol=1e-5)
    torch.testing.assert_close((feats * arc.embed_images(faces.clone())).sum(-1), torch.ones(3), atol=1e-5, rtol=0)
    inside = ArcFaceEmbedder(str(write_tiny_arcface(tmp_path / "selfnorm.onnx", self_normalising=True)))
    assert (inside.mean, inside.std) == (0.0, 1.0)
    torch.testing.assert_close(inside.embed_images(faces), feats, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        arc.embed_images(faces * 255)

    clip_dir, _ = tiny_metric_models
    scorer = concept_scorer(str(clip_dir), str(tiny_arcface), identity_threshold=0.68, identity_model="arcface")
    same = scorer(faces[:1].repeat(2, 1, 1, 1), faces[:1], ["a photo of person"] * 2)
    assert same["identity_alignment"] == 1.0 and abs(same["identity_similarity"] - 1.0) < 1e-5
    scores = scorer(faces, faces, ["a photo of person"] * 3)  # the paper's rule on the mean cosine distance
    expected_share = float(((1 - (feats @ feats.T).mean(1)) < 0.68).float().mean())
    assert scores["identity_alignment"] == expected_share


@pytest.mark.parametrize("case", ["missing", "not_onnx", "bad_kind"])
def test_arcface_bad_input_is_one_line(tmp_path, tiny_arcface, case):
    from lorabench.evaluation.hf import ArcFaceEmbedder, concept_scorer

    if case == "missing":
        with pytest.raises(ConfigError,
                           match="eval.scorer.identity: .*w600k.onnx is not a file; give the ArcFace ONNX"):
            ArcFaceEmbedder(str(tmp_path / "w600k.onnx"))
    elif case == "not_onnx":
        (tmp_path / "x.onnx").write_bytes(b"\x00not a model\xff" * 10)
        with pytest.raises(ConfigError, match="x.onnx is not an ONNX model"):
            ArcFaceEmbedder(str(tmp_path / "x.onnx"))
    else:
        with pytest.raises(ConfigError, match="eval.scorer.identity_model: .*arcface"):
            concept_scorer("nowhere", str(tiny_arcface), identity_model="insightface")
