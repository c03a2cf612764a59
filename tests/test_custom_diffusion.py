"""Custom Diffusion: K / V of cross-attention trained whole with a modifier token, its diffusers export,
and its constrained merge."""

from __future__ import annotations

import pytest
import torch

from helpers import model_weights, two_steps
from lorabench.adapters import inject_adapters
from lorabench.adapters.custom_diffusion import CUSTOM_DIFFUSION_FILE, export_custom_diffusion
from lorabench.adapters.tokens import inject_tokens
from lorabench.errors import ConfigError
from lorabench.merging import AdapterUpdate, merge
from lorabench.models import denoise, encode_prompts, load_components

CD = {"name": "custom_diffusion", "target_modules": ["attn2.to_k", "attn2.to_v"]}


def unet_out(comps, cond):
    cfg = comps.unet.config
    g = torch.Generator().manual_seed(0)
    latent = torch.randn(1, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    return denoise(comps.unet, latent, torch.tensor([500]), cond, torch.float32)


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_export_loads_in_diffusers_with_the_same_unet_output(arch, scaled_down_models, tmp_path):
    """The K / V weights (diffusers' Custom Diffusion file, unet.load_attn_procs) and the modifier token
    (its textual-inversion file) give diffusers' pipeline the same UNet output as lorabench's model, 1e-5."""
    from diffusers import DiffusionPipeline
    from safetensors.torch import load_file

    comps = load_components(str(scaled_down_models[arch]))
    adapters = inject_adapters(comps, CD)
    assert adapters.layers and all(".attn2." in k for k in adapters.layers)
    tokens = inject_tokens(comps, {"token": "<sks>", "bind": "sks"})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in [*adapters.trainable_parameters(), *tokens.parameters()]:
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    export_custom_diffusion(adapters, tmp_path / CUSTOM_DIFFUSION_FILE)
    tokens.save(tmp_path / "sks.safetensors")
    ours = unet_out(comps, encode_prompts(comps, ["a photo of sks dog"], "cpu"))

    pipe = DiffusionPipeline.from_pretrained(str(scaled_down_models[arch]), safety_checker=None,
                                             requires_safety_checker=False)
    pipe.unet.load_attn_procs(str(tmp_path), weight_name=CUSTOM_DIFFUSION_FILE, _pipeline=pipe)
    assert any(type(p).__name__.startswith("CustomDiffusion") for p in pipe.unet.attn_processors.values())
    if arch == "sd15":
        pipe.load_textual_inversion(str(tmp_path / "sks.safetensors"))
    else:
        rows = load_file(str(tmp_path / "sks.safetensors"))
        pipe.load_textual_inversion(rows["clip_l"], token="<sks>", text_encoder=pipe.text_encoder,
                                    tokenizer=pipe.tokenizer)
        pipe.load_textual_inversion(rows["clip_g"], token="<sks>", text_encoder=pipe.text_encoder_2,
                                    tokenizer=pipe.tokenizer_2)
    with torch.no_grad():
        kwargs = dict(prompt="a photo of <sks> dog", device="cpu", num_images_per_prompt=1,
                      do_classifier_free_guidance=False)
        if arch == "sd15":
            states, _ = pipe.encode_prompt(**kwargs)
            cond = {"encoder_hidden_states": states}
        else:
            states, _, pooled, _ = pipe.encode_prompt(**kwargs)
            res = comps.resolution
            cond = {"encoder_hidden_states": states, "added_cond_kwargs": {
                "text_embeds": pooled, "time_ids": torch.tensor([[res, res, 0, 0, res, res]], dtype=states.dtype)}}
        theirs = unet_out(pipe, cond)
    assert torch.allclose(ours, theirs, atol=1e-5), float((ours - theirs).abs().max())


def test_only_kv_and_the_token_train(load_tiny):
    """Two steps change the K / V deltas of every cross-attention layer and the token's row, and nothing
    else: every UNet and text-encoder weight stays bit-identical."""
    from lorabench.training import DiffusionFineTuner

    comps = load_tiny()
    before = model_weights(comps)
    module = DiffusionFineTuner(comps, adapter=CD, optim={"lr": 1e-2}, embeddings={"token": "<sks>", "bind": "sks"})
    trainable = [p for p in module.parameters() if p.requires_grad]
    assert len(trainable) == len(module.adapters.layers) + 1
    start = [p.detach().clone() for p in trainable]
    two_steps(module, torch.optim.AdamW(trainable, lr=1e-2))
    assert all(not torch.equal(a, p) for a, p in zip(start, trainable))
    module.tokens.remove()
    module.adapters.remove()
    after = model_weights(comps)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_export_needs_k_and_v_together(load_tiny, tmp_path):
    comps = load_tiny()
    adapters = inject_adapters(comps, {"name": "custom_diffusion", "target_modules": ["attn2.to_k"]})
    with pytest.raises(ConfigError, match="adapt both"):
        export_custom_diffusion(adapters, tmp_path / "x.safetensors")


def test_constrained_merge_keeps_each_concept_and_is_the_least_change():
    """The merged update maps every concept's target-word features as its own model (to 1e-8) and, among
    updates that do, changes the regularisation features' outputs least."""
    g = torch.Generator().manual_seed(0)
    n_in, n_out, n_reg = 12, 6, 40
    reg_rows = torch.randn(n_reg, n_in, generator=g, dtype=torch.float64)
    reg = reg_rows.T @ reg_rows / n_reg
    ups, stats = [], []
    for i in range(3):
        dw = torch.randn(n_out, n_in, generator=g)
        ups.append(AdapterUpdate(f"c{i}", {"l": (dw, torch.eye(n_in))}))
        stats.append({"l": {"rows": torch.randn(2, n_in, generator=g, dtype=torch.float64), "reg": reg}})
    res = merge(ups, {"name": "custom_diffusion", "ridge": 1e-12}, stats=stats)
    d = res.deltas["l"].dense.double()
    for u, s in zip(ups, stats):
        rows = s["l"]["rows"]
        assert torch.allclose(d @ rows.T, u.delta("l").double() @ rows.T, atol=1e-5)
    assert max(res.info["constraint_error"].values()) < 1e-6
    c = torch.cat([s["l"]["rows"] for s in stats])  # any feasible update is d + E with E C^T = 0
    null = torch.linalg.svd(c, full_matrices=True).Vh[len(c):]  # rows orthogonal to every constraint row
    for _ in range(5):
        e = torch.randn(n_out, len(null), generator=g, dtype=torch.float64) @ null
        assert torch.trace((d + e) @ reg @ (d + e).T) >= torch.trace(d @ reg @ d.T) - 1e-9
    with pytest.raises(ConfigError, match="merge.stats: custom_diffusion needs target-word rows"):
        merge(ups, {"name": "custom_diffusion"}, stats=[{"l": torch.eye(n_in)}] * 3)


def test_target_features_run_from_the_modifier_token_through_eos(load_tiny):
    """As the authors' merge reads "<new1> category": the text states from the concept's first new token
    through EOS (no padding); the regularisation Gram sums every real position but BOS."""
    from lorabench.merging import text_gram, token_features
    from lorabench.merging.capture import text_states

    comps = load_tiny()
    tokens = inject_tokens(comps, {"token": "<sks>", "num_vectors": 2, "bind": "sks"})
    rows = token_features(comps, ["a photo of sks dog"], tokens.names)
    states, ids, real = text_states(comps, ["a photo of sks dog"])
    first = int((ids[0] == comps.tokenizer.convert_tokens_to_ids("<sks>")).nonzero()[0])
    last = int(real[0].nonzero()[-1])  # EOS
    assert torch.equal(rows, states[0, first:last + 1])
    assert len(rows) == 4  # <sks> <sks>_1 dog EOS
    gram = text_gram(comps, ["a photo of sks dog", "a dog"])
    everything = torch.cat([states[0, 1:last + 1], text_states(comps, ["a dog"])[0][0, 1:4]])
    assert torch.allclose(gram, everything.T @ everything)
    with pytest.raises(ConfigError, match="does not name the tokens"):
        token_features(comps, ["a dog"], tokens.names)


def test_the_quickstart_trains_custom_diffusion_from_the_command_line(tmp_path):
    """`experiment=quickstart adapter=custom_diffusion` stopped on `adapter.rank: ... leave it unset`: the
    experiment set a rank for every adapter (LoRA's default, 4, already); the summary names no rank for it."""
    from helpers import FAST, crashed, run_here

    proc = run_here([*FAST, "adapter=custom_diffusion", "exports=[custom_diffusion]",
                     f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert proc.returncode == 0, crashed(proc)
    assert (tmp_path / "run" / CUSTOM_DIFFUSION_FILE).is_file()
    assert "custom_diffusion" in proc.stdout and "rank None" not in proc.stdout
