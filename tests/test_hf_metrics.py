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
    for emb in (clip.embed_images(images), clip.embed_texts(["a red circle", "a square", "a"]), dino.embed_images(images)):
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
