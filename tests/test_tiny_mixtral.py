"""The shipped `tiny-mixtral` checkpoint: present, trained, and GPTQ beats round-to-nearest in loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from qmoe_cli.cli import main
from qmoe_cli.formats.open import open_model

SAMPLES = ["--samples", "64"]


def _run(*args: str) -> dict:
    result = CliRunner().invoke(main, [*args, "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_preset_resolves_to_the_shipped_files() -> None:
    opened = open_model("tiny-mixtral")
    try:
        directory = opened.tokenizer_dir
        assert directory.parts[-3:] == ("qmoe_cli", "assets", "tiny-mixtral")
        assert opened.kind == "original" and opened.stored_dtype == torch.float32 and opened.window == 256
        assert opened.weights.arch.objective == "causal_lm"
        for data in (opened.default_data, opened.default_calib):
            assert Path(data).is_absolute() and Path(data).parent == directory and Path(data).is_file()
        assert sum(p.stat().st_size for p in directory.iterdir()) < 10 * 2**20
        record = json.loads((directory / "training.json").read_text())
    finally:
        opened.weights.close()
    assert "scripts/train_tiny_decoder.py" in record["command"] and "--out" in record["command"]
    # A model that learned nothing beyond word frequencies sits at its unigram entropy.
    assert record["validation"]["loss_bits"] < 0.6 * record["validation"]["unigram_entropy_bits"], record
    assert record["acceptance"]["every_expert_share_ok"], record["routing"]


@pytest.fixture(scope="module")
def losses(tmp_path_factory) -> dict[str, float]:
    root = tmp_path_factory.mktemp("tiny-mixtral")
    out = {"original": _run("eval", "--model", "tiny-mixtral", *SAMPLES)["loss"]}
    for method in ("gptq", "rtn"):
        for bits in ("ternary", "2"):
            directory = root / f"{method}-{bits}"
            summary = _run("compress", "--model", "tiny-mixtral", "--bits", bits, "--method", method,
                           "--calib-samples", "64", "--out", str(directory), "--pack")
            assert summary["fallbacks"] == 0, summary
            out[f"{method}-{bits}"] = _run("eval", "--model", str(directory), *SAMPLES)["loss"]
            out[f"{method}-{bits}-packed"] = _run("eval", "--model", summary["packed"]["path"], *SAMPLES)["loss"]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("bits", ["ternary", "2"])
def test_gptq_costs_less_loss_than_rtn(losses: dict[str, float], bits: str) -> None:
    """Trained weights make the loss meaningful: GPTQ keeps the model nearer its trained loss."""
    assert losses["original"] < losses[f"gptq-{bits}"] < losses[f"rtn-{bits}"], losses
    for method in ("gptq", "rtn"):
        # Packing is lossless; the loss moves only by float summation order in the decode-matmul.
        assert losses[f"{method}-{bits}-packed"] == pytest.approx(losses[f"{method}-{bits}"], rel=1e-6), losses
