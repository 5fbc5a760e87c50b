"""The project's user-facing errors: each message names the file, line, field or value at fault.

``launch.py`` prints them as one line and exits non-zero; anything else is a bug and keeps
its traceback.
"""


class SmallshotError(Exception):
    """Base of every error caused by the user's input or environment."""


class ConfigError(SmallshotError, ValueError):
    """A recipe, override, search space or field value is invalid."""


class DataError(SmallshotError, ValueError):
    """A dataset file, row or image is malformed, or a class has too few examples."""


class CheckpointError(SmallshotError):
    """A checkpoint is missing, truncated, unsafe to load or does not fit the model."""


class ClusterError(SmallshotError):
    """The Ray cluster cannot run what was asked (resources, address, authentication)."""


class TrainingError(SmallshotError):
    """Training cannot go on (e.g. the loss became NaN or infinite)."""


def did_you_mean(value: object, names: list[str] | tuple[str, ...], cutoff: float = 0.6) -> str:
    """'; did you mean 'adam'?' when ``value`` is close to one of ``names``, else ''."""
    import difflib

    hint = difflib.get_close_matches(str(value), [str(n) for n in names], n=1, cutoff=cutoff)
    return f"; did you mean {hint[0]!r}?" if hint else ""
