"""End to end on the shipped trained model: compression costs loss, GPTQ beats round-to-nearest."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from qmoe_cli.cli import main

SAMPLES = ["--samples", "64"]


def _run(*args: str) -> dict:
    result = CliRunner().invoke(main, [*args, "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def losses(tmp_path_factory) -> dict[str, float]:
    root = tmp_path_factory.mktemp("e2e")
    out = {"original": _run("eval", "--model", "tiny-switch", *SAMPLES)["loss"]}
    for method in ("gptq", "rtn"):
        for bits in ("ternary", "2"):
            directory = root / f"{method}-{bits}"
            _run("compress", "--model", "tiny-switch", "--bits", bits, "--method", method,
                 "--calib-samples", "64", "--out", str(directory))
            out[f"{method}-{bits}"] = _run("eval", "--model", str(directory), *SAMPLES)["loss"]
    return out


def test_gptq_ternary_costs_less_than_rtn_ternary(losses: dict[str, float]) -> None:
    assert losses["original"] < losses["gptq-ternary"] < losses["rtn-ternary"], losses


def test_gptq_2bit_beats_rtn_2bit(losses: dict[str, float]) -> None:
    assert losses["original"] < losses["gptq-2"] < losses["rtn-2"], losses
