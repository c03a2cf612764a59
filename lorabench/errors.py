"""User-facing errors, and the checks that raise them.

A :class:`ConfigError` is bad input: a wrong config value, a missing file, an
adapter that does not fit the model. The CLI prints it as one line (no
traceback unless ``HYDRA_FULL_ERROR=1``) and removes the run directory it was
about to fill, so nothing half-written is left in ``outputs/``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping, Optional

from hydra.errors import InstantiationException

PACKAGE_DIR = Path(__file__).resolve().parent


class ConfigError(ValueError):
    """Bad user input. The message names the field or file and what is valid."""

    def __init__(self, field: str, message: str):
        self.field, self.message = field, message
        super().__init__(f"{field}: {message}")

    def __reduce__(self):
        # rebuilt from both arguments: a protocol's cell that raises one in a worker process sends it back pickled
        # (the default rebuilds from the joined message alone, fails, and the pool reads as broken)
        return type(self), (self.field, self.message)


def choice_error(field: str, value, valid) -> ConfigError:
    """The error for a value that is not one of ``valid`` (listed, sorted)."""
    valid = ", ".join(sorted(map(str, valid))) or "none yet"
    return ConfigError(field, f"unknown value {value!r}; valid: {valid}")


def check_int(value, field: str, minimum: int | None = None, allow_none: bool = False) -> int | None:
    """``value`` as an int, or a ConfigError naming ``field``: booleans and strings are refused,
    ``None`` only with ``allow_none``, and values below ``minimum``."""
    if value is None and allow_none:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise ConfigError(field, f"must be an integer{bound}{' or null' if allow_none else ''}, got {value!r}")
    return value


# The seeds a run accepts: Lightning's ``seed_everything`` seeds numpy, whose seeds are unsigned 32-bit integers
# (outside them it raises, deep inside a run or a protocol's cell).
SEED_RANGE = (0, 2**32 - 1)


def check_seed(value, field: str) -> int:
    """``value`` as a seed (an integer in :data:`SEED_RANGE`), or a ConfigError naming ``field``."""
    low, high = SEED_RANGE
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ConfigError(field, f"must be an integer from {low} to {high}, got {value!r}")
    return value


def find_config_error(exc: BaseException) -> Optional[ConfigError]:
    """The ConfigError behind ``exc``, looking through Hydra's InstantiationException wrappers; or,
    for an error raised inside a third-party constructor that Hydra instantiated (a Lightning or
    diffusers class rejecting an option), a ConfigError naming the config key Hydra reports."""
    seen, chain = set(), []
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, ConfigError):
            return exc
        seen.add(id(exc))
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    wrapper = next((e for e in chain if isinstance(e, InstantiationException)), None)
    inner = chain[-1]
    if wrapper is None or inner is wrapper or raised_in_lorabench(inner):
        return None  # our own bug: keep the traceback
    key = re.search(r"full_key: (\S+)", str(wrapper))
    return ConfigError(key.group(1) if key else "config", f"{type(inner).__name__}: {' '.join(str(inner).split())}")


def raised_in_lorabench(exc: BaseException) -> bool:
    """Whether the innermost frame of ``exc``'s traceback is lorabench's own code."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and PACKAGE_DIR in Path(tb.tb_frame.f_code.co_filename).resolve().parents


def raised_by(exc: BaseException, objects: Mapping[str, object]) -> Optional[str]:
    """The name in ``objects`` of the object whose method raised ``exc`` (the innermost frame of its traceback
    whose ``self`` is one of them), or None: which configured callback refused its options."""
    by_id, found, tb = {id(obj): name for name, obj in objects.items()}, None, exc.__traceback__
    while tb is not None:
        found = by_id.get(id(tb.tb_frame.f_locals.get("self")), found)
        tb = tb.tb_next
    return found
