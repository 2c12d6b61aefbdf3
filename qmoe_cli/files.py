"""Crash-safe output: a file or directory appears under its final name only when complete, with
the mode the umask asks for."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from .errors import QmoeError, os_error_message, os_error_of, os_error_remedy


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
    """Give the finished file `tmp` the umask's mode, flush it to disk, then rename it to `path`
    (atomic on POSIX).

    The mode matters on shared machines: safetensors' `save_file` creates 0600 files, which the
    colleague who evaluates a checkpoint cannot read.
    """
    os.chmod(tmp, 0o666 & ~_umask())
    _fsync(tmp)
    os.replace(tmp, path)


def save_tensors_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """A safetensors file written under a temporary name, then renamed (a crash leaves no half file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    except SafetensorError as exc:  # it names no file: say which
        raise os_error_of(exc, tmp) from exc
    replace_durably(tmp, path)


def check_output_dir(directory: Path, flag: str) -> None:
    """Refuse, before any work, an output directory that could never be written: a symbolic link
    (a loop included), a path under a file, or a parent where nothing may be created (read-only,
    no permission). Creates the missing parents, as the writer would; probes by creating and
    removing one empty directory beside `directory`, since `os.access` says yes to root on
    file systems that refuse it (sysfs) and knows nothing of read-only mounts' quotas.
    """
    if directory.is_symlink():
        target = os.readlink(directory)
        raise QmoeError(f"{flag} {directory}: is a symbolic link (to {target}); outputs are new directories: "
                        "remove the link or choose another path")
    parent = directory.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(prefix=f".{directory.name}.probe-", dir=parent))
    except OSError as exc:
        raise QmoeError(f"{flag} {directory}: cannot be written ({os_error_message(exc)}); "
                        f"{os_error_remedy(exc)}") from None


def write_json_atomic(path: Path, obj: Any) -> None:
    """`obj` as indented, key-sorted JSON, written under a temporary name, then renamed."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    replace_durably(tmp, path)


def _umask() -> int:
    """The process's umask. Linux shows it in /proc; elsewhere the only way to read it is to set
    it and put it back at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


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
