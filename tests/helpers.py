"""What the tests share besides fixtures: the command as users run it (:func:`run_cli`, :func:`assert_one_line_error`),
the real config tree composed and shrunk (:func:`compose`), and writers of tiny stand-ins for the real
checkpoints (ArcFace, SCRFD, CSD) and datasets (UnlearnCanvas). Test modules import from here, never from
each other; conftest.py holds the fixtures."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import lorabench  # noqa: F401 - registers the lb.* resolvers the config tree's interpolations use

REPO = Path(__file__).resolve().parents[1]

# The trainer a test that runs on either device takes: the CPU always, CUDA as a `gpu` test.
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("gpu", id="gpu", marks=pytest.mark.gpu)]

CONF = REPO / "conf"

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


FAST = ["experiment=quickstart", "trainer.max_steps=2", "trainer.enable_progress_bar=false"]


def cli_env(env_extra=None) -> dict[str, str]:
    """The environment a test starts the ``lorabench`` command in: W&B offline, Hydra's short errors, runs under
    cwd/outputs where the tests look (the GPU runner sets LORABENCH_OUTPUTS), then ``env_extra``."""
    env = {**os.environ, "WANDB_MODE": "offline"}
    env.pop("HYDRA_FULL_ERROR", None)
    env.pop("LORABENCH_OUTPUTS", None)
    env.update(env_extra or {})
    return env


def run_cli(args, cwd: Path, env_extra=None):
    return subprocess.run([sys.executable, "-m", "lorabench", *args], cwd=cwd, env=cli_env(env_extra),
                          capture_output=True, text=True, timeout=300)


def crashed(proc: subprocess.CompletedProcess, tail: int = 2000) -> str:
    """What a failed command's assertion shows: each exception line of its stderr, then the stderr's last ``tail``
    characters. A multi-process run (Lightning's ddp starts rank 1 by running the command again) prints rank
    zero's traceback last; the rank that failed first says why above it, beyond the tail."""
    raised = [ln for ln in proc.stderr.splitlines() if re.match(r"\s*([\w.]+(Error|Exception|Interrupt)\b|Killed)", ln)]
    return "\n".join(["exception lines:", *raised, "stderr tail:", proc.stderr[-tail:]])


def run_here(args, cwd: Path, env_extra=None) -> subprocess.CompletedProcess:
    """:func:`run_cli` in this process: the same ``lorabench`` entry point, exit status, stdout and stderr,
    without an interpreter start-up and torch import per call (about 5 s on 2 cores). For bad input, whose
    one-line error is all a test reads; the console of a run that trains is :func:`run_cli`'s to test."""
    import contextlib
    import io

    from hydra.core.global_hydra import GlobalHydra

    from lorabench import cli

    saved = (dict(os.environ), list(sys.argv), os.getcwd())
    out, err, code = io.StringIO(), io.StringIO(), 0
    try:
        os.environ.update({"WANDB_MODE": "offline", **(env_extra or {})})
        for key in ("HYDRA_FULL_ERROR", "LORABENCH_OUTPUTS"):
            if key not in (env_extra or {}):
                os.environ.pop(key, None)
        os.chdir(cwd)
        sys.argv = ["lorabench", *map(str, args)]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli.main()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    finally:
        os.environ.clear()
        os.environ.update(saved[0])
        sys.argv = saved[1]
        os.chdir(saved[2])
        GlobalHydra.instance().clear()
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def assert_one_line_error(proc, cwd: Path, *fragments: str):
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("lorabench: error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    for f in fragments:
        assert f in errors[0], errors[0]
    assert "Traceback" not in proc.stderr
    outputs = cwd / "outputs"
    leftovers = [p for p in outputs.rglob("*")] if outputs.exists() else []
    assert not leftovers, f"half-written run left behind: {leftovers[:5]}"
    return errors[0]


def scrfd_outputs(size=32):
    """Raw outputs for a 32 px input: one face on stride 8 (anchor 2 of the cell at x = 1, y = 1), a
    weaker overlapping one (suppressed by NMS), one below the threshold, and one on stride 16."""
    outs = []
    for stride in (8, 16, 32):
        n = (size // stride) ** 2 * 2
        outs.append(np.full((n, 1), 0.1))
    boxes = [np.zeros(((size // s) ** 2 * 2, 4)) for s in (8, 16, 32)]
    kps = [np.zeros(((size // s) ** 2 * 2, 10)) for s in (8, 16, 32)]
    i = (1 * 4 + 1) * 2 + 1                        # stride 8, cell (x=1, y=1), second anchor: centre (8, 8)
    outs[0][i], boxes[0][i] = 0.9, [0.5, 0.5, 1.0, 1.0]
    kps[0][i] = [0.25, 0.0, 0.75, 0.0, 0.5, 0.5, 0.25, 0.75, 0.75, 0.75]
    j = (1 * 4 + 2) * 2                            # stride 8, cell (x=2, y=1): overlaps the first face
    outs[0][j], boxes[0][j] = 0.8, [1.4, 0.5, 0.1, 1.0]
    outs[0][0] = 0.49                              # below the 0.5 threshold
    k = (1 * 2 + 1) * 2                            # stride 16, cell (x=1, y=1): centre (16, 16)
    outs[1][k], boxes[1][k] = 0.7, [0.25, 0.25, 0.5, 0.5]
    return [*outs, *boxes, *kps]


# Each paper's world experiment shrunk to seconds: what the protocol battery (test_protocol_battery.py)
# and the papers' own tests run.
# Table 2: two circle identities, groups of 2, a few steps, one image per prompt.
SMALL = ["experiment=orthogonal_adaptation/world", "protocol.concepts=[sks,twt]", "protocol.group_size=2",
         "protocol.seeds=[0]", "eval.images_per_prompt=1", "eval.sampler.num_inference_steps=2",
         "eval.concepts.n_references=2", "protocol.capture.images_per_prompt=1",
         "protocol.capture.num_inference_steps=2", "protocol.train_workers=1"]
# The continual objects table: three tasks.
SHORT = ["experiment=continual/world_objects", "sequence.length=3", "trainer.max_steps=12",
         "eval.images_per_prompt=1", "eval.sampler.num_inference_steps=3", "eval.concepts.n_references=2",
         "eval.concepts.contexts=[[left,black]]", "protocol.method.name=ortho_init"]
# Table 1: 12 images, a 6-image subset, two epochs.
WORLD_ARGS = ["experiment=trilora/world", "data.n=12", "data.max_train_samples=6", "data.batch_size=3",
              "protocol.seeds=[0]", "protocol.table_epoch=1", "protocol.checkpoints=[1,2]",
              "~protocol.adapters.trilora_svd_u", "eval.sampler.num_inference_steps=2", "protocol.grid_images=4"]


def _gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (exited, reaped or not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # exited, not yet reaped
    except FileNotFoundError:
        return True


def child_outlives_parent(tmp_path: Path, parent_script: str, wait_s: float = 10.0) -> bool:
    """Runs ``parent_script`` (Python that starts a child process, prints its pid on a line of its own, then
    waits), SIGKILLs it once the child is up, and says whether the child still runs ``wait_s`` seconds later
    (read from /proc: skips where there is none)."""
    import signal
    import time

    if not os.path.isdir("/proc/self"):
        pytest.skip("needs /proc (Linux) to see whether a process has ended")
    script = tmp_path / "parent.py"
    script.write_text(parent_script)
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        child = int(parent.stdout.readline())
        time.sleep(0.5)
        assert not _gone(child), "the child ended on its own"
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + wait_s
        while not _gone(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        alive = not _gone(child)
        if alive:
            os.kill(child, signal.SIGKILL)
        return alive
    finally:
        parent.kill()
