"""The errors caused by the user's input: the scripts print their message alone, as one `error:` line (udtimm.cli).

Imports nothing of udtimm or torch, so any module, the lightest included, can raise them.
"""

from __future__ import annotations

# The most items of a list that an error message quotes: a model of 10,000 classes still gets a one-line message.
QUOTED_ITEMS = 10


class ConfigError(ValueError):
    """A configuration file or flag combination that cannot be used."""


class DatasetError(ValueError):
    """Bad dataset input; the message names the file (and line, row or id) at fault."""


class CorruptImageError(DatasetError):
    """An image file that cannot be read or decoded; the message names the file."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked; the message says what differs."""


class ModelConfigError(ValueError):
    """A model that cannot be built as asked (unknown name, unreachable weights, ...)."""


class HeadConfigError(ValueError):
    """A head that cannot be built as asked (unknown name, options it does not take, values out of range)."""


class WeightsError(ValueError):
    """A weights file that cannot be read or does not fit the model; the message names the file and the keys."""


class NonFiniteLossError(FloatingPointError):
    """A NaN/inf loss term; the message names the epoch, step and term."""


USER_ERRORS = (ConfigError, DatasetError, CheckpointError, ModelConfigError, HeadConfigError, WeightsError,
               NonFiniteLossError, OSError)


def shortened(values: object, limit: int = QUOTED_ITEMS) -> str:
    """repr of `values`; a list or tuple of more than `limit` items as its first `limit` and how many more."""
    if not isinstance(values, (list, tuple)) or len(values) <= limit:
        return repr(values)
    return f"{repr(list(values[:limit]))[:-1]}, ... {len(values) - limit:,} more]"
