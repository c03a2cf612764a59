"""The protocol contract: what a paper's protocol declares, and what every protocol gets for free.

A paper's protocol file (``lorabench/protocols/<paper>.py``) declares:

- its ``protocol:`` block as a dataclass (:class:`Settings`): each field documented, typed and checked
  once, before any work, with one line naming ``protocol.<field>`` (:func:`read_settings`);
- ``run(cfg, run_dir)``: its cells (:mod:`lorabench.protocols.cells` trains them) and how it scores
  them into rows;
- its tables as column specs (:class:`lorabench.utils.tables.Column`, rendered by ``markdown`` and
  ``csv_of`` there; :func:`pm` and :func:`mean_std_csv` for mean +- std), its published numbers and its
  claims (:func:`verdict`);
- ``PAPER = Paper(...)``: its name, the name its results.json files carry, and ``rebuild(results)``:
  the files its tables are made of, from finished runs' results.json contents alone.

Shared code does the rest: output folder and one-line errors (:mod:`lorabench.cli`), progress
(:class:`lorabench.utils.console.CellProgress`), loggers, results.json, sample grids and the rebuild
command for every paper (``python -m lorabench.protocols rebuild <paper> RUNS... --out DIR``,
:func:`rebuild`). docs/adding_a_paper.md walks through one.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import statistics
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from hydra.utils import instantiate
from omegaconf import OmegaConf

from lorabench.errors import ConfigError, check_int, find_config_error
from lorabench.utils.console import quiet_cells
from lorabench.utils.io import write_json, write_text

# Every paper's protocol, by the name its command and experiments/<paper>/ folder use.
PAPERS = {name: f"lorabench.protocols.{name}" for name in ("orthogonal_adaptation", "continual", "trilora")}


# -- settings: the protocol block as a dataclass -----------------------------------------------------------
def setting(default: Any = dataclasses.MISSING, *, minimum: Optional[int] = None, doc: str = "") -> Any:
    """A field of a protocol's :class:`Settings`: its default (none: required), an integer's lower bound and
    what it means (shown by docs/adding_a_paper.md's table of settings)."""
    meta = {"minimum": minimum, "doc": doc}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(kw_only=True)
class Settings:
    """The ``protocol:`` keys every protocol that trains several cells reads. A paper subclasses it with its
    own (a protocol that trains one cell at a time, as a continual sequence, need not)."""

    seeds: list[int] = setting([0], doc="training seeds: one replicate each")
    batch_cells: Any = setting(1, doc="cells a batched pass trains together (1: every cell alone; auto)")
    train_workers: int = setting(1, minimum=1, doc="processes that train uncached cells at once")


def read_settings(cls: type, node: Optional[Mapping], prefix: str = "protocol") -> Any:
    """An instance of the dataclass ``cls`` from the config block ``node``: integers, lists of integers,
    strings, booleans and their ``Optional`` forms checked by the field's type, a one-line
    :class:`ConfigError` naming ``<prefix>.<field>`` otherwise; other types are taken as plain containers.
    Keys ``cls`` does not declare are left to the protocol (its adapters, methods, ...)."""
    node = node if node is not None else {}
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        raw = node.get(f.name, None) if f.name in node else default
        if raw is dataclasses.MISSING:
            raise ConfigError(f"{prefix}.{f.name}", "missing; this protocol needs it")
        value = OmegaConf.to_container(raw, resolve=True) if OmegaConf.is_config(raw) else raw
        values[f.name] = _checked(value, hints[f.name], f"{prefix}.{f.name}", f.metadata.get("minimum"))
    return cls(**values)


def _checked(value: Any, hint: Any, name: str, minimum: Optional[int]) -> Any:
    args = typing.get_args(hint)
    optional = typing.get_origin(hint) is typing.Union and type(None) in args
    if optional:
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
    if hint is int:
        return check_int(value, name, minimum=minimum, allow_none=optional)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(name, f"must be true or false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(name, f"must be a string, got {value!r}")
        return value
    if typing.get_origin(hint) is list:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(name, f"must be a list, got {value!r}")
        (item,) = typing.get_args(hint)
        if item is int:
            return [check_int(v, f"{name}[{i}]", minimum=minimum) for i, v in enumerate(value)]
        return [str(v) for v in value] if item is str else list(value)
    return value


def pick(items: Mapping, only: Any, field_name: str, what: str) -> dict:
    """``items`` restricted to the names ``only`` gives (a name or a list, in its order; empty: every item), or
    one line naming ``field_name`` for a name ``items`` lacks (e.g. ``protocol.only``: a sweep's subset of methods)."""
    if not only:
        return dict(items)
    only = [only] if isinstance(only, str) else list(only)
    for name in only:
        if name not in items:
            raise ConfigError(field_name, f"unknown {what} {name!r}; valid: {', '.join(items)}")
    return {k: items[k] for k in only}


def load_field(node: Any, name: str) -> Any:
    """``node`` instantiated (a model a protocol needs beside the one it trains, console quiet), or one
    line naming the field ``name`` with the loader's reason."""
    try:
        with quiet_cells():
            return instantiate(node, _convert_="all")
    except Exception as exc:  # noqa: BLE001 - Hydra wraps the loader's error: one line naming the field
        raise ConfigError(name, f"could not load it ({find_config_error(exc) or exc})") from exc


# -- summaries ---------------------------------------------------------------------------------------------
def mean_std(xs: Sequence[float]) -> dict[str, float]:
    """``{mean, std, n}`` with the population std; empty for no values."""
    return {"mean": statistics.fmean(xs), "std": statistics.pstdev(xs), "n": len(xs)} if xs else {}


def pm(v: Optional[Mapping], fmt: str = "{:.3f}") -> str:
    """``mean +- std`` of a :func:`mean_std` summary, ``-`` when there is none."""
    return "-" if not v else f"{fmt.format(v['mean'])} +- {fmt.format(v['std'])}"


def mean_std_csv(summary: Mapping[Any, Mapping], keys: Sequence[str]) -> tuple[tuple[str, Callable], ...]:
    """The CSV part of a table column (:class:`lorabench.utils.tables.Column`) over :func:`mean_std` summaries
    ``summary[row][key]``: ``<key>_mean`` and ``<key>_std`` per key, empty where a row has none."""
    return tuple((f"{k}_{x}", lambda row, k=k, x=x: summary[row].get(k, {}).get(x, "")) for k in keys
                 for x in ("mean", "std"))


# -- claims --------------------------------------------------------------------------------------------------
def verdict(claim: str, ok: bool, detail: str, inconclusive: str = "", **numbers: Any) -> dict[str, Any]:
    """One claim judged by a rule fixed in advance: ``reproduced`` or ``not reproduced``, ``inconclusive``
    (with the reason) when the data cannot decide; ``detail`` says the numbers and the rule."""
    word = "inconclusive" if inconclusive else ("reproduced" if ok else "not reproduced")
    return {"claim": claim, "verdict": word, "detail": detail + (f"; {inconclusive}" if inconclusive else ""),
            **numbers}


def seedwise(in_the_mean: bool, in_every_seed: bool) -> str:
    """A claim's verdict from seeds: ``reproduced`` when it holds in the seed mean and in every seed, ``mixed``
    in the mean only, ``not reproduced`` otherwise."""
    return "reproduced" if in_the_mean and in_every_seed else "mixed" if in_the_mean else "not reproduced"


# -- rebuilding a paper's tables from finished runs -----------------------------------------------------------
@dataclass
class Rebuilt:
    """What a paper's tables are made of: ``files`` (name -> text, or a function that writes the file at
    the path it is given: a plot) and the ``console`` text the rebuild command prints."""

    files: dict[str, str | Callable[[Path], Any]]
    console: str


@dataclass(frozen=True)
class Paper:
    """A paper's protocol as the shared code sees it: ``name`` (its module, command and experiments/ folder),
    ``protocol`` (what its results.json files say they are), ``rebuild`` (results.json contents ->
    :class:`Rebuilt`), whether the rebuild command needs ``--out`` and what its files are."""

    name: str
    protocol: str
    rebuild: Callable[[list[dict]], Rebuilt]
    outputs: str
    out_required: bool = True


def paper(name: str) -> Paper:
    """The registered paper ``name`` (:data:`PAPERS`), or a one-line error listing them."""
    if name not in PAPERS:
        raise ConfigError("paper", f"unknown paper {name!r}; valid: {', '.join(PAPERS)}")
    return importlib.import_module(PAPERS[name]).PAPER


def collect(p: Paper, paths: Sequence[str | Path]) -> list[dict]:
    """The results.json contents of ``p``'s runs under ``paths`` (files, or folders searched recursively),
    in path order, each with its ``_path``. A folder without one, or a results.json of another protocol
    named directly, is a one-line error."""
    found = []
    for path in map(Path, paths):
        if path.is_file():
            files = [path]
        elif (path / "results.json").is_file():
            files = [path / "results.json"]
        else:
            files = sorted(path.rglob("results.json")) if path.is_dir() else []
        if not files:
            raise ConfigError(str(path), f"holds no results.json (is it a finished {p.name} run folder?)")
        for f in files:
            try:
                data = json.loads(f.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:  # a run writes it whole (a temp file renamed)
                raise ConfigError(str(f), f"is not JSON ({exc}); a results.json edited by hand, or another file "
                                  "of that name?") from exc
            if not isinstance(data, dict):
                raise ConfigError(str(f), f"holds a {type(data).__name__}, not a run's results (a JSON object)")
            if data.get("protocol") != p.protocol:
                if f.parent == path or f == path:
                    what = f"a {data['protocol']!r} run" if data.get("protocol") else "a training run (no protocol)"
                    raise ConfigError(str(f), f"is {what}, not one of {p.name}'s (protocol {p.protocol!r})")
                continue  # a nested file of another protocol (a cell's training results): not a run of this table
            found.append({**data, "_path": str(f)})
    if not found:
        raise ConfigError("paths", f"no {p.name} results.json under {', '.join(map(str, paths))}")
    return found


def join_rows(outs: Sequence[Mapping], same: Sequence[str], key: Callable[[dict], tuple],
              repeated: Optional[Callable[[dict, dict], Optional[str]]] = None) -> list[dict]:
    """The rows of several runs of one setup (e.g. the jobs of a multirun) as one list, for one table. Every
    field of ``same`` must agree across runs. A row whose ``key`` an earlier run's row has is an error
    (``<key> appears in two runs``), unless ``repeated(row, first)`` is given: None keeps the first only (a
    row every run repeats), a message is the error. Errors are ``ValueError``s naming the run (its ``_path``)."""
    rows, seen = [], {}
    for o in outs:
        where = o.get("_path", "a run")
        for field_name in same:
            if o.get(field_name) != outs[0].get(field_name):
                raise ValueError(f"{where}: {field_name} differs from {outs[0].get('_path', 'the first run')}; these "
                                 "runs are not one table")
        for row in o["rows"]:
            k = key(row)
            if k in seen:
                error = repeated(row, seen[k]) if repeated else " ".join(map(str, k)) + " appears in two runs"
                if error is None:
                    continue
                raise ValueError(f"{where}: {error}")
            seen[k] = row
            rows.append(row)
    return rows


def write_files(files: Mapping[str, Any], out_dir: str | Path) -> None:
    """Write ``files`` into ``out_dir``: name -> text, JSON content (a ``.json`` name) or a function that writes
    the file at the path it is given (a plot); each through a temporary file and a rename."""
    for name, content in files.items():
        target = Path(out_dir) / name
        if callable(content):
            content(target)
        elif name.endswith(".json") and not isinstance(content, str):
            write_json(target, content)
        else:
            write_text(target, content)


def rebuild(name: str, paths: Sequence[str | Path], out_dir: Optional[str | Path] = None) -> Rebuilt:
    """Paper ``name``'s tables from its runs' results.json files under ``paths``, written into ``out_dir``
    when given; no model is loaded and nothing re-runs."""
    p = paper(name)
    rebuilt = p.rebuild(collect(p, paths))
    if out_dir is not None:
        write_files(rebuilt.files, out_dir)
    return rebuilt
