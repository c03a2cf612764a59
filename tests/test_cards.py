"""The protocol cards (experiments/<paper>/protocol.yaml): every line has a source, and every carded key
of every full-scale experiment composes to the carded value, so a config cannot drift from its card;
protocol.md is the card rendered."""

from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from helpers import compose
from lorabench.protocols.report import render_card

ROOT = Path(__file__).resolve().parents[1]
CARDS = sorted((ROOT / "experiments").glob("*/protocol.yaml"))
DATA_ENV = ("DREAMBOOTH_DATA", "CONTINUAL_STYLES_DATA", "ORTHA_DATA", "ARCFACE_ONNX", "FACE_DETECTOR_ONNX",
            "CSD_CHECKPOINT")


def experiments():
    return sorted({exp for path in CARDS for exp in yaml.safe_load(path.read_text())["experiments"]})


def test_every_paper_has_a_card_and_every_line_a_source():
    assert {p.parent.name for p in CARDS} == {"continual", "orthogonal_adaptation", "trilora"}
    for path in CARDS:
        card = yaml.safe_load(path.read_text())
        for line in card["settings"]:
            assert line.get("setting") and line.get("source"), (path, line)
            if line.get("key") is None:
                assert line.get("note"), f"{path}: {line['setting']} is carried by no key, so it needs a note"
        assert (path.with_suffix(".md")).read_text() == render_card(card), f"{path.with_suffix('.md')} is stale"


@pytest.mark.parametrize("experiment", experiments())
def test_composed_full_scale_config_matches_its_card(tmp_path, monkeypatch, experiment):
    for var in DATA_ENV:  # the carded paths are the defaults, not a machine's data folders
        monkeypatch.delenv(var, raising=False)
    cfg = compose([f"experiment={experiment}"], tmp_path)
    drift, checked = [], 0
    for path in CARDS:
        card = yaml.safe_load(path.read_text())
        if experiment not in card["experiments"]:
            continue
        for line in card["settings"]:
            if not line.get("key") or experiment not in line.get("experiments", card["experiments"]):
                continue
            value = OmegaConf.select(cfg, line["key"], throw_on_missing=True)
            value = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
            if line.get("field"):
                value = [OmegaConf.select(OmegaConf.create(v), line["field"]) for v in value]
            checked += 1
            if value != line["value"]:
                drift.append(f"{line['key']} is {value!r}; the card says {line['value']!r}")
    assert checked >= 20 and not drift, f"{experiment} drifted from its card:\n" + "\n".join(drift)
