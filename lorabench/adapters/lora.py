"""LoRA (Hu et al., 2021): dW = up @ down * alpha / r, both factors trained."""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from lorabench.adapters.base import AdapterLayer, AdapterOptions, register_adapter
from lorabench.errors import choice_error

LORA_INITS = ("gaussian", "kaiming")


@dataclasses.dataclass
class LoRAOptions(AdapterOptions):
    """LoRA's options: the common ones and the initialisation of ``down``."""
    # gaussian: down ~ N(0, std=1/r), up = 0 -- diffusers' training scripts and PEFT's "gaussian".
    # kaiming: down ~ kaiming_uniform(a=sqrt(5)), up = 0 -- PEFT's default.
    init: str = "gaussian"

    def validate(self) -> None:
        super().validate()
        if self.init not in LORA_INITS:
            raise choice_error("adapter.init", self.init, LORA_INITS)


@register_adapter("lora")
class LoRALayer(AdapterLayer):
    """``dW = up @ down * alpha / r``; both factors train, ``up`` starts at zero."""
    Options = LoRAOptions

    def __init__(self, base, name, opts: LoRAOptions, context=None):
        super().__init__(base, name, opts, context)
        self.lora_down = nn.Parameter(torch.empty(opts.rank, self.in_features))
        self.lora_up = nn.Parameter(torch.zeros(self.out_features, opts.rank))
        if opts.init == "gaussian":
            nn.init.normal_(self.lora_down, std=1.0 / opts.rank)
        else:
            nn.init.kaiming_uniform_(self.lora_down, a=math.sqrt(5))

    def factors(self):
        return self.lora_up, self.lora_down
