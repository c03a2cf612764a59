"""User-facing errors, and the checks that raise them.

A :class:`ConfigError` is bad input: a wrong config value, a missing file, an
adapter that does not fit the model. The CLI prints it as one line (no
traceback unless ``HYDRA_FULL_ERROR=1``) and removes the run directory it was
about to fill, so nothing half-written is left in ``outputs/``.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """Bad user input. The message names the field or file and what is valid."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


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
