"""scripts/bench_cpu.py on a tiny shape: it runs and prints its table (no timing is asserted:
timings belong to docs/cpu.md, measured once, on a stated machine)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_tiny_run_prints_the_table(tmp_path: Path) -> None:
    out = tmp_path / "cpu.md"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_cpu.py"), "--shapes", "97x1025,30x64",
                           "--tokens", "1,9", "--dictionary", "512", "--bits-shape", "30x64", "--bits", "2,8",
                           "--beyond", "40", "--repeats", "1", "--out", str(out)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.read_text().splitlines()
            if line.startswith(("| 97x1025", "| 30x64", "| 2-bit 30x64", "| 8-bit 30x64"))]
    timings, layouts, beyond = ([r for r in rows if len(r) == cells] for cells in (14, 6, 5))
    assert (len(timings), len(layouts), len(beyond), len(rows)) == (8, 2, 2, 12)  # 2 ternary shapes + 2 b, 2 counts
    assert all(float(c) >= 0 for row in timings for c in row[2:])
    assert all(float(c) > 0 for row in layouts for c in row[1:]) and all(float(c) > 0 for r in beyond for c in r[1:])


def test_bad_flags_are_usage_errors() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_cpu.py"), "--tokens", "0"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert done.returncode == 2 and "--tokens" in done.stderr
