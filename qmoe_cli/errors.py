"""The exception types the CLI turns into a one-line message, and one-line text for OS errors.

Library code raises `QmoeError` (or `ValueError` for invalid configuration values) for
problems with the user's input: missing files, corrupt checkpoints, bad data. The CLI prints
`error: <message>` on stderr and exits 1; `UsageError` (a flag's value is wrong, e.g. a
`--model` that names nothing) and `ValueError` exit 2. A traceback only with `--debug`.
"""

from __future__ import annotations

import difflib
import errno
import os
import re
from collections.abc import Iterable


class QmoeError(Exception):
    """A user-facing failure: the message names the file or flag, what is wrong, and the fix."""


class UsageError(QmoeError):
    """The command line itself is wrong (exit 2): the message names the flag as the user typed it."""


def did_you_mean(given: str, known: Iterable[str]) -> str:
    """' (did you mean X?)' for the known names closest to a mistyped one, '' when none is close."""
    close = difflib.get_close_matches(given, list(known), n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


# What to do next for the errors a write meets in practice; anything else: "fix the cause".
_REMEDIES = {
    errno.ENOSPC: "free space",
    errno.EDQUOT: "free space or raise the disk quota",
    errno.EFBIG: "write to a file system that allows larger files (not FAT32, no `ulimit -f`)",
    errno.EACCES: "choose a writable directory or fix its permissions",
    errno.EPERM: "choose a writable directory or fix its permissions",
    errno.EROFS: "choose a directory on a writable file system",
    errno.ELOOP: "remove the symbolic link loop or choose another path",
    errno.ENOTDIR: "a path component is a file, not a directory: choose another path",
}


def os_error_remedy(exc: BaseException) -> str:
    """The next step for an OSError (or a safetensors write error): 'free space' for a full disk, ..."""
    code = exc.errno if isinstance(exc, OSError) else _safetensors_errno(str(exc))
    return _REMEDIES.get(code, "fix the cause") if code is not None else "fix the cause"


def os_error_message(exc: BaseException) -> str:
    """One line for an OSError or a safetensors write error (disk full while saving): the file
    when known, then the operating system's reason."""
    if isinstance(exc, OSError):
        names = " -> ".join(str(n) for n in (exc.filename, exc.filename2) if n is not None)
        reason = exc.strerror or str(exc) or type(exc).__name__
        return f"{names}: {reason}" if names else reason
    code = _safetensors_errno(str(exc))
    if code is not None:
        return os.strerror(code)
    found = re.search(r'message: "([^"]*)"', str(exc))
    return found.group(1) if found else (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def os_error_of(exc: BaseException, path: object) -> OSError:
    """A safetensors write error as the OSError it wraps, naming `path` (safetensors names no file)."""
    code = _safetensors_errno(str(exc))
    if code is None:
        return OSError(errno.EIO, os_error_message(exc), str(path))
    return OSError(code, os.strerror(code), str(path))


def _safetensors_errno(text: str) -> int | None:
    """The errno inside safetensors' message: `IoError(Os { code: 28, ... })` (older releases) or
    `I/O error: File too large (os error 27)` (newer)."""
    found = re.search(r"code: (\d+)|os error (\d+)", text)
    return int(found.group(1) or found.group(2)) if found else None
