"""The typed manifests of the compressed formats: JSON round trip, validation naming the field,
old versions refused as before. (Manifests of real checkpoints are read by every test that opens
one; `tests/test_quantized_integrity.py` edits them field by field.)"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from qmoe_cli.errors import QmoeError
from qmoe_cli.formats.integrity import manifest_digest
from qmoe_cli.formats.packed_manifest import PackedManifest
from qmoe_cli.formats.quantized_manifest import QuantizedManifest, new_manifest

WHERE = Path("ckpt/manifest.json")
SHA = "ab" * 32
SETTINGS = {"bits": "ternary", "group_size": 16, "grid_group": None, "method": "gptq", "shared_experts": "quantize"}


def _quantized() -> dict[str, Any]:
    raw = new_manifest("tiny-switch", 512, dict(SETTINGS), {"d_model": 8}, SHA)
    raw.update(complete=True, calibration_loss=2.5, finished=["encoder.1"], blocks={"encoder.1": {"error": 1.0}},
               files={"head.safetensors": {"bytes": 10, "sha256": SHA}})
    return raw


def _sealed(raw: dict[str, Any]) -> dict[str, Any]:
    """`raw` with its checksum recomputed (an edit that passes the checksum)."""
    body = {k: v for k, v in raw.items() if k != "manifest_sha256"}
    return {**body, "manifest_sha256": manifest_digest(body)}


def _packed() -> PackedManifest:
    return PackedManifest(source="tiny-switch", window=512, config={"d_model": 8}, settings=dict(SETTINGS),
                          quantized_fingerprint=SHA, codec={"type": "bitpack", "bits": 2},
                          pack_settings={"max_pairs": 14}, totals={"weights": 4}, layers=[],
                          files={"head.safetensors": {"bytes": 10, "sha256": SHA}}, total_bytes=10)


def test_json_round_trips() -> None:
    raw = _sealed(_quantized())
    assert QuantizedManifest.from_json(copy.deepcopy(raw), WHERE).to_json() == raw
    packed = _packed()
    assert PackedManifest.from_json(packed.to_json(), WHERE) == packed
    assert packed.spec.label == "ternary" and packed.group_size == 16


def test_a_partial_run_keeps_no_calibration_loss() -> None:
    raw = _quantized()
    del raw["calibration_loss"]
    manifest = QuantizedManifest.from_json(_sealed(raw), WHERE)
    assert manifest.calibration_loss is None and "calibration_loss" not in manifest.to_json()


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["settings"].update(group_size=0), "settings.group_size must be an integer >= 1, got 0"),
    (lambda m: m["settings"].update(bits="5"), "QuantSpec.bits must be one of"),
    (lambda m: m["settings"].update(shared_experts="drop"), "settings.shared_experts must be one of"),
    (lambda m: m["settings"].update(symmetric="yes"), "QuantSpec.symmetric must be True or False, got 'yes'"),
    (lambda m: m.pop("fingerprint"), "malformed manifest (KeyError: 'fingerprint')"),
    (lambda m: m.update(complete=False), "incomplete"),
    (lambda m: m.update(format_version=1), "format version 1 is not readable"),
])
def test_quantized_validation_names_the_field(edit, message: str) -> None:
    raw = _quantized()
    edit(raw)
    with pytest.raises(QmoeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        QuantizedManifest.from_json(_sealed(raw), WHERE)


def test_packed_validation_and_versions() -> None:
    raw = _packed().to_json()
    with pytest.raises(QmoeError, match="checksum mismatch"):
        PackedManifest.from_json({**raw, "window": 7}, WHERE)
    with pytest.raises(QmoeError, match="'window' must be an integer >= 2, got 1"):
        PackedManifest.from_json(_sealed({**raw, "window": 1}), WHERE)
    with pytest.raises(QmoeError, match="packed format version 1 is no longer read"):
        PackedManifest.from_json(_sealed({**raw, "format_version": 1}), WHERE)
    with pytest.raises(QmoeError, match="expected 'packed' version 2"):
        PackedManifest.from_json(_sealed({**raw, "kind": "quantized"}), WHERE)
