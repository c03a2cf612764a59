"""W&B runs offline by default, logs the resolved config, and finishes between jobs."""

from __future__ import annotations

import pytest

from helpers import compose, tiny_overrides
from lorabench.run import train


@pytest.mark.integration
def test_wandb_offline_logs_resolved_config(tiny_model_dir, tmp_path, monkeypatch, capfd):
    wandb = pytest.importorskip("wandb")
    import lorabench.run as run_module

    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline must be the default, not the environment's doing
    seen = {}
    real_finish = run_module.finish_wandb

    def snapshot_then_finish(exit_code=0):
        seen["config"] = dict(wandb.run.config)
        seen["mode"] = wandb.run.settings.mode
        seen["group"], seen["job_type"] = wandb.run.group, wandb.run.job_type
        real_finish(exit_code)

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
    # no warning about a setting nobody set (Lightning hands wandb.init anonymous=None, which wandb 0.31 warns of)
    assert "anonymous" not in capfd.readouterr().err


@pytest.mark.integration
def test_a_run_that_crashes_ends_its_wandb_run_as_failed(tiny_model_dir, tmp_path, monkeypatch):
    """A crashed run's W&B run was finished as a success (exit code 0): a dashboard showed it finished. Now it
    is marked failed, and closed (a sweep's next job starts its own)."""
    wandb = pytest.importorskip("wandb")
    import lightning as L

    import lorabench.run as run_module

    codes, real_finish = [], run_module.finish_wandb
    monkeypatch.setattr(run_module, "finish_wandb",
                        lambda exit_code=0: (codes.append(exit_code), real_finish(exit_code)))

    class Crash(L.Callback):
        def on_train_start(self, trainer, module):
            raise ZeroDivisionError("a bug in a user's callback")

    cfg = compose([*tiny_overrides(tiny_model_dir, steps=2), "logger=wandb", "exports=[]", "data.val_samples=0"],
                  tmp_path)
    with pytest.raises(ZeroDivisionError):
        train(cfg, tmp_path, callbacks=[Crash()])
    assert codes == [1] and wandb.run is None
    train(cfg, tmp_path / "ok")
    assert codes == [1, 0]


def test_wandb_mode_env_overrides(monkeypatch):
    from lorabench.errors import ConfigError
    from lorabench.loggers import build_loggers

    monkeypatch.setenv("WANDB_MODE", "sideways")
    with pytest.raises(ConfigError, match="WANDB_MODE: unknown mode 'sideways'"):
        build_loggers({"wandb": {"project": "p"}}, ".", "r", {})


def test_an_online_wandb_run_that_cannot_start_is_one_line(monkeypatch, tmp_path):
    """Online without an API key: wandb.init's UsageError was a traceback after the run folder was made; a mode
    given in the config (not WANDB_MODE) was named WANDB_MODE."""
    from lorabench.errors import ConfigError
    from lorabench.loggers import build_loggers

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))  # no stored login
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    with pytest.raises(ConfigError, match="logger.wandb.mode: unknown mode 'sideways'"):
        build_loggers({"wandb": {"project": "p", "mode": "sideways"}}, str(tmp_path), "r", {})
    with pytest.raises(ConfigError, match=r"logger.wandb.mode: W&B could not start the online run \(.*\); log "
                                          r"offline \(logger.wandb.mode=offline"):
        build_loggers({"wandb": {"project": "p", "mode": "online"}}, str(tmp_path), "r", {})


def test_wandb_takes_one_tag_and_names_an_option_it_does_not_have(monkeypatch, tmp_path):
    """``logger.wandb.tags=ablation`` tagged the run a, b, l, ...; an option wandb.init does not take was its
    TypeError traceback, after the run folder was made."""
    from lorabench.errors import ConfigError
    from lorabench.loggers import build_loggers, finish_wandb

    monkeypatch.delenv("WANDB_MODE", raising=False)
    with pytest.raises(ConfigError, match=r"logger.wandb.colour: not an option of wandb.init \(project, name"):
        build_loggers({"wandb": {"project": "p", "mode": "offline", "colour": "red"}}, str(tmp_path / "a"), "r", {})
    loggers = build_loggers({"wandb": {"project": "p", "mode": "offline", "tags": "ablation"}}, str(tmp_path / "b"),
                            "r", {})
    try:
        assert loggers[1].experiment.tags == ("ablation",)
    finally:
        finish_wandb()


def test_csv_writers_of_separate_processes_share_one_file(tmp_path):
    """Under ddp_spawn each validate and the fit log through a copy of the writer pickled before any row (no
    keys): the fit's writer, adding its own columns, keeps the first validation's rows and columns (Lightning's
    failed with "dict contains fields not in fieldnames: 'val/loss'"), and a later copy appends under them."""
    import csv
    import pickle

    from lorabench.loggers import RunCSVLogger

    logger = RunCSVLogger(save_dir=str(tmp_path), name="csv", version="")
    blank = pickle.dumps(logger.experiment)  # as the main process hands it to each spawn
    validate, fit, again = (pickle.loads(blank) for _ in range(3))
    validate.log_metrics({"val/loss": 1.5, "epoch": 0}, step=0)
    validate.save()
    fit.log_metrics({"train/loss": 1.2, "epoch": 4}, step=4)
    fit.save()
    again.log_metrics({"val/loss": 1.1, "epoch": 5}, step=5)
    again.save()
    with open(tmp_path / "csv" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["epoch", "step", "train/loss", "val/loss"]
    assert [(r["step"], r["train/loss"], r["val/loss"]) for r in rows] == [
        ("0", "", "1.5"), ("4", "1.2", ""), ("5", "", "1.1")]


def test_a_resumed_run_keeps_the_first_parts_rows_and_the_checkpoints_own_validation(tmp_path):
    """One metrics.csv for a run resumed at step 4: the first part's rows before the step (its retrained ones
    after it go), the resumed part's from it on (its validation before fitting at step 0 goes: the first part
    has it). The first part's validation at step 4 itself scored the checkpoint (a run that ended, resumed to
    more steps) and used to be dropped with the retrained rows; a training row at step 4 was retrained."""
    import csv

    from lorabench.loggers import join_csv, set_aside_csv

    folder = tmp_path / "csv"
    folder.mkdir()

    def write(rows):
        with open(folder / "metrics.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["epoch", "step", "train/loss", "val/loss"])
            writer.writeheader()
            writer.writerows({"epoch": 0, "step": s, "train/loss": t, "val/loss": v} for s, t, v in rows)

    write([(0, "", 1.5), (1, 1.4, ""), (3, 1.3, ""), (4, 1.25, ""), (4, "", 1.2), (5, 1.1, "")])
    aside = set_aside_csv(tmp_path)
    assert aside is not None and not (folder / "metrics.csv").exists()
    write([(0, "", 1.5), (4, 1.26, ""), (5, 1.15, ""), (6, "", 1.0)])
    join_csv(tmp_path, aside, resumed_step=4)
    with open(folder / "metrics.csv", newline="") as f:
        rows = [(int(r["step"]), r["train/loss"], r["val/loss"]) for r in csv.DictReader(f)]
    assert rows == [(0, "", "1.5"), (1, "1.4", ""), (3, "1.3", ""), (4, "", "1.2"),
                    (4, "1.26", ""), (5, "1.15", ""), (6, "", "1.0")]
    assert not aside.exists()


def test_a_resumed_run_goes_on_in_its_online_wandb_run(monkeypatch, tmp_path, capsys):
    """A run resumed in its folder started a second W&B run: the dashboard showed two runs, each with part of the
    curves. An online run now goes on in the run it had (its id, read from the folder's wandb/latest-run); an
    offline one cannot (W&B does not resume offline runs) and says so."""
    pytest.importorskip("wandb")
    from lorabench.loggers import RunWandbLogger, build_loggers, finish_wandb, previous_wandb_id

    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert previous_wandb_id(tmp_path) is None
    first = build_loggers({"wandb": {"project": "p", "mode": "offline"}}, str(tmp_path), "r", {})
    run_id = first[1].experiment.id
    finish_wandb()
    assert previous_wandb_id(tmp_path) == run_id
    # offline: a run of its own, and a line that says why
    again = build_loggers({"wandb": {"project": "p", "mode": "offline"}}, str(tmp_path), "r", {}, resume_id=run_id)
    try:
        assert again[1].experiment.id != run_id
    finally:
        finish_wandb()
    assert f"W&B cannot resume the offline run {run_id}; the resumed part logs to a run of its own" in \
        capsys.readouterr().out
    # online (no network here: wandb.init is not reached): the same id, resumed
    monkeypatch.setattr(RunWandbLogger, "log_hyperparams", lambda self, params: None)
    online = build_loggers({"wandb": {"project": "p", "mode": "online"}}, str(tmp_path), "r", {}, resume_id=run_id)
    assert online[1]._wandb_init["id"] == run_id and online[1]._wandb_init["resume"] == "allow"
    given = build_loggers({"wandb": {"project": "p", "mode": "online", "id": "mine"}}, str(tmp_path), "r", {},
                          resume_id=run_id)
    assert given[1]._wandb_init["id"] == "mine"  # an id the config sets is kept


def test_a_resumed_protocol_goes_on_in_its_online_wandb_run(monkeypatch, tmp_path):
    """A continual sequence resumed from its state opened a second W&B run, which held none of the tasks before
    the stop (their scores are replayed into the metric, not logged again)."""
    pytest.importorskip("wandb")
    from lorabench.loggers import RunWandbLogger, finish_wandb
    from lorabench.protocols.report import Session

    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = compose(["experiment=continual/world_objects", "logger=wandb"], tmp_path)
    first = Session(cfg, tmp_path, "continual").open_loggers("continual-naive-seed0")
    run_id = first[1].experiment.id
    finish_wandb()
    cfg.logger.wandb.mode = "online"
    monkeypatch.setattr(RunWandbLogger, "log_hyperparams", lambda self, params: None)  # no network here
    assert Session(cfg, tmp_path, "continual").open_loggers("x", resumed=True)[1]._wandb_init["id"] == run_id
    assert Session(cfg, tmp_path, "continual").open_loggers("x")[1]._wandb_init["id"] is None  # a fresh run
