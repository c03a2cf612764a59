"""lorabench LoRA against the ecosystem: PEFT's LoRA, diffusers' load_lora_weights, kohya files."""

from __future__ import annotations

import pytest
import torch

from lorabench.adapters import Adapters, export_diffusers, export_kohya, inject_adapters, load_adapter

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out"]  # proj_in/out are 1x1 convs here
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def unet_inputs(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = unet.config
    x = torch.randn(2, c.in_channels, c.sample_size, c.sample_size, generator=g)
    e = torch.randn(2, 16, c.cross_attention_dim, generator=g)
    return x, torch.tensor([10, 700]), e


def randomize(adapters: Adapters, seed=0, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapters.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


@torch.no_grad()
def test_matches_peft_lora(load_tiny):
    pytest.importorskip("peft", reason="peft is the reference implementation (pip install -e '.[dev]')")
    from peft import LoraConfig

    ours, ref = load_tiny(), load_tiny()
    adapters = inject_adapters(ours, {"name": "lora", "rank": 4, "alpha": 8, "target_modules": UNET_TARGETS})
    randomize(adapters)
    ref.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=UNET_TARGETS, init_lora_weights="gaussian"))
    modules = dict(ref.unet.named_modules())
    n = 0
    for name, layer in adapters.layers.items():
        peft_layer = modules[name.removeprefix("unet.")]
        a, b = peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight
        a.copy_(layer.lora_down.reshape(a.shape))
        b.copy_(layer.lora_up.reshape(b.shape))
        n += 1
    assert n == len(adapters) > 0
    inputs = unet_inputs(ours.unet)
    out_ours, out_ref = ours.unet(*inputs).sample, ref.unet(*inputs).sample
    assert (out_ours - ours.unet.__class__.forward(ours.unet, *inputs).sample).abs().max() == 0
    torch.testing.assert_close(out_ours, out_ref, atol=1e-5, rtol=0)
    assert (out_ours - out_ref).abs().max() <= 1e-5


@pytest.fixture
def pipeline_and_ours(tiny_latent_model_dir):
    from diffusers import StableDiffusionPipeline

    from lorabench.models import load_components

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_latent_model_dir), safety_checker=None,
                                                   requires_safety_checker=False)
    ours = load_components(str(tiny_latent_model_dir), resolution=16)
    return pipe, ours


def _text_inputs(tokenizer):
    return tokenizer(["a photo of a dog"], padding="max_length", max_length=tokenizer.model_max_length,
                     return_tensors="pt").input_ids


@pytest.mark.parametrize("name", ["lora", "ortho", "trilora"])
@torch.no_grad()
def test_diffusers_load_lora_weights_matches_merged(pipeline_and_ours, tmp_path, name):
    pipe, ours = pipeline_and_ours
    adapters = inject_adapters(ours, {"name": name, "rank": 4, "alpha": 2 if name == "lora" else None,
                                      "target_modules": UNET_TARGETS, "text_encoder_targets": TE_TARGETS})
    randomize(adapters, std=0.3)
    path = export_diffusers(adapters, tmp_path / "pytorch_lora_weights.safetensors")
    adapters.merge()
    pipe.load_lora_weights(str(path))
    inputs = unet_inputs(ours.unet)
    torch.testing.assert_close(pipe.unet(*inputs).sample, ours.unet(*inputs).sample, atol=1e-5, rtol=0)
    ids = _text_inputs(ours.tokenizer)
    torch.testing.assert_close(pipe.text_encoder(ids)[0], ours.text_encoder(ids)[0], atol=1e-5, rtol=0)
    adapters.remove()  # the loaded adapter really changes the model
    assert (pipe.unet(*inputs).sample - ours.unet(*inputs).sample).abs().max() > 1e-3
    assert (pipe.text_encoder(ids)[0] - ours.text_encoder(ids)[0]).abs().max() > 1e-3


@torch.no_grad()
def test_kohya_export_reimported(pipeline_and_ours, tmp_path):
    pipe, ours = pipeline_and_ours
    from lorabench.models import load_components

    adapters = inject_adapters(ours, {"name": "lora", "rank": 4, "alpha": 1,
                                      "target_modules": UNET_TARGETS, "text_encoder_targets": TE_TARGETS})
    randomize(adapters, std=0.3)
    path = export_kohya(adapters, tmp_path / "kohya.safetensors")
    from safetensors.torch import load_file

    keys = list(load_file(str(path)))
    assert any(k.startswith("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down")
               for k in keys)
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha") for k in keys)
    adapters.merge()
    inputs = unet_inputs(ours.unet)
    expected = ours.unet(*inputs).sample
    # lorabench's importer
    fresh = load_components(ours.model_id, resolution=16)
    imported = load_adapter(fresh, path)
    assert imported.adapter_type == "lora" and len(imported) == len(adapters)
    imported.merge()
    torch.testing.assert_close(fresh.unet(*inputs).sample, expected, atol=1e-5, rtol=0)
    ids = _text_inputs(ours.tokenizer)
    torch.testing.assert_close(fresh.text_encoder(ids)[0], ours.text_encoder(ids)[0], atol=1e-5, rtol=0)
    # diffusers' own kohya converter (what A1111-style files go through in diffusers)
    pipe.load_lora_weights(str(path))
    torch.testing.assert_close(pipe.unet(*inputs).sample, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(pipe.text_encoder(ids)[0], ours.text_encoder(ids)[0], atol=1e-5, rtol=0)


@torch.no_grad()
def test_diffusers_files_in_the_names_before_peft_load_as_diffusers_loads_them(pipeline_and_ours, tmp_path):
    """diffusers < 0.21 wrote a LoRA's layers under its attention processors (``attn1.processor.to_q_lora.down``) and
    the text encoders' as ``q_proj.lora_linear_layer.down``; many shared ``pytorch_lora_weights.safetensors`` still
    are. lorabench refused them ("neither lorabench, diffusers nor kohya LoRA format"); now it renames them as
    diffusers' loader does, to the same model as its load_lora_weights of the file."""
    import re

    from safetensors.torch import load_file, save_file

    from lorabench.models import load_components

    pipe, ours = pipeline_and_ours
    adapters = inject_adapters(ours, {"name": "lora", "rank": 4, "alpha": 2, "text_encoder_targets": TE_TARGETS,
                                      "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]})
    randomize(adapters, std=0.3)
    half = {"A": "down", "B": "up"}
    old = {}
    for key, t in load_file(str(export_diffusers(adapters, tmp_path / "peft.safetensors"))).items():
        if key.startswith("unet."):
            key = re.sub(r"\.(to_[qkv]|to_out)(?:\.0)?\.lora_([AB])\.weight$",
                         lambda m: f".processor.{m[1]}_lora.{half[m[2]]}.weight", key)
        else:
            key = re.sub(r"\.lora_([AB])\.weight$", lambda m: f".lora_linear_layer.{half[m[1]]}.weight", key)
        old[key] = t
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight" in old
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight" in old
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(old, str(path))
    adapters.merge()
    inputs, ids = unet_inputs(ours.unet), _text_inputs(ours.tokenizer)
    expected, expected_text = ours.unet(*inputs).sample, ours.text_encoder(ids)[0]
    fresh = load_components(ours.model_id, resolution=16)
    imported = load_adapter(fresh, path)  # raised "neither lorabench, diffusers nor kohya LoRA format"
    assert len(imported) == len(adapters)
    imported.merge()
    torch.testing.assert_close(fresh.unet(*inputs).sample, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(fresh.text_encoder(ids)[0], expected_text, atol=1e-5, rtol=0)
    pipe.load_lora_weights(str(path))
    torch.testing.assert_close(pipe.unet(*inputs).sample, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(pipe.text_encoder(ids)[0], expected_text, atol=1e-5, rtol=0)


@torch.no_grad()
def test_diffusers_files_with_their_lora_configs_load_at_peft_scales(pipeline_and_ours, tmp_path):
    """diffusers saves each part's PEFT LoraConfig in the file's metadata (``lora_adapter_metadata``, when given the
    adapters' metadata), and
    its loader scales each layer by it: alpha / r, per-layer alphas and ranks from the patterns, alpha / sqrt(r) with
    rsLoRA. lorabench read such a file at scale 1: a LoRA trained with lora_alpha=8 at r=4 loaded at half its update.
    Now it loads to the same model as diffusers' load_lora_weights (and as the PEFT model it was saved from); a DoRA
    file is refused in one line."""
    pytest.importorskip("peft", reason="peft writes the file (pip install -e '.[dev]')")
    import json

    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open
    from safetensors.torch import save_file

    from lorabench.errors import ConfigError
    from lorabench.models import load_components

    pipe, ours = pipeline_and_ours
    unet_cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                          rank_pattern={"to_v": 2}, alpha_pattern={"to_k": 2}, init_lora_weights="gaussian")
    text_cfg = LoraConfig(r=4, lora_alpha=6, use_rslora=True, target_modules=TE_TARGETS, init_lora_weights="gaussian")
    pipe.unet.add_adapter(unet_cfg)
    inject_adapter_in_model(text_cfg, pipe.text_encoder)  # transformers' add_adapter wants peft >= 0.22
    g = torch.Generator().manual_seed(0)
    for model in (pipe.unet, pipe.text_encoder):
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        unet_lora_adapter_metadata=unet_cfg.to_dict(), text_encoder_lora_adapter_metadata=text_cfg.to_dict())
    path = tmp_path / "pytorch_lora_weights.safetensors"
    inputs, ids = unet_inputs(ours.unet), _text_inputs(ours.tokenizer)
    expected, expected_text = pipe.unet(*inputs).sample, pipe.text_encoder(ids)[0]  # the PEFT model saved
    assert (expected - ours.unet(*inputs).sample).abs().max() > 1e-2  # the adapter changes the model
    imported = load_adapter(ours, path)
    imported.merge()
    torch.testing.assert_close(ours.unet(*inputs).sample, expected, atol=1e-5, rtol=0)  # off by 1.41 at scale 1
    # merged weights against PEFT's separate low-rank path, rsLoRA's scale 3: float32 rounding reached 1.5e-5 in a
    # one-thread pytest-xdist worker
    torch.testing.assert_close(ours.text_encoder(ids)[0], expected_text, atol=1e-4, rtol=0)
    imported.remove()
    reread = StableDiffusionPipeline.from_pretrained(ours.model_id, safety_checker=None, requires_safety_checker=False)
    reread.load_lora_weights(str(path))  # diffusers' own reading agrees
    torch.testing.assert_close(reread.unet(*inputs).sample, expected, atol=1e-5, rtol=0)
    # DoRA: its update is not up @ down
    with safe_open(str(path), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())
    flat = json.loads(meta["lora_adapter_metadata"])
    meta["lora_adapter_metadata"] = json.dumps({**flat, "unet.use_dora": True})
    save_file(tensors, str(tmp_path / "dora.safetensors"), metadata=meta)
    with pytest.raises(ConfigError, match="its unet adapter is DoRA") as err:
        load_adapter(load_components(ours.model_id, resolution=16), tmp_path / "dora.safetensors")
    assert "\n" not in str(err.value)


@torch.no_grad()
def test_kohya_sdxl_files_in_sgm_names_load_as_diffusers_loads_them(scaled_down_models, tmp_path):
    """kohya's SDXL trainer names the UNet's layers as SGM's UNet does (``lora_unet_input_blocks_4_1_transformer_
    blocks_0_attn1_to_q``), not as diffusers' (``lora_unet_down_blocks_1_attentions_0_...``): lorabench refused such a
    file ("kohya key ... names no layer of this model"), so most SDXL LoRAs shared for A1111 and ComfyUI could be
    neither sampled nor merged. Now it reads them, to the same model as diffusers' load_lora_weights of the file
    (which maps SGM's blocks itself) and as the diffusers-named export it was renamed from."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file, save_file

    from lorabench.adapters.io import KOHYA_PREFIX_SDXL, kohya_name, ldm_names
    from lorabench.models import load_components

    model = scaled_down_models["sdxl"]
    ours = load_components(str(model))
    adapters = inject_adapters(ours, {"name": "lora", "rank": 4, "alpha": 1, "text_encoder_targets": TE_TARGETS,
                                      "target_modules": [*UNET_TARGETS, "ff.net.2", "time_emb_proj"]})
    randomize(adapters, std=0.3)
    exported = export_kohya(adapters, tmp_path / "kohya.safetensors")
    sgm_name = {kohya_name(f"unet.{n}", KOHYA_PREFIX_SDXL): kohya_name(f"unet.{ldm}", KOHYA_PREFIX_SDXL)
                for n, ldm in ldm_names(ours.unet).items()}
    sgm = {f"{sgm_name.get(stem, stem)}.{kind}": t
           for stem, _, kind, t in ((*k.partition("."), t) for k, t in load_file(str(exported)).items())}
    for key in ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight",  # as kohya's files
                "lora_unet_middle_block_1_proj_out.alpha", "lora_unet_output_blocks_8_0_emb_layers_1.lora_up.weight",
                "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"):
        assert key in sgm
    assert not any("down_blocks" in k or "up_blocks" in k or "mid_block" in k for k in sgm)
    path = tmp_path / "sgm.safetensors"
    save_file(sgm, str(path), metadata={"ss_network_module": "networks.lora"})
    adapters.merge()
    c = ours.unet.config
    g = torch.Generator().manual_seed(0)
    text_dim = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    inputs = (torch.randn(2, c.in_channels, 8, 8, generator=g), torch.tensor([10, 700]),
              torch.randn(2, 7, c.cross_attention_dim, generator=g))
    cond = {"text_embeds": torch.randn(2, text_dim, generator=g), "time_ids": torch.rand(2, 6, generator=g) * 64}
    expected = ours.unet(*inputs, added_cond_kwargs=cond).sample
    ids = _text_inputs(ours.tokenizer_2)
    expected_text = ours.text_encoder_2(ids)[0]
    fresh = load_components(str(model))
    imported = load_adapter(fresh, path)  # raised "kohya key 'lora_unet_input_blocks_1_0_emb_layers_1' names no layer"
    assert len(imported) == len(adapters)
    imported.merge()
    torch.testing.assert_close(fresh.unet(*inputs, added_cond_kwargs=cond).sample, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(fresh.text_encoder_2(ids)[0], expected_text, atol=1e-5, rtol=0)
    pipe = StableDiffusionXLPipeline.from_pretrained(str(model))
    pipe.load_lora_weights(str(path))  # diffusers' own reading of the SGM names
    torch.testing.assert_close(pipe.unet(*inputs, added_cond_kwargs=cond).sample, expected, atol=1e-5, rtol=0)


def test_ldm_names_are_sd15_checkpoints_names(scaled_down_models):
    """SD1.5's original checkpoint (``model.diffusion_model.<name>.weight``) names its UNet's modules as these; the
    upsampler of a block without attention sits at index 1 (``output_blocks.2.1.conv``), after one with it at 2."""
    from lorabench.adapters.io import ldm_names
    from lorabench.models import load_components

    names = ldm_names(load_components(str(scaled_down_models["sd15"])).unet)
    for diffusers_name, ldm in (("conv_in", "input_blocks.0.0"), ("time_embedding.linear_1", "time_embed.0"),
                                ("down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k",
                                 "input_blocks.2.1.transformer_blocks.0.attn2.to_k"),
                                ("down_blocks.0.downsamplers.0.conv", "input_blocks.3.0.op"),
                                ("down_blocks.3.resnets.1.conv2", "input_blocks.11.0.out_layers.3"),
                                ("mid_block.resnets.1.norm1", "middle_block.2.in_layers.0"),
                                ("up_blocks.0.upsamplers.0.conv", "output_blocks.2.1.conv"),
                                ("up_blocks.1.resnets.0.conv_shortcut", "output_blocks.3.0.skip_connection"),
                                ("up_blocks.1.upsamplers.0.conv", "output_blocks.5.2.conv"),
                                ("up_blocks.3.attentions.2.proj_out", "output_blocks.11.1.proj_out"),
                                ("conv_out", "out.2")):
        assert names[diffusers_name] == ldm
    assert len(set(names.values())) == len(names)  # one module, one name


@torch.no_grad()
def test_native_file_round_trip_every_adapter(load_tiny, tmp_path):
    from lorabench.adapters import save_adapter

    for name in ("lora", "ortho", "trilora"):
        a, b = load_tiny(), load_tiny()
        adapters = inject_adapters(a, {"name": name, "rank": 4, "text_encoder_targets": TE_TARGETS})
        randomize(adapters, seed=3)
        path = save_adapter(adapters, tmp_path / f"{name}.safetensors", base_model="tiny")
        loaded = load_adapter(b, path)
        assert loaded.adapter_type == name and loaded.config == adapters.config
        inputs = unet_inputs(a.unet)
        torch.testing.assert_close(b.unet(*inputs).sample, a.unet(*inputs).sample, atol=0, rtol=0)


TRAIN_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _lorabench_step(components, size: int, alpha: float):
    """One DreamBooth-LoRA step of lorabench's ``DiffusionFineTuner`` on two random images (the LoRA's up factors
    random too, so every factor has a gradient): ``(pixels, batch, latents, noise, timesteps, loss, factors)``,
    ``factors`` each adapted layer's ``(down, up, down's gradient, up's gradient)`` by UNet path; the adapter is
    removed after, so the script's step can run on the same UNet (a second copy of a scaled-down SDXL rounds its
    GEMMs otherwise, which put the gradients 1e-3 apart, relative, where the losses agreed to 2e-7)."""
    from lorabench.training import DiffusionFineTuner

    adapter = {"name": "lora", "rank": 4, "alpha": alpha, "target_modules": TRAIN_TARGETS}
    module = DiffusionFineTuner(components, adapter)
    randomize(module.adapters, std=0.3)
    pixels = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    module.train()
    batch, latents, noise, timesteps = module.draw({"pixel_values": pixels, "prompts": ["a photo of sks dog", "a dog"]},
                                                   torch.Generator().manual_seed(0))
    loss = module.diffusion_loss(batch, noise, timesteps, latents)
    loss.backward()
    factors = {name.removeprefix("unet."): (layer.lora_down.detach().clone(), layer.lora_up.detach().clone(),
                                            layer.lora_down.grad.clone(), layer.lora_up.grad.clone())
               for name, layer in module.adapters.layers.items()}
    module.adapters.remove()
    return pixels, batch, latents, noise, timesteps, loss.detach(), factors


def _peft_lora(unet, factors, alpha: float) -> dict:
    """A PEFT LoRA (as diffusers' scripts configure it) on ``unet`` holding ``factors``: its modules by path."""
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=4, lora_alpha=alpha, target_modules=TRAIN_TARGETS, init_lora_weights="gaussian"))
    layers = dict(unet.named_modules())
    with torch.no_grad():
        for name, (down, up, _, _) in factors.items():
            a, b = layers[name].lora_A["default"].weight, layers[name].lora_B["default"].weight
            a.copy_(down.reshape(a.shape))
            b.copy_(up.reshape(b.shape))
    return layers


def _same_gradients(layers: dict, factors: dict) -> None:
    for name, (_, _, down_grad, up_grad) in factors.items():
        a, b = layers[name].lora_A["default"].weight, layers[name].lora_B["default"].weight
        torch.testing.assert_close(down_grad.reshape(a.shape), a.grad, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(up_grad.reshape(b.shape), b.grad, atol=1e-6, rtol=1e-4)
    assert factors


def test_a_training_step_computes_what_diffusers_dreambooth_lora_script_computes(tiny_latent_model_dir):
    """A DreamBooth-LoRA step as diffusers' ``train_dreambooth_lora.py`` computes it: the VAE's latent sample times
    its scaling factor, the training scheduler's ``add_noise`` at the drawn timesteps, the text encoder's last
    hidden state, the UNet with a PEFT LoRA on to_q/k/v/out.0, MSE against the noise. lorabench's
    ``DiffusionFineTuner`` gives the same loss and the same gradient on every LoRA factor from the same draws."""
    pytest.importorskip("peft", reason="peft is the reference implementation (pip install -e '.[dev]')")
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    from lorabench.models import load_components

    ours = load_components(str(tiny_latent_model_dir), resolution=16)
    pixels, batch, latents, noise, timesteps, loss, factors = _lorabench_step(ours, 16, alpha=8)
    layers = _peft_lora(ours.unet, factors, alpha=8)
    with torch.no_grad():  # the script's step, from the same draws (its latent sample first from the same generator)
        model_input = ours.vae.encode(pixels).latent_dist.sample(generator=torch.Generator().manual_seed(0))
        model_input = model_input * ours.vae.config.scaling_factor
        ids = ours.tokenizer(batch["prompts"], padding="max_length", max_length=ours.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        states = ours.text_encoder(ids, return_dict=False)[0]
    torch.testing.assert_close(latents, model_input, atol=0, rtol=0)
    noisy = DDPMScheduler.from_pretrained(str(tiny_latent_model_dir), subfolder="scheduler").add_noise(
        model_input, noise, timesteps)
    ref = F.mse_loss(ours.unet(noisy, timesteps, states, return_dict=False)[0].float(), noise.float())
    ref.backward()
    torch.testing.assert_close(loss, ref.detach(), atol=1e-6, rtol=1e-5)
    _same_gradients(layers, factors)


def test_an_sdxl_training_step_computes_what_diffusers_sdxl_dreambooth_lora_script_computes(scaled_down_models):
    """The continual paper trains with diffusers' ``train_dreambooth_lora_sdxl.py``: both text encoders' penultimate
    hidden states side by side, the second's pooled output, the size conditioning ``(original size, crop corner,
    target size)`` of a square, centred image, the UNet with a PEFT LoRA. lorabench's step gives the same loss and
    the same gradient on every LoRA factor from the same draws."""
    pytest.importorskip("peft", reason="peft is the reference implementation (pip install -e '.[dev]')")
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    from lorabench.models import load_components

    path = scaled_down_models["sdxl"]
    ours = load_components(str(path), resolution=32)
    _, batch, latents, noise, timesteps, loss, factors = _lorabench_step(ours, 32, alpha=4)
    layers = _peft_lora(ours.unet, factors, alpha=4)
    with torch.no_grad():  # the script's encode_prompt and compute_time_ids
        embeds = []
        for tokenizer, encoder in ((ours.tokenizer, ours.text_encoder), (ours.tokenizer_2, ours.text_encoder_2)):
            ids = tokenizer(batch["prompts"], padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids
            out = encoder(ids, output_hidden_states=True, return_dict=False)
            pooled, embeds = out[0], [*embeds, out[-1][-2]]
        states = torch.concat(embeds, dim=-1)
        time_ids = torch.tensor([[32, 32, 0, 0, 32, 32]] * 2, dtype=states.dtype)
    noisy = DDPMScheduler.from_pretrained(str(path), subfolder="scheduler").add_noise(latents, noise, timesteps)
    pred = ours.unet(noisy, timesteps, states, added_cond_kwargs={"time_ids": time_ids, "text_embeds": pooled},
                     return_dict=False)[0]
    ref = F.mse_loss(pred.float(), noise.float())
    ref.backward()
    torch.testing.assert_close(loss, ref.detach(), atol=1e-6, rtol=1e-5)
    _same_gradients(layers, factors)
