"""What a protocol run shows on the console: one progress bar over its cells, one line per finished
cell, the table, and where the results went.

A protocol trains and samples many cells, and every library below it has something to say once per
cell: transformers' "Loading weights" bars, Lightning's banners and its warnings about eval-mode
modules, a missing val_dataloader or a logging interval longer than an epoch. Those are expected in
a protocol cell (frozen modules are in eval mode on purpose; cells validate outside Lightning) and
are silenced here. Every other warning still shows, once per message. ``lorabench -v`` (or
``HYDRA_FULL_ERROR=1``) keeps the full output.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path
from typing import IO, Callable, Iterator, Optional, TextIO

from tqdm.auto import tqdm

VERBOSE_ENV = "LORABENCH_VERBOSE"
# The log a job keeps its console in (record_console), for the worker processes it starts (record_worker_console)
CONSOLE_LOG_ENV = "LORABENCH_CONSOLE_LOG"

# Warnings every protocol cell raises by design; matched against the start of the message.
EXPECTED_PER_CELL = (
    r"Found \d+ module\(s\) in eval mode",                       # frozen base model (Lightning >= 2.4)
    r"You defined a `validation_step` but have no `val_dataloader`",
    r"The number of training batches \(\d+\) is smaller than the logging interval",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",          # Lightning's pytree shim on new torch
    r"The '(train|val)_dataloader' does not have many workers",   # tiny in-memory sets need none
    r"Experiment logs directory .* exists and is not empty",      # a resumed run: lorabench.loggers.join_csv
    r"Checkpoint directory .* exists and is not empty",           # a resumed run keeps its checkpoints
    r"The dirpath has changed from .* to .*, therefore",          # resume=<another run>: checkpoints go in this one
    # DDP (trainer=ddp | ddp_cpu): the validation loss is gathered over ranks and its padded duplicates
    # dropped in the module (training.module, unique_mean), which these two do not know
    r"Using `DistributedSampler` with the dataloaders. During `trainer.validate\(\)`",
    r"It is recommended to use `self.log\('val/loss', ..., sync_dist=True\)`",
    r"torch.distributed.nn.functional.all_gather is deprecated",  # inside Lightning's all_gather
)


LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric")


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1" or os.environ.get("HYDRA_FULL_ERROR") == "1"


@contextlib.contextmanager
def quiet_cells() -> Iterator[None]:
    """Silence what repeats once per cell (see the module docstring); other warnings show once."""
    if verbose():
        yield
        return
    loggers = {name: logging.getLogger(name) for name in LIGHTNING_LOGGERS}
    levels = {name: lg.level for name, lg in loggers.items()}
    # heavy: the CLI imports this module at start-up, before it knows whether anything will run
    from diffusers.utils import logging as dlogging  # noqa: PLC0415
    from transformers.utils import logging as tlogging  # noqa: PLC0415

    bars = (tlogging.is_progress_bar_enabled(), dlogging.is_progress_bar_enabled())
    with warnings.catch_warnings():
        _silence_expected()
        try:
            yield
        finally:
            for name, lg in loggers.items():
                lg.setLevel(levels[name])
            if bars[0]:
                tlogging.enable_progress_bar()
            if bars[1]:
                dlogging.enable_progress_bar()


def quiet_worker() -> None:
    """:func:`quiet_cells`' silencing for the rest of this process, for a process that ends with its work:
    the workers a spawning strategy (ddp_spawn) starts for each ``validate`` and ``fit``, which inherit
    neither the main process's warning filters nor its logging levels. Nothing under ``lorabench -v``."""
    if not verbose():
        _silence_expected()


def _silence_expected() -> None:
    """Warning filters, Lightning's logging level and the hub libraries' progress bars, as the module
    docstring says; the caller restores them (:func:`quiet_cells`) or ends (:func:`quiet_worker`)."""
    # heavy, as in quiet_cells
    from diffusers.utils import logging as dlogging  # noqa: PLC0415
    from transformers.utils import logging as tlogging  # noqa: PLC0415

    # Python's defaults stay (library DeprecationWarnings hidden); what does show, shows once.
    warnings.filterwarnings("once", category=UserWarning)
    for pattern in EXPECTED_PER_CELL:
        warnings.filterwarnings("ignore", message=pattern)
    for name in LIGHTNING_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    tlogging.disable_progress_bar()
    dlogging.disable_progress_bar()


def first_process() -> bool:
    """Whether this is the first process of a job: not one of the ranks Lightning's ddp starts by running
    the command again (``LOCAL_RANK`` / ``NODE_RANK`` set to a non-zero rank), which run the protocol too
    but leave the console and the files to rank zero."""
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"


def console_log_name() -> str:
    """The file in the run folder that keeps this process's console (:func:`record_console`): ``cli.log`` for
    the first process; for a rank Lightning's ddp started by running the command again, which prints nothing
    unless something goes wrong (a crash's traceback, a warning), ``cli.rank<LOCAL_RANK>.log`` (on node
    N > 0: ``cli.node<N>.rank<LOCAL_RANK>.log``)."""
    if first_process():
        return "cli.log"
    node, rank = os.environ.get("NODE_RANK", "0"), os.environ.get("LOCAL_RANK", "0")
    return f"cli.rank{rank}.log" if node == "0" else f"cli.node{node}.rank{rank}.log"


def note(line: str) -> None:
    """A line above any progress bar, in the first process only."""
    if first_process():
        tqdm.write(line)


class CellProgress:
    """One bar over a protocol's cells; ``done(line)`` prints a finished cell's line above it (in the
    first process only)."""

    def __init__(self, total: int, desc: str):
        self.shown = first_process()
        self.bar: Optional[tqdm] = tqdm(total=total, desc=desc, unit="cell", dynamic_ncols=True, leave=False,
                                        disable=not self.shown)

    def done(self, line: str) -> None:
        note(line)
        self.bar.update(1)

    def tick(self) -> None:
        """Redraw the bar, its clock with it, on a terminal (where a worker process's line cleared it); in a
        file, a redraw would be one more line."""
        if self.shown and _is_terminal(self.bar.fp):
            self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


_ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # terminal control sequences (tqdm moves its cursor with them)


class _Log:
    """The run folder's ``cli.log``: the complete lines of each stream, a progress bar as the state it was
    left in (what follows its last carriage return), opened on the first line and flushed on each, one write
    a line (the job's worker processes append theirs to the same file). A job in a folder whose log has lines
    when it starts (a resumed run; not a worker joining its job's log) starts with a line saying so and
    giving its command."""

    def __init__(self, path: Path, joined: bool = False):
        self.path, self.file, self.pending, self.lock, self.broken = Path(path), None, {}, threading.RLock(), False
        self.again = not joined and self.path.is_file() and self.path.stat().st_size > 0

    def feed(self, stream: str, text: str) -> None:
        with self.lock:  # libraries print from their own threads too (W&B, tqdm's monitor)
            if self.broken:
                return
            *lines, self.pending[stream] = (self.pending.get(stream, "") + text).split("\n")
            self.guarded(lambda: [self.write(line) for line in lines])

    def guarded(self, work: Callable[[], object]) -> None:
        """``work``; an OSError (a full disk, a removed folder) ends the log and the run goes on, on the
        console alone."""
        try:
            work()
        except OSError as exc:
            self.broken = True
            warnings.warn(f"{self.path} stopped keeping the console: {exc}", stacklevel=3)

    def open(self) -> None:
        with self.lock:
            if self.file is None and not self.broken:
                self.file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()
                if self.again:  # a resumed run: after the first part's lines
                    self.file.write(f"\n--- the same folder again, {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                                    f"{' '.join(['lorabench', *sys.argv[1:]])}\n")
                    self.file.flush()

    def write(self, line: str) -> None:
        line = _ESCAPES.sub("", line.rsplit("\r", 1)[-1]).rstrip()
        self.open()
        self.file.write(line + "\n")  # one write, appended whole: the workers' lines come between, not inside
        self.file.flush()

    def close(self) -> None:
        with self.lock:
            for stream, rest in self.pending.items():
                if rest.rsplit("\r", 1)[-1].strip() and not self.broken:  # a bar left on the screen as it ended
                    with contextlib.suppress(OSError):
                        self.write(rest)
            self.pending.clear()
            self.broken = True  # a stream still held after the job (a bar's, a handler's): the console alone
            if self.file is not None:
                with contextlib.suppress(OSError):
                    self.file.close()


# What a worker's line starts with on a terminal: back to the line's start and clear it (the job's progress bar,
# which another process drew there and ended with no newline)
CLEAR_LINE = "\r\x1b[K"


class _Tee:
    """A text stream that writes to the console stream it stands for and to the log. ``clear_lines``: each
    line starts by clearing the console's line (:data:`CLEAR_LINE`), for a worker process on a terminal."""

    def __init__(self, stream: TextIO, log: _Log, name: str, clear_lines: bool = False):
        self.stream, self.log, self.name, self.clear_lines, self.line_start = stream, log, name, clear_lines, True

    def write(self, text: str) -> int:
        self.log.feed(self.name, text)
        if not (self.clear_lines and text):
            return self.stream.write(text)
        parts = text.split("\n")  # each part starts a line (the first if the last write ended one) ...
        last = len(parts) - 1  # ... but the empty part after a last newline: the next write's
        shown = "\n".join(CLEAR_LINE + part if (i or self.line_start) and (part or i < last) else part
                          for i, part in enumerate(parts))
        self.line_start = text.endswith("\n")
        self.stream.write(shown)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, attr: str):  # isatty, fileno, encoding, ...: the console stream's
        return getattr(self.stream, attr)


_RECORDING: list[_Log] = []  # the logs of the jobs recording in this process, innermost last


@contextlib.contextmanager
def record_console(path: Path) -> Iterator[None]:
    """Keep what a job shows on the console, stdout and stderr, in ``path`` as it shows it (its lines, its
    logging records as formatted, warnings, each progress bar's last state), and the traceback of an
    exception that ends the job: a run folder's ``cli.log``. Nothing is written until a line is (a job
    stopped by bad input leaves no file). The worker processes the job starts (its cells', a ddp_spawn
    fit's) add what they show to the same file (:func:`record_worker_console`)."""
    log = _Log(path)
    saved, tees = _tee_console(log)
    env = os.environ.get(CONSOLE_LOG_ENV)
    os.environ[CONSOLE_LOG_ENV] = str(Path(path).absolute())  # inherited by the processes the job starts
    _RECORDING.append(log)
    try:
        yield
    except BaseException as exc:  # the job's end, as the console shows it after this (Hydra prints it)
        if not isinstance(exc, SystemExit):
            log.feed("stderr", "".join(traceback.format_exception(exc)))
        raise
    finally:
        sys.stdout, sys.stderr = saved["stdout"], saved["stderr"]
        # the handlers it moved, and those made during the job (a library's, bound to the stream it met)
        _point_handlers(tees, saved)
        _RECORDING.remove(log)
        if env is None:
            os.environ.pop(CONSOLE_LOG_ENV, None)
        else:
            os.environ[CONSOLE_LOG_ENV] = env
        log.close()


def share_console() -> None:
    """Before a job starts worker processes that add to its log (:func:`record_worker_console`): open the
    log, so that a resumed run's line comes before the workers' lines. Nothing outside a recorded job."""
    if _RECORDING:
        log = _RECORDING[-1]
        log.guarded(log.open)


def record_worker_console() -> None:
    """In a worker process a job started (a protocol's cell worker, a ddp_spawn rank), for the rest of the
    process: what it shows on the console (its stdout and stderr, which are the job's console) goes to the
    job's log too (:func:`record_console`), a line at a time. Nothing outside a recorded job, nothing twice."""
    path = os.environ.get(CONSOLE_LOG_ENV)
    if not path or isinstance(sys.stdout, _Tee):
        return
    log = _Log(Path(path), joined=True)
    # on a terminal the job's cell bar may be on the line this worker comes to (it is redrawn, not followed)
    _tee_console(log, clear_lines=True)
    atexit.register(log.close)  # a bar's last state; the complete lines are written as they come


def _tee_console(log: _Log, clear_lines: bool = False) -> tuple[dict[str, IO], dict[str, _Tee]]:
    """Send stdout, stderr and the console handlers that write to them through tees into ``log``; the
    streams they were, and the tees. ``clear_lines``: a stream that is a terminal starts each line by
    clearing the console's line."""
    saved: dict[str, IO] = {"stdout": sys.stdout, "stderr": sys.stderr}
    tees = {name: _Tee(stream, log, name, clear_lines and _is_terminal(stream)) for name, stream in saved.items()}
    _point_handlers(saved, tees)
    sys.stdout, sys.stderr = tees["stdout"], tees["stderr"]
    return saved, tees


def _is_terminal(stream: IO) -> bool:
    """Whether ``stream`` is a terminal (a closed or odd stream: not)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def _point_handlers(old: dict[str, IO], new: dict[str, IO]) -> None:
    """Point the console handlers of every logger (Hydra's on the root, those libraries add to their own,
    such as Lightning's in a spawned worker or transformers') that write to one of ``old``'s streams at
    ``new``'s stream of the same name."""
    loggers = [logging.getLogger(), *(lg for lg in list(logging.Logger.manager.loggerDict.values())
                                     if isinstance(lg, logging.Logger))]
    for h in {id(h): h for lg in loggers for h in lg.handlers}.values():
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
            for name, stream in old.items():
                if h.stream is stream:
                    h.setStream(new[name])
