"""The one exception type the CLI turns into a one-line message.

Library code raises `QmoeError` (or `ValueError` for invalid configuration values) for
problems with the user's input: missing files, corrupt checkpoints, bad data. The CLI prints
`error: <message>` on stderr and exits 1 (2 for usage errors); a traceback only with `--debug`.
"""

import re


class QmoeError(Exception):
    """A user-facing failure: the message names the file or flag, what is wrong, and the fix."""


def os_error_message(exc: BaseException) -> str:
    """One line for an OSError or a safetensors write error (disk full while saving): the file
    when known, then the operating system's reason."""
    if isinstance(exc, OSError):
        names = " -> ".join(str(n) for n in (exc.filename, exc.filename2) if n is not None)
        reason = exc.strerror or str(exc) or type(exc).__name__
        return f"{names}: {reason}" if names else reason
    # safetensors reports `Error while serializing: IoError(Os { code: 28, ..., message: "..." })`
    found = re.search(r'message: "([^"]*)"', str(exc))
    return found.group(1) if found else (str(exc).strip().splitlines() or [type(exc).__name__])[0]
