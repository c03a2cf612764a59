"""Shared fixtures: tiny models of the real classes, saved and loaded back through the user-facing
loader; toy image folders; the real Hydra configs, composed and shrunk."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# `pytest -n 2` (the README's command): one torch thread a worker, and for what it starts, so the two never share
# a core; set before torch loads OpenMP, which reads them once. PASSIVE: a threads(2) test's idle thread sleeps
# rather than spins beside the other worker (spinning made those tests 2-3x slower).
XDIST_WORKER = bool(os.environ.get("PYTEST_XDIST_WORKER"))
if XDIST_WORKER:
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

from helpers import write_tiny_arcface  # noqa: E402

# Before anything imports huggingface_hub (it reads this once): the tests never touch the hub, and a
# machine without network would otherwise wait on retries.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(min(2, torch.get_num_threads()))  # 1 in a worker: OMP_NUM_THREADS above


@pytest.fixture(autouse=True)
def _marked_threads(request):
    """``@pytest.mark.threads(n)``: the test runs at ``n`` torch threads (its claim holds there), then back."""
    mark = request.node.get_closest_marker("threads")
    before = torch.get_num_threads()
    if mark is not None:
        torch.set_num_threads(mark.args[0])
    yield  # pytest resumes here whether the test passed or failed
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config, items):
    """`gpu` tests are collected everywhere and skipped, with the reason, where CUDA is absent."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device: run `pytest -m gpu` on a GPU machine (bench/gpu_rows.sh)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny pixel-space model saved in diffusers layout (what users point model.pretrained at)."""
    from lorabench.models import build_tiny_components, save_components

    path = tmp_path_factory.mktemp("models") / "tiny-pixel"
    save_components(build_tiny_components(seed=0, words=["sks", "photo", "dog"]), path)
    return path


@pytest.fixture(scope="session")
def tiny_latent_model_dir(tmp_path_factory) -> Path:
    """A tiny latent model (with an AutoencoderKL) that diffusers' StableDiffusionPipeline can load."""
    from lorabench.models import build_tiny_components, save_components

    path = tmp_path_factory.mktemp("models") / "tiny-latent"
    save_components(build_tiny_components(seed=1, with_vae=True, use_linear_projection=False), path)
    return path


@pytest.fixture
def load_tiny(tiny_model_dir):
    from lorabench.models import load_components

    def _load(path=None, **kw):
        return load_components(str(path or tiny_model_dir), name="tiny", resolution=16, **kw)

    return _load


@pytest.fixture(scope="session")
def toy_images(tmp_path_factory) -> Path:
    from lorabench.data import write_toy_dataset

    return write_toy_dataset(tmp_path_factory.mktemp("data") / "toy", n=8, resolution=16, seed=0)


@pytest.fixture(scope="session")
def tiny_metric_models(tmp_path_factory) -> tuple[Path, Path]:
    """(clip_dir, vit_dir): a tiny CLIP (with tokenizer) and a tiny ViT saved in transformers layout,
    what ``eval.scorer.clip`` / ``eval.scorer.identity`` point at in full-scale dry runs."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer, ViTConfig, ViTModel

    from lorabench.models.tiny import write_clip_tokenizer

    root = tmp_path_factory.mktemp("metric_models")
    clip_dir, vit_dir = root / "clip", root / "vit"
    write_clip_tokenizer(str(clip_dir), words=["a", "photo", "of", "person", "dog", "cat"], max_length=16)
    vocab = len(CLIPTokenizer.from_pretrained(str(clip_dir)).get_vocab())
    CLIPModel(CLIPConfig(text_config=dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                          num_hidden_layers=1, max_position_embeddings=16),
                         vision_config=dict(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                            num_hidden_layers=1, image_size=32, patch_size=8),
                         projection_dim=16)).save_pretrained(str(clip_dir))
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(str(clip_dir))
    ViTModel(ViTConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=1,
                       image_size=32, patch_size=8), add_pooling_layer=False).save_pretrained(str(vit_dir))
    return clip_dir, vit_dir


@pytest.fixture(scope="session")
def tiny_arcface(tmp_path_factory) -> Path:
    pytest.importorskip("onnxruntime")
    return write_tiny_arcface(tmp_path_factory.mktemp("arcface") / "w600k_tiny.onnx")


@pytest.fixture(scope="session")
def scaled_down_models(tmp_path_factory) -> dict[str, Path]:
    """SD1.5- and SDXL-architecture models (same block types and counts, tiny widths, a 4-block VAE)
    saved as diffusers folders: what the full-scale dry runs point ``model.pretrained`` at."""
    from lorabench.models import build_scaled_down, save_components

    root = tmp_path_factory.mktemp("scaled_down")
    words = ["sks", "photo", "person", "dog", "cat", "image"]
    return {arch: save_components(build_scaled_down(arch, words=words, resolution=res), root / arch)
            for arch, res in (("sd15", 64), ("sdxl", 32))}


