"""The quantized checkpoint's manifest: one typed, versioned record, validated once, JSON both ways.

A running compression keeps it as the JSON object it writes (`new_manifest`, then files, finished
blocks and their statistics added as they land, rewritten with its checksum after every sparse
block by `write_manifest`), so a killed run leaves a manifest that `--resume` can check; a
finished checkpoint is read into a `QuantizedManifest` (`from_json`), which every reader uses.
The JSON is format version 2's as it has always been written (keys sorted, `manifest_sha256`
over the rest): checkpoints written before this class existed read unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import QmoeError
from ..files import read_json_object, write_json_atomic
from ..quant.grids import QuantSpec
from .integrity import check_manifest_digest, file_records, manifest_digest

KIND = "quantized"
FORMAT_VERSION = 2  # 2: file records and the manifest checksum (1 had neither)
SHARED_MODES = ("quantize", "keep")  # `settings.shared_experts`: quantized like routed experts, or as stored


def read_manifest(directory: Path) -> dict[str, Any]:
    """The JSON object of `directory/manifest.json` of any qmoe checkpoint kind (it has a `kind`)."""
    path = directory / "manifest.json"
    manifest = read_json_object(path, "not a qmoe checkpoint")
    if "kind" not in manifest:
        raise QmoeError(f"{path}: not a qmoe manifest (no 'kind')")
    return manifest


def check_manifest(manifest: dict[str, Any], where: Path) -> None:
    """A quantized manifest of this format version whose checksum holds (QmoeError otherwise)."""
    kind, version = manifest.get("kind"), manifest.get("format_version")
    if kind != KIND:
        raise QmoeError(f"{where}: manifest is kind {kind!r} version {version!r}; "
                        f"expected {KIND!r} version {FORMAT_VERSION}")
    if version != FORMAT_VERSION:
        older = isinstance(version, int) and version < FORMAT_VERSION
        raise QmoeError(f"{where}: quantized format version {version!r} is not readable by this qmoe, which reads "
                        f"version {FORMAT_VERSION}; " + ("compress the model again (version 1 has no checksums)"
                                                         if older else "use the qmoe version that wrote it"))
    check_manifest_digest(manifest, where)


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    """Write `manifest` into `directory` with its checksum (atomically)."""
    manifest["manifest_sha256"] = manifest_digest(manifest)
    write_json_atomic(directory / "manifest.json", manifest)


def new_manifest(source: str, window: int, settings: dict[str, Any], config: dict[str, Any],
                 fingerprint: str) -> dict[str, Any]:
    """The manifest a compression starts with: nothing finished, no files yet."""
    return {"kind": KIND, "format_version": FORMAT_VERSION, "source": source, "window": window,
            "settings": settings, "config": config, "fingerprint": fingerprint,
            "finished": [], "blocks": {}, "complete": False, "files": {}}


class QuantizationSettings:
    """What a compressed checkpoint's manifest answers from its `settings` (both formats carry
    the quantization's settings as `qmoe compress` recorded them)."""

    settings: dict[str, Any]

    def check_settings(self) -> None:
        """ValueError naming the field unless group_size and the scheme (bits, grid_group, symmetric) hold."""
        group_size = self.settings.get("group_size") if isinstance(self.settings, dict) else None
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"settings.group_size must be an integer >= 1, got {group_size!r}")
        self.spec  # a scheme, else ValueError

    @property
    def spec(self) -> QuantSpec:
        # `symmetric` is recorded only when set: checkpoints written before it existed are asymmetric
        return QuantSpec(self.settings["bits"], self.settings.get("grid_group"), self.settings.get("symmetric", False))

    @property
    def group_size(self) -> int:
        """Experts per expert group file."""
        return self.settings["group_size"]


@dataclass(frozen=True)
class QuantizedManifest(QuantizationSettings):
    """What `manifest.json` of a finished quantized checkpoint holds (besides `kind`,
    `format_version` and `manifest_sha256`, which `to_json` adds)."""

    source: str  # the model compressed (a preset, hub id or directory)
    window: int  # longest input or label sequence, tokens (the source's)
    settings: dict[str, Any]  # `CompressConfig.settings_of`: bits, group_size, grid_group, method, ...
    config: dict[str, Any]  # the architecture's config (`Architecture.config.to_dict()`)
    fingerprint: str  # sha256 of model, settings and calibration data (what --resume compares)
    finished: list[str]  # sparse blocks done, "stack.i"
    blocks: dict[str, Any]  # per sparse block: `BlockStats`
    complete: bool
    files: dict[str, dict[str, Any]]  # every other file: {"bytes": n, "sha256": hex}
    calibration_loss: float | None = None  # absent from a partial run's manifest

    def __post_init__(self) -> None:
        self.check_settings()
        if self.settings.get("shared_experts", "keep") not in SHARED_MODES:
            raise ValueError(f"settings.shared_experts must be one of {', '.join(SHARED_MODES)}, "
                             f"got {self.settings['shared_experts']!r}")

    def to_json(self) -> dict[str, Any]:
        """The manifest as written, checksum included."""
        body = {"kind": KIND, "format_version": FORMAT_VERSION,
                **{f.name: getattr(self, f.name) for f in fields(self)}}
        if self.calibration_loss is None:
            del body["calibration_loss"]
        return {**body, "manifest_sha256": manifest_digest(body)}

    @classmethod
    def from_json(cls, raw: dict[str, Any], where: Path) -> "QuantizedManifest":
        """A checked, finished manifest: kind "quantized" of this format version, its checksum
        holding, complete, its fields well-formed; QmoeError naming `where` otherwise."""
        check_manifest(raw, where)
        if raw.get("complete") is not True:
            raise QmoeError(f"{where.parent}: the quantized checkpoint is incomplete; finish it with "
                            "`qmoe compress --resume`")
        try:
            records = file_records(raw, where)
            values = {f.name: raw[f.name] for f in fields(cls) if f.name in raw or f.name != "calibration_loss"}
            return cls(**{**values, "files": records})
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise QmoeError(f"{where}: malformed manifest ({type(exc).__name__}: {exc})") from None
