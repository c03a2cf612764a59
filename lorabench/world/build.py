"""Builders the Hydra configs call: the world's untrained model and its datasets."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from lorabench.data import ImageFolderDataModule
from lorabench.errors import choice_error
from lorabench.models import ModelComponents, build_tiny_components
from lorabench.world.datasets import caption_items, concept_items, pretrain_items, style_items, write_imagefolder
from lorabench.world.spec import make_world

KINDS = ("pretrain", "concept", "style", "captions")


def build_world_model(world_seed: int = 0, resolution: int = 16, seed: int = 0,
                      block_out_channels: Sequence[int] = (32, 64, 64), layers_per_block: int = 1,
                      cross_attention_dim: int = 64, attention_head_dim: int = 8, text_layers: int = 2,
                      text_max_length: int = 24, beta_schedule: str = "squaredcos_cap_v2",
                      prediction_type: str = "v_prediction", timestep_spacing: str = "trailing",
                      name: str = "world-init") -> ModelComponents:
    """The untrained mini-world model: a tiny pixel-space UNet and a CLIP text encoder whose tokenizer
    holds every world word (attributes, classes, rare tokens, style words) as one token.

    The noise schedule is a pixel-space one. SD's ``scaled_linear`` schedule was made for latents: at
    t = T it keeps 7% of the signal, and at 16 px that is enough for the UNet to read the object's
    position from the noisy input instead of from the prompt. Sampling starts from pure noise, so a
    model trained that way ignores "at left". The cosine schedule reaches zero signal at T, which
    needs v-prediction (epsilon cannot be inverted to x0 there) and trailing timesteps (so sampling
    starts at t = T, where training saw pure noise)."""
    world = make_world(world_seed, resolution)
    return build_tiny_components(seed=seed, name=name, resolution=resolution, words=world.vocabulary(),
                                 block_out_channels=block_out_channels, layers_per_block=layers_per_block,
                                 cross_attention_dim=cross_attention_dim, attention_head_dim=attention_head_dim,
                                 text_hidden_size=cross_attention_dim, text_layers=text_layers,
                                 text_max_length=text_max_length, beta_schedule=beta_schedule,
                                 prediction_type=prediction_type, timestep_spacing=timestep_spacing)


def world_datamodule(kind: str, folder: str, world_seed: int = 0, resolution: int = 16, n: int = 8,
                     data_seed: int = 0, concept: Optional[str] = None, style: Optional[str] = None,
                     caption_mode: str = "fixed", exclude_contexts: Sequence[Sequence[str]] = (),
                     caption_drop: Sequence[str] = (), **kwargs) -> ImageFolderDataModule:
    """Write one mini-world dataset into ``folder`` (imagefolder format) and return a datamodule on it."""
    world = make_world(world_seed, resolution)
    if kind == "pretrain":
        items = pretrain_items(world, n, data_seed)
    elif kind == "concept":
        items = concept_items(world, world.identity(concept, field="data.concept"), n, data_seed, caption_mode,
                              exclude_contexts)
    elif kind == "style":
        items = style_items(world, world.style(style, field="data.style"), n, data_seed)
    elif kind == "captions":
        items = caption_items(world, world.style(style, field="data.style"), n, data_seed, caption_drop)
    else:
        raise choice_error("data.kind", kind, KINDS)
    write_imagefolder(Path(folder), items, extra={"world_seed": world_seed, "kind": kind, "n": n,
                                                  "data_seed": data_seed, "concept": concept, "style": style,
                                                  "caption_mode": caption_mode, "caption_drop": sorted(caption_drop)})
    return ImageFolderDataModule(path=str(folder), resolution=resolution, **kwargs)
