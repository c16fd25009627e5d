"""Which errors are the user's to fix (bad input, files, options, damaged models) and their one-line message.

The command line prints ``user_error(err)`` as one line and exits 2; anything it returns None for is a bug and
keeps its traceback. ``--debug`` (or ``VIDLATENT_DEBUG=1``) shows the traceback of every error.
"""

from __future__ import annotations

import errno
import importlib
import os

MAX_MESSAGE = 400  # characters of a one-line error; longer ones are cut (``--debug`` shows everything)

# errno values that say the disk, not the input, is the problem
DISK_ERRORS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
}


def debug_wanted(flag: bool = False) -> bool:
    """``--debug`` given, or ``VIDLATENT_DEBUG`` set to anything but "" or "0"."""
    return flag or os.environ.get("VIDLATENT_DEBUG", "") not in ("", "0")


def _user_classes() -> tuple[type, ...]:
    # ImportError: an optional package is missing (the message says what to install)
    classes: list[type] = [ValueError, OSError, MemoryError, UnicodeError, LookupError, ImportError]
    # the error classes of the libraries that read files for us, where installed
    for module, name in (("omegaconf.errors", "OmegaConfBaseException"), ("yaml", "YAMLError"),
                         ("safetensors", "SafetensorError"), ("torch", "OutOfMemoryError")):  # fmt: skip
        try:
            classes.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # pragma: no cover
            pass
    return tuple(classes)


def error_reason(err: BaseException) -> str:
    """``Type: first line of the message``: why one item of a batch job failed, for its report."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def one_line(text: str, limit: int = MAX_MESSAGE) -> str:
    """Collapse a message's lines into one (``; `` between them) and cut it to ``limit`` characters."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    text = "; ".join(lines).replace(":;", ":")
    return text if len(text) <= limit else text[: limit - 30].rstrip() + " ... (--debug shows all)"


def os_error_message(err: OSError) -> str:
    """``path: what`` for an OSError that names a file (``[Errno 28] ...: 'path'`` otherwise)."""
    what = err.strerror or DISK_ERRORS.get(err.errno) or str(err)
    if err.filename is not None:
        names = str(err.filename) + (f" -> {err.filename2}" if err.filename2 is not None else "")
        return f"{names}: {what}"
    return str(err) if err.strerror is None else what


def user_error(err: BaseException) -> str | None:
    """The one-line message for an error a user can act on, or None for an unexpected one (a bug)."""
    import torch

    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return one_line(f"out of memory ({err}); try a smaller size, fewer frames or --dtype bfloat16")
    if isinstance(err, OSError) and not isinstance(err, (FileNotFoundError,)) and err.filename is not None:
        return one_line(os_error_message(err))
    if isinstance(err, OSError) and err.errno in DISK_ERRORS:
        return one_line(os_error_message(err))
    if isinstance(err, KeyError) and not type(err).__module__.startswith("omegaconf"):
        return None  # a missing dict key is a bug here, not the user's
    if isinstance(err, _user_classes()):
        text = str(err.args[0]) if isinstance(err, LookupError) and err.args else str(err)
        return one_line(text or type(err).__name__)
    return None
