"""Fuzzing the quantized checkpoint, as `test_packed_fuzz.py` does the packed one: flipped,
truncated and extended bytes anywhere, and edited manifest values.

Every case must end in a clean `QmoeError` or in a model whose output is exactly the original's
— never another exception, a crash or a silently different model; `qmoe pack` of a mutated
checkpoint likewise refuses it or packs the original. Files are mutated in place and restored.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from click.testing import CliRunner
from fuzzing import check_outcome, fuzz_files, mutate, outputs
from test_compress import _calib, _model

from qmoe_cli.cli import main
from qmoe_cli.compress.pack import PackConfig, pack
from qmoe_cli.errors import QmoeError

CASES = 300
MANIFEST_EDITS = 150
PACK_CASES = 12


@pytest.fixture(scope="module")
def quantized(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("qfuzz")
    model, calib = _model(root / "model", experts=4, layers=2), _calib(root / "calib.jsonl", samples=8)
    result = CliRunner().invoke(main, ["compress", "--model", str(model), "--calib", str(calib), "--calib-samples", "8",
                                       "--out", str(root / "q"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return root / "q"


def test_every_corruption_is_a_clean_error_or_harmless(quantized: Path) -> None:
    weights = {p: 8 if p.name == "manifest.json" else 1 for p in quantized.rglob("*") if p.is_file()}
    outcomes = fuzz_files(quantized, weights, seed=4321, cases=CASES)
    assert outcomes["error"] > CASES * 0.9, outcomes


def _leaves(value: Any, path: tuple = ()) -> Iterator[tuple]:
    """Paths to every scalar (and empty container) in a JSON value."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else None
    if not items:
        yield path
        return
    for key, child in items:
        yield from _leaves(child, (*path, key))


def _edited(value: Any, rnd: random.Random) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return rnd.choice([value + 1, value - 1, -value, 2 * value, 0, value / 2])
    if isinstance(value, str):
        return rnd.choice([value[:-1], value + "0", value.upper(), "", "ternary", "2"])
    return rnd.choice([0, "x", None, [], {}])


def test_every_manifest_edit_is_a_clean_error_or_harmless(quantized: Path) -> None:
    """Values changed, replaced or removed anywhere in the manifest (its checksum left as is)."""
    reference = outputs(quantized)
    path = quantized / "manifest.json"
    original = path.read_text()
    rnd = random.Random(99)
    outcomes = {"error": 0, "harmless": 0}
    for case in range(MANIFEST_EDITS):
        manifest = json.loads(original)
        *parents, key = rnd.choice(list(_leaves(manifest)))
        container = manifest
        for parent in parents:
            container = container[parent]
        if rnd.random() < 0.2 and isinstance(container, dict):
            del container[key]
            what = f"case {case} (delete {'.'.join(map(str, parents + [key]))})"
        else:
            container[key] = _edited(container[key], rnd)
            what = f"case {case} ({'.'.join(map(str, parents + [key]))} = {container[key]!r})"
        path.write_text(json.dumps(manifest, indent=2))
        try:
            check_outcome(quantized, reference, what, outcomes)
        finally:
            path.write_text(original)
    assert outcomes["error"] > MANIFEST_EDITS * 0.9, outcomes


def test_pack_refuses_corruption_or_packs_the_original(quantized: Path, tmp_path: Path) -> None:
    small = PackConfig(dictionary_size=512, max_pairs=4)  # a quick fit: what is tested is pack's reading
    packed = pack(quantized, tmp_path / "reference", small, lambda line: None).manifest
    reference = outputs(tmp_path / "reference")
    files = sorted(p for p in quantized.rglob("*.safetensors"))
    rnd = random.Random(7)
    for case in range(PACK_CASES):
        path = rnd.choice(files)
        original = path.read_bytes()
        what = f"case {case} ({mutate(path, rnd)})"
        out = tmp_path / f"p{case}"
        try:
            manifest = pack(quantized, out, small, lambda line: None).manifest
        except QmoeError:
            assert not out.exists(), what
        except Exception as exc:  # noqa: BLE001
            pytest.fail(f"{what}: {type(exc).__name__}: {exc}")
        else:
            assert manifest.files == packed.files and torch.equal(outputs(out), reference), what
            shutil.rmtree(out)
        finally:
            path.write_bytes(original)
