"""One battery over every registered paper protocol (lorabench.protocols.base.PAPERS), fed by a table of
cases, in place of a copy per paper: the committed tables rebuild from the committed results.json files to
the same bytes (through the shared command and the old per-paper one), results files follow the schema,
and bad input to the rebuild command is one line. Each paper's own test module keeps what is that
paper's (its cells, scoring, claims, cache reuse or resume)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import crashed
from lorabench.protocols import base
from lorabench.protocols.__main__ import main

REPO = Path(__file__).resolve().parents[1]
EXP = REPO / "experiments"
# paper -> (the committed runs its page's tables come from, the text files rebuilt from them, byte for byte)
CASES = {
    "orthogonal_adaptation": (["orthogonal_adaptation/runs/world"], ["table2.md", "table2.csv"]),
    "continual": (["continual/runs/world_objects", "continual/runs/world_styles"],
                  ["table_objects.md", "table_objects.csv", "table_styles.md", "table_styles.csv", "verdicts.json"]),
    "trilora": (["trilora/runs/world_vango"], ["table.md", "table.csv", "curves.csv", "verdicts.json", "results.json"]),
}


def test_every_paper_has_a_case():
    assert set(CASES) == set(base.PAPERS)


@pytest.mark.parametrize("paper", list(CASES))
def test_committed_tables_rebuild_to_the_same_bytes(paper, tmp_path, capsys, monkeypatch):
    runs, files = CASES[paper]
    monkeypatch.chdir(REPO)  # as the READMEs' commands run (a joined results.json records the paths given)
    main(["rebuild", paper, *[f"experiments/{r}" for r in runs], "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    for name in files:
        assert (tmp_path / name).read_bytes() == (EXP / paper / name).read_bytes(), name
    assert printed.strip()
    for png in tmp_path.glob("*.png"):  # plots are written, not compared (matplotlib versions differ)
        assert png.stat().st_size > 0


@pytest.mark.parametrize("paper", list(CASES))
def test_results_files_follow_the_schema(paper):
    p = base.paper(paper)
    results = base.collect(p, [EXP / r for r in CASES[paper][0]])
    assert results and all(r["protocol"] == p.protocol for r in results)
    for r in results:
        assert {"seeds", "summary", "config"} <= set(r), r["_path"]
        assert json.loads(Path(r["_path"]).read_text())["protocol"] == p.protocol


@pytest.mark.parametrize("paper", list(CASES))
def test_rebuild_bad_input_is_one_line(paper, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    other = next(o for o in CASES if o != paper)
    wrong = EXP / CASES[other][0][0]
    wrong = wrong / "results.json" if (wrong / "results.json").is_file() else next(wrong.rglob("results.json"))
    plain = tmp_path / "plain"  # a training run's folder: its results.json names no protocol
    plain.mkdir()
    (plain / "results.json").write_text(json.dumps({"config_name": "quickstart", "metrics": {}}))
    a_file = tmp_path / "a_file"  # an --out it cannot make: a traceback after the work, before
    a_file.write_text("x")
    broken = tmp_path / "broken"  # a results.json that is no JSON: json's own message, naming no file, before
    broken.mkdir()
    (broken / "results.json").write_text("{\"protocol\": ")
    for args, fragment, out in (([str(tmp_path / "empty")], "holds no results.json", tmp_path / "out"),
                                ([str(wrong)], f"run, not one of {paper}'s", tmp_path / "out"),
                                ([str(plain)], f"is a training run (no protocol), not one of {paper}'s",
                                 tmp_path / "out"),
                                ([str(broken)], f"{broken / 'results.json'}: is not JSON (", tmp_path / "out"),
                                ([str(EXP / r) for r in CASES[paper][0]], f"--out: '{a_file}' is a file, not a folder",
                                 a_file / "out")):
        with pytest.raises(SystemExit) as exit_info:
            main(["rebuild", paper, *args, "--out", str(out)])
        assert exit_info.value.code == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lorabench: error:")]
        assert len(err) == 1 and fragment in err[0], err
    assert not (tmp_path / "out").exists()
    # argparse's own errors name the command as the docs show it (they read "python -m lorabench.protocols ...")
    with pytest.raises(SystemExit):
        main(["rebuild", paper])
    assert f"lorabench rebuild {paper}: error: the following arguments are required: paths" in capsys.readouterr().err


@pytest.mark.parametrize("paper", list(CASES))
def test_a_row_two_runs_hold_is_one_line(paper, tmp_path, capsys):
    """Joining runs (base.join_rows) refuses a row that two runs hold (here one run copied into two folders),
    which would count twice in the table's means (continual: the same method, order and seed twice)."""
    found = base.collect(base.paper(paper), [EXP / CASES[paper][0][0]])
    for copy in ("a", "b"):
        (tmp_path / copy).mkdir()
        (tmp_path / copy / "results.json").write_text(Path(found[0]["_path"]).read_text())
    with pytest.raises(SystemExit) as exit_info:
        main(["rebuild", paper, str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lorabench: error:")]
    assert len(err) == 1 and str(tmp_path / "b") in err[0] and "appears in two runs" in err[0], err
    assert not (tmp_path / "out").exists()


def test_unknown_paper_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["rebuild", "dreambooth", "x"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "paper: unknown paper 'dreambooth'; valid: orthogonal_adaptation, continual, trilora" in err


def test_lorabench_rebuild_is_the_rebuild_command(tmp_path, capsys, monkeypatch):
    """Why: ``lorabench rebuild`` (what a user of ``lorabench sample`` and ``lorabench summarize`` types) was
    read as a Hydra override. It is the shared rebuild command: the same tables, the same one-line errors."""
    from lorabench import cli

    runs, files = CASES["trilora"]
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", ["lorabench", "rebuild", "trilora", *[f"experiments/{r}" for r in runs],
                                      "--out", str(tmp_path)])
    cli.main()
    for name in files:
        assert (tmp_path / name).read_bytes() == (EXP / "trilora" / name).read_bytes(), name
    monkeypatch.setattr(sys, "argv", ["lorabench", "rebuild", "dreambooth", "x"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2
    assert "usage: lorabench rebuild {orthogonal_adaptation,continual,trilora}" in capsys.readouterr().err


@pytest.mark.integration
def test_the_per_paper_command_is_an_alias(tmp_path):
    """``python -m lorabench.protocols.<paper>`` (the command before the shared one) writes the same files."""
    runs, files = CASES["trilora"]
    proc = subprocess.run([sys.executable, "-m", "lorabench.protocols.trilora", *[f"experiments/{r}" for r in runs],
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, crashed(proc)
    for name in files:
        assert (tmp_path / name).read_bytes() == (EXP / "trilora" / name).read_bytes(), name
