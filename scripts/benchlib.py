"""What the benchmark scripts share: shape lists, timing, device sync and the markdown table.

Public names only, imported as `from benchlib import ...` (a script's own directory is on
`sys.path` when it runs); the scripts use only public names of `qmoe_cli`.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Callable

import torch


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """"768x3072,3072x768" -> [(768, 3072), (3072, 768)]."""
    shapes = []
    for item in text.split(","):
        try:
            rows, cols = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise SystemExit(f"error: --shapes: {item!r} is not ROWSxCOLS, e.g. 768x3072") from None
        if rows < 1 or cols < 1:
            raise SystemExit(f"error: --shapes: {item!r} must have positive sizes")
        shapes.append((rows, cols))
    return shapes


def median_ms(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median wall time of fn() in ms over `repeats` runs, synchronizing CUDA around each."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def emit_table(lines: list[str], out: Path | None) -> None:
    """Print a benchmark's markdown table on stdout and, with `--out`, write it to that file."""
    table = "\n".join(lines) + "\n"
    print(table, end="")
    if out is not None:
        out.write_text(table)


def dtype_bytes(dtype: torch.dtype) -> int:
    """Bytes of one element of `dtype`."""
    return torch.empty((), dtype=dtype).element_size()


def sync(device: torch.device) -> None:
    """Wait for `device`'s queued work (a no-op on the CPU), so a timer measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
