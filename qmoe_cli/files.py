"""Crash-safe output: a directory appears under its final name only when complete."""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import QmoeError


def temporary_name(directory: Path) -> Path:
    """The name a run writes `directory` under until it is complete."""
    return directory.with_name(f".{directory.name}.partial")


@contextmanager
def atomic_directory(directory: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `directory`; rename it into place on success.

    On an exception the temporary directory is removed and nothing appears at `directory`.
    An existing `directory` is an error unless `overwrite` (then it is replaced atomically
    enough: the old one is removed only after the new one is fully written).
    """
    if directory.exists() and not overwrite:
        raise QmoeError(f"{directory}: already exists; choose another output or remove it")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(directory)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        for child in tmp.iterdir():
            _fsync(child)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_durably(tmp: Path, path: Path) -> None:
    """Flush the finished file `tmp` to disk, then rename it to `path` (atomic on POSIX)."""
    _fsync(tmp)
    os.replace(tmp, path)


def _fsync(path: Path) -> None:
    if path.is_file():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())


def read_json_object(path: Path, missing: str) -> dict[str, Any]:
    """The JSON object in `path`; QmoeError naming the file if absent (with `missing` as the
    explanation), unreadable, or not an object."""
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise QmoeError(f"{path}: not found; {missing}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise QmoeError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise QmoeError(f"{path}: expected a JSON object")
    return value
