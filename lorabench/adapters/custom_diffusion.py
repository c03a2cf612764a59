"""Custom Diffusion (Kumari et al., CVPR 2023): the cross-attention key and value projections train whole.

The update of each adapted projection is a dense ``dW`` (zero at the start), trained directly, which is
what fine-tuning ``W_k`` and ``W_v`` is; with the modifier token (``embeddings=textual_inversion``, one
vector) that is the method. Through the common interface the update factors exactly as ``up @ down``
with the identity on the smaller side (rank ``min(in, out)``), so merges, diffusers-format LoRA
exports and folds read it like any adapter; the forward pass uses ``dW`` itself.

Its own file format is diffusers' Custom Diffusion one (``unet.load_attn_procs``): for every attention
processor, the full trained weights ``W0 + dW`` as ``<processor>.to_k_custom_diffusion.weight`` and
``...to_v_custom_diffusion.weight``; processors that do not train get an empty entry.
Its merge, the constrained closed form of the paper's eq. (5), is ``merge.name=custom_diffusion``
(:mod:`lorabench.merging.methods`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from lorabench.adapters.base import AdapterLayer, AdapterOptions, layer_shape, register_adapter
from lorabench.errors import ConfigError
from lorabench.utils.io import atomic_path

CUSTOM_DIFFUSION_FILE = "pytorch_custom_diffusion_weights.safetensors"  # diffusers' weight name


@dataclasses.dataclass
class CustomDiffusionOptions(AdapterOptions):
    """No rank and no alpha: the whole weight trains."""
    rank: Optional[int] = None

    def validate(self) -> None:
        for key in ("rank", "alpha"):
            if getattr(self, key) is not None:
                raise ConfigError(f"adapter.{key}", "custom_diffusion trains each weight whole; it has no "
                                  f"{key} (leave it unset)")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("adapter.dropout", f"must be in [0, 1), got {self.dropout!r}")


@register_adapter("custom_diffusion")
class CustomDiffusionLayer(AdapterLayer):
    """A dense update ``dW`` (out, in), zero at the start, trained whole (``rank`` is ``min(in, out)``)."""
    Options = CustomDiffusionOptions
    dense_update = "delta"  # stacked (lorabench.adapters.stacked), K runs apply their dW directly

    def __init__(self, base, name, opts: CustomDiffusionOptions, context=None):
        n_in, n_out = layer_shape(base, name)
        super().__init__(base, name, dataclasses.replace(opts, rank=min(n_in, n_out)), context)
        self.delta = nn.Parameter(torch.zeros(n_out, n_in))

    def factors(self):
        eye = torch.eye(self.rank, device=self.delta.device, dtype=self.delta.dtype)  # made when asked, never saved
        return (eye, self.delta) if self.out_features <= self.in_features else (self.delta, eye)

    def delta_weight(self) -> torch.Tensor:
        """``dW`` itself (float32), times the multiplier."""
        return self.delta.float() * self.multiplier

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``dW x`` with the dense update (no identity factor)."""
        return self._project(self.dropout(x.to(self.delta.dtype)), self.delta) * self.multiplier

    def fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The CUDA path: ``base(x) + dW x`` in the activations' dtype."""
        out = self.base(x)
        return out + F.linear(x.to(out.dtype), self.delta.to(out.dtype)) * self.multiplier


KV = ("to_k", "to_v")  # the projections a Custom Diffusion file holds, per attention module


def check_custom_diffusion_export(adapters) -> None:
    """What a Custom Diffusion file can hold: the UNet's attention ``to_k`` and ``to_v`` weights, in pairs. Other
    adapted layers (a LoRA's to_q and to_out.0, text-encoder layers) it would drop: a one-line error, checked
    before training (it wrote the file without them)."""
    unet = adapters._roots.get("unet")
    if unet is None:
        raise ConfigError("exports", "a Custom Diffusion file holds UNet layers; these adapters have none")
    others = sorted(n for n in adapters.layers if not n.startswith("unet.") or n.rsplit(".", 1)[-1] not in KV)
    if others:
        raise ConfigError("exports", f"a Custom Diffusion file holds the UNet's to_k and to_v weights only; these "
                          f"adapters also adapt {others[0]!r} ({len(others)} such layers), which it would drop: "
                          "export diffusers or kohya instead")
    for key in unet.attn_processors:  # "<attention module>.processor"
        attn = key[: -len(".processor")]
        pair = [adapters.layers.get(f"unet.{attn}.{p}") for p in KV]
        if any(pair) and not all(pair):
            raise ConfigError("adapter.target_modules", f"{attn}: Custom Diffusion files hold to_k and to_v together; "
                              "adapt both (e.g. [attn2.to_k, attn2.to_v])")


def export_custom_diffusion(adapters, path) -> Path:
    """Write diffusers' Custom Diffusion file (see the module docstring): ``unet.load_attn_procs(folder,
    weight_name=CUSTOM_DIFFUSION_FILE)`` reads it (:func:`check_custom_diffusion_export` says what it holds)."""
    check_custom_diffusion_export(adapters)
    unet = adapters._roots["unet"]
    tensors = {}
    for key in unet.attn_processors:  # "<attention module>.processor"
        attn = key[: -len(".processor")]
        pair = [adapters.layers.get(f"unet.{attn}.{p}") for p in KV]
        if not any(pair):
            tensors[key] = torch.zeros(0)  # diffusers: this processor does not train
            continue
        for p, layer in zip(KV, pair):
            w = layer.base.weight.detach().float() + layer.delta_weight().detach()
            tensors[f"{key}.{p}_custom_diffusion.weight"] = w.cpu().contiguous()
    with atomic_path(Path(path)) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    return Path(path)
