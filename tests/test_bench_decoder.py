"""scripts/bench_decoder.py: its flags make a valid config for every family, and a tiny CPU run
prints a table with a prefill and a step row per batch size."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = ("deepseek_v3", "mixtral", "olmoe", "qwen2_moe", "qwen3_moe")

TINY = ["--hidden", "32", "--expert-width", "24", "--experts", "4", "--top-k", "2", "--layers", "2", "--heads", "4",
        "--kv-heads", "2", "--vocab", "64"]


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import bench_decoder

    return bench_decoder


@pytest.mark.parametrize("family", FAMILIES)
def test_flags_make_each_familys_config(bench, family: str) -> None:
    transformers = pytest.importorskip("transformers")
    assert sorted(bench.FAMILIES) == list(FAMILIES)
    args = bench.parse_args(["--family", family, *TINY, "--batches", "1,5", "--dtype", "float32"])
    assert args.batches == [1, 5]
    config = getattr(transformers, bench.FAMILIES[family][0])(**bench.model_config(args))
    experts = getattr(config, bench.EXPERT_COUNT_KEY.get(family, "num_experts"))
    width = getattr(config, bench.EXPERT_WIDTH_KEY.get(family, "intermediate_size"))
    assert (experts, width, config.hidden_size, config.num_hidden_layers, config.vocab_size) == (4, 24, 32, 2, 64)


def test_bad_flags_are_usage_errors(bench) -> None:
    for argv in (["--top-k", "9", "--experts", "8"], ["--steps", "0"], ["--family", "switch"],
                 ["--heads", "8", "--kv-heads", "3"], ["--family", "deepseek_v3", "--experts", "6"]):
        with pytest.raises(SystemExit) as raised:
            bench.parse_args(argv)
        assert raised.value.code == 2


def test_tiny_cpu_run_prints_the_table(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    out = tmp_path / "table.md"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_decoder.py"), "--family", "qwen2_moe",
                           "--device", "cpu", *TINY, "--batches", "1,3", "--steps", "2", "--prefills", "1",
                           "--warmup", "1", "--prompt-tokens", "5", "--out", str(out)],
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert out.read_text() == done.stdout
    rows = [line.split(" | ") for line in done.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[0][:5] == ["| what", "batch", "float32 ms", "packed ms", "packed / float32"]
    assert [r[:2] for r in rows[1:]] == [["| prefill", "1"], ["| prefill", "3"],
                                        ["| decoder step (per token)", "1"], ["| decoder step (per token)", "3"]]
    for row in rows[1:]:
        dense, packed, ratio = float(row[2]), float(row[3]), float(row[4])
        assert dense > 0 and packed > 0 and ratio == pytest.approx(packed / dense, rel=0.02, abs=0.01)
        dense_mb, packed_mb = float(row[5]), float(row[6].rstrip(" |"))
        assert 0 < packed_mb < dense_mb  # ternary codes and grids vs fp32 weights
