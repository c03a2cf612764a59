"""Textual inversion (Gal et al. 2022): new tokens whose embedding rows alone train.

A concept gets ``num_vectors`` new tokens, named as diffusers names a multi-vector embedding: ``<sks>``,
``<sks>_1``, ``<sks>_2``, ... They are added to a copy of each tokenizer (the model's own tokenizer is put
back by :meth:`ConceptTokens.remove`) and read by a :class:`NewTokenEmbedding` that wraps each text
encoder's token embedding: the base table stays frozen and bit-identical, the new rows are the only
trainable tensors, initialised from an existing word's embedding. A prompt names the concept by its
token (``a <sks> circle``) or, with ``bind``, by a word the tokens stand in for (``bind: sks`` rewrites
``a sks circle`` as ``a <sks> <sks>_1 circle``, so datasets and evaluation prompts stay as they are).

Files are diffusers' textual-inversion format, safetensors, so ``pipe.load_textual_inversion`` reads
them: one encoder: ``{token: (num_vectors, dim)}``; SDXL: ``{"clip_l": ..., "clip_g": ...}`` (load each
into its encoder with ``token=``, as diffusers' documentation does). lorabench's metadata rides along.

    tokens = inject_tokens(components, {"token": "<sks>", "num_vectors": 2, "init_word": "circle", "bind": "sks"})
    tokens.parameters(); tokens.save("sks.safetensors"); tokens.remove()
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Mapping, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lorabench.errors import ConfigError, check_int
from lorabench.utils.io import atomic_path

TOKEN_KEYS = ("name", "token", "num_vectors", "init_word", "bind")
SDXL_KEYS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}


class NewTokenEmbedding(nn.Module):
    """A token embedding with new rows: ``base`` (frozen) for the model's tokens, ``new`` (trainable,
    float32) for the tokens ``ids``; a gradient reaches ``new`` only."""

    def __init__(self, base: nn.Embedding, ids: list[int], init: torch.Tensor):
        super().__init__()
        self.base = base
        self.register_buffer("ids", torch.tensor(ids, dtype=torch.long, device=base.weight.device),
                             persistent=False)
        self.new = nn.Parameter(init.detach().float().clone().to(base.weight.device))

    @property
    def weight(self) -> torch.Tensor:
        """The whole table as transformers sees it (base rows, then the new rows at their ids)."""
        n = max(self.base.num_embeddings, int(self.ids.max()) + 1)
        table = torch.cat([self.base.weight, self.base.weight.new_zeros(n - self.base.num_embeddings,
                                                                         self.base.embedding_dim)])
        return table.index_copy(0, self.ids, self.new.to(table.dtype))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.base(input_ids.clamp(max=self.base.num_embeddings - 1))
        for j in range(len(self.ids)):
            out = torch.where((input_ids == self.ids[j]).unsqueeze(-1), self.new[j].to(out.dtype), out)
        return out


def _token_embedding(text_encoder: nn.Module) -> nn.Module:
    """A transformers text encoder's token embedding (``get_input_embeddings``)."""
    get = getattr(text_encoder, "get_input_embeddings", None)
    emb = get() if get is not None else None
    if not isinstance(emb, (nn.Embedding, NewTokenEmbedding)):
        raise ConfigError("embeddings", f"{type(text_encoder).__name__} has no token embedding table to extend")
    return emb


def _known(tokenizer, name: str) -> bool:
    """Whether the tokenizer already has ``name`` as one token (CLIP's BPE spells words ``dog</w>``)."""
    if name in tokenizer.get_vocab():
        return True
    pieces = tokenizer.tokenize(name)
    return len(pieces) == 1 and tokenizer.convert_tokens_to_ids(pieces[0]) != tokenizer.unk_token_id


def check_tokens_config(config: Mapping, field: str = "embeddings") -> dict:
    """The token config with defaults, its values checked (one-line errors naming ``<field>.<key>``)."""
    cfg = {"name": "textual_inversion", "num_vectors": 1, "init_word": None, "bind": None, **dict(config)}
    unknown = sorted(set(cfg) - set(TOKEN_KEYS))
    if unknown:
        raise ConfigError(f"{field}.{unknown[0]}", f"not an option; valid: {', '.join(TOKEN_KEYS)}")
    if cfg["name"] != "textual_inversion":
        raise ConfigError(f"{field}.name", f"unknown embedding method {cfg['name']!r}; valid: textual_inversion")
    token = cfg.get("token")
    if not isinstance(token, str) or not token.strip() or token != token.strip() or " " in token:
        raise ConfigError(f"{field}.token", f"must be one word without spaces, e.g. '<sks>', got {token!r}")
    check_int(cfg["num_vectors"], f"{field}.num_vectors", minimum=1)
    for key in ("init_word", "bind"):
        if cfg[key] is not None and (not isinstance(cfg[key], str) or not cfg[key].strip()):
            raise ConfigError(f"{field}.{key}", f"must be a word or null, got {cfg[key]!r}")
    return cfg


def token_names(token: str, num_vectors: int) -> list[str]:
    """diffusers' names of a multi-vector token: ``token, token_1, ..., token_{n-1}``."""
    return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


class ConceptTokens:
    """New tokens in every text encoder of a model (see the module docstring)."""

    def __init__(self, components, config: Mapping, layers: dict[str, NewTokenEmbedding], saved: dict):
        self.components, self.config, self.layers, self._saved = components, dict(config), layers, saved

    @classmethod
    def inject(cls, components, config: Mapping, init: Optional[Mapping[str, torch.Tensor]] = None) -> "ConceptTokens":
        """Add the tokens of ``config`` (see :func:`check_tokens_config`); ``init`` (``{encoder: (n, dim)}``)
        overrides the init word's embedding, as when a file is loaded. Checks everything before any change."""
        cfg = check_tokens_config(config)
        names = token_names(cfg["token"], cfg["num_vectors"])
        encoders = components.text_encoders()
        tokenizers = {"text_encoder": components.tokenizer, "text_encoder_2": components.tokenizer_2}
        plans = {}
        for key, te in encoders.items():
            tok, base = tokenizers[key], _token_embedding(te)
            if isinstance(base, NewTokenEmbedding):
                raise ConfigError("embeddings", f"{key} already carries new tokens; remove them first")
            taken = [n for n in names if _known(tok, n)]
            if taken:
                raise ConfigError("embeddings.token", f"{taken[0]!r} is already in {key}'s vocabulary; a new token "
                                  "must be a string the tokenizer does not know, e.g. '<sks>'")
            if init is not None:
                rows = init.get(key)
                if rows is None or tuple(rows.shape) != (len(names), base.embedding_dim):
                    got = None if rows is None else tuple(rows.shape)
                    raise ConfigError("embeddings", f"the embedding file's rows for {key} have shape {got}, but this "
                                      f"model needs ({len(names)}, {base.embedding_dim}): made for another text "
                                      "encoder?")
            elif cfg["init_word"]:
                ids = tok(cfg["init_word"], add_special_tokens=False).input_ids
                if not ids:
                    raise ConfigError("embeddings.init_word", f"{cfg['init_word']!r} gives no token")
                rows = base.weight.detach()[ids].float().mean(0, keepdim=True).repeat(len(names), 1)
            else:  # the mean of the table, as when no word fits
                rows = base.weight.detach().float().mean(0, keepdim=True).repeat(len(names), 1)
            plans[key] = (tok, te, rows)
        # every check passed: change the model
        saved = {"tokenizer": components.tokenizer, "tokenizer_2": components.tokenizer_2,
                 "prompt_rewrites": dict(components.prompt_rewrites)}
        layers = {}
        for key, (tok, te, rows) in plans.items():
            new_tok = copy.deepcopy(tok)
            new_tok.add_tokens(names)
            ids = new_tok.convert_tokens_to_ids(names)
            layer = NewTokenEmbedding(te.get_input_embeddings(), ids, rows)
            te.set_input_embeddings(layer)
            layers[key] = layer
            if key == "text_encoder":
                components.tokenizer = new_tok
            else:
                components.tokenizer_2 = new_tok
        if cfg["bind"]:
            if cfg["bind"] in components.prompt_rewrites:
                raise ConfigError("embeddings.bind", f"{cfg['bind']!r} already stands for other tokens")
            components.prompt_rewrites[cfg["bind"]] = " ".join(names)
        return cls(components, cfg, layers, saved)

    # -- what trains ----------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """The new tokens, in order."""
        return token_names(self.config["token"], self.config["num_vectors"])

    def parameters(self) -> list[nn.Parameter]:
        """The new rows of every text encoder: the only trainable tensors."""
        return [layer.new for layer in self.layers.values()]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``{encoder: (num_vectors, dim)}``."""
        return {key: layer.new.detach() for key, layer in self.layers.items()}

    @torch.no_grad()
    def load_state_dict(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy ``{encoder: (num_vectors, dim)}`` in (shapes checked)."""
        for key, layer in self.layers.items():
            if key not in tensors or tensors[key].shape != layer.new.shape:
                raise ConfigError("embeddings", f"no rows of shape {tuple(layer.new.shape)} for {key}")
            layer.new.copy_(tensors[key])

    def remove(self) -> None:
        """Put the model's own embeddings, tokenizers and prompts back."""
        for key, layer in self.layers.items():
            self.components.text_encoders()[key].set_input_embeddings(layer.base)
        self.components.tokenizer = self._saved["tokenizer"]
        self.components.tokenizer_2 = self._saved["tokenizer_2"]
        self.components.prompt_rewrites = self._saved["prompt_rewrites"]
        self.layers = {}

    # -- files ------------------------------------------------------------------------------------------
    def save(self, path, metadata: Optional[Mapping[str, str]] = None) -> Path:
        """Write diffusers' textual-inversion format (see the module docstring), atomically."""
        rows = {k: v.float().cpu().contiguous() for k, v in self.state_dict().items()}
        tensors = {self.config["token"]: rows["text_encoder"]} if len(rows) == 1 else \
            {SDXL_KEYS[k]: v for k, v in rows.items()}
        meta = {"format": "pt", "lorabench_tokens": json.dumps(self.config), **dict(metadata or {})}
        with atomic_path(Path(path)) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return Path(path)


def inject_tokens(components, config: Mapping) -> ConceptTokens:
    """:meth:`ConceptTokens.inject` with the init word's embedding."""
    return ConceptTokens.inject(components, config)


def load_tokens(components, path, token: Optional[str] = None, bind: Optional[str] = None) -> ConceptTokens:
    """Add the tokens of a textual-inversion file (lorabench's or any diffusers-format one)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("embeddings.path", f"{path} is not a file")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    cfg = json.loads(meta["lorabench_tokens"]) if "lorabench_tokens" in meta else {}
    if set(tensors) == set(SDXL_KEYS.values()):
        init = {k: tensors[v] for k, v in SDXL_KEYS.items()}
    elif len(tensors) == 1:
        (name, rows), = tensors.items()
        cfg.setdefault("token", name)
        init = {"text_encoder": rows if rows.dim() == 2 else rows[None]}
    else:
        raise ConfigError("embeddings.path", f"{path}: not a textual-inversion file (one tensor, or clip_l and "
                          f"clip_g), got keys {sorted(tensors)[:4]}")
    if token is not None:
        cfg["token"] = token
    if bind is not None:
        cfg["bind"] = bind
    if "token" not in cfg:
        raise ConfigError("embeddings.token", f"{path} names no token; give one")
    cfg["num_vectors"] = int(next(iter(init.values())).shape[0])
    if set(init) != set(components.text_encoders()):
        raise ConfigError("embeddings.path", f"{path} holds rows for {sorted(init)}, the model has text encoders "
                          f"{sorted(components.text_encoders())}: made for another model?")
    cfg["init_word"] = None
    return ConceptTokens.inject(components, cfg, init=init)

