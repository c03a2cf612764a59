"""W&B runs offline by default, logs the resolved config, and finishes between jobs."""

from __future__ import annotations

import pytest

from helpers import compose, tiny_overrides
from lorabench.run import train


@pytest.mark.integration
def test_wandb_offline_logs_resolved_config(tiny_model_dir, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    import lorabench.run as run_module

    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline must be the default, not the environment's doing
    seen = {}
    real_finish = run_module.finish_wandb

    def snapshot_then_finish():
        seen["config"] = dict(wandb.run.config)
        seen["mode"] = wandb.run.settings.mode
        seen["group"], seen["job_type"] = wandb.run.group, wandb.run.job_type
        real_finish()

    monkeypatch.setattr(run_module, "finish_wandb", snapshot_then_finish)
    cfg = compose([*tiny_overrides(tiny_model_dir, steps=2), "logger=wandb", "logger.wandb.group=unit",
                   "exports=[]", "data.val_samples=0"], tmp_path)
    assert compose(["logger=wandb"], tmp_path).logger.wandb.group == "quickstart"  # default: one group per experiment
    train(cfg, tmp_path, config_name="wandb_test")
    assert wandb.run is None  # finished at the end of the job (needed between multirun jobs)
    assert seen["mode"] == "offline" and seen["group"] == "unit" and seen["job_type"] == "train"
    config = seen["config"]
    assert config["adapter"]["target_modules"] == ["to_q", "to_k", "to_v", "to_out.0"]
    assert config["model"]["pretrained"] == str(tiny_model_dir)  # interpolations resolved
    assert config["data"]["resolution"] == 16
    assert len(list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))) == 1


def test_wandb_mode_env_overrides(monkeypatch):
    from lorabench.errors import ConfigError
    from lorabench.loggers import build_loggers

    monkeypatch.setenv("WANDB_MODE", "sideways")
    with pytest.raises(ConfigError, match="WANDB_MODE: unknown mode 'sideways'"):
        build_loggers({"wandb": {"project": "p"}}, ".", "r", {})
