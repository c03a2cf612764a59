"""A run folder's cli.log is its console (lorabench.utils.console.record_console): lines, logging records,
progress bars as they were left, and the traceback of an exception that ends the job."""

from __future__ import annotations

import logging
import sys

import pytest

from lorabench.utils.console import console_log_name, record_console


def test_the_record_keeps_what_the_console_shows_and_gives_the_streams_back(tmp_path):
    path = tmp_path / "cli.log"
    out, err = sys.stdout, sys.stderr
    handler = logging.StreamHandler(out)  # as Hydra's console handler: bound to stdout before the job starts
    handler.setFormatter(logging.Formatter("[%(levelname)s] %(message)s"))
    root, log = logging.getLogger(), logging.getLogger("lorabench.test_console")
    root.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        with record_console(path):
            sys.stderr.write("\r")
            assert not path.exists()  # opened on the first line: bad input, which prints none, leaves no file
            print("first line")
            for i in range(1, 4):  # a progress bar redrawn in place; its last state is what the log keeps
                sys.stderr.write(f"\rtrain: {i}/3")
            sys.stderr.write("\n")
            log.info("a record")
            print("a table", "row", sep="\n")
            sys.stderr.write("\x1b[A\rcells: 2/2   ")  # a bar left on the screen as the job ends, moved up
    finally:
        root.removeHandler(handler)
    assert sys.stdout is out and sys.stderr is err and handler.stream is out
    assert path.read_text().splitlines() == ["first line", "train: 3/3", "[INFO] a record", "a table", "row",
                                             "cells: 2/2"]
    with record_console(path):  # the same folder again (a resumed run): after a line that says so
        print("resumed")
    first, blank, again, last = path.read_text().splitlines()[5:]
    assert first == "cells: 2/2" and not blank and again.startswith("--- the same folder again, ") and last == "resumed"


def test_a_crash_leaves_its_traceback_and_an_exit_nothing(tmp_path):
    with pytest.raises(ValueError, match="boom"), record_console(tmp_path / "crash.log"):
        print("working")
        raise ValueError("boom")
    text = (tmp_path / "crash.log").read_text()
    assert text.startswith("working\nTraceback (most recent call last):") and text.endswith("ValueError: boom\n")

    with pytest.raises(SystemExit), record_console(tmp_path / "exit.log"):
        sys.exit(2)  # bad input: its one line is printed after the record ends, and the folder removed
    assert not (tmp_path / "exit.log").exists()


@pytest.mark.parametrize(("env", "name"), [({}, "cli.log"), ({"LOCAL_RANK": "0", "NODE_RANK": "0"}, "cli.log"),
                                           ({"LOCAL_RANK": "1"}, "cli.rank1.log"),
                                           ({"LOCAL_RANK": "3", "NODE_RANK": "2"}, "cli.node2.rank3.log")])
def test_each_process_of_a_ddp_job_keeps_its_own_log(monkeypatch, env, name):
    """Rank zero's is the console's cli.log; a rank Lightning's ddp starts by running the command again keeps
    what it prints (nothing, unless it crashes) beside it, under its rank."""
    for key in ("LOCAL_RANK", "NODE_RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert console_log_name() == name


def test_a_log_that_cannot_be_written_leaves_the_run_on_the_console(tmp_path, capsys):
    """A full disk or a removed folder stops the log, with one warning; the job and its console go on."""
    with pytest.warns(UserWarning, match="stopped keeping the console"), record_console(tmp_path / "gone" / "cli.log"):
        print("one")
        print("two")
    assert capsys.readouterr().out == "one\ntwo\n" and not (tmp_path / "gone").exists()
