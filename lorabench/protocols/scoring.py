"""What a protocol scores with: the eval sets, scorer, sampler and device from ``cfg.eval``, built
before any training, and the initial-latent seeds every concept protocol shares."""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lorabench.sampling import eval_device
from lorabench.utils.seeding import derive_seed_list


class EvalSetup(NamedTuple):
    """What a protocol scores with, built from ``cfg.eval`` before any training."""

    eval_sets: Any          # callable: item name -> its eval set (prompts, references)
    sets: dict[str, Any]    # {item: eval set}
    scorer: Any
    sampler: dict
    images_per_prompt: int
    device: torch.device


def eval_setup(cfg: DictConfig, items: Sequence[str], sets_key: str, scorer_key: str) -> EvalSetup:
    """Instantiate ``eval.<sets_key>`` and ``eval.<scorer_key>`` and build every item's eval set, so an
    unknown item name fails here, before any training."""
    ev = cfg.eval
    eval_sets = instantiate(ev[sets_key])
    sets = {i: eval_sets(i) for i in items}
    return EvalSetup(eval_sets, sets, instantiate(ev[scorer_key]), OmegaConf.to_container(ev.sampler, resolve=True),
                     int(ev.images_per_prompt), eval_device(cfg))


def concept_seeds(seed: int, n: int) -> list[int]:
    """The initial-latent seeds of replicate ``seed`` in the concept protocols (single concept and
    Orthogonal Adaptation): the same for every prompt, every method, alone and merged."""
    return derive_seed_list("single-concept-samples", seed, n)
