"""Textual inversion: new tokens whose embedding rows alone train, exported in diffusers' format."""

from __future__ import annotations

import pytest
import torch

from helpers import model_weights, two_steps
from lorabench.adapters.tokens import inject_tokens, load_tokens
from lorabench.errors import ConfigError
from lorabench.models import encode_prompts, load_components


def pipeline_for(path):
    """The diffusers pipeline of a saved model folder (the user's loader for textual inversion)."""
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(str(path), safety_checker=None, requires_safety_checker=False)


def text_states(encoder, tokenizer, prompt):
    ids = tokenizer([prompt], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return encoder(ids, output_hidden_states=True).hidden_states[-2]


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_export_loads_in_diffusers_with_the_same_text_states(arch, scaled_down_models, tmp_path):
    """A trained-looking embedding (random rows), saved and loaded with diffusers' load_textual_inversion,
    gives every text encoder the same hidden states as lorabench's own model, to 1e-5 (fp32)."""
    comps = load_components(str(scaled_down_models[arch]))
    tokens = inject_tokens(comps, {"token": "<sks>", "num_vectors": 2, "init_word": "dog", "bind": "sks"})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in tokens.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    path = tokens.save(tmp_path / "sks.safetensors")
    ours = encode_prompts(comps, ["a photo of sks dog"], "cpu")["encoder_hidden_states"]

    pipe = pipeline_for(scaled_down_models[arch])
    with torch.no_grad():
        if arch == "sd15":
            pipe.load_textual_inversion(str(path))
            prompt = pipe.maybe_convert_prompt("a photo of <sks> dog", pipe.tokenizer)
            theirs = pipe.text_encoder(pipe.tokenizer([prompt], padding="max_length", return_tensors="pt",
                                                      max_length=pipe.tokenizer.model_max_length).input_ids)[0]
        else:
            from safetensors.torch import load_file

            rows = load_file(str(path))
            pipe.load_textual_inversion(rows["clip_l"], token="<sks>", text_encoder=pipe.text_encoder,
                                        tokenizer=pipe.tokenizer)
            pipe.load_textual_inversion(rows["clip_g"], token="<sks>", text_encoder=pipe.text_encoder_2,
                                        tokenizer=pipe.tokenizer_2)
            prompt = pipe.maybe_convert_prompt("a photo of <sks> dog", pipe.tokenizer)
            theirs = torch.cat([text_states(pipe.text_encoder, pipe.tokenizer, prompt),
                                text_states(pipe.text_encoder_2, pipe.tokenizer_2, prompt)], dim=-1)
    assert prompt == "a photo of <sks> <sks>_1 dog"
    assert torch.allclose(ours, theirs, atol=1e-5), float((ours - theirs).abs().max())
    # the base model sees a different prompt: the tokens changed something
    tokens.remove()
    base = encode_prompts(comps, ["a photo of sks dog"], "cpu")["encoder_hidden_states"]
    assert not torch.allclose(base, ours, atol=1e-3)
    # and lorabench reads its own file back to the same states
    again = load_tokens(comps, path)
    assert again.config["bind"] == "sks" and again.names == ["<sks>", "<sks>_1"]
    assert torch.allclose(encode_prompts(comps, ["a photo of sks dog"], "cpu")["encoder_hidden_states"], ours,
                          atol=1e-6)


def test_only_the_new_rows_train(load_tiny):
    """Two optimiser steps through the text encoder change the new rows and nothing else: the base table
    and every other weight stay bit-identical; after remove() the tokenizer is the model's own again."""
    comps = load_tiny()
    tok_before = comps.tokenizer
    before = {k: v.clone() for k, v in comps.text_encoder.state_dict().items()}
    tokens = inject_tokens(comps, {"token": "<sks>", "num_vectors": 2, "init_word": "dog", "bind": "sks"})
    trainable = [p for p in comps.text_encoder.parameters() if p.requires_grad]
    assert trainable == tokens.parameters()
    start = [p.detach().clone() for p in tokens.parameters()]
    opt = torch.optim.AdamW(tokens.parameters(), lr=1e-2)
    for _ in range(2):
        states = encode_prompts(comps, ["a sks dog", "a photo of sks"], "cpu")["encoder_hidden_states"]
        states.square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert all(not torch.equal(a, p) for a, p in zip(start, tokens.parameters()))
    tokens.remove()
    after = comps.text_encoder.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)
    assert comps.tokenizer is tok_before and comps.prompt_rewrites == {}


def test_bad_token_inputs_are_one_line_errors(load_tiny, scaled_down_models, tmp_path):
    comps = load_tiny()
    with pytest.raises(ConfigError, match="embeddings.token.*already in text_encoder's vocabulary"):
        inject_tokens(comps, {"token": "dog"})
    with pytest.raises(ConfigError, match="embeddings.token: must be one word"):
        inject_tokens(comps, {"token": "<a b>"})
    with pytest.raises(ConfigError, match="embeddings.num_vectors"):
        inject_tokens(comps, {"token": "<x>", "num_vectors": 0})
    with pytest.raises(ConfigError, match="embeddings.colour: not an option"):
        inject_tokens(comps, {"token": "<x>", "colour": 1})
    # an embedding file for another text encoder (the SD1.5-shaped model's width) is refused, and the model
    # is left as it was
    other = load_components(str(scaled_down_models["sdxl"]))
    path = inject_tokens(other, {"token": "<sks>"}).save(tmp_path / "sdxl.safetensors")
    with pytest.raises(ConfigError, match="holds rows for .*text_encoder_2"):
        load_tokens(comps, path)
    sd15 = load_components(str(scaled_down_models["sd15"]))
    one = inject_tokens(sd15, {"token": "<w>"})
    wide = tmp_path / "wide.safetensors"
    from safetensors.torch import save_file

    save_file({"<w>": torch.zeros(1, one.parameters()[0].shape[1] * 2)}, str(wide))
    with pytest.raises(ConfigError, match="made for another text encoder"):
        load_tokens(comps, wide)
    assert "<w>" not in comps.tokenizer.get_vocab() and comps.prompt_rewrites == {}


def cross_attention_inputs(comps, cond):
    """What every cross-attention layer's to_k reads, by layer, in one UNet call."""
    from lorabench.adapters.tokens import cross_attention_layers
    from lorabench.models import denoise

    seen, hooks = {}, []
    for name in cross_attention_layers(comps.unet):
        mod = comps.unet.get_submodule(name).to_k
        hooks.append(mod.register_forward_hook(lambda m, args, out, name=name: seen.__setitem__(name, args[0])))
    latent = torch.randn(1, comps.unet.config.in_channels, comps.unet.config.sample_size,
                         comps.unet.config.sample_size, generator=torch.Generator().manual_seed(0))
    out = denoise(comps.unet, latent, torch.tensor([500]), cond, torch.float32)
    for h in hooks:
        h.remove()
    return seen, out


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_pplus_routes_each_cross_attention_layer_to_its_own_rows(arch, scaled_down_models, tmp_path):
    """P+: cross-attention layer l reads exactly the text states of textual inversion with P+'s rows of layer
    l (1e-5, fp32); the lorabench file loads back to the same UNet output; remove() restores the model."""
    from lorabench.adapters.tokens import cross_attention_layers

    comps = load_components(str(scaled_down_models[arch]))
    layers = cross_attention_layers(comps.unet)
    assert len(layers) > 2
    plain_processors = dict(comps.unet.attn_processors)
    tokens = inject_tokens(comps, {"name": "pplus", "token": "<sks>", "num_vectors": 2, "bind": "sks"})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in tokens.parameters():
            assert p.shape[:2] == (len(layers), 2)
            p.copy_(torch.randn(p.shape, generator=g))
    rows = {k: v.clone() for k, v in tokens.state_dict().items()}
    cond = encode_prompts(comps, ["a photo of sks dog"], "cpu")
    seen, out = cross_attention_inputs(comps, cond)
    path = tokens.save(tmp_path / "pplus.safetensors")
    tokens.remove()
    assert comps.text_groups == 1 and dict(comps.unet.attn_processors).keys() == plain_processors.keys()
    assert all(type(p) is type(plain_processors[k]) for k, p in comps.unet.attn_processors.items())
    for i, name in enumerate(layers[:: max(1, len(layers) // 4)] + [layers[-1]]):
        i = layers.index(name)
        ti = load_tokens_rows(comps, {k: v[i:i + 1] for k, v in rows.items()})
        want = encode_prompts(comps, ["a photo of sks dog"], "cpu")["encoder_hidden_states"]
        ti.remove()
        assert torch.allclose(seen[name], want, atol=1e-5), name
    again = load_tokens(comps, path)
    assert again.config["name"] == "pplus" and comps.text_groups == len(layers)
    _, out_again = cross_attention_inputs(comps, encode_prompts(comps, ["a photo of sks dog"], "cpu"))
    assert torch.allclose(out, out_again, atol=1e-6)


def load_tokens_rows(comps, rows):
    """Textual inversion of <sks> x2 bound to sks with the given rows ({encoder: (1, 2, dim)})."""
    from lorabench.adapters.tokens import ConceptTokens

    return ConceptTokens.inject(comps, {"token": "<sks>", "num_vectors": 2, "bind": "sks"}, init=rows)


def test_pplus_trains_only_its_rows_through_the_unet(load_tiny):
    """Two steps of the diffusion loss through a frozen UNet and text encoder change P+'s rows of every layer
    and leave every model weight bit-identical."""
    from lorabench.training import DiffusionFineTuner

    comps = load_tiny()
    before = model_weights(comps)
    module = DiffusionFineTuner(comps, adapter=None, optim={"lr": 1e-2},
                                embeddings={"name": "pplus", "token": "<sks>", "num_vectors": 2, "bind": "sks"})
    trainable = [p for p in module.parameters() if p.requires_grad]
    assert trainable == module.tokens.parameters()
    start = [p.detach().clone() for p in trainable]
    two_steps(module, torch.optim.AdamW(trainable, lr=1e-2))
    for a, p in zip(start, trainable):
        changed = (a != p.detach()).flatten(1).any(1)  # per layer group
        assert changed.all()
    module.tokens.remove()
    after = model_weights(comps)
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)


def test_concepts_side_by_side(load_tiny):
    """Two concepts' tokens in one model: each bound word reads its own tokens; a second concept with the
    same token or the same word is a one-line error that changes nothing; removal is last-in first-out. A
    two-vector token named in a prompt reads as both vectors (it read as its first alone: the second row trained
    nothing, and diffusers' pipelines, which expand it, sampled that row untrained)."""
    from lorabench.models.components import rewrite_prompt

    comps = load_tiny()
    a = inject_tokens(comps, {"name": "pplus", "token": "<sks>", "num_vectors": 2, "bind": "sks"})
    b = inject_tokens(comps, {"name": "textual_inversion", "token": "<twt>", "bind": "photo"})
    def read(prompt):
        return rewrite_prompt(prompt, comps.prompt_rewrites)

    # each word its own tokens, a two-vector token both of its vectors (written or bound), never twice
    assert read("a sks photo") == read("a <sks> <twt>") == "a <sks> <sks>_1 <twt>"
    before = dict(comps.prompt_rewrites)
    for cfg, fragment in (({"token": "<sks>", "bind": "dog"}, "'<sks>' is already in text_encoder's vocabulary"),
                          ({"token": "<new>", "bind": "sks"}, "two concepts cannot share a word")):
        with pytest.raises(ConfigError, match=fragment) as exc:
            inject_tokens(comps, cfg)
        assert "\n" not in str(exc.value)
    assert comps.prompt_rewrites == before
    with pytest.raises(RuntimeError, match="reverse order"):
        a.remove()
    b.remove()
    a.remove()
    assert comps.prompt_rewrites == {} and comps.text_groups == 1


def test_a_token_files_tokens_read_from_its_header_say_which_files_clash(load_tiny, tmp_path):
    """What the merge job checks before it copies its inputs' token files into one run: the tokens and bound word of
    lorabench's files (textual inversion with two vectors, P+) and of a diffusers one (a bare (dim,) row, its key
    the token), read without a model, and the first pair of files that one model could not hold side by side."""
    from safetensors.torch import save_file

    from lorabench.adapters.tokens import file_tokens, token_clash

    comps = load_tiny()
    ti = inject_tokens(comps, {"token": "<sks>", "num_vectors": 2, "bind": "sks"})
    ti_file = ti.save(tmp_path / "ti.safetensors")
    ti.remove()
    pplus = inject_tokens(comps, {"name": "pplus", "token": "<zwz>", "bind": "sks"})
    pplus_file = pplus.save(tmp_path / "pplus.safetensors")
    pplus.remove()
    bare = tmp_path / "learned_embeds.safetensors"
    save_file({"<cat-toy>": torch.zeros(32)}, str(bare))
    assert file_tokens(ti_file) == (["<sks>", "<sks>_1"], "sks")
    assert file_tokens(pplus_file) == (["<zwz>"], "sks")
    assert file_tokens(bare) == (["<cat-toy>"], None)
    assert token_clash([ti_file, bare]) is None
    assert token_clash([ti_file, bare, pplus_file]) == f"{ti_file} and {pplus_file} both bind the word 'sks'"
    assert token_clash([bare, tmp_path / "ti.safetensors", bare]) == f"{bare} and {bare} both add the token '<cat-toy>'"


class _RunsCode:
    """A pickled object whose loading would call a function (what ``weights_only`` refuses)."""

    def __reduce__(self):
        return (print, ("this ran",))


def test_a1111_and_sdxl_embedding_files_name_their_token_by_the_file(load_tiny, scaled_down_models, tmp_path):
    """Embeddings shared for A1111 and ComfyUI: an SD1.5 one saved as ``{"emb_params": (n, dim)}`` took the token
    ``emb_params`` (two such files clashed), and an SDXL one (``clip_l`` / ``clip_g``) was "names no token; give one",
    which the sample job gives no way to. Both now take their file's name, as A1111's and ComfyUI's prompts do.
    A1111's pickled ``.pt`` embeddings (and diffusers' ``learned_embeds.bin``) load too, read with ``weights_only``."""
    from safetensors.torch import save_file

    from lorabench.adapters.tokens import file_tokens, load_tokens
    from lorabench.models.components import rewrite_prompt

    comps = load_tiny()
    dim = comps.text_encoder.get_input_embeddings().embedding_dim
    a1111 = tmp_path / "my-style.safetensors"
    save_file({"emb_params": torch.randn(2, dim)}, str(a1111))
    assert file_tokens(a1111) == (["my-style", "my-style_1"], None)
    tokens = load_tokens(comps, a1111)
    assert tokens.names == ["my-style", "my-style_1"]
    assert rewrite_prompt("a my-style circle", comps.prompt_rewrites) == "a my-style my-style_1 circle"
    tokens.remove()
    # A1111's pickled .pt (string_to_param, as its webui saves it) and diffusers' older learned_embeds.bin
    rows = torch.randn(2, dim)
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.nn.Parameter(rows.clone())},
                "name": "old-style", "step": 500, "sd_checkpoint": "e1441589", "sd_checkpoint_name": "v1-5"},
               tmp_path / "old-style.pt")
    torch.save({"<cat-toy>": rows[0].clone()}, tmp_path / "learned_embeds.bin")
    assert file_tokens(tmp_path / "old-style.pt") == (["old-style", "old-style_1"], None)
    tokens = load_tokens(comps, tmp_path / "old-style.pt")  # was "not a safetensors file" (safetensors' error)
    assert tokens.names == ["old-style", "old-style_1"] and torch.equal(tokens.state_dict()["text_encoder"][0], rows)
    tokens.remove()
    assert load_tokens(comps, tmp_path / "learned_embeds.bin").names == ["<cat-toy>"]
    # a pickle that would run code is refused, not run
    torch.save({"x": _RunsCode()}, tmp_path / "evil.pt")
    with pytest.raises(ConfigError, match="evil.pt: not a token file torch reads with weights_only") as err:
        load_tokens(comps, tmp_path / "evil.pt")
    assert "\n" not in str(err.value)
    (tmp_path / "notes.safetensors").write_text("not a tensor file\n")  # was safetensors' own traceback
    with pytest.raises(ConfigError, match="notes.safetensors: not a safetensors file"):
        load_tokens(comps, tmp_path / "notes.safetensors")
    sdxl = load_components(str(scaled_down_models["sdxl"]))
    dims = {k: sdxl.text_encoders()[e].get_input_embeddings().embedding_dim
            for k, e in (("clip_l", "text_encoder"), ("clip_g", "text_encoder_2"))}
    shared = tmp_path / "neon-look.safetensors"
    save_file({k: torch.randn(1, d) for k, d in dims.items()}, str(shared))
    assert file_tokens(shared) == (["neon-look"], None)
    assert load_tokens(sdxl, shared).names == ["neon-look"]  # was "names no token; give one"


def test_pplus_needs_cross_attention(load_tiny):
    from diffusers import UNet2DConditionModel

    comps = load_tiny()
    comps.unet = UNet2DConditionModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 8),
                                      down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
                                      mid_block_type="UNetMidBlock2D", norm_num_groups=4, cross_attention_dim=32)
    with pytest.raises(ConfigError, match="embeddings.name: pplus needs a UNet with cross-attention layers"):
        inject_tokens(comps, {"name": "pplus", "token": "<sks>"})


@pytest.mark.parametrize("adapter", [
    {"name": "lora", "rank": 2, "text_encoder_targets": ["q_proj", "k_proj", "v_proj", "out_proj"]},  # ED-LoRA
    {"name": "ortho", "rank": 2, "row_mode": "random", "concept_key": "sks",                         # OrthA (paper)
     "text_encoder_targets": ["q_proj", "k_proj", "v_proj", "out_proj"]},
])
def test_adapter_and_layerwise_tokens_train_exactly_their_parameters(adapter, load_tiny):
    """ED-LoRA and OrthA as the paper trains it: after two steps every trainable adapter tensor (UNet and
    text encoder) and the P+ rows (their own optimiser group, at embedding_lr) have changed; OrthA's frozen
    down and every model weight are bit-identical."""
    from lorabench.training import DiffusionFineTuner

    comps = load_tiny()
    before = model_weights(comps)
    module = DiffusionFineTuner(comps, adapter=adapter, optim={"lr": 1e-2, "embedding_lr": 5e-2},
                                embeddings={"name": "pplus", "token": "<sks>", "num_vectors": 2, "bind": "sks"})
    assert any(k.startswith("text_encoder.") for k in module.adapters.layers)
    ptrs = {p.data_ptr() for p in module.adapters.trainable_parameters()}
    frozen = {k: t.clone() for k, t in module.adapters.state_dict().items() if t.data_ptr() not in ptrs}
    trainable = module.adapters.trainable_parameters() + module.tokens.parameters()
    assert {id(p) for p in module.parameters() if p.requires_grad} == {id(p) for p in trainable}
    start = [p.detach().clone() for p in trainable]
    import lightning as L

    module.trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                               enable_progress_bar=False)
    opt = module.configure_optimizers()["optimizer"]  # the tokens in their own group, at embedding_lr
    lrs = {id(p): group["lr"] for group in opt.param_groups for p in group["params"]}
    assert all(lrs[id(p)] == 5e-2 for p in module.tokens.parameters())
    assert all(lrs[id(p)] == 1e-2 for p in module.adapters.trainable_parameters())
    two_steps(module, opt)
    assert all(not torch.equal(a, p) for a, p in zip(start, trainable))
    now = module.adapters.state_dict()
    assert all(torch.equal(frozen[k], now[k]) for k in frozen)
    assert (adapter["name"] == "ortho") == bool(frozen)  # OrthA's down is frozen, LoRA has none
    module.tokens.remove()
    module.adapters.remove()
    after = model_weights(comps)
    assert all(torch.equal(before[k], after[k]) for k in before)
