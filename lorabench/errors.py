"""User-facing errors.

A :class:`ConfigError` is bad input: a wrong config value, a missing file, an
adapter that does not fit the model. The CLI prints it as one line (no
traceback unless ``HYDRA_FULL_ERROR=1``) and removes the run directory it was
about to fill, so nothing half-written is left in ``outputs/``.
"""


class ConfigError(ValueError):
    """Bad user input. The message names the field or file and what is valid."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


def choice_error(field: str, value, valid) -> ConfigError:
    valid = ", ".join(sorted(map(str, valid))) or "none yet"
    return ConfigError(field, f"unknown value {value!r}; valid: {valid}")
