"""Fuzzing the packed checkpoint: flipped, truncated and extended bytes anywhere in it.

Every case must end in a clean `QmoeError` or in a model whose output is exactly the original's
(a flip the format makes harmless, e.g. in manifest whitespace) — never another exception, a
crash, a hang or a silently different model. Files are mutated in place and restored.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from fuzzing import fuzz_files
from test_compress import _calib, _model

from qmoe_cli.cli import main

CASES = 300


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz")
    model, calib = _model(root / "model", experts=4, layers=2), _calib(root / "calib.jsonl")
    runner = CliRunner()
    result = runner.invoke(main, ["compress", "--model", str(model), "--calib", str(calib), "--out",
                                  str(root / "q"), "--pack", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return root / "q-packed"


def test_every_corruption_is_a_clean_error_or_harmless(packed: Path) -> None:
    # weight the small, structured files up: the manifest and dictionary matter most
    weights = {p: 8 if p.name == "manifest.json" else 4 if p.parent.name.startswith(("encoder", "decoder")) or
               p.name == "dictionary.safetensors" else 1 for p in packed.rglob("*") if p.is_file()}
    outcomes = fuzz_files(packed, weights, seed=1234, cases=CASES)
    assert outcomes["error"] > CASES * 0.9, outcomes


def test_cli_reports_corruption_in_one_line(packed: Path) -> None:
    group = next(packed.glob("experts/*/group-*.safetensors"))
    original = group.read_bytes()
    try:
        group.write_bytes(original[:-3])
        result = CliRunner().invoke(main, ["info", str(packed), "--verify"])
    finally:
        group.write_bytes(original)
    assert result.exit_code == 1
    assert result.output.strip().count("\n") == 0 and "checksum mismatch" in result.output
