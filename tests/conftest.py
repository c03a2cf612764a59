"""Shared fixtures: tiny models of the real classes, saved and loaded back through the user-facing
loader; toy image folders; the real Hydra configs, composed and shrunk."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Before anything imports huggingface_hub (it reads this once): the tests never touch the hub, and a
# machine without network would otherwise wait on retries.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(min(2, torch.get_num_threads()))

REPO = Path(__file__).resolve().parents[1]
# The trainer a test that runs on either device takes: the CPU always, CUDA as a `gpu` test.
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("gpu", id="gpu", marks=pytest.mark.gpu)]


def pytest_collection_modifyitems(config, items):
    """`gpu` tests are collected everywhere and skipped, with the reason, where CUDA is absent."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device: run `pytest -m gpu` on a GPU machine (bench/gpu_rows.sh)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
CONF = REPO / "conf"


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


def compose(overrides: list[str], output_dir: Path):
    """The real config tree composed with ``overrides``, output paths pointed at ``output_dir``.
    Without an ``experiment=`` override it composes ``experiment=quickstart`` (one plain training
    run), not the main job's protocol."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    if not any(o.lstrip("+~").startswith("experiment=") for o in overrides):
        overrides = ["experiment=quickstart", *overrides]

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose(config_name="train", overrides=[f"paths.output_dir={output_dir}",
                                                            f"paths.output_root={output_dir}", *overrides])
    return cfg


def tiny_overrides(model_dir: Path, steps: int = 20) -> list[str]:
    """Shrink any experiment to the tiny saved model, loaded through model/sd15's loader."""
    return ["model=sd15", f"model.pretrained={model_dir}", "model.name=tiny", "model.resolution=16",
            f"trainer.max_steps={steps}", "trainer.enable_progress_bar=false"]


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


def write_tiny_arcface(path: Path, self_normalising: bool = False) -> Path:
    """A tiny random ONNX graph with ArcFace's interface: input (N, 3, 112, 112), output (N, 16). With
    ``self_normalising``, its first nodes are ``Sub`` and ``Mul`` as in graphs that normalise inside."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 3, 16, 16)).astype("float32") * 0.05, "conv_w"),
             numpy_helper.from_array(rng.standard_normal((392, 16)).astype("float32") * 0.1, "fc_w"),
             numpy_helper.from_array(np.zeros(16, "float32"), "fc_b")]
    nodes, x = [], "input.1"
    if self_normalising:
        inits += [numpy_helper.from_array(np.array(127.5, "float32"), "mean"),
                  numpy_helper.from_array(np.array(1 / 127.5, "float32"), "scale")]
        nodes += [helper.make_node("Sub", [x, "mean"], ["centred"], name="Sub_0"),
                  helper.make_node("Mul", ["centred", "scale"], ["scaled"], name="Mul_1")]
        x = "scaled"
    nodes += [helper.make_node("Conv", [x, "conv_w"], ["c"], name="Conv_2", strides=[16, 16]),
              helper.make_node("Relu", ["c"], ["r"], name="Relu_3"),
              helper.make_node("Flatten", ["r"], ["f"], name="Flatten_4", axis=1),
              helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["683"], name="Gemm_5")]
    graph = helper.make_graph(nodes, "arcface_tiny",
                              [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["N", 3, 112, 112])],
                              [helper.make_tensor_value_info("683", TensorProto.FLOAT, ["N", 16])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


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


def write_tiny_csd(path: Path, seed: int = 0):
    """A tiny checkpoint in the CSD authors' format: OpenAI-format visual weights (``backbone.*``, fused
    q/k/v ``in_proj``), ``last_layer_style`` / ``last_layer_content``, under ``model_state_dict`` with
    DataParallel's ``module.`` prefix. Returns (the transformers model it was made from, its tensors)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    ref = CLIPVisionModel(cfg).eval()
    hf = {k.removeprefix("vision_model."): v for k, v in ref.state_dict().items()}  # transformers 4.x has the prefix
    sd = {"backbone.class_embedding": hf["embeddings.class_embedding"],
          "backbone.positional_embedding": hf["embeddings.position_embedding.weight"],
          "backbone.conv1.weight": hf["embeddings.patch_embedding.weight"]}
    for theirs, ours in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        for p in ("weight", "bias"):
            sd[f"backbone.{theirs}.{p}"] = hf[f"{ours}.{p}"]
    for i in range(2):
        a, b = f"backbone.transformer.resblocks.{i}.", f"encoder.layers.{i}."
        for p in ("weight", "bias"):
            sd[f"{a}attn.in_proj_{p}"] = torch.cat([hf[f"{b}self_attn.{x}_proj.{p}"] for x in "qkv"])
            for theirs, ours in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
                                 ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                sd[f"{a}{theirs}.{p}"] = hf[f"{b}{ours}.{p}"]
    sd["last_layer_style"] = torch.randn(128, 16)
    sd["last_layer_content"] = torch.randn(128, 16)
    torch.save({"model_state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 1}, path)
    return ref, sd


def model_weights(comps) -> dict[str, torch.Tensor]:
    """Copies of every UNet and text-encoder tensor, to check later that training left them bit-identical."""
    return {f"{k}.{n}": t.detach().clone() for k, m in (("unet", comps.unet), ("te", comps.text_encoder))
            for n, t in m.state_dict().items()}


def two_steps(module, opt) -> None:
    """Two optimiser steps of a DiffusionFineTuner's diffusion loss on random latents, prompts naming ``sks``."""
    comps, g = module.components, torch.Generator().manual_seed(0)
    size = comps.unet.config.sample_size
    module.train()
    for _ in range(2):
        latents = torch.randn(2, comps.unet.config.in_channels, size, size, generator=g)
        module.diffusion_loss({"prompts": ["a sks dog", "a photo of sks"]}, torch.randn_like(latents),
                              torch.tensor([100, 700]), latents).backward()
        opt.step()
        opt.zero_grad()


def write_tiny_scrfd(path: Path, size: int, outputs: list) -> Path:
    """An ONNX graph with the interface of insightface's SCRFD detector (``det_10g.onnx``): input
    (1, 3, size, size), nine outputs (scores, box distances, landmark offsets for strides 8, 16, 32,
    two anchors per position, in stride units). ``outputs``: the nine arrays it returns, whatever the image."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits, nodes, outs = [], [], []
    for i, arr in enumerate(outputs):
        arr = np.asarray(arr, dtype="float32")
        inits.append(numpy_helper.from_array(arr, f"const_{i}"))
        nodes.append(helper.make_node("Identity", [f"const_{i}"], [f"out_{i}"], name=f"Identity_{i}"))
        outs.append(helper.make_tensor_value_info(f"out_{i}", TensorProto.FLOAT, list(arr.shape)))
    graph = helper.make_graph(nodes, "scrfd_tiny",
                              [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, size, size])],
                              outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


# The public datasets' folder names (UnlearnCanvas: its 20 objects; 12 of its style folders)
UNLEARNCANVAS_OBJECTS = ("Architectures Bears Birds Butterfly Cats Dogs Fishes Flame Flowers Frogs Horses Human "
                         "Jellyfish Rabbits Sandwiches Sea Statues Towers Trees Waterfalls").split()
UNLEARNCANVAS_STYLES = ("Abstractionism Byzantine Cartoon Cubism Impressionism Monet Pencil_Drawing Pop_Art Sketch "
                        "Ukiyoe Van_Gogh Watercolor").split()


def tiny_jpeg(seed: int = 0) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def write_unlearncanvas_tree(root: Path, styles=UNLEARNCANVAS_STYLES, objects=UNLEARNCANVAS_OBJECTS,
                             images: int = 20) -> Path:
    """A synthetic copy of UnlearnCanvas's tree: <Style>/<Object>/1.jpg .. 20.jpg and Seed_Images/<Object>."""
    jpg = [tiny_jpeg(i) for i in range(4)]
    for style in (*styles, "Seed_Images"):
        for obj in objects:
            d = root / style / obj
            d.mkdir(parents=True)
            for k in range(1, images + 1):
                (d / f"{k}.jpg").write_bytes(jpg[k % 4])
    return root
