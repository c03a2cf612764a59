"""The trainer options of the full-scale configs: gradient checkpointing, the attention kernel, mixed
precision (bf16 and fp16) and their one-line errors. Run on CPU with tiny and scaled-down models; the
memory and speed they buy are measured by bench/bench_train_step.py on a GPU."""

from __future__ import annotations

import pytest
import torch

from helpers import assert_one_line_error, compose, run_here, tiny_overrides
from lorabench.errors import ConfigError
from lorabench.run import train

pytestmark = pytest.mark.integration  # end to end: out of the fast tier

ADAPTER = {"name": "lora", "rank": 2, "text_encoder_targets": ["q_proj", "v_proj"]}


def adapter_grads(components, checkpointing: bool) -> tuple[float, dict[str, torch.Tensor]]:
    from lorabench.training import DiffusionFineTuner

    torch.manual_seed(0)
    module = DiffusionFineTuner(components, dict(ADAPTER), gradient_checkpointing=checkpointing).train()
    torch.manual_seed(1)
    pixels = torch.rand(2, 3, components.resolution, components.resolution) * 2 - 1
    latents = module.to_latents(pixels)
    noise, timesteps = torch.randn_like(latents), torch.tensor([10, 700])
    loss = module.diffusion_loss({"pixel_values": pixels, "prompts": ["a photo of sks dog", "a dog"]}, noise,
                                 timesteps, latents)
    loss.backward()
    # None where a layer does not reach the loss (SDXL reads the first text encoder's penultimate layer)
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in adapter_params(module.adapters).items()}
    module.adapters.remove()
    return float(loss.detach()), grads


def adapter_params(adapters) -> dict[str, torch.nn.Parameter]:
    return {f"{layer}.{n}": p for layer, mod in adapters.layers.items() for n, p in mod.named_parameters(recurse=False)}


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_gradient_checkpointing_gives_the_same_loss_and_adapter_gradients(arch, scaled_down_models):
    from lorabench.models import load_components

    res = 64 if arch == "sd15" else 32
    components = load_components(str(scaled_down_models[arch]), resolution=res)
    loss, grads = adapter_grads(components, checkpointing=False)
    assert not any(getattr(m, "gradient_checkpointing", False) for m in components.unet.modules())
    loss_ck, grads_ck = adapter_grads(components, checkpointing=True)
    assert any(getattr(m, "gradient_checkpointing", False) for m in components.unet.modules())
    assert components.text_encoder.is_gradient_checkpointing  # its adapters train, so it checkpoints too
    assert loss_ck == pytest.approx(loss, rel=1e-6)
    assert grads.keys() == grads_ck.keys() and any(k.startswith("text_encoder") for k in grads)
    for root in ("unet", "text_encoder"):  # gradients reach the up factors (down's are 0 while up is 0)
        assert any(g is not None and g.abs().sum() > 0 for k, g in grads.items()
                   if k.startswith(root + ".") and "lora_up" in k)
    for k in grads:
        if grads[k] is None:
            assert grads_ck[k] is None
        else:
            torch.testing.assert_close(grads_ck[k], grads[k], atol=1e-6, rtol=1e-5)


def test_attention_kernels_agree_and_a_bad_kernel_is_one_line(scaled_down_models):
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    from lorabench.models import encode_prompts, load_components

    outs = {}
    for kind, cls in (("sdpa", AttnProcessor2_0), ("classic", AttnProcessor)):
        c = load_components(str(scaled_down_models["sdxl"]), resolution=32, attention=kind)
        assert {type(p) for p in c.unet.attn_processors.values()} == {cls}
        torch.manual_seed(0)
        x = torch.randn(2, 4, 4, 4)
        with torch.no_grad():
            outs[kind] = c.unet(x, torch.tensor([5, 500]), **encode_prompts(c, ["a dog", "a cat"], "cpu")).sample
    torch.testing.assert_close(outs["sdpa"], outs["classic"], atol=1e-5, rtol=1e-4)
    with pytest.raises(ConfigError, match="model.attention: .*'flash'.*sdpa"):
        load_components(str(scaled_down_models["sdxl"]), attention="flash")


def test_bf16_mixed_precision_trains_fp32_adapters(tiny_model_dir, tmp_path):
    """Autocast runs the frozen model in bf16; the adapter's master weights stay fp32 and move. (fp16 with
    gradient scaling needs CUDA: on CPU Lightning turns 16-mixed into bf16-mixed, so trainer=gpu_fp16 is
    exercised by bench/bench_train_step.py on a GPU.)"""
    cfg = compose([*tiny_overrides(tiny_model_dir, steps=3), "trainer.precision=bf16-mixed", "exports=[]",
                   "data.val_samples=0", "optim.lr=1e-2", "module.gradient_checkpointing=true"], tmp_path)
    results, module = train(cfg, tmp_path)
    params = list(module.adapters.parameters())
    assert results["metrics"]["steps"] == 3 and all(p.dtype == torch.float32 for p in params)
    assert torch.isfinite(torch.tensor(results["metrics"]["train_loss_last"]))
    assert any(p.abs().sum() > 0 for n, p in adapter_params(module.adapters).items() if "lora_up" in n)


def test_fp16_config_on_a_machine_without_cuda_is_one_line(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("checks the no-CUDA error, which a machine with a GPU cannot raise")
    cfg = compose(["trainer=gpu_fp16"], tmp_path)
    assert cfg.trainer.precision == "16-mixed" and cfg.trainer.accelerator == "gpu"
    assert_one_line_error(run_here(["experiment=quickstart", "trainer=gpu_fp16"], tmp_path), tmp_path,
                          "trainer.accelerator", "no CUDA device; use trainer=cpu")
