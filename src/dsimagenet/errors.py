"""The one base class of every error that is the input's or the environment's fault, not ours.

The command line prints such an error as one line (``dsimagenet build: error: <message>``) and exits with its
``exit_code``; any other exception is a bug of ours and keeps its traceback. Every message names the file (or
the flag) and says what is wrong with it.

    try:
        open_dataset(path)
    except DSImageNetError as e:
        print(e)            # "data/val_data: ..."
"""

from __future__ import annotations


class DSImageNetError(Exception):
    """Bad input or a failing environment; the message names the file or flag and what is wrong."""

    exit_code = 1


class FormatError(DSImageNetError, ValueError):
    """A dataset file that is not what it should be; the message names the file."""


class ConfigError(DSImageNetError, ValueError):
    """A configuration value out of range; the message names the field (as its flag) and the allowed values."""


def describe_os_error(e: OSError) -> str:
    """An OSError as one line that always names the path: ``[Errno 28] No space left on device`` alone is not
    enough to act on."""
    text = e.strerror or str(e)
    paths = [p for p in (e.filename, e.filename2) if p is not None]
    if not paths:
        return str(e)
    return f"{' -> '.join(map(str, paths))}: {text}"


class Diverged(DSImageNetError):
    """A training run whose loss became non-finite (NaN or infinite): stopped, and marked ``"status":
    "diverged"`` in its result.json; the message names the run, the epoch and step, the loss, and a remedy."""

    exit_code = 3
