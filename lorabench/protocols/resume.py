"""Resume: a run that goes through steps in order (a continual sequence's tasks) keeps each finished
step's state in its folder, so the same command started again continues where the run stopped and
ends with the same results as an uninterrupted run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file

from lorabench.errors import ConfigError
from lorabench.protocols.cells import config_hash
from lorabench.utils.io import atomic_dir, write_json
from lorabench.utils.seeding import rng_state, set_rng_state


class SequenceState:
    """``<run>/state``: ``sequence.json`` (the run's fingerprint and step names) and one folder per
    completed step (``task_<t>``: the method's tensors, the global RNG state and a JSON record), each
    written to a temporary folder and renamed. A folder holding another run's state is refused."""

    def __init__(self, folder: Path, key: str, tasks: Sequence[str]):
        self.folder, self.key, self.tasks = Path(folder), key, list(tasks)
        meta = self.folder / "sequence.json"
        if meta.is_file():
            found = json.loads(meta.read_text())
            if found.get("fingerprint") != key or found.get("tasks") != self.tasks:
                raise ConfigError("hydra.run.dir", f"{self.folder.parent} holds a sequence run with other settings "
                                  f"(tasks {found.get('tasks')}); resume it with its own command or give this run "
                                  "another folder")

    def start(self) -> None:
        """Create the folder and record the run's fingerprint and steps."""
        self.folder.mkdir(parents=True, exist_ok=True)
        write_json(self.folder / "sequence.json", {"fingerprint": self.key, "tasks": self.tasks})

    def task_dir(self, t: int) -> Path:
        """The folder of step ``t``."""
        return self.folder / f"task_{t:03d}"

    def completed(self) -> int:
        """How many tasks are complete (consecutive from the first)."""
        n = 0
        while (self.task_dir(n) / "record.json").is_file():
            n += 1
        return n

    def cached(self, name: str, compute: Callable[[], Any]) -> Any:
        """The JSON file ``name`` of the state if a run before this one wrote it, else ``compute()``, written there
        (what every step is compared with: a continual sequence's base-model scores)."""
        path = self.folder / name
        if path.is_file():
            return json.loads(path.read_text())
        value = compute()
        write_json(path, value)
        return value

    def replay(self, on_step: Callable[[int, dict], None]) -> tuple[int, Optional[dict[str, torch.Tensor]]]:
        """Each completed step's record (without its RNG state) to ``on_step(t, record)`` in order, then the
        global RNG state after the last of them set: ``(steps done, the last step's tensors or None)``."""
        done = self.completed()
        for t in range(done):
            on_step(t, {k: v for k, v in self.read_record(t).items() if k != "rng"})
        return done, self.load_task(done - 1)[1] if done else None

    def save_task(self, t: int, method_state: Mapping[str, torch.Tensor], record: dict) -> None:
        """Step ``t``'s tensors, record and the RNG state, atomically (on rank zero only: :func:`rank_zero`)."""
        if not rank_zero():
            return
        meta, tensors = rng_state()
        with atomic_dir(self.task_dir(t)) as tmp:
            save_file({k: v.contiguous() for k, v in method_state.items()}, str(tmp / "method.safetensors"))
            save_file(tensors, str(tmp / "rng.safetensors"))
            (tmp / "record.json").write_text(json.dumps({**record, "rng": meta}))

    def load_task(self, t: int) -> tuple[dict, dict[str, torch.Tensor]]:
        """Step ``t``'s record and tensors; the global RNG state is set to what it was after the step."""
        d = self.task_dir(t)
        record = json.loads((d / "record.json").read_text())
        set_rng_state(record["rng"], load_file(str(d / "rng.safetensors")))
        return record, load_file(str(d / "method.safetensors"))

    def read_record(self, t: int) -> dict:
        """Step ``t``'s record, the RNG state left as it is."""
        return json.loads((self.task_dir(t) / "record.json").read_text())


def rank_zero() -> bool:
    """Under DDP (every rank runs the protocol; training and evaluation are sharded by Lightning and the
    callback) only rank zero writes state and outputs."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def fingerprint(cfg: DictConfig, keys: Sequence[str]) -> str:
    """What decides a resumed run's results: the config groups ``keys`` (:func:`~lorabench.protocols.cells.config_hash`)
    and the ``protocol`` block, not where the run is written or logged."""
    protocol = {k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
                for k, v in cfg.protocol.items() if k != "_target_"}
    return config_hash(cfg, keys, length=16, extra={"protocol": protocol})
