"""Presets: one `configs/*.toml` file per known model, so that no code branches on a model's name.

A preset names the hub id of a known model, the quirks of its checkpoint (applied on top of its
`config.json`), its window and default data. Presets are family-independent; the family is read
from the checkpoint's config.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from typing import Any

from ..errors import QmoeError
from ..resources import shipped_dir

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass(frozen=True)
class Preset:
    """One `configs/*.toml` file: a known model, where it lives, and its checkpoint's quirks."""

    name: str
    hub_id: str
    description: str = ""
    stored_dtype: str = "float32"  # what the checkpoint holds; GPUs run float32 ones in bfloat16
    window: int = 512  # longest input or label sequence a sample may have, in tokens
    local_dir: str | None = None  # a checkpoint shipped inside the package, relative to it
    default_calib: str = "c4"
    default_data: str = "c4"
    config_overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.stored_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"Preset.stored_dtype must be float32, bfloat16 or float16, got {self.stored_dtype!r}")
        if self.window < 2:
            raise ValueError(f"Preset.window must be >= 2, got {self.window}")


def _preset_files() -> dict[str, Any]:
    root = shipped_dir("configs")
    return {p.name[: -len(".toml")]: p for p in root.iterdir() if p.name.endswith(".toml")}


def preset_names() -> list[str]:
    """Names in natural order: switch-base-8 before switch-base-16 before switch-base-128."""
    return sorted(_preset_files(), key=natural_key)


def natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key comparing runs of digits as numbers ("x-16" < "x-128")."""
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", name) if part)


def load_preset(name: str) -> Preset | None:
    """The preset called `name`, or the one whose hub id is `name`; None when there is none."""
    files = _preset_files()
    if name in files:
        return _parse_preset(files[name])
    for candidate in files.values():
        preset = _parse_preset(candidate)
        if preset.hub_id == name:
            return preset
    return None


def _parse_preset(path: Any) -> Preset:
    try:
        raw = tomllib.loads(path.read_text())
        return Preset(**raw)
    except (tomllib.TOMLDecodeError, TypeError, ValueError) as exc:
        raise QmoeError(f"preset {path.name}: {exc}") from None
