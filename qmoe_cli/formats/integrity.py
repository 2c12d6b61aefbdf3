"""Checksums of compressed checkpoints (quantized and packed alike).

A manifest lists every other file of its checkpoint in `files` (`{"bytes": n, "sha256": hex}`)
and carries `manifest_sha256`, the sha256 of the rest of itself as canonical JSON. So a flipped,
truncated or edited byte anywhere is an error, never a silently different model: the manifest is
checked when it is read, and each file against its record before any tensor of it is used.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from ..errors import QmoeError

_SHA256 = re.compile(r"[0-9a-f]{64}")


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest without its own `manifest_sha256`, as canonical JSON."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def file_record(path: Path) -> dict[str, Any]:
    """What the manifest's `files` holds for one file."""
    return {"bytes": path.stat().st_size, "sha256": file_digest(path)}


def check_manifest_digest(manifest: dict[str, Any], where: Path) -> None:
    if manifest.get("manifest_sha256") != manifest_digest(manifest):
        raise QmoeError(f"{where}: checksum mismatch; the manifest is corrupt or was edited")


def file_records(manifest: dict[str, Any], where: Path) -> dict[str, dict[str, Any]]:
    """The manifest's `files`, checked to be records of relative paths inside the checkpoint."""
    records = manifest.get("files")
    if not isinstance(records, dict):
        raise QmoeError(f"{where}: malformed manifest ('files' must map file names to records)")
    for name, record in records.items():
        if (not inside(name) or not isinstance(record, dict)
                or not isinstance(record.get("bytes"), int) or not isinstance(record.get("sha256"), str)
                or not _SHA256.fullmatch(record["sha256"])):
            raise QmoeError(f"{where}: malformed manifest (bad record for file {name!r})")
    return records


def inside(name: str) -> bool:
    """Whether a manifest's file name stays inside its checkpoint: relative, no `..`, not empty.
    Every reader checks this before it opens a listed file, so a re-signed manifest cannot make
    qmoe read (or hash, or copy) a file elsewhere."""
    path = Path(name)
    return bool(name) and not path.is_absolute() and ".." not in path.parts and "\\" not in name


def verify_file(directory: Path, records: dict[str, dict[str, Any]], name: str, kind: str) -> Path:
    """The path of file `name` of a `kind` checkpoint after checking its size and sha256 against
    its record (reads the whole file)."""
    if not inside(name):
        raise QmoeError(f"{directory / 'manifest.json'}: file record {name!r} points outside the checkpoint; "
                        "the manifest is corrupt or was edited")
    path = directory / name
    record = records.get(name)
    if record is None:
        raise QmoeError(f"{path}: not listed in the manifest; the checkpoint is corrupt")
    if not path.is_file():
        raise QmoeError(f"{path}: missing; the {kind} checkpoint is incomplete")
    if path.stat().st_size != record["bytes"] or file_digest(path) != record["sha256"]:
        raise QmoeError(f"{path}: checksum mismatch; the file is corrupt or truncated")
    return path
