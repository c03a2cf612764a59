"""The real metric models behind the same interface as the mini world's evaluators.

- ``CLIPEmbedder``: CLIP image and text features (CLIP-T, CLIP-I), e.g. openai/clip-vit-base-patch32
  (the continual paper) or openai/clip-vit-large-patch14 (torchmetrics' CLIPScore default).
- ``DINOEmbedder``: the self-supervised DINO ViT's CLS token, e.g. facebook/dino-vits16 (DreamBooth's
  DINO metric; not a supervised ViT).
- ``CSDEmbedder``: CSD (Somepalli et al. 2024), CLIP ViT-L/14's image tower with a style head, from the
  authors' checkpoint file (the continual paper's style metric).
- ``ArcFaceEmbedder``: an ArcFace recognition network from a local ONNX file (insightface's
  ``w600k_r50.onnx`` or ``glintr100.onnx``), run by onnxruntime (``pip install 'lorabench[arcface]'``);
  Orthogonal Adaptation's identity metric.

All take images (N, 3, H, W), float in [0, 1] or uint8 in [0, 255], resize them (bicubic, antialiased)
to the model's input size, normalise with the model's own mean/std, and return L2-normalised features.
Hub ids or local folders.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import CLIPModel, CLIPTokenizer, CLIPVisionConfig, CLIPVisionModel, ViTModel

from lorabench.errors import ConfigError, choice_error
from lorabench.evaluation.faces import FaceDetector, align_face
from lorabench.evaluation.scores import ConceptScorer
from lorabench.models.components import explain_load_error

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def load_pretrained(cls, model_id: str, field: str):
    """``cls.from_pretrained(model_id)``, or a one-line error naming ``field`` and why it failed."""
    try:
        return cls.from_pretrained(model_id)
    except Exception as exc:  # noqa: BLE001 - one line naming the field
        raise ConfigError(field, f"could not load {model_id!r}: {explain_load_error(exc)}") from exc


def weights_file(path, field: str, what: str):
    """``path`` as a Path if it is a file, else a one-line error naming ``field`` and what to download."""
    if not Path(str(path)).is_file():
        raise ConfigError(field, f"{path} is not a file; give {what}")
    return Path(str(path))


def tensor_features(out) -> torch.Tensor:
    """The feature tensor of a ``get_*_features`` call: transformers >= 5 returns a model output whose
    pooler_output is the projected feature; 4.x a tensor."""
    return out.pooler_output if hasattr(out, "pooler_output") else out


class _Preprocess:
    """Resize to ``size`` (or, with ``resize``, to ``resize`` then a centre crop of ``size``: DINO's
    ``Resize(256) + CenterCrop(224)``), then normalise."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float], device: str,
                 resize: Optional[int] = None):
        self.size, self.device, self.resize = size, torch.device(device), resize or size
        if self.resize < self.size:
            raise ConfigError("eval.scorer.identity_resize", f"{resize} is below the model's input size {size}")
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = unit_range(images).to(self.device)
        if x.shape[-2:] != (self.resize, self.resize):
            x = F.interpolate(x, size=(self.resize, self.resize), mode="bicubic", antialias=True, align_corners=False)
        if self.resize != self.size:
            top = (self.resize - self.size) // 2
            x = x[..., top:top + self.size, top:top + self.size]
        return (x.clamp(0, 1) - self.mean) / self.std


def unit_range(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) float images in [0, 1]: uint8 images are divided by 255; float images must already
    be in [0, 1] (a float image in 0-255 is the usual slip, and would silently score as white)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected (N, 3, H, W) images, got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    x = images.float()
    if x.numel() and (float(x.min()) < -0.01 or float(x.max()) > 1.01):
        raise ValueError(f"float images must be in [0, 1] (got values in [{float(x.min()):.3g}, "
                         f"{float(x.max()):.3g}]); pass uint8 for 0-255 images")
    return x


class CLIPEmbedder:
    def __init__(self, model_id: str = "openai/clip-vit-base-patch32", device: str = "cpu",
                 field: str = "eval.clip"):
        self.model = load_pretrained(CLIPModel, model_id, field).eval().to(device)
        self.tokenizer = load_pretrained(CLIPTokenizer, model_id, field)
        self.pre = _Preprocess(self.model.config.vision_config.image_size, CLIP_MEAN, CLIP_STD, device)

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model.get_image_features(pixel_values=self.pre(images))
        return F.normalize(tensor_features(out).float(), dim=-1)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        tok = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt").to(self.pre.device)
        out = self.model.get_text_features(input_ids=tok.input_ids, attention_mask=tok.attention_mask)
        return F.normalize(tensor_features(out).float(), dim=-1)


class DINOEmbedder:
    def __init__(self, model_id: str = "facebook/dino-vits16", device: str = "cpu", image_size: Optional[int] = None,
                 field: str = "eval.dino", resize: Optional[int] = None):
        self.model = load_pretrained(ViTModel, model_id, field).eval().to(device)
        self.pre = _Preprocess(image_size or self.model.config.image_size, IMAGENET_MEAN, IMAGENET_STD, device,
                               resize=resize)

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=self.pre(images), interpolate_pos_encoding=True)
        return F.normalize(out.last_hidden_state[:, 0].float(), dim=-1)  # the CLS token


def _openai_visual_config(sd: dict, prefix: str):
    """A CLIPVisionConfig read off OpenAI-format visual weights (``conv1``, ``transformer.resblocks.*``)."""
    width, _, patch, _ = sd[f"{prefix}conv1.weight"].shape
    layers = len({k.split(".")[3] for k in sd if k.startswith(f"{prefix}transformer.resblocks.")})
    grid = int(round((sd[f"{prefix}positional_embedding"].shape[0] - 1) ** 0.5))
    mlp = sd[f"{prefix}transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    return CLIPVisionConfig(hidden_size=width, intermediate_size=mlp,
                            num_hidden_layers=layers, num_attention_heads=width // 64, image_size=grid * patch,
                            patch_size=patch, hidden_act="quick_gelu", layer_norm_eps=1e-5)


def openai_visual_to_transformers(sd: dict, prefix: str = "backbone.", to: str = "vision_model.") -> dict:
    """OpenAI CLIP's ``VisionTransformer`` weights (``prefix``-ed, as in CSD's checkpoint) as a
    transformers ``CLIPVisionModel`` state dict (``in_proj`` split into q, k, v). ``to``: the prefix of
    transformers' keys (``vision_model.`` in 4.x, none in 5.x)."""
    out = {f"{to}embeddings.class_embedding": sd[f"{prefix}class_embedding"],
           f"{to}embeddings.position_embedding.weight": sd[f"{prefix}positional_embedding"],
           f"{to}embeddings.patch_embedding.weight": sd[f"{prefix}conv1.weight"]}
    for ours, theirs in (("pre_layrnorm", "ln_pre"), ("post_layernorm", "ln_post")):
        for p in ("weight", "bias"):
            out[f"{to}{ours}.{p}"] = sd[f"{prefix}{theirs}.{p}"]
    i = 0
    while f"{prefix}transformer.resblocks.{i}.ln_1.weight" in sd:
        src, dst = f"{prefix}transformer.resblocks.{i}.", f"{to}encoder.layers.{i}."
        for p in ("weight", "bias"):
            q, k, v = sd[f"{src}attn.in_proj_{p}"].chunk(3)
            out.update({f"{dst}self_attn.q_proj.{p}": q, f"{dst}self_attn.k_proj.{p}": k,
                        f"{dst}self_attn.v_proj.{p}": v,
                        f"{dst}self_attn.out_proj.{p}": sd[f"{src}attn.out_proj.{p}"],
                        f"{dst}layer_norm1.{p}": sd[f"{src}ln_1.{p}"], f"{dst}layer_norm2.{p}": sd[f"{src}ln_2.{p}"],
                        f"{dst}mlp.fc1.{p}": sd[f"{src}mlp.c_fc.{p}"], f"{dst}mlp.fc2.{p}": sd[f"{src}mlp.c_proj.{p}"]})
        i += 1
    return out


class CSDEmbedder:
    """CSD's style embedding: ``normalize(ln_post(CLS) @ last_layer_style)`` of CLIP's image tower.

    ``checkpoint``: the authors' file (``.pth`` with a ``model_state_dict``, or its tensors as
    ``.safetensors``): OpenAI-format ``backbone.*`` visual weights and the ``last_layer_style``
    projection. The architecture is read off the weights; images are resized to its input size
    (224 for ViT-L/14) and normalised with CLIP's mean and std."""

    def __init__(self, checkpoint: str, device: str = "cpu", field: str = "eval.style_scorer.checkpoint"):
        path = weights_file(checkpoint, field, "the CSD checkpoint (checkpoint.pth from the CSD authors' release, "
                            "or its tensors as .safetensors)")
        try:
            if path.suffix == ".safetensors":
                sd = load_file(str(path))
            else:
                raw = torch.load(str(path), map_location="cpu", weights_only=True)
                sd = raw.get("model_state_dict", raw) if isinstance(raw, dict) else raw
            sd = {k.removeprefix("module."): v for k, v in sd.items()}
            config = _openai_visual_config(sd, "backbone.")
            style = sd["last_layer_style"].float()
        except (KeyError, RuntimeError, ValueError) as exc:
            what = f"{checkpoint} is not a CSD checkpoint ({type(exc).__name__}: {exc})"
            raise ConfigError(field, what[:300]) from exc
        self.model = CLIPVisionModel(config).eval()
        to = "vision_model." if any(k.startswith("vision_model.") for k in self.model.state_dict()) else ""
        missing, _ = self.model.load_state_dict(openai_visual_to_transformers(sd, to=to), strict=False)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing:
            raise ConfigError(field, f"{checkpoint} lacks {len(missing)} visual weights (e.g. {missing[0]!r})")
        self.model.to(device)
        self.style = style.to(device)
        self.pre = _Preprocess(config.image_size, CLIP_MEAN, CLIP_STD, device)

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.model(pixel_values=self.pre(images)).pooler_output.float()
        return F.normalize(feats @ self.style, dim=-1)


class ArcFaceEmbedder:
    """ArcFace identity features from a local ONNX file, with insightface's own preprocessing: RGB
    faces at the network's input (112 x 112), scaled to ``(x - mean) / std`` in 0-255 units,
    where ``mean = std = 127.5`` unless the graph normalises itself (its first nodes hold both a
    ``Sub`` and a ``Mul``; then ``mean = 0, std = 1``), exactly as ``insightface.model_zoo.ArcFaceONNX``
    decides.

    ``detector``: insightface's SCRFD ONNX file. Each frame's best face is detected and warped onto the
    ArcFace 5-point template (:mod:`lorabench.evaluation.faces`), what the 0.68 distance rule assumes;
    a frame without a face gets a zero embedding (never the identity) and is counted in
    ``face_counts``. Without a detector the whole frame is resized to 112 px (only for frames that are
    already aligned face crops)."""

    def __init__(self, onnx_file: str, device: str = "cpu", field: str = "eval.scorer.identity",
                 detector: Optional[str] = None):
        path = weights_file(onnx_file, field, "the ArcFace ONNX file (e.g. insightface's buffalo_l/w600k_r50.onnx)")
        try:  # optional dependencies: pip install 'lorabench[arcface]'
            import onnx  # noqa: PLC0415
            import onnxruntime as ort  # noqa: PLC0415
        except ImportError as exc:
            raise ConfigError(field, "ArcFace needs onnxruntime and onnx (pip install 'lorabench[arcface]')") from exc
        try:
            graph = onnx.load(str(path)).graph
        except Exception as exc:  # noqa: BLE001 - protobuf raises its own DecodeError
            raise ConfigError(field, f"{onnx_file} is not an ONNX model ({type(exc).__name__})") from exc
        self.mean, self.std = arcface_normalisation([n.name for n in graph.node[:8]])
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if str(device).startswith("cuda") else \
            ["CPUExecutionProvider"]
        providers = [p for p in providers if p in ort.get_available_providers()]
        self.session = ort.InferenceSession(str(path), providers=providers)
        inp = self.session.get_inputs()[0]
        self.input_name, self.size = inp.name, tuple(int(d) for d in inp.shape[2:4])
        if len(self.size) != 2 or self.size[0] != self.size[1]:
            raise ConfigError(field, f"{onnx_file} takes input {inp.shape}; expected (N, 3, S, S)")
        self.detector = FaceDetector(detector) if detector else None
        self.face_counts = {"frames": 0, "no_face": 0}

    def face_report(self) -> Optional[dict]:
        """With a detector: how many frames (samples and references) had no face, and the rule they were scored
        by (results.json's ``faces``); None without one (whole frames are scored)."""
        if self.detector is None:
            return None
        return {**self.face_counts, "rule": "the best-scoring detection is the face; a frame without one gets a zero "
                "embedding: cosine 0 with every reference, never the identity"}

    def crops(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The network's input faces in 0-255 units, (N, 3, S, S), and which frames had a face."""
        x = unit_range(images).clamp(0, 1) * 255.0
        if self.detector is None:
            if x.shape[-2:] != self.size:
                x = F.interpolate(x, size=self.size, mode="bicubic", antialias=True, align_corners=False)
            return x.clamp(0, 255), torch.ones(len(x), dtype=torch.bool)
        out, found = torch.zeros(len(x), 3, *self.size), torch.zeros(len(x), dtype=torch.bool)
        for i, frame in enumerate(x):
            _, landmarks = self.detector.detect(frame)
            self.face_counts["frames"] += 1
            if len(landmarks) == 0:
                self.face_counts["no_face"] += 1
                continue
            out[i], found[i] = align_face(frame, landmarks[0], self.size[0]), True
        return out, found

    def blob(self, images: torch.Tensor):
        """The network's input (N, 3, S, S) float32 array, and which frames had a face."""
        faces, found = self.crops(images.cpu())
        return ((faces - self.mean) / self.std).numpy().astype("float32"), found

    def preprocess(self, images: torch.Tensor):
        return self.blob(images)[0]

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        blob, found = self.blob(images)
        out = F.normalize(torch.from_numpy(self.session.run(None, {self.input_name: blob})[0]).float().flatten(1),
                          dim=-1)
        return out * found[:, None].float()  # no face: a zero embedding (cosine 0 with everything)


def arcface_normalisation(first_node_names) -> tuple[float, float]:
    """insightface's rule: a graph whose first nodes subtract and multiply normalises itself."""
    names = list(first_node_names)
    sub = any(n.startswith(("Sub", "_minus")) for n in names)
    mul = any(n.startswith(("Mul", "_mul")) for n in names)
    return (0.0, 1.0) if sub and mul else (127.5, 127.5)


IDENTITY_MODELS = ("dino", "arcface")


def style_models(csd: str, device: str = "cpu"):
    """The models the continual protocol's style metrics read: ``.style`` (CSD)."""
    return SimpleNamespace(style=CSDEmbedder(csd, device, field="eval.style_scorer.csd"))


def concept_scorer(clip: str = "openai/clip-vit-base-patch32", identity: str = "facebook/dino-vits16",
                   identity_threshold: float = 0.5, device: str = "cpu", identity_model: str = "dino",
                   identity_resize: Optional[int] = None, face_detector: Optional[str] = None):
    """A ConceptScorer on real models: CLIP for text/image alignment; for identity, DINO (``identity``: a
    hub id or folder; ``identity_resize``: resize to it, then centre-crop the model's input) or ArcFace
    (``identity``: an ONNX file; ``face_detector``: insightface's SCRFD ONNX file, so faces are
    detected and 5-point aligned first), per ``identity_model``."""
    if identity_model not in IDENTITY_MODELS:
        raise choice_error("eval.scorer.identity_model", identity_model, IDENTITY_MODELS)
    if identity_model == "arcface":
        ident = ArcFaceEmbedder(identity, device, field="eval.scorer.identity", detector=face_detector)
    else:
        ident = DINOEmbedder(identity, device, field="eval.scorer.identity", resize=identity_resize)
    return ConceptScorer(CLIPEmbedder(clip, device, field="eval.scorer.clip"), ident, identity_threshold)
