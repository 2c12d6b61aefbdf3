"""`qmoe compress` end to end on small random Switch models: format, safety, resume."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from interrupted import kill_after_a_finished_block, tree_hashes

from qmoe_cli.arch.switch.config import SwitchConfig
from qmoe_cli.arch.switch.model import random_model, save_pretrained
from qmoe_cli.cli import main
from qmoe_cli.formats.safetensors_io import SafetensorsFile


def _model(directory: Path, *, experts: int = 4, layers: int = 2, d_model: int = 32, d_ff: int = 64) -> Path:
    config = SwitchConfig(vocab_size=64, d_model=d_model, d_kv=8, d_ff=d_ff, num_heads=4, num_layers=layers,
                          num_decoder_layers=layers, num_experts=experts, encoder_sparse_step=1, decoder_sparse_step=1)
    save_pretrained(random_model(config), directory)
    return directory


def _calib(path: Path, samples: int = 24, length: int = 24) -> Path:
    g = torch.Generator().manual_seed(1)
    rows = [{"input_ids": torch.randint(3, 64, (length,), generator=g).tolist() + [1],
             "labels": torch.randint(3, 64, (8,), generator=g).tolist() + [1]} for _ in range(samples)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _compress(model: Path, calib: Path, out: Path, *extra: str):
    return CliRunner().invoke(main, ["compress", "--model", str(model), "--calib", str(calib), "--out", str(out),
                                     "--device", "cpu", "--json", *extra])


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("compress")
    return _model(root / "model"), _calib(root / "calib.jsonl")


@pytest.mark.parametrize("bits", ["ternary", "2", "4"])
def test_codes_and_grids_and_eval_agree(setup, tmp_path: Path, bits: str) -> None:
    model, calib = setup
    result = _compress(model, calib, tmp_path / "q", "--bits", bits)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    # 24 calibration samples where 128 are asked for: proceed with all of them, and say so.
    assert "has only 24 usable samples (asked for 128)" in result.stderr
    assert summary["fallbacks"] == 0 and set(summary["blocks"]) == {"encoder.0", "encoder.1", "decoder.0", "decoder.1"}
    experts = SafetensorsFile(tmp_path / "q" / "experts" / "encoder-001" / "group-00000.safetensors")
    for j in range(4):
        codes = experts.read(f"expert_{j}.wi.codes")
        assert codes.dtype == torch.uint8 and codes.shape == (64, 32)
        assert int(codes.max()) <= (2 if bits == "ternary" else 2 ** int(bits) - 1)
    if bits == "ternary":  # every row: at most 3 distinct values, one of them 0
        from qmoe_cli.formats.quantized import QuantizedWeights
        bank = QuantizedWeights.open(tmp_path / "q").experts("decoder", 1)
        for j in range(4):
            for name in ("wi", "wo"):
                w = bank.matrix(j, name)
                for row in w:
                    values = set(row.tolist())
                    assert len(values) <= 3 and 0.0 in values and min(values) <= 0 <= max(values)
    evaluated = CliRunner().invoke(main, ["eval", "--model", str(tmp_path / "q"), "--data", str(calib),
                                          "--device", "cpu", "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    # Compression propagates through the quantized experts, so its loss is the model's.
    assert json.loads(evaluated.stdout)["loss"] == pytest.approx(summary["calibration_loss"], abs=1e-6)


def test_refuses_existing_output_and_foreign_partial_runs(setup, tmp_path: Path) -> None:
    model, calib = setup
    out = tmp_path / "q"
    out.mkdir()
    result = _compress(model, calib, out, "--bits", "ternary")
    assert result.exit_code == 1 and "already exists" in result.stderr
    out.rmdir()
    partial = tmp_path / ".q.partial"
    partial.mkdir()
    (partial / "manifest.json").write_text(json.dumps({"kind": "quantized", "fingerprint": "other", "finished": []}))
    result = _compress(model, calib, out, "--bits", "ternary")
    assert result.exit_code == 1 and "--resume" in result.stderr
    result = _compress(model, calib, out, "--bits", "ternary", "--resume")
    assert result.exit_code == 1 and "other settings" in result.stderr
    assert not out.exists()


@pytest.mark.parametrize("flags, fragment", [(["--bits", "5"], "--bits"), (["--bits", "ternary", "--group-size", "0"],
                                             "--group-size"), (["--bits", "2", "--damp", "-1"], "damp")])
def test_bad_flags_are_usage_errors(setup, tmp_path: Path, flags: list[str], fragment: str) -> None:
    model, calib = setup
    result = _compress(model, calib, tmp_path / "q", *flags)
    assert result.exit_code == 2 and fragment in result.stderr and "Traceback" not in result.stderr


def test_resume_after_sigkill_is_byte_identical(tmp_path: Path) -> None:
    """A Switch compression (encoder and decoder blocks) killed after its first sparse block, then
    `--resume`d in this process: the files equal an uninterrupted run's. Decoder-only families:
    tests/test_decoder_families.py."""
    model = _model(tmp_path / "model", experts=8, layers=2, d_model=64, d_ff=128)
    calib = _calib(tmp_path / "calib.jsonl", samples=16, length=32)
    command = ["compress", "--model", str(model), "--calib", str(calib), "--bits", "ternary", "--device", "cpu",
               "--group-size", "3", "--threads", "1"]
    straight = CliRunner().invoke(main, [*command, "--out", str(tmp_path / "straight")])
    assert straight.exit_code == 0, straight.output
    out = tmp_path / "resumed"
    finished = kill_after_a_finished_block([sys.executable, "-m", "qmoe_cli", *command, "--out", str(out)],
                                           tmp_path / ".resumed.partial")
    assert 1 <= finished < 4 and not out.exists()
    resumed = CliRunner().invoke(main, [*command, "--out", str(out), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert f"resuming: {finished} sparse blocks already done" in resumed.stderr
    assert tree_hashes(out) == tree_hashes(tmp_path / "straight")
