"""The one exception type the CLI turns into a one-line message.

Library code raises `QmoeError` (or `ValueError` for invalid configuration values) for
problems with the user's input: missing files, corrupt checkpoints, bad data. The CLI prints
`error: <message>` on stderr and exits 1 (2 for usage errors); a traceback only with `--debug`.
"""


class QmoeError(Exception):
    """A user-facing failure: the message names the file or flag, what is wrong, and the fix."""
