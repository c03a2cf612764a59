"""A run folder's cli.log is its console (lorabench.utils.console.record_console): lines, logging records,
progress bars as they were left, and the traceback of an exception that ends the job."""

from __future__ import annotations

import atexit
import io
import logging
import os
import sys
from multiprocessing import get_context

import pytest

from lorabench.utils.console import (
    CLEAR_LINE,
    CONSOLE_LOG_ENV,
    CellProgress,
    console_log_name,
    record_console,
    record_worker_console,
    share_console,
)


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


def _worker(n: int) -> None:
    """A worker process a job starts (a cell worker, a ddp_spawn rank): a library's console handler bound to
    stderr before the record (as Lightning's, made when it is imported), a line, a record, a bar left as it
    ended; joining twice adds nothing twice."""
    library = logging.getLogger("lorabench.test_console.library")
    library.addHandler(logging.StreamHandler())
    library.propagate = False
    record_worker_console()
    record_worker_console()
    print(f"worker {n} line")
    library.warning("worker %d record", n)
    for i in range(1, 4):
        sys.stderr.write(f"\rworker {n} bar {i}/3")


def test_the_workers_a_job_starts_add_their_console_to_its_log(tmp_path, capfd):
    """Cell workers and ddp_spawn ranks print to the job's console (their stdout and stderr are its); their
    lines go to its cli.log too, after a resumed run's line, and the worker's own console still shows them."""
    path = tmp_path / "cli.log"
    path.write_text("the first part\n")
    assert CONSOLE_LOG_ENV not in os.environ
    with record_console(path):
        share_console()  # before the workers: a resumed run's line comes first
        for n in (1, 2):  # one after the other: their lines in a known order
            worker = get_context("spawn").Process(target=_worker, args=(n,))
            worker.start()
            worker.join()
            assert worker.exitcode == 0
        print("the job's line")
    assert CONSOLE_LOG_ENV not in os.environ  # as it was: later processes join no log
    first, blank, again, *lines = path.read_text().splitlines()
    assert first == "the first part" and not blank and again.startswith("--- the same folder again, ")
    assert lines == ["worker 1 line", "worker 1 record", "worker 1 bar 3/3",
                     "worker 2 line", "worker 2 record", "worker 2 bar 3/3", "the job's line"]
    shown = capfd.readouterr()
    assert "worker 2 line" in shown.out and "worker 2 record" in shown.err and "worker 2 bar 3/3" in shown.err

    try:
        _worker(3)  # outside a recorded job: the console alone
    finally:
        logging.getLogger("lorabench.test_console.library").handlers.clear()
    assert "worker 3 line" in capfd.readouterr().out and len(path.read_text().splitlines()) == 10


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_workers_lines_clear_the_jobs_bar_on_a_terminal(tmp_path, monkeypatch):
    """On a terminal a protocol's cell bar ends in no newline, and a cell worker's line came after it on its
    line: each line of a worker's terminal stream now starts by clearing the line (the job redraws its bar), while
    a stream that is no terminal and the job's cli.log get the lines as before."""
    terminal, pipe, closers = _Terminal(), io.StringIO(), []
    monkeypatch.setattr(sys, "stdout", terminal)
    monkeypatch.setattr(sys, "stderr", pipe)
    monkeypatch.setattr(atexit, "register", closers.append)  # the worker's log closes when the test says
    monkeypatch.setenv(CONSOLE_LOG_ENV, str(tmp_path / "cli.log"))
    record_worker_console()
    print("first")
    sys.stdout.write("part")
    sys.stdout.write("ial\n\nlast\n")
    sys.stderr.write("a warning\n")
    closers[0]()
    assert terminal.getvalue() == "".join(CLEAR_LINE + ln + "\n" for ln in ["first", "partial", "", "last"])
    assert pipe.getvalue() == "a warning\n"
    assert (tmp_path / "cli.log").read_text().splitlines() == ["first", "partial", "", "last", "a warning"]


def test_the_cell_bar_redraws_on_a_terminal_alone(monkeypatch):
    """While cell workers train, the job redraws its bar each second (:meth:`CellProgress.tick`): on a terminal,
    where its clock runs and a worker's line cleared it; written to a file, each redraw would be one more line."""
    for stream, redraws in ((_Terminal(), True), (io.StringIO(), False)):
        monkeypatch.setattr(sys, "stderr", stream)
        bar = CellProgress(3, desc="training")
        before = stream.getvalue()
        bar.tick()
        assert (stream.getvalue() != before) == redraws
        assert "training:   0%" in stream.getvalue()
        bar.close()


def test_streams_held_past_the_job_write_to_the_console_alone(tmp_path, capsys):
    """A handler a library makes during the job binds the stream it meets, the record's (transformers makes
    its own on first use); a progress bar keeps its file. After the job the handler is pointed back at the
    console, and a write through a kept stream goes to the console alone, not to a closed log (before 708ff16
    the handler printed '--- Logging error ---' with 'I/O operation on closed file' and the kept stream's write
    raised it: transformers, first imported in a sweep's first job, would have sent its later jobs' warnings
    through the first job's closed log)."""
    library = logging.getLogger("lorabench.test_console.made_during_the_job")
    library.propagate = False
    try:
        with record_console(tmp_path / "cli.log"):
            library.addHandler(logging.StreamHandler())  # bound to sys.stderr, the record's stream now
            kept = sys.stdout
            library.warning("during")
        library.warning("after")
        kept.write("late line\n")
    finally:
        library.handlers.clear()
    assert (tmp_path / "cli.log").read_text() == "during\n"
    shown = capsys.readouterr()
    assert shown.err == "during\nafter\n" and shown.out == "late line\n"
