"""Benchmark batched GPTQ over E experts against a loop of single-expert calls.

Both sides run the same function, `gptq_quantize`: once on the stacked [E, rows, cols] weights,
and E times on [1, rows, cols] slices. Ternary, per-row grids, default GPTQConfig. Prints a
markdown table (median of --repeats runs) on stdout; progress goes to stderr.

    python scripts/bench_gptq.py --shapes 768x3072,3072x768 --experts 4
    python scripts/bench_gptq.py --device cuda --out bench.md

Shapes are rows x cols of one expert weight (out x in): Switch's d_model x d_ff pairs
(768/3072 base, 1024/4096 large, 2080/6144 c2048). cols sets the Hessian size, so on CPU the
cols = 6144 shapes spend most of their time in LAPACK and take minutes each.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from qmoe_cli.quant.gptq import GPTQConfig, gptq_quantize
from qmoe_cli.quant.grids import QuantSpec

DEFAULT_SHAPES = "768x3072,3072x768,1024x4096,4096x1024,2080x6144,6144x2080"
TOKENS_PER_EXPERT = 256  # a rare expert's share of calibration tokens: H is low rank, damp makes it PD


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


def make_inputs(experts: int, rows: int, cols: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random weights [E, rows, cols] fp32 and Hessians [E, cols, cols] fp32 from correlated
    inputs (X = Z @ A with a shared mixing A, TOKENS_PER_EXPERT tokens each), on `device`."""
    g = torch.Generator(device=device).manual_seed(0)
    w = torch.randn(experts, rows, cols, generator=g, device=device) / cols ** 0.5
    mix = torch.randn(cols, cols, generator=g, device=device) / cols ** 0.5
    h = torch.empty(experts, cols, cols, device=device)
    for e in range(experts):  # one at a time: [E, tokens, cols] for 16 experts would not fit on small GPUs
        x = torch.randn(TOKENS_PER_EXPERT, cols, generator=g, device=device) @ mix
        h[e] = 2 * x.T @ x / TOKENS_PER_EXPERT
    return w, h


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


def bench_shape(rows: int, cols: int, experts: int, device: torch.device, repeats: int,
                cfg: GPTQConfig) -> tuple[float, float]:
    """(per-expert-loop ms, batched ms) for one shape."""
    w, h = make_inputs(experts, rows, cols, device)
    result = gptq_quantize(w, h, cfg)
    if bool(result.fallback.any()):  # a fallback expert skips the real work: timing would lie
        raise SystemExit(f"error: {int(result.fallback.sum())} experts fell back at {rows}x{cols}")

    def loop() -> None:
        for e in range(experts):
            gptq_quantize(w[e:e + 1], h[e:e + 1], cfg)

    looped = median_ms(loop, device, repeats)
    batched = median_ms(lambda: gptq_quantize(w, h, cfg), device, repeats)
    return looped, batched


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--experts", type=int, default=None, help="E (default 16 on GPU, 4 on CPU)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side; median reported")
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated ROWSxCOLS")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--block-size", type=int, default=128,
                        help="GPTQ lazy-batch width (128 suits GPUs; on CPU 32 keeps blocks in cache)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this .md file")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no CUDA device; use --device cpu")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    experts = args.experts or (16 if device.type == "cuda" else 4)
    if experts < 1 or args.repeats < 1:
        raise SystemExit("error: --experts and --repeats must be >= 1")
    try:
        cfg = GPTQConfig(QuantSpec("ternary"), block_size=args.block_size)
    except ValueError as exc:
        raise SystemExit(f"error: --block-size: {exc}") from None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"

    # Warm up library loading (LAPACK, cuSOLVER, kernels) on a small problem first.
    gptq_quantize(*make_inputs(2, 64, 256, device), cfg)
    lines = [
        f"GPTQ ternary, block {cfg.block_size}, damp {cfg.damp}; median of {args.repeats}; "
        f"torch {torch.__version__}; {name}",
        "",
        "| shape (rows x cols) | device | E | per-expert loop ms | batched ms | speedup |",
        "|---|---|---|---|---|---|",
    ]
    for rows, cols in parse_shapes(args.shapes):
        print(f"bench {rows}x{cols} E={experts} on {device} ...", file=sys.stderr, flush=True)
        looped, batched = bench_shape(rows, cols, experts, device, args.repeats, cfg)
        lines.append(f"| {rows}x{cols} | {device.type} | {experts} | {looped:.0f} | {batched:.0f} "
                     f"| {looped / batched:.2f}x |")
    emit_table(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
