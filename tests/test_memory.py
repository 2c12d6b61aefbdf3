"""The streamed runtime's peak memory does not grow with the number of experts.

Each measurement runs in a fresh subprocess (peak RSS only ever grows within a process): a
checkpoint with 64 experts per sparse block holds ~112 MB more expert weights than one with 8,
and streaming must not read more than one group of them at a time.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qmoe_cli.arch.switch.config import SwitchConfig
from qmoe_cli.arch.switch.model import SwitchModel, save_pretrained

D_MODEL, D_FF = 128, 1024  # one fp32 expert: 2 * 128 * 1024 * 4 B = 1 MiB

CHILD = """
import sys, torch
from qmoe_cli.formats.hf import resolve_model
from qmoe_cli.run.stream import RunConfig, streamed_losses
from qmoe_cli.formats.hf import CheckpointWeights
torch.manual_seed(0)
weights = CheckpointWeights(resolve_model(sys.argv[1]))
ids = torch.randint(3, 100, (16, 64)).tolist()
labels = torch.randint(3, 100, (16, 16)).tolist()
run = RunConfig(device=torch.device("cpu"), dtype=torch.float32, progress=False, group_size=4)
loss, tokens = streamed_losses(weights, ids, labels, run)
assert torch.isfinite(loss).all()
# VmHWM is this address space's peak; ru_maxrss would include the parent's RSS at fork.
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(int(hwm.split()[1]) * 1024)
"""


def _checkpoint(directory: Path, experts: int, layers: int = 2, d_ff: int = D_FF) -> Path:
    torch.manual_seed(0)
    config = SwitchConfig(vocab_size=100, d_model=D_MODEL, d_kv=32, d_ff=d_ff, num_heads=4, num_layers=layers,
                          num_decoder_layers=layers, num_experts=experts, encoder_sparse_step=1, decoder_sparse_step=1)
    save_pretrained(SwitchModel(config), directory)
    return directory


def _peak_rss(checkpoint: Path) -> int:
    out = subprocess.run([sys.executable, "-c", CHILD, str(checkpoint)], capture_output=True, text=True,
                         check=True, env={"OMP_NUM_THREADS": "1", "PATH": ""})
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(sys.platform != "linux", reason="reads VmHWM from /proc/self/status")
def test_streamed_peak_memory_does_not_grow_with_experts(tmp_path: Path) -> None:
    few, many = _checkpoint(tmp_path / "e8", 8), _checkpoint(tmp_path / "e64", 64)
    extra_bytes = (many / "model.safetensors").stat().st_size - (few / "model.safetensors").stat().st_size
    assert extra_bytes > 200 * 2**20  # 4 sparse blocks x 56 extra experts x 1 MiB
    growth = _peak_rss(many) - _peak_rss(few)
    # Both runs hold at most group_size=4 experts (4 MiB) at once; allow allocator noise.
    assert growth < 0.1 * extra_bytes, (f"peak RSS grew by {growth / 2**20:.1f} MiB "
                                        f"for {extra_bytes / 2**20:.0f} MiB more experts")


COMPRESS_CHILD = """
import json, sys, torch
from click.testing import CliRunner
from qmoe_cli.cli import main
torch.manual_seed(0)
rows = [{"input_ids": torch.randint(3, 100, (64,)).tolist(), "labels": torch.randint(3, 100, (16,)).tolist()}
        for _ in range(16)]
open(sys.argv[2], "w").write("".join(json.dumps(r) + "\\n" for r in rows))
result = CliRunner().invoke(main, ["compress", "--model", sys.argv[1], "--calib", sys.argv[2], "--out", sys.argv[3],
                                   "--bits", "ternary", "--device", "cpu", "--group-size", "4"])
assert result.exit_code == 0, result.output
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(int(hwm.split()[1]) * 1024)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="reads VmHWM from /proc/self/status")
def test_compress_peak_memory_grows_less_than_the_extra_codes(tmp_path: Path) -> None:
    """8 vs 64 experts: compress may hold one block's codes, never all experts' weights."""
    peaks = {}
    for experts in (8, 64):
        model = _checkpoint(tmp_path / f"e{experts}", experts, layers=1, d_ff=512)
        child = [sys.executable, "-c", COMPRESS_CHILD, str(model), str(tmp_path / "calib.jsonl"),
                 str(tmp_path / f"q{experts}")]
        out = subprocess.run(child, capture_output=True, text=True, check=True,
                             env={"OMP_NUM_THREADS": "1", "PATH": ""})
        peaks[experts] = int(out.stdout.split()[-1])
    extra_codes = 2 * 56 * 2 * D_MODEL * 512  # 2 sparse blocks x 56 experts x (wi + wo) uint8 codes
    growth = peaks[64] - peaks[8]
    assert growth < extra_codes, (f"peak RSS grew by {growth / 2**20:.1f} MiB, "
                                  f"extra codes are {extra_codes / 2**20:.0f} MiB")
