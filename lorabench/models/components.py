"""Load the parts of a text-to-image diffusion model, from a hub id or a local folder.

One entry point, :func:`load_components`, serves every model: SD1.5 and its
fine-tunes (ChilloutMix, AnyLoRA), SDXL (two text encoders, added time
conditioning) and the tiny models the tests and the mini world build. The
folder layout is diffusers' (``model_index.json``, ``unet/``, ``vae/``,
``text_encoder/``, ``tokenizer/``, ``scheduler/``). A model without ``vae/``
is a pixel-space model: the UNet sees images scaled to [-1, 1].
"""

from __future__ import annotations

import inspect
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from torch import nn
from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

from lorabench.checks import check_model_source, check_part_source
from lorabench.errors import ConfigError, choice_error
from lorabench.utils.io import atomic_dir

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
PREDICTION_TYPES = ("epsilon", "v_prediction")
ATTENTION = ("sdpa", "classic", "xformers")


def resolve_dtype(name: str, field: str = "model.dtype") -> torch.dtype:
    if name not in DTYPES:
        raise choice_error(field, name, DTYPES)
    return DTYPES[name]


@dataclass
class ModelComponents:
    """What a fine-tuning run needs from a base model."""

    unet: nn.Module
    text_encoder: nn.Module
    tokenizer: object
    noise_scheduler: object
    vae: Optional[nn.Module] = None
    text_encoder_2: Optional[nn.Module] = None
    tokenizer_2: Optional[object] = None
    name: str = "model"
    model_id: str = ""
    resolution: int = 512
    # word -> the new tokens it stands for (textual inversion's ``bind``), applied by encode_prompts
    prompt_rewrites: dict[str, str] = field(default_factory=dict)
    # > 1 with layer-wise tokens (P+): the text is encoded once per UNet cross-attention layer
    text_groups: int = 1
    # what the model's own diffusers pipeline would do when sampling (its model_index.json): the
    # scheduler class it ships ("scheduler") and SDXL's "force_zeros_for_empty_prompt"
    pipeline_defaults: dict = field(default_factory=dict)

    def __post_init__(self):
        blocks = getattr(getattr(self.vae, "config", None), "block_out_channels", None)  # AutoencoderKL's
        factor = 2 ** (len(blocks) - 1) if blocks else 1
        if int(self.resolution) % factor:  # diffusers' pipelines refuse such sizes, and training would crop them
            raise ConfigError("model.resolution", f"must be a multiple of {factor} (the VAE's down-sampling), "
                              f"got {self.resolution}")

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    def text_encoders(self) -> dict[str, nn.Module]:
        out = {"text_encoder": self.text_encoder}
        if self.text_encoder_2 is not None:
            out["text_encoder_2"] = self.text_encoder_2
        return out

    def adaptable_modules(self) -> dict[str, nn.Module]:
        """Top-level modules adapters may be injected into, by the prefix used in files."""
        return {"unet": self.unet, **self.text_encoders()}

    def freeze(self) -> "ModelComponents":
        for m in (self.unet, self.vae, self.text_encoder, self.text_encoder_2):
            if m is not None:
                m.requires_grad_(False)
                m.eval()
        return self


def rewrite_prompt(prompt: str, rewrites: dict[str, str]) -> str:
    """``prompt`` with each bound word (a whole word, not inside another token) replaced by its tokens."""
    for word, tokens in rewrites.items():
        prompt = re.sub(rf"(?<![\w<>]){re.escape(word)}(?![\w<>])", tokens, prompt)
    return prompt


def tokenize_prompts(components: ModelComponents, prompts: list[str], device,
                     time_ids: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
    """What :func:`encode_tokens` encodes, as tensors of fixed shapes on ``device`` (so a captured training
    step can take them as inputs, :mod:`lorabench.training.cuda_graph`): ``ids`` (and ``ids_2``, SDXL's
    second tokenizer), each padded to the tokenizer's length and repeated once per text group (P+), and,
    for SDXL, the size/crop ``time_ids`` (``time_ids``: each prompt's own (N, 6), e.g. a training batch's
    original sizes and crops; else the square ``(res, res, 0, 0, res, res)`` a pipeline samples with).
    Words bound to new tokens (``components.prompt_rewrites``) are replaced by them first."""
    if components.prompt_rewrites:
        prompts = [rewrite_prompt(p, components.prompt_rewrites) for p in prompts]
    groups = components.text_groups

    def ids(tok):
        out = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        return out.repeat(groups, 1).to(device)  # group-major: each group's copy of every prompt

    out = {"ids": ids(components.tokenizer)}
    if components.is_sdxl:
        res = components.resolution
        out["ids_2"] = ids(components.tokenizer_2)
        if time_ids is not None:
            if tuple(time_ids.shape) != (len(prompts), 6):
                raise ValueError(f"time_ids: expected ({len(prompts)}, 6), got {tuple(time_ids.shape)}")
            out["time_ids"] = time_ids.to(device)
        else:
            out["time_ids"] = torch.tensor([[res, res, 0, 0, res, res]], device=device).repeat(len(prompts), 1)
    return out


def encode_tokens(components: ModelComponents, tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """UNet conditioning from :func:`tokenize_prompts`'s tensors: ``encoder_hidden_states`` and, for SDXL,
    ``added_cond_kwargs`` (pooled text embeddings and size/crop time ids). With layer-wise tokens (P+,
    ``components.text_groups`` > 1) the prompts were repeated once per cross-attention layer, and
    ``layer_states`` holds each layer's states (``encoder_hidden_states`` and the pooled embeddings are the
    first layer's); :func:`denoise` hands them to the UNet."""
    groups = components.text_groups
    if not components.is_sdxl:
        states = components.text_encoder(tokens["ids"])[0]
        out = {"encoder_hidden_states": states}
    else:
        # SDXL: penultimate hidden states of both encoders, concatenated; pooled output of the second.
        out1 = components.text_encoder(tokens["ids"], output_hidden_states=True)
        out2 = components.text_encoder_2(tokens["ids_2"], output_hidden_states=True)
        states = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
        time_ids = tokens["time_ids"].to(states.dtype)
        out = {"encoder_hidden_states": states,
               "added_cond_kwargs": {"text_embeds": out2.text_embeds[:len(time_ids)], "time_ids": time_ids}}
    if groups > 1:
        out["layer_states"] = tuple(states.chunk(groups))
        out["encoder_hidden_states"] = out["layer_states"][0]
    return out


def encode_prompts(components: ModelComponents, prompts: list[str], device,
                   time_ids: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
    """UNet conditioning for ``prompts`` (:func:`tokenize_prompts`, then :func:`encode_tokens`):
    ``encoder_hidden_states`` and, for SDXL, ``added_cond_kwargs``; with layer-wise tokens (P+) also
    ``layer_states``, one per cross-attention layer."""
    return encode_tokens(components, tokenize_prompts(components, prompts, device, time_ids))


def denoise(unet: nn.Module, sample: torch.Tensor, timesteps, cond: dict, dtype: torch.dtype) -> torch.Tensor:
    """The UNet's prediction for ``sample`` under ``cond`` (from :func:`encode_prompts`), in ``dtype``:
    the layer-wise text states, if any, go to the attention processors as ``cross_attention_kwargs``."""
    extra = {}
    if "layer_states" in cond:
        extra["cross_attention_kwargs"] = {"layer_states": tuple(s.to(dtype) for s in cond["layer_states"])}
    return unet(sample.to(dtype), timesteps, cond["encoder_hidden_states"].to(dtype),
                added_cond_kwargs=cond.get("added_cond_kwargs"), **extra).sample


def _read_model_index(pretrained: str, revision: Optional[str]) -> dict:
    local = Path(pretrained) / "model_index.json"
    if local.is_file():
        return json.loads(local.read_text())
    if os.path.isdir(pretrained):
        # A folder without model_index.json: infer from its subfolders.
        return {name: True for name in ("vae", "text_encoder_2") if (Path(pretrained) / name).is_dir()}
    return DiffusionPipeline.load_config(pretrained, revision=revision)


def _present(index: dict, name: str) -> bool:
    entry = index.get(name)
    if entry is None:
        return False
    if isinstance(entry, (list, tuple)):
        return entry[0] is not None
    return bool(entry)


def explain_load_error(exc: BaseException) -> str:
    """One line on why loading failed; 'not cached and hub unreachable' when that is the root cause."""
    chain, e = [], exc
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    names = {type(e).__name__ for e in chain}
    if names & {"LocalEntryNotFoundError", "OfflineModeIsEnabled", "ConnectionError", "ConnectTimeout"}:
        return ("not in the local Hugging Face cache and the hub cannot be reached; download it first "
                "(huggingface-cli download) or set model.pretrained to a local folder")
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_components(
    pretrained: str,
    *,
    name: Optional[str] = None,
    revision: Optional[str] = None,
    variant: Optional[str] = None,
    dtype: str = "float32",
    vae: Optional[str] = None,
    prediction_type: Optional[str] = None,
    resolution: int = 512,
    attention: Optional[str] = None,
    unet: Optional[str] = None,
) -> ModelComponents:
    """Load UNet, VAE, text encoder(s), tokenizer(s) and the DDPM noise scheduler.

    Args:
        pretrained: hub id (``stable-diffusion-v1-5/stable-diffusion-v1-5``) or a local folder.
        name: short name recorded in results (defaults to ``pretrained``).
        dtype: dtype of the frozen weights; adapters always train in float32.
        vae: optional separate VAE (hub id or folder), e.g. SDXL's fp16-fix VAE.
        prediction_type: override the scheduler's ``epsilon`` / ``v_prediction``; ``None`` keeps it.
        resolution: training and sampling resolution in pixels.
        attention: the UNet's attention kernel, see :func:`set_attention`; ``None`` keeps diffusers' choice.
        unet: optional UNet folder in place of the model's own, of its architecture (:func:`load_unet`): a merge's
            ``protocol.save_as=unet`` folder, or a full fine-tune's UNet.
    """
    check_model_source(pretrained)
    torch_dtype = resolve_dtype(dtype)
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise choice_error("model.prediction_type", prediction_type, PREDICTION_TYPES)
    if attention is not None and attention not in ATTENTION:
        raise choice_error("model.attention", attention, ATTENTION)
    kw = dict(revision=revision)
    try:
        index = _read_model_index(pretrained, revision)
        sched_kw = {} if prediction_type is None else {"prediction_type": prediction_type}
        noise_scheduler = DDPMScheduler.from_pretrained(pretrained, subfolder="scheduler", **kw, **sched_kw)
        tokenizer = AutoTokenizer.from_pretrained(pretrained, subfolder="tokenizer", **kw)
        text_encoder = CLIPTextModel.from_pretrained(
            pretrained, subfolder="text_encoder", torch_dtype=torch_dtype, variant=variant, **kw)
        unet_model = UNet2DConditionModel.from_pretrained(
            pretrained, subfolder="unet", torch_dtype=torch_dtype, variant=variant, **kw) if unet is None \
            else load_unet(unet, pretrained, torch_dtype, revision)
        tokenizer_2 = text_encoder_2 = None
        if _present(index, "text_encoder_2"):
            tokenizer_2 = AutoTokenizer.from_pretrained(pretrained, subfolder="tokenizer_2", **kw)
            text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
                pretrained, subfolder="text_encoder_2", torch_dtype=torch_dtype, variant=variant, **kw)
        vae_model = None
        if vae is not None:
            hint = "give a diffusers AutoencoderKL folder (with config.json) or hub id, or null for the model's own"
            check_part_source(vae, "model.vae", hint)
            try:  # its own field: a wrong VAE path was said to be model.pretrained's
                vae_model = AutoencoderKL.from_pretrained(vae, torch_dtype=torch_dtype)
            except (OSError, ValueError) as exc:
                why = explain_load_error(exc).rstrip(".")
                raise ConfigError("model.vae", f"could not load {vae!r}: {why}; {hint}") from exc
        elif _present(index, "vae"):
            vae_model = AutoencoderKL.from_pretrained(
                pretrained, subfolder="vae", torch_dtype=torch_dtype, variant=variant, **kw)
    except ConfigError:
        raise
    except (OSError, ValueError, EnvironmentError) as exc:
        why = explain_load_error(exc)
        if variant and f".{variant}." in why:  # the folder has the weights, not this variant's files of them
            raise ConfigError("model.variant", f"{variant!r}: {pretrained!r} has no {variant} weight files ({why}); "
                              "set model.variant=null to load its plain ones") from exc
        raise ConfigError("model.pretrained", f"could not load {pretrained!r}: {why}") from exc
    if attention is not None:
        set_attention(unet_model, attention)
    return ModelComponents(
        unet=unet_model, vae=vae_model, text_encoder=text_encoder, tokenizer=tokenizer,
        noise_scheduler=noise_scheduler, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        name=name or pretrained, model_id=pretrained if unet is None else f"{pretrained} with unet {unet}",
        resolution=int(resolution),
        pipeline_defaults=pipeline_defaults(index),
    ).freeze()


def load_unet(path: str, pretrained: str, torch_dtype: torch.dtype, revision: Optional[str] = None):
    """``model.unet``: the UNet folder ``path`` in place of ``pretrained``'s own, once its config shows the same
    architecture (every option of the UNet's constructor, diffusers' defaults where a file omits one): a UNet of
    another model would fail at the first step, or pair with a text encoder of another width."""
    hint = ("give a diffusers UNet2DConditionModel folder (with config.json and its weights), e.g. a merge's "
            "<run>/unet (experiment=merge_adapters protocol.save_as=unet), or null for the model's own")
    check_part_source(path, "model.unet", hint)
    try:
        theirs = UNet2DConditionModel.load_config(path)
    except (OSError, ValueError) as exc:
        raise ConfigError("model.unet", f"could not load {path!r}: {explain_load_error(exc).rstrip('.')}; "
                                        f"{hint}") from exc
    ours = UNet2DConditionModel.load_config(pretrained, subfolder="unet", revision=revision)
    defaults = {k: p.default for k, p in inspect.signature(UNet2DConditionModel.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    ours, theirs = ({k: json.loads(json.dumps(v)) for k, v in {**defaults, **c}.items() if not k.startswith("_")}
                    for c in (ours, theirs))  # JSON's lists for the defaults' tuples
    differ = [k for k in ours if k in defaults and ours[k] != theirs.get(k)]
    if differ:
        k = differ[0]
        raise ConfigError("model.unet", f"{path!r} is a UNet of another architecture than model.pretrained "
                                        f"{pretrained!r} ({k}: {theirs.get(k)!r} here, {ours[k]!r} in the model); "
                                        "give a UNet of that model")
    try:
        return UNet2DConditionModel.from_pretrained(path, torch_dtype=torch_dtype)
    except (OSError, ValueError) as exc:
        raise ConfigError("model.unet", f"could not load {path!r}: {explain_load_error(exc).rstrip('.')}; "
                                        f"{hint}") from exc


def pipeline_defaults(index: dict) -> dict:
    """What a model folder's ``model_index.json`` says its pipeline samples with: the scheduler class
    (e.g. SDXL base ships ``EulerDiscreteScheduler``) and whether an empty negative prompt is encoded as
    zeros (SDXL base: ``force_zeros_for_empty_prompt: true``)."""
    out = {}
    entry = index.get("scheduler")
    if isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1]:
        out["scheduler"] = str(entry[1])
    if "force_zeros_for_empty_prompt" in index:
        out["force_zeros_for_empty_prompt"] = bool(index["force_zeros_for_empty_prompt"])
    return out


def set_attention(unet: nn.Module, kind: str, field: str = "model.attention") -> None:
    """The UNet's attention kernel: ``sdpa`` (``torch.nn.functional.scaled_dot_product_attention``,
    flash / memory-efficient kernels where the GPU has them; diffusers' default on torch 2), ``classic``
    (explicit softmax(QK^T)V, the reference), ``xformers`` (needs the xformers package). Adapters sit on
    the projections, so every kernel trains the same adapter."""
    if kind not in ATTENTION:
        raise choice_error(field, kind, ATTENTION)
    if kind == "xformers":
        try:
            unet.enable_xformers_memory_efficient_attention()
        except (ImportError, ModuleNotFoundError, ValueError) as exc:
            raise ConfigError(field, f"xformers attention is unavailable here ({exc}); use sdpa") from exc
        return
    unet.set_attn_processor(AttnProcessor2_0() if kind == "sdpa" else AttnProcessor())


def save_components(components: ModelComponents, path: str | os.PathLike) -> Path:
    """Save in diffusers' folder layout so :func:`load_components` (and diffusers pipelines,
    when a VAE is present) can load it back. Written to a temp folder, then renamed."""
    path = Path(path)
    with atomic_dir(path) as tmp:
        parts = {"unet": components.unet, "text_encoder": components.text_encoder,
                 "tokenizer": components.tokenizer, "scheduler": components.noise_scheduler}
        if components.vae is not None:
            parts["vae"] = components.vae
        if components.text_encoder_2 is not None:
            parts["text_encoder_2"] = components.text_encoder_2
            parts["tokenizer_2"] = components.tokenizer_2
        index = {"_class_name": "StableDiffusionXLPipeline" if components.is_sdxl else "StableDiffusionPipeline",
                 "feature_extractor": [None, None], "safety_checker": [None, None], "image_encoder": [None, None],
                 "requires_safety_checker": False}
        for sub, obj in parts.items():
            obj.save_pretrained(tmp / sub)
            lib = "diffusers" if type(obj).__module__.startswith("diffusers") else "transformers"
            index[sub] = [lib, type(obj).__name__]
        if components.pipeline_defaults.get("scheduler"):  # what the pipeline samples with (the file holds the config)
            index["scheduler"] = ["diffusers", components.pipeline_defaults["scheduler"]]
        if "force_zeros_for_empty_prompt" in components.pipeline_defaults:
            index["force_zeros_for_empty_prompt"] = components.pipeline_defaults["force_zeros_for_empty_prompt"]
        index.setdefault("vae", [None, None])
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return path
