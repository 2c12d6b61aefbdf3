"""The packed checkpoint's manifest: one typed, versioned record, validated once, JSON both ways.

`qmoe pack` builds a `PackedManifest` and writes it (`write`); the reader (`formats.packed`),
`qmoe info` and placement read its fields instead of indexing a dict. The JSON is the one
format version 2 has always had (keys sorted, `manifest_sha256` over the rest), so checkpoints
packed before this class existed read unchanged, and a packed directory is byte-identical to
what earlier qmoe versions wrote.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import QmoeError
from ..files import write_json_atomic
from .integrity import file_records, manifest_digest
from .quantized_manifest import QuantizationSettings

KIND = "packed"
FORMAT_VERSION = 2  # 2: no stored offsets, bf16 ternary grids


@dataclass(frozen=True)
class PackedManifest(QuantizationSettings):
    """What `manifest.json` of a packed checkpoint holds (besides `kind`, `format_version` and
    `manifest_sha256`, which `to_json` adds)."""

    source: str  # the model the quantized checkpoint was made from (a preset, hub id or directory)
    window: int  # longest input or label sequence, tokens (the source's)
    config: dict[str, Any]  # the architecture's config (`Architecture.config.to_dict()`)
    settings: dict[str, Any]  # the quantization's settings, as the quantized checkpoint has them
    quantized_fingerprint: str  # the quantized checkpoint's `fingerprint`
    codec: dict[str, Any]  # {"type": "dictionary", ...} or {"type": "bitpack", "bits": b}
    pack_settings: dict[str, Any]  # `PackConfig` without progress and threads
    totals: dict[str, Any]  # `LayerSize.summary("all")`
    layers: list[dict[str, Any]]  # one `LayerSize.summary` per sparse block
    files: dict[str, dict[str, Any]]  # every other file: {"bytes": n, "sha256": hex}
    total_bytes: int  # sum of `files`' bytes

    def __post_init__(self) -> None:
        if not isinstance(self.source, str):
            raise ValueError(f"'source' must be a model name, got {self.source!r}")
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 2:
            raise ValueError(f"'window' must be an integer >= 2, got {self.window!r}")
        for name in ("config", "settings", "codec", "pack_settings", "totals", "files"):
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"'{name}' must be an object, got {type(getattr(self, name)).__name__}")
        self.check_settings()

    def to_json(self) -> dict[str, Any]:
        """The manifest as written, checksum included."""
        body = {"kind": KIND, "format_version": FORMAT_VERSION,
                **{f.name: getattr(self, f.name) for f in fields(self)}}
        return {**body, "manifest_sha256": manifest_digest(body)}

    def write(self, directory: Path) -> None:
        """`directory/manifest.json`, written atomically."""
        write_json_atomic(directory / "manifest.json", self.to_json())

    @classmethod
    def from_json(cls, raw: dict[str, Any], where: Path) -> "PackedManifest":
        """A checked manifest: kind "packed" of this format version, its checksum holding, its
        fields well-formed; QmoeError naming `where` and what is wrong otherwise."""
        kind, version = raw.get("kind"), raw.get("format_version")
        if kind == KIND and isinstance(version, int) and version < FORMAT_VERSION:
            raise QmoeError(f"{where}: packed format version {version} is no longer read (this qmoe reads version "
                            f"{FORMAT_VERSION}); pack the quantized checkpoint again with `qmoe pack`")
        if kind != KIND or version != FORMAT_VERSION:
            raise QmoeError(f"{where}: manifest is kind {kind!r} version {version!r}; "
                            f"expected {KIND!r} version {FORMAT_VERSION}")
        if raw.get("manifest_sha256") != manifest_digest(raw):
            raise QmoeError(f"{where}: checksum mismatch; the manifest is corrupt")
        try:
            records = file_records(raw, where)
            return cls(**{f.name: raw[f.name] if f.name != "files" else records for f in fields(cls)})
        except (KeyError, TypeError, ValueError) as exc:
            raise QmoeError(f"{where}: malformed manifest ({exc})") from None

