"""Tiny, randomly initialised models of the real classes, built from config.

The tests and the smoke run (experiment=quickstart) use these: a diffusers
``UNet2DConditionModel``, a transformers ``CLIPTextModel`` and a ``CLIPTokenizer``
written to the standard ``vocab.json`` / ``merges.txt`` files, optionally a tiny
``AutoencoderKL``. Saved with :func:`save_components` they load back through the
same :func:`load_components` users call for SD1.5.

    lorabench tiny-model tiny-sd           # a tiny SD1.5-shaped model folder, with a VAE
    lorabench tiny-model tiny-px --pixel   # pixel space, as model=tiny builds (no VAE)

The saved folder with a VAE is a diffusers pipeline (``StableDiffusionPipeline.from_pretrained``, 16 x 16
images) and lorabench's model (``model=sd15 model.pretrained=tiny-sd model.name=tiny model.resolution=16``).
A pixel-space folder is lorabench's only: a diffusers pipeline needs a VAE.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from lorabench.checks import check_writable
from lorabench.errors import ConfigError
from lorabench.models.components import ModelComponents, save_components
from lorabench.utils.console import quiet_cells

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable unicode map (the base alphabet of the BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one word (lower-case ASCII), as ``CLIPTokenizer.bpe`` does it."""
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    while len(pieces) > 1:
        pairs = {(pieces[i], pieces[i + 1]) for i in range(len(pieces) - 1)}
        best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(pieces):
            if i < len(pieces) - 1 and (pieces[i], pieces[i + 1]) == best:
                merged.append(pieces[i] + pieces[i + 1])
                i += 2
            else:
                merged.append(pieces[i])
                i += 1
        pieces = merged
    return pieces


def write_clip_tokenizer(folder: str | Path, words: Iterable[str] = (), max_length: int = 77) -> Path:
    """Write a CLIP BPE tokenizer whose vocabulary is the byte alphabet plus ``words`` as whole tokens.

    Every word in ``words`` becomes one token (merges are built by simulating CLIP's BPE, so
    words sharing letter pairs do not break each other); any other text still tokenizes.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for tok in alphabet + [c + "</w>" for c in alphabet]:
        vocab.setdefault(tok, len(vocab))
    ranks: dict[tuple[str, str], int] = {}
    for word in sorted(set(w.lower() for w in words)):
        if len(word) < 2 or not word.isascii() or not word.isalnum():
            continue
        # Simulate CLIP's BPE with the merges so far and append merges until the word is one token.
        # Appended merges rank last, so they never split a word that is already whole.
        while len(pieces := _bpe(word, ranks)) > 1:
            ranks[(pieces[0], pieces[1])] = len(ranks)
            vocab.setdefault(pieces[0] + pieces[1], len(vocab))
    merges = [f"{a} {b}" for (a, b), _ in sorted(ranks.items(), key=lambda kv: kv[1])]
    vocab.setdefault(BOS, len(vocab))
    vocab.setdefault(EOS, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "bos_token": BOS,
        "eos_token": EOS, "unk_token": EOS, "pad_token": EOS, "do_lower_case": True}))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}))
    return folder


def build_tiny_components(
    *,
    seed: int = 0,
    name: str = "tiny",
    resolution: int = 16,
    in_channels: int = 3,
    block_out_channels: Sequence[int] = (32, 64),
    layers_per_block: int = 1,
    cross_attention_dim: int = 32,
    attention_head_dim: int = 8,
    norm_num_groups: int = 8,
    use_linear_projection: bool = False,
    text_hidden_size: int = 32,
    text_layers: int = 2,
    text_max_length: int = 16,
    words: Iterable[str] = (),
    with_vae: bool = False,
    prediction_type: str = "epsilon",
    num_train_timesteps: int = 1000,
    beta_schedule: str = "scaled_linear",
    timestep_spacing: str = "leading",
    tokenizer_dir: Optional[str] = None,
    sdxl: bool = False,
) -> ModelComponents:
    """Build a tiny random text-to-image model. Pixel space unless ``with_vae``.

    ``sdxl=True`` builds SDXL's shape: two text encoders (the second with a projection) whose
    hidden states are concatenated, and a UNet with ``text_time`` added conditioning.
    """
    torch.manual_seed(seed)
    down = ["CrossAttnDownBlock2D"] * (len(block_out_channels) - 1) + ["DownBlock2D"]
    up = ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (len(block_out_channels) - 1)
    latent_channels = 4 if with_vae else in_channels
    vae = None
    sample_size = resolution
    if with_vae:
        vae = AutoencoderKL(in_channels=in_channels, out_channels=in_channels, latent_channels=4,
                            block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, sample_size=resolution)
        sample_size = resolution // 2
    te_hidden = cross_attention_dim // 2 if sdxl else text_hidden_size
    extra = {}
    if sdxl:
        extra = dict(addition_embed_type="text_time", addition_time_embed_dim=8,
                     projection_class_embeddings_input_dim=6 * 8 + te_hidden)
    elif text_hidden_size != cross_attention_dim:
        raise ValueError("text_hidden_size must equal cross_attention_dim (the UNet attends to the text states)")
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=latent_channels, out_channels=latent_channels,
        block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
        down_block_types=tuple(down), up_block_types=tuple(up), cross_attention_dim=cross_attention_dim,
        attention_head_dim=attention_head_dim, norm_num_groups=norm_num_groups,
        use_linear_projection=use_linear_projection, **extra)
    tmp = None
    if tokenizer_dir is None:
        tmp = tempfile.TemporaryDirectory()
        tokenizer_dir = tmp.name
        write_clip_tokenizer(tokenizer_dir, words=words, max_length=text_max_length)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    if tmp is not None:
        tmp.cleanup()
    vocab = tokenizer.get_vocab()
    text_config = CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=te_hidden, intermediate_size=2 * te_hidden,
        num_attention_heads=max(1, te_hidden // 8), num_hidden_layers=text_layers,
        max_position_embeddings=text_max_length, projection_dim=te_hidden,
        bos_token_id=vocab[BOS], eos_token_id=vocab[EOS], pad_token_id=vocab[EOS])
    text_encoder = CLIPTextModel(text_config)
    text_encoder_2 = CLIPTextModelWithProjection(text_config) if sdxl else None
    scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                              beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type,
                              clip_sample=False, steps_offset=1, timestep_spacing=timestep_spacing)
    return ModelComponents(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                           text_encoder_2=text_encoder_2, tokenizer_2=tokenizer if sdxl else None,
                           noise_scheduler=scheduler, name=name, model_id=f"random:{name}:seed{seed}",
                           resolution=resolution).freeze()


def _text(hidden: int, layers: int = 2, heads: int | None = None, intermediate: int | None = None,
          projection: int | None = None) -> dict:
    return dict(hidden=hidden, layers=layers, heads=heads or max(1, hidden // 8),
                intermediate=intermediate or 2 * hidden, projection=projection or hidden)


# The published architectures, scaled down: the same block types, block counts, layers per block,
# attention layout (linear projections, per-block transformer depth, added time conditioning) and
# encoder pairing as SD1.5 and SDXL's diffusers configs; only widths (and SDXL's deepest transformer
# stack, 10 -> 2) shrink. What full-scale dry runs load through ``model.pretrained=<folder>``.
SCALED_DOWN = {
    "sd15": dict(
        unet=dict(down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                  block_out_channels=(32, 32, 64, 64), layers_per_block=2, attention_head_dim=8,  # SD1.5: 320..1280
                  norm_num_groups=32, use_linear_projection=False),
        text=(_text(32),), vae=(32,) * 4, vocab=None),  # CLIP ViT-L/14's text tower (768); VAE: 4 blocks, 8x down
    "sdxl": dict(
        unet=dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                  block_out_channels=(32, 64, 64), layers_per_block=2, transformer_layers_per_block=(1, 2, 2),
                  attention_head_dim=(2, 4, 4), norm_num_groups=32, use_linear_projection=True,  # SDXL: (5, 10, 20)
                  addition_embed_type="text_time", addition_time_embed_dim=8),
        text=(_text(16), _text(32)), vae=(32,) * 4, vocab=None),  # CLIP ViT-L (768) + OpenCLIP bigG (1280)
}
# The published architectures at their real sizes (the diffusers configs of stable-diffusion-v1-5 and
# stable-diffusion-xl-base-1.0: UNet, text encoders, VAE), with random weights: what bench/bench_full_scale.py
# times on a GPU (SD1.5: 860M UNet parameters and a 123M text encoder; SDXL: 2.6B, 123M and 695M).
FULL_SIZE = {
    "sd15": dict(
        unet=dict(SCALED_DOWN["sd15"]["unet"], block_out_channels=(320, 640, 1280, 1280)),
        text=(_text(768, 12, 12, 3072),), vae=(128, 256, 512, 512), vocab=49408),
    "sdxl": dict(
        unet=dict(SCALED_DOWN["sdxl"]["unet"], block_out_channels=(320, 640, 1280),
                  transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), addition_time_embed_dim=256),
        text=(_text(768, 12, 12, 3072), _text(1280, 32, 20, 5120, 1280)), vae=(128, 256, 512, 512), vocab=49408),
}


# what the real models' model_index.json say their pipelines sample with (SD1.5: PNDM; SDXL base: Euler,
# zero embeddings for an empty negative prompt)
PIPELINE_DEFAULTS = {"sd15": {"scheduler": "PNDMScheduler"},
                     "sdxl": {"scheduler": "EulerDiscreteScheduler", "force_zeros_for_empty_prompt": True}}


def build_scaled_down(arch: str, *, seed: int = 0, resolution: int = 64, words: Iterable[str] = (),
                      text_max_length: int = 16, full_size: bool = False) -> ModelComponents:
    """A randomly initialised ``arch`` (``sd15`` | ``sdxl``) model with tiny widths (``full_size``: the
    real widths, :data:`FULL_SIZE`), latent space (an ``AutoencoderKL`` with the real 4 blocks, so 8x
    down-sampling: ``resolution`` must be a multiple of 8 x the UNet's down-sampling)."""
    specs = FULL_SIZE if full_size else SCALED_DOWN
    if arch not in specs:
        raise ValueError(f"arch must be one of {sorted(specs)}, got {arch!r}")
    spec = specs[arch]
    n_vae = len(spec["vae"])
    factor = 2 ** (n_vae - 1) * 2 ** (len(spec["unet"]["down_block_types"]) - 1)
    if resolution % factor:
        raise ValueError(f"resolution must be a multiple of {factor} for {arch}, got {resolution}")
    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=spec["vae"],
                        down_block_types=("DownEncoderBlock2D",) * n_vae,
                        up_block_types=("UpDecoderBlock2D",) * n_vae, layers_per_block=2,
                        norm_num_groups=32, sample_size=resolution)
    with tempfile.TemporaryDirectory() as tok_dir:
        write_clip_tokenizer(tok_dir, words=words, max_length=text_max_length)
        tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    vocab = tokenizer.get_vocab()

    def text_config(t: dict) -> CLIPTextConfig:
        return CLIPTextConfig(vocab_size=max(spec["vocab"] or 0, len(vocab)), hidden_size=t["hidden"],
                              intermediate_size=t["intermediate"], num_attention_heads=t["heads"],
                              num_hidden_layers=t["layers"], max_position_embeddings=text_max_length,
                              projection_dim=t["projection"],
                              bos_token_id=vocab[BOS], eos_token_id=vocab[EOS], pad_token_id=vocab[EOS])

    texts = spec["text"]
    extra = {}
    text_encoder, text_encoder_2 = CLIPTextModel(text_config(texts[0])), None
    if len(texts) == 2:
        text_encoder_2 = CLIPTextModelWithProjection(text_config(texts[1]))
        extra["projection_class_embeddings_input_dim"] = 6 * spec["unet"]["addition_time_embed_dim"] + \
            texts[1]["projection"]
    unet = UNet2DConditionModel(sample_size=resolution // 2 ** (n_vae - 1), in_channels=4, out_channels=4,
                                cross_attention_dim=sum(t["hidden"] for t in texts), **spec["unet"], **extra)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, prediction_type="epsilon", clip_sample=False, steps_offset=1,
                              timestep_spacing="leading")
    return ModelComponents(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                           text_encoder_2=text_encoder_2, tokenizer_2=tokenizer if text_encoder_2 else None,
                           noise_scheduler=scheduler, name=f"{arch}-{'full-size' if full_size else 'scaled-down'}",
                           model_id=f"random:{arch}:seed{seed}",
                           resolution=resolution, pipeline_defaults=PIPELINE_DEFAULTS[arch]).freeze()


def main(argv: Optional[Sequence[str]] = None) -> None:
    """``lorabench tiny-model <folder>``: save a tiny random model in diffusers' folder layout."""
    parser = argparse.ArgumentParser(prog="lorabench tiny-model", description="Save a tiny random "
                                     "text-to-image model (SD1.5's classes) as a diffusers folder.")
    parser.add_argument("folder", help="where to write it (must not exist)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pixel", action="store_true", help="pixel space, no VAE (not a diffusers pipeline)")
    parser.add_argument("--words", nargs="*", default=["sks", "photo", "dog"],
                        help="words the tokenizer keeps whole (others are split into characters)")
    args = parser.parse_args(argv)
    if Path(args.folder).exists():
        parser.error(f"folder: {args.folder!r} exists; give a new folder")
    try:
        check_writable(args.folder, "folder")
    except ConfigError as err:
        parser.error(str(err))
    with quiet_cells():  # transformers' "Writing model shards" bar, for a model of a few kilobytes
        comps = build_tiny_components(seed=args.seed, with_vae=not args.pixel, words=args.words)
        save_components(comps, args.folder)
    kind = "pixel space, lorabench only" if args.pixel else "with a VAE: also a diffusers StableDiffusionPipeline"
    print(f"wrote {args.folder} ({kind}); train on it with: lorabench experiment=quickstart model=sd15 "
          f"model.pretrained={args.folder} model.name=tiny model.resolution=16")
