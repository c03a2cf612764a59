"""Atomic file writes: write to a temporary file in the same folder, then rename."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it over ``path`` on success.

    On failure the temporary file is removed, so readers never see a partial file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; finished files get the usual mode
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def atomic_dir(path: str | os.PathLike, keep: Optional[Callable[[Path], bool]] = None) -> Iterator[Path]:
    """Yield a temporary folder next to ``path``; on success it is renamed to ``path``, replacing a folder
    there, unless ``keep(path)`` says to keep that one (then the new one is dropped). On failure the
    temporary folder is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        try:
            os.replace(tmp, path)  # refused where a folder with files (or a file) is in the way
        except OSError:
            if keep is not None and keep(path):
                return
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def holds(folder: str | os.PathLike, files: Mapping[str, bytes]) -> bool:
    """Whether ``folder`` holds exactly ``files``: the same names, nothing else, the same bytes."""
    folder = Path(folder)
    try:
        return {p.name for p in folder.iterdir()} == set(files) and \
            all((folder / name).read_bytes() == data for name, data in files.items())
    except (FileNotFoundError, NotADirectoryError):  # not there (or removed while read): it does not hold them
        return False


def write_folder(folder: str | os.PathLike, files: Mapping[str, bytes]) -> Path:
    """Make ``folder`` hold exactly ``files`` (name -> bytes) with :func:`atomic_dir`. A folder that already holds
    them is left as it is, also when another process writes the same files at the same time: under
    ``trainer.strategy=ddp`` every rank builds a cell's dataset in the same folder at once, and replacing it under
    a rank reading it failed that rank (a missing image, read as bad input). Other content is replaced."""
    folder = Path(folder)
    if not holds(folder, files):
        with atomic_dir(folder, keep=lambda p: holds(p, files)) as tmp:  # keep: the same files, placed meanwhile
            for name, data in files.items():
                (tmp / name).write_bytes(data)
    return folder


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as indented, key-sorted JSON, atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
