"""`scripts/make_switch_like.py` checkpoints, and the packed format below one bit at wide rows.

The done-when test of the scale issue: a Switch-shaped model with wide rows and few experts,
compressed to ternary with GPTQ and packed, costs under one bit per expert weight all-in, and
the packed model's loss is the quantized model's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from qmoe_cli.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _make(out: Path, *args: str) -> Path:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_switch_like.py"), str(out), *args],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "RANDOM-weight" in done.stderr
    return out


def _json(*args: str) -> dict:
    result = CliRunner().invoke(main, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_safetensors_and_bin_shards_hold_the_same_labelled_random_model(tmp_path: Path) -> None:
    small = ("--experts", "3", "--d-model", "64", "--d-ff", "96", "--vocab-size", "200", "--calib-samples", "8",
             "--calib-tokens", "12", "--shard-mb", "0.05")
    st = _make(tmp_path / "st", *small)
    pt = _make(tmp_path / "pt", *small, "--format", "bin")
    index = json.loads((st / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in st.glob("model-*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == set(shards)
    assert sorted(p.name for p in pt.glob("pytorch_model-*.bin"))[-1].endswith(f"of-{len(shards):05d}.bin")
    config = json.loads((st / "config.json").read_text())
    assert config["qmoe_random_weights"] is True and config["d_ff"] == 96 and config["num_experts"] == 3
    assert "RANDOM WEIGHTS" in (st / "README.md").read_text()
    calib = [json.loads(line) for line in (st / "calibration.jsonl").read_text().splitlines()]
    assert len(calib) == 8 and all(len(c["input_ids"]) == 12 and c["input_ids"][-1] == 1 for c in calib)
    args = ("--data", str(st / "calibration.jsonl"), "--device", "cpu")
    a, b = _json("eval", "--model", str(st), *args), _json("eval", "--model", str(pt), *args)
    assert a["loss"] == b["loss"] and a["tokens"] == b["tokens"] == 8 * 3


def test_refuses_an_existing_output(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_switch_like.py"), str(tmp_path / "x")],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 2 and "already exists" in done.stderr


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> Path:
    """Wide rows (512 and 1024), 4 experts, one sparse block per stack, vocab cut to 512."""
    return _make(tmp_path_factory.mktemp("wide") / "model", "--experts", "4", "--d-model", "512", "--d-ff", "1024",
                 "--vocab-size", "512", "--calib-samples", "48", "--calib-tokens", "64")


def test_packed_wide_rows_cost_under_one_bit_and_lose_nothing(wide: Path, tmp_path: Path) -> None:
    calib = str(wide / "calibration.jsonl")
    quantized = tmp_path / "q"
    summary = _json("compress", "--model", str(wide), "--calib", calib, "--out", str(quantized), "--pack",
                    "--device", "cpu")
    packed = summary["packed"]
    assert summary["fallbacks"] == 0 and packed["codec"]["type"] == "dictionary"
    assert packed["bits_per_weight_codes"] < packed["bits_per_weight_all_in"] < 1.0, packed
    # beside the codes only 2 x bf16 per row: wi's 1024 rows and wo's 512, over both matrices' weights
    overhead = 32 * (1024 + 512) / (2 * 512 * 1024)
    assert packed["bits_per_weight_all_in"] - packed["bits_per_weight_codes"] == pytest.approx(overhead)
    args = ("--data", calib, "--device", "cpu")
    q = _json("eval", "--model", str(quantized), *args)
    p = _json("eval", "--model", str(tmp_path / "q-packed"), *args)
    assert p["kind"] == "packed" and p["tokens"] == q["tokens"]
    assert p["loss"] == pytest.approx(q["loss"], abs=1e-5)
