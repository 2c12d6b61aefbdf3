"""Prompts for generation from a JSONL file (`qmoe generate --input`): one JSON object a line."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import QmoeError, UsageError


def read_prompts(path: Path) -> list[tuple[str, str]]:
    """(where, text) of every line of a prompts JSONL file, `{"prompt": TEXT}` (or `"text"`); blank
    lines are skipped. `where` is "FILE:LINE", for messages about that prompt."""
    if not path.is_file():
        raise UsageError(f"--input {path}: no such file")
    found = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise QmoeError(f"{where}: not valid JSON ({exc.msg})") from None
        text = row.get("prompt", row.get("text")) if isinstance(row, dict) else None
        if not isinstance(text, str):
            raise QmoeError(f'{where}: expected an object with a "prompt" (or "text") string')
        found.append((where, text))
    if not found:
        raise QmoeError(f"--input {path}: holds no prompts")
    return found
