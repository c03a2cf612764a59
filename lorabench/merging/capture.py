"""Input statistics of adapted layers, captured with forward hooks, for gradient fusion and crosstalk.

While concept i's own model (base + its adapter) samples its prompts, a hook on every adapter layer
adds ``X^T X`` of the layer's input rows (tokens or pixels) to an (in, in) accumulator and counts
the rows. Memory is bounded by the layer width squared, never by the number of tokens. Sampling
covers both kinds of layers Mix-of-Show distinguishes: text-side inputs (cross-attention K/V, and
text-encoder layers when adapted) come from the concept's prompts, spatial inputs from the
activations of the sampling trajectory (``num_inference_steps``, short by default).

Saved as safetensors: one ``(in, in)`` float32 tensor ``G = X^T X / n`` per layer (the mean over
rows, so every concept weighs the same in fusion however many tokens it saw), with the base
model's fingerprint, the row counts and the prompts in the metadata.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch
from safetensors.torch import save_file

from lorabench.adapters import read_safetensors
from lorabench.errors import ConfigError
from lorabench.models import encode_prompts
from lorabench.models.components import rewrite_prompt
from lorabench.sampling import sample_prompts
from lorabench.utils.io import atomic_path

STATS_FORMAT = "lorabench-input-stats-1"


class InputStats:
    """Forward hooks on adapter layers that accumulate ``X^T X`` and the row count per layer.

    A setting sampled in a batched pass (:class:`lorabench.protocols.scoring.EvalBatch`) runs its UNet layers
    as plain Linear layers, one weight per setting: the pass records this setting's rows of each layer in
    :attr:`names` through :meth:`record` (:func:`setting_grams`), the hooks record what ran with the adapter
    injected (its text-encoder layers, when the pass's prompts were encoded)."""

    def __init__(self, adapters):
        self.names = list(adapters.layers)
        self.sums: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}
        self._handles = []
        for name, layer in adapters.layers.items():
            self._handles.append(layer.register_forward_hook(self._hook(name, layer.is_conv)))

    def _hook(self, name: str, is_conv: bool):
        def hook(module, args, output):
            x = args[0].detach()
            x = x.movedim(1, -1) if is_conv else x  # (N, C, H, W) -> (N, H, W, C)
            x = x.reshape(-1, x.shape[-1]).double()
            self.record(name, x.T @ x, x.shape[0])

        return hook

    def record(self, name: str, gram: torch.Tensor, rows: int) -> None:
        """Add ``gram`` (``X^T X`` of ``rows`` input rows of layer ``name``, float64) to the layer's sums."""
        acc = self.sums.get(name)
        self.sums[name] = gram if acc is None else acc + gram
        self.rows[name] = self.rows.get(name, 0) + rows

    def remove(self) -> None:
        """Take the hooks off the layers."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def grams(self) -> dict[str, torch.Tensor]:
        """``{layer: G = X^T X / n}`` (float32, on the CPU)."""
        return {k: (v / self.rows[k]).float().cpu() for k, v in self.sums.items()}

    def result(self) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """``({layer: G}, {layer: rows})`` once every layer in :attr:`names` has run; an error naming the first
        that never did."""
        missing = sorted(set(self.names) - set(self.sums))
        if missing:
            raise RuntimeError(f"layer {missing[0]!r} never ran while sampling; cannot capture its inputs")
        return self.grams(), dict(self.rows)


def setting_grams(x: torch.Tensor, settings: int) -> tuple[torch.Tensor, int]:
    """``(X_s^T X_s for each setting s, rows a setting)`` of a batched pass's input to a Linear layer: ``x``'s
    leading dimension holds ``settings`` equal, contiguous parts (setting-major, as
    :func:`lorabench.sampling.setting_weights` computes them); the grams (settings, in, in) in float64, in one
    batched product."""
    xs = x.detach().reshape(settings, -1, x.shape[-1]).double()
    return torch.bmm(xs.transpose(1, 2), xs), xs.shape[1]


def capture_stats(components, adapters, prompts: Sequence[str], seeds: Sequence[int], sampler_cfg: Mapping,
                  device: torch.device = torch.device("cpu")) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Sample every prompt from every seed with the adapters active and return ``({layer: G}, {layer: rows})``."""
    if adapters.merged:
        raise RuntimeError("capture runs the adapter unmerged (its layers' inputs are what is recorded)")
    hooks = InputStats(adapters)
    try:
        with torch.no_grad():
            sample_prompts(components, dict(sampler_cfg), prompts, seeds, device)
    finally:
        hooks.remove()
    return hooks.result()


@torch.no_grad()
def text_states(components, prompts: Sequence[str], device=torch.device("cpu")) -> tuple[torch.Tensor, torch.Tensor,
                                                                                          torch.Tensor]:
    """``(states, ids, real)``: the text states cross-attention K / V layers read for ``prompts`` (B, T, dim),
    the first tokenizer's ids (B, T) and which positions are real tokens, BOS excluded, EOS included
    (not padding), bound words rewritten as the model does."""
    states = encode_prompts(components, list(prompts), device)["encoder_hidden_states"]
    tok = components.tokenizer
    texts = [rewrite_prompt(p, components.prompt_rewrites) for p in prompts]
    enc = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
    real = enc.attention_mask.bool()
    real[:, 0] = False  # BOS: the same state in every prompt
    return states.double().cpu(), enc.input_ids, real


def token_features(components, prompts: Sequence[str], tokens: Sequence[str],
                   device=torch.device("cpu")) -> torch.Tensor:
    """Custom Diffusion's target features: in each of ``prompts``, the text states from the first of
    ``tokens`` (the concept's new tokens) through EOS, as the authors' merge takes "<new1> category"
    from the modifier token on; (n, dim) float64 on the CPU."""
    states, ids, real = text_states(components, prompts, device)
    new = torch.isin(ids, torch.tensor(components.tokenizer.convert_tokens_to_ids(list(tokens))))
    if not new.any(dim=1).all():
        raise ConfigError("merge.stats", f"a prompt of {list(prompts)[:2]} does not name the tokens {list(tokens)}")
    after = new.long().cumsum(dim=1) > 0  # from the first new token on
    return states[after & real]


def text_gram(components, prompts: Sequence[str], device=torch.device("cpu")) -> torch.Tensor:
    """``C^T C`` over the real token positions (BOS excluded) of ``prompts``' text states, as the authors
    use their regularisation captions; (dim, dim) float64 on the CPU."""
    states, _, real = text_states(components, prompts, device)
    rows = states[real]
    return rows.T @ rows


def save_stats(path, grams: Mapping[str, torch.Tensor], rows: Mapping[str, int], fingerprint: str,
               prompts: Sequence[str] = (), extra: Optional[Mapping] = None) -> Path:
    """Write captured statistics (:func:`capture_stats`) with the base model's fingerprint, atomically."""
    meta = {"format": STATS_FORMAT, "base_fingerprint": fingerprint, "rows": json.dumps(dict(rows)),
            "prompts": json.dumps(list(prompts)), "extra": json.dumps(dict(extra or {}), default=str)}
    with atomic_path(Path(path)) as tmp:
        save_file({k: v.contiguous() for k, v in grams.items()}, str(tmp), metadata=meta)
    return Path(path)


def load_stats(path, adapters=None, fingerprint: Optional[str] = None) -> dict[str, torch.Tensor]:
    """Read a statistics file; with ``adapters`` (or a ``fingerprint``), refuse one made on another model
    or for other layers, in one line."""
    grams, meta = read_safetensors(path)
    field = f"statistics file {str(path)!r}"
    if meta.get("format") != STATS_FORMAT:
        raise ConfigError(field, f"is not a lorabench input-statistics file (format {meta.get('format')!r})")
    expect = fingerprint
    if adapters is not None:
        expect = adapters.base_fingerprint()
        widths = {k: layer.in_features for k, layer in adapters.layers.items()}
        for k, w in widths.items():
            if k not in grams:
                raise ConfigError(field, f"has no statistics for layer {k!r}; was it captured with other targets?")
            if tuple(grams[k].shape) != (w, w):
                raise ConfigError(field, f"layer {k!r} has statistics of shape {tuple(grams[k].shape)}, the model "
                                  f"needs ({w}, {w}); it comes from another model")
    if expect and meta.get("base_fingerprint") and meta["base_fingerprint"] != expect:
        raise ConfigError(field, f"was captured on another base model (fingerprint {meta['base_fingerprint']}, "
                          f"this model {expect})")
    return grams
