"""New tokens whose embedding rows alone train: textual inversion (Gal et al. 2022) and P+ (Voynov et al.
2023, extended textual conditioning, the layer-wise embeddings of Mix-of-Show's ED-LoRA).

A concept gets ``num_vectors`` new tokens, named as diffusers names a multi-vector embedding: ``<sks>``,
``<sks>_1``, ... They are added to a copy of each tokenizer (the model's own is put back by
:meth:`ConceptTokens.remove`) and read by a :class:`NewTokenEmbedding` wrapping each text encoder's token
embedding: the base table stays frozen and bit-identical, the new rows are the only trainable tensors,
initialised from an existing word's embedding (or the table's mean). A prompt names the concept by its
token (``a <sks> circle``, read as ``a <sks> <sks>_1 circle`` with two vectors, as diffusers' pipelines expand
it) or, with ``bind``, by a word the tokens stand in for (``bind: sks`` rewrites ``a sks circle`` the same way, so
datasets and evaluation prompts stay as they are).

- ``textual_inversion``: one row per token, shared by every layer of the UNet.
- ``pplus``: one row per token *per UNet cross-attention layer* (16 on SD1.5). The text encoder runs once
  per layer, batched (``ModelComponents.text_groups``), and diffusers attention processors route each
  cross-attention layer to its own text states (:class:`LayerRouting`, through the UNet's
  ``cross_attention_kwargs``); no UNet is forked.

Several concepts' tokens sit side by side in one model (each injection wraps the previous one; remove in
reverse order). A word bound twice, or a token taken twice, is a one-line error before any change.

Files. Textual inversion: diffusers' format, so ``pipe.load_textual_inversion`` reads it; one encoder
``{token: (num_vectors, dim)}``, SDXL ``{"clip_l": ..., "clip_g": ...}``. P+: lorabench's own format,
``{encoder: (layers, num_vectors, dim)}`` with the cross-attention layers' names, in order, in the
metadata (``lorabench_layers``). Both carry the token config in ``lorabench_tokens``. A file without it names its
token by its key (diffusers'), or, an A1111 ``emb_params`` file or an SDXL ``clip_l`` / ``clip_g`` one, by its file
name, as A1111 and ComfyUI prompts name an embedding. A1111's pickled ``.pt`` embeddings (and diffusers' older
``learned_embeds.bin``) are read with ``torch.load(weights_only=True)``: tensors and plain data, no code run.

    tokens = inject_tokens(components, {"name": "pplus", "token": "<sks>", "num_vectors": 2, "bind": "sks"})
    tokens.parameters(); tokens.save("sks.safetensors"); tokens.remove()
"""

from __future__ import annotations

import copy
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from lorabench.errors import ConfigError, check_int
from lorabench.utils.io import atomic_path

METHODS = ("textual_inversion", "pplus")
TOKEN_KEYS = ("name", "token", "num_vectors", "init_word", "bind")
SDXL_KEYS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}


class NewTokenEmbedding(nn.Module):
    """A token embedding with new rows: ``base`` (frozen; an ``nn.Embedding`` or another
    :class:`NewTokenEmbedding`) for every other token, ``new`` (trainable, float32, (groups, n, dim)) for
    the tokens ``ids``. With ``groups`` > 1 the batch holds the prompts once per group, group-major, and
    group g's rows embed its copy. A gradient reaches ``new`` only."""

    def __init__(self, base: nn.Module, ids: list[int], init: torch.Tensor):
        super().__init__()
        self.base = base
        device = self.table().weight.device
        self.register_buffer("ids", torch.tensor(ids, dtype=torch.long, device=device), persistent=False)
        self.new = nn.Parameter(init.detach().float().clone().to(device))

    def table(self) -> nn.Embedding:
        """The model's own embedding table under every wrapper."""
        return self.base.table() if isinstance(self.base, NewTokenEmbedding) else self.base

    @property
    def embedding_dim(self) -> int:
        """The width of an embedding row."""
        return self.table().embedding_dim

    @property
    def weight(self) -> torch.Tensor:
        """The model's table with every wrapper's first-group rows at their ids (what transformers reads
        as the input embeddings' weight, e.g. to size things)."""
        inner = self.base.weight
        n = max(inner.shape[0], int(self.ids.max()) + 1)
        table = torch.cat([inner, inner.new_zeros(n - inner.shape[0], inner.shape[1])])
        return table.index_copy(0, self.ids, self.new[0].to(table.dtype))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        own = isinstance(self.base, nn.Embedding)
        out = self.base(input_ids.clamp(max=self.base.num_embeddings - 1) if own else input_ids)
        groups = self.new.shape[0]
        if groups == 1:
            rows = self.new[0].to(out.dtype)[None]  # (1, n, dim): every prompt
        else:
            if input_ids.shape[0] % groups:
                raise ValueError(f"layer-wise tokens: a batch of {input_ids.shape[0]} prompts is not {groups} "
                                 "groups of equal size (encode prompts with lorabench.models.encode_prompts)")
            per = input_ids.shape[0] // groups
            rows = self.new.to(out.dtype).repeat_interleave(per, dim=0)  # (batch, n, dim)
        for j in range(len(self.ids)):
            out = torch.where((input_ids == self.ids[j]).unsqueeze(-1), rows[:, j, None, :], out)
        return out


class LayerRouting:
    """An attention processor wrapper: a cross-attention layer (``index`` set) reads its own text states,
    ``layer_states[index]``, from the UNet's ``cross_attention_kwargs``; a self-attention layer (``index``
    None) takes the keyword and ignores it. Everything else is the wrapped processor's."""

    def __init__(self, inner, index: Optional[int]):
        self.inner, self.index = inner, index

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 layer_states=None, **kwargs):
        if layer_states is not None and self.index is not None:
            encoder_hidden_states = layer_states[self.index]
        return self.inner(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                          attention_mask=attention_mask, temb=temb, **kwargs)


def cross_attention_layers(unet: nn.Module) -> list[str]:
    """The UNet's cross-attention modules, in execution order of their names (P+'s layers)."""
    return [n for n, m in unet.named_modules() if getattr(m, "is_cross_attention", False)]


def _route(unet: nn.Module) -> None:
    layers = {f"{n}.processor": i for i, n in enumerate(cross_attention_layers(unet))}
    unet.set_attn_processor({k: LayerRouting(p, layers.get(k)) for k, p in unet.attn_processors.items()})


def _unroute(unet: nn.Module) -> None:
    unet.set_attn_processor({k: p.inner if isinstance(p, LayerRouting) else p
                             for k, p in unet.attn_processors.items()})


@contextmanager
def layer_routing(unet: nn.Module) -> Iterator[None]:
    """For the ``with`` block, the UNet's cross-attention layers read their own text states (:class:`LayerRouting`),
    as while P+ tokens are loaded; a UNet already routed is left as it is."""
    if any(isinstance(p, LayerRouting) for p in unet.attn_processors.values()):
        yield
        return
    _route(unet)
    try:
        yield
    finally:
        _unroute(unet)


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
    if cfg["name"] not in METHODS:
        raise ConfigError(f"{field}.name", f"unknown embedding method {cfg['name']!r}; valid: {', '.join(METHODS)}")
    token = cfg.get("token")
    if not isinstance(token, str) or not token.strip() or token != token.strip() or " " in token:
        raise ConfigError(f"{field}.token", f"must be one word without spaces, e.g. '<sks>', got {token!r}")
    check_int(cfg["num_vectors"], f"{field}.num_vectors", minimum=1)
    if cfg["init_word"] is not None and (not isinstance(cfg["init_word"], str) or not cfg["init_word"].strip()):
        raise ConfigError(f"{field}.init_word", f"must be a word or null, got {cfg['init_word']!r}")
    if cfg["bind"] not in (None, False) and (not isinstance(cfg["bind"], str) or not cfg["bind"].strip()):
        raise ConfigError(f"{field}.bind", f"must be a word, null (the concept's word) or false, got {cfg['bind']!r}")
    return cfg


def for_concept(config: Mapping, word: Optional[str], field: str = "embeddings") -> dict:
    """``config`` with a null ``token`` / ``bind`` taken from the concept's word: token ``<word>``, bound
    to ``word`` (how protocols name each concept's tokens). ``bind: false`` binds nothing (prompts name
    the token themselves). A null token with no word is a one-line error."""
    cfg = dict(config)
    if cfg.get("token") is None:
        if not word:
            raise ConfigError(f"{field}.token", "null and no concept word to name it after; give the new token "
                              "(e.g. '<sks>') or data.concept")
        cfg["token"] = f"<{word}>"
    if cfg.get("bind") is None and word:
        cfg["bind"] = word
    return cfg


def token_names(token: str, num_vectors: int) -> list[str]:
    """diffusers' names of a multi-vector token: ``token, token_1, ..., token_{n-1}``."""
    return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


class ConceptTokens:
    """One concept's new tokens in every text encoder of a model (see the module docstring)."""

    def __init__(self, components, config: Mapping, layers: dict[str, NewTokenEmbedding], saved: dict,
                 unet_layers: list[str]):
        self.components, self.config, self.layers, self._saved = components, dict(config), layers, saved
        self.unet_layers = unet_layers  # P+: the cross-attention layers, in the order of the rows

    @classmethod
    def inject(cls, components, config: Mapping, init: Optional[Mapping[str, torch.Tensor]] = None,
               field: str = "embeddings") -> "ConceptTokens":
        """Add the tokens of ``config`` (see :func:`check_tokens_config`); ``init`` (``{encoder: (groups, n,
        dim)}``) replaces the init word's embedding, as when a file is loaded. Checks everything first."""
        cfg = check_tokens_config(config, field)
        names = token_names(cfg["token"], cfg["num_vectors"])
        unet_layers = cross_attention_layers(components.unet) if cfg["name"] == "pplus" else []
        if cfg["name"] == "pplus":
            if not unet_layers:
                raise ConfigError(f"{field}.name", "pplus needs a UNet with cross-attention layers; this one has "
                                  "none (use textual_inversion)")
            if components.text_groups not in (1, len(unet_layers)):
                raise ConfigError(f"{field}.name", f"the model's text is already encoded in {components.text_groups} "
                                  f"groups, not {len(unet_layers)}")
        groups = max(1, len(unet_layers))
        if cfg["bind"] and cfg["bind"] in components.prompt_rewrites:
            raise ConfigError(f"{field}.bind", f"{cfg['bind']!r} already stands for "
                              f"{components.prompt_rewrites[cfg['bind']]!r}; two concepts cannot share a word")
        tokenizers = {"text_encoder": components.tokenizer, "text_encoder_2": components.tokenizer_2}
        plans = {}
        for key, te in components.text_encoders().items():
            tok, emb = tokenizers[key], _token_embedding(te)
            taken = [n for n in names if _known(tok, n)]
            if taken:
                raise ConfigError(f"{field}.token", f"{taken[0]!r} is already in {key}'s vocabulary (a word of the "
                                  "model or another concept's token); a new token must be a string the tokenizer "
                                  "does not know, e.g. '<sks>'")
            dim = emb.embedding_dim
            if init is not None:
                rows = init.get(key)
                if rows is None or tuple(rows.shape) != (groups, len(names), dim):
                    got = None if rows is None else tuple(rows.shape)
                    raise ConfigError(field, f"the embedding file's rows for {key} have shape {got}, but this model "
                                      f"needs {(groups, len(names), dim)}: made for another text encoder or UNet?")
            else:
                table = (emb.table() if isinstance(emb, NewTokenEmbedding) else emb).weight.detach().float()
                ids = tok(cfg["init_word"], add_special_tokens=False).input_ids if cfg["init_word"] else []
                if cfg["init_word"] and not ids:
                    raise ConfigError(f"{field}.init_word", f"{cfg['init_word']!r} gives no token")
                start = table[ids].mean(0) if ids else table.mean(0)  # no word: the table's mean
                rows = start.expand(groups, len(names), dim)
            plans[key] = (tok, te, rows)
        # every check passed: change the model
        saved = {"tokenizer": components.tokenizer, "tokenizer_2": components.tokenizer_2,
                 "prompt_rewrites": dict(components.prompt_rewrites), "text_groups": components.text_groups}
        layers = {}
        for key, (tok, te, rows) in plans.items():
            new_tok = copy.deepcopy(tok)
            new_tok.add_tokens(names)
            layers[key] = NewTokenEmbedding(te.get_input_embeddings(), new_tok.convert_tokens_to_ids(names), rows)
            te.set_input_embeddings(layers[key])
            setattr(components, "tokenizer" if key == "text_encoder" else "tokenizer_2", new_tok)
        rewrites = dict(components.prompt_rewrites)  # applied in order: the bound word, then the token
        if cfg["bind"]:
            rewrites[cfg["bind"]] = names[0]
        if len(names) > 1:  # a multi-vector token reads as all its vectors, as diffusers' pipelines expand it (a
            # prompt naming "<sks>" trained its first row alone, and the file sampled the others untrained)
            rewrites[names[0]] = " ".join(names)
        components.prompt_rewrites = rewrites
        if groups > 1 and components.text_groups == 1:
            _route(components.unet)
            components.text_groups = groups
        return cls(components, cfg, layers, saved, unet_layers)

    # -- what trains ----------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """The new tokens, in order."""
        return token_names(self.config["token"], self.config["num_vectors"])

    def parameters(self) -> list[nn.Parameter]:
        """The new rows of every text encoder: the only trainable tensors."""
        return [layer.new for layer in self.layers.values()]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``{encoder: (groups, num_vectors, dim)}`` (groups: 1, or P+'s layers)."""
        return {key: layer.new.detach() for key, layer in self.layers.items()}

    def remove(self) -> None:
        """Put the model's own embeddings, tokenizers, prompts and attention processors back (the last
        concept added is removed first)."""
        encoders = self.components.text_encoders()
        for key, layer in self.layers.items():
            if encoders[key].get_input_embeddings() is not layer:
                raise RuntimeError("remove concepts' tokens in the reverse order of adding them")
        for key, layer in self.layers.items():
            encoders[key].set_input_embeddings(layer.base)
        comps = self.components
        comps.tokenizer, comps.tokenizer_2 = self._saved["tokenizer"], self._saved["tokenizer_2"]
        comps.prompt_rewrites = self._saved["prompt_rewrites"]
        if comps.text_groups != self._saved["text_groups"]:
            _unroute(comps.unet)
            comps.text_groups = self._saved["text_groups"]
        self.layers = {}

    # -- files ------------------------------------------------------------------------------------------
    def save(self, path, metadata: Optional[Mapping[str, str]] = None) -> Path:
        """Write the tokens (see the module docstring for the formats), atomically."""
        rows = {k: v.float().cpu().contiguous() for k, v in self.state_dict().items()}
        meta = {"format": "pt", "lorabench_tokens": json.dumps(self.config), **dict(metadata or {})}
        if self.config["name"] == "pplus":
            tensors = rows
            meta["lorabench_layers"] = json.dumps(self.unet_layers)
        elif len(rows) == 1:
            tensors = {self.config["token"]: rows["text_encoder"][0]}
        else:
            tensors = {SDXL_KEYS[k]: v[0] for k, v in rows.items()}
        with atomic_path(Path(path)) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return Path(path)


def inject_tokens(components, config: Mapping, field: str = "embeddings") -> ConceptTokens:
    """:meth:`ConceptTokens.inject` with the init word's embedding."""
    return ConceptTokens.inject(components, config, field=field)


A1111_KEY = "emb_params"  # the one tensor of an A1111 (stable-diffusion-webui) embedding saved as safetensors


def _default_token(keys, path) -> Optional[str]:
    """The token a file without lorabench's config names: a one-tensor file's key (diffusers' textual inversion), or
    the file's name for A1111's ``emb_params`` and for SDXL's ``clip_l`` / ``clip_g`` (as A1111 and ComfyUI prompts
    name an embedding); None for any other file."""
    keys = list(keys)
    if len(keys) == 1:
        return Path(path).stem if keys[0] == A1111_KEY else keys[0]
    return Path(path).stem if set(keys) == set(SDXL_KEYS.values()) else None


def _read_pickled(path: Path) -> dict[str, torch.Tensor]:
    """A ``.pt`` / ``.bin`` embedding (A1111's ``{"string_to_param": {"*": rows}, ...}``, diffusers' older
    ``learned_embeds.bin`` ``{token: rows}``) read with ``weights_only`` (tensors and plain data, no code run): its
    rows by key, A1111's under ``emb_params`` (named by the file: :func:`_default_token`)."""
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle's and torch's errors alike: one line naming the file
        raise ConfigError("embeddings.path", f"{path}: not a token file torch reads with weights_only "
                          f"({type(exc).__name__}); give a .safetensors or an A1111 / diffusers .pt / .bin") from None
    if isinstance(state, dict) and isinstance(state.get("string_to_param"), dict):
        rows = state["string_to_param"].get("*")
        if isinstance(rows, torch.Tensor):
            return {A1111_KEY: rows.detach()}
    if isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values()):
        return {k: v.detach() for k, v in state.items()}
    raise ConfigError("embeddings.path", f"{path}: not an embedding (A1111's string_to_param, or tensors by token)")


def _read(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """A token file's metadata and tensors: a ``.safetensors`` (lorabench's, diffusers', A1111's, ComfyUI's), or a
    pickled ``.pt`` / ``.bin`` embedding (:func:`_read_pickled`, no metadata)."""
    if path.suffix in (".pt", ".bin"):
        return {}, _read_pickled(path)
    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as exc:
        raise ConfigError("embeddings.path", f"{path}: not a safetensors file ({exc}); give a .safetensors, or an "
                          "A1111 / diffusers .pt / .bin") from None


def file_tokens(path) -> tuple[list[str], Optional[str]]:
    """A token file's new tokens and the word they are bound to (None: none), without a model: what two concepts'
    files must not share to sit in one model side by side."""
    meta, tensors = _read(Path(path))
    cfg = json.loads(meta["lorabench_tokens"]) if "lorabench_tokens" in meta else {}
    token = cfg.get("token") or _default_token(tensors, path)
    if not token:
        return [], None
    shape = list(next(iter(tensors.values())).shape) if tensors else []
    vectors = cfg.get("num_vectors") or (shape[0] if len(shape) == 2 else 1)  # diffusers': (n, dim) or (dim,)
    return token_names(token, int(vectors)), cfg.get("bind") or None


def token_clash(files: list) -> Optional[str]:
    """Where two of ``files`` add the same token or bind the same word (one model cannot hold both): a phrase naming
    them, else None."""
    seen: dict[str, Path] = {}
    for path in map(Path, files):
        names, bind = file_tokens(path)
        for key in [*(f"add the token {n!r}" for n in names), *([f"bind the word {bind!r}"] if bind else [])]:
            if key in seen:
                return f"{seen[key]} and {path} both {key}"
            seen[key] = path
    return None


def load_tokens(components, path, token: Optional[str] = None, bind: Optional[str] = None) -> ConceptTokens:
    """Add the tokens of a file: lorabench's (textual inversion or P+), any diffusers-format textual inversion, or
    an embedding shared for A1111 or ComfyUI (``.safetensors``, or A1111's pickled ``.pt``). ``token`` / ``bind``
    override the file's."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("embeddings.path", f"{path} is not a file")
    meta, tensors = _read(path)
    cfg = json.loads(meta["lorabench_tokens"]) if "lorabench_tokens" in meta else {"name": "textual_inversion"}
    if cfg.get("name") == "pplus":
        init = tensors
        layers = json.loads(meta.get("lorabench_layers", "[]"))
        if layers != cross_attention_layers(components.unet):
            raise ConfigError("embeddings.path", f"{path}: P+ rows for {len(layers)} cross-attention layers that are "
                              "not this UNet's: made for another model?")
    elif set(tensors) == set(SDXL_KEYS.values()):
        cfg.setdefault("token", _default_token(tensors, path))
        init = {k: tensors[v][None] for k, v in SDXL_KEYS.items()}
    elif len(tensors) == 1:
        (name, rows), = tensors.items()
        cfg.setdefault("token", _default_token(tensors, path))
        init = {"text_encoder": (rows if rows.dim() == 2 else rows[None])[None]}
    else:
        raise ConfigError("embeddings.path", f"{path}: not a token file (one tensor, or clip_l and clip_g, or "
                          f"lorabench's P+), got keys {sorted(tensors)[:4]}")
    if token is not None:
        cfg["token"] = token
    if bind is not None:
        cfg["bind"] = bind
    if "token" not in cfg:
        raise ConfigError("embeddings.token", f"{path} names no token; give one")
    if set(init) != set(components.text_encoders()):
        raise ConfigError("embeddings.path", f"{path} holds rows for {sorted(init)}, the model has text encoders "
                          f"{sorted(components.text_encoders())}: made for another model?")
    cfg["num_vectors"] = int(next(iter(init.values())).shape[1])
    cfg["init_word"] = None
    return ConceptTokens.inject(components, cfg, init=init)
