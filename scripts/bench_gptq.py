"""Benchmark batched GPTQ over E experts against a loop of single-expert calls, and the fused
(Triton) column loop against the unfused torch loop.

All sides run `gptq_quantize`: on the stacked [E, rows, cols] weights and E times on
[1, rows, cols] slices, with the torch column loop (`loop="torch"`: a few kernels per column);
with `--fused`, also on the stacked weights with the Triton kernel (`loop="triton"`, CUDA only),
reporting its speedup over the unfused batched call, the share of codes equal and the largest
relative difference of the GPTQ error. Ternary, per-row grids. Prints a markdown table (median
of --repeats runs) on stdout; progress goes to stderr. When both c2048 shapes are measured, a
last line extrapolates one c2048 sparse block's GPTQ time (2048 experts: wi 6144x2080 and wo
2080x6144, batch time x 2048 / E; Hessians, routing and propagation not included).

    python scripts/bench_gptq.py --shapes 768x3072,3072x768 --experts 4
    python scripts/bench_gptq.py --device cuda --fused --experts auto --out bench.md   # on a GPU

`--experts auto` takes as many experts per batch as half the free GPU memory holds
(`experts_per_batch`, as `qmoe compress` does on a GPU), per shape.

Shapes are rows x cols of one expert weight (out x in): Switch's d_model x d_ff pairs
(768/3072 base, 1024/4096 large, 2080/6144 c2048). cols sets the Hessian size, so on CPU the
cols = 6144 shapes spend most of their time in LAPACK and take minutes each.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch
from benchlib import emit_table, median_ms, parse_shapes

from qmoe_cli.quant.gptq import GPTQConfig, experts_per_batch, gptq_quantize
from qmoe_cli.quant.gptq_triton import unavailable
from qmoe_cli.quant.grids import QuantSpec

DEFAULT_SHAPES = "768x3072,3072x768,1024x4096,4096x1024,2080x6144,6144x2080"
TOKENS_PER_EXPERT = 256  # a rare expert's share of calibration tokens: H is low rank, damp makes it PD


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


def bench_shape(rows: int, cols: int, experts: int, device: torch.device, repeats: int, cfg: GPTQConfig,
                fused: bool) -> dict[str, float]:
    """Per-expert-loop ms, batched ms (torch loop) and, with `fused`, the fused call's ms, share
    of codes equal to the unfused call's and largest relative error difference, for one shape."""
    w, h = make_inputs(experts, rows, cols, device)
    plain = replace(cfg, loop="torch")
    result = gptq_quantize(w, h, plain)
    if bool(result.fallback.any()):  # a fallback expert skips the real work: timing would lie
        raise SystemExit(f"error: {int(result.fallback.sum())} experts fell back at {rows}x{cols}")

    def loop() -> None:
        for e in range(experts):
            gptq_quantize(w[e:e + 1], h[e:e + 1], plain)

    row = {"looped": median_ms(loop, device, repeats),
           "batched": median_ms(lambda: gptq_quantize(w, h, plain), device, repeats)}
    if fused:
        triton = replace(cfg, loop="triton")
        other = gptq_quantize(w, h, triton)  # also compiles the kernel before timing
        row["fused"] = median_ms(lambda: gptq_quantize(w, h, triton), device, repeats)
        row["codes_equal"] = float((other.codes == result.codes).float().mean())
        row["error_diff"] = float(((other.error - result.error).abs() / result.error.abs()).max())
    return row


def pick_experts(text: str, device: torch.device, rows: int, cols: int) -> int:
    """--experts: a number, or "auto": what half the free GPU memory holds for this shape."""
    if text == "auto":
        if device.type != "cuda":
            raise SystemExit("error: --experts auto sizes batches by free GPU memory; give a number on CPU")
        return experts_per_batch([(rows, cols)], torch.cuda.mem_get_info(device)[0] // 2, most=2048)
    try:
        experts = int(text)
    except ValueError:
        raise SystemExit(f"error: --experts: {text!r} is neither a number nor auto") from None
    if experts < 1:
        raise SystemExit("error: --experts must be >= 1")
    return experts


def c2048_line(times: dict[tuple[int, int], tuple[int, dict[str, float]]]) -> str | None:
    """One c2048 sparse block's GPTQ seconds, extrapolated from the batches measured."""
    if (2080, 6144) not in times or (6144, 2080) not in times:
        return None
    kinds = ["batched"] + (["fused"] if "fused" in times[(2080, 6144)][1] else [])
    seconds = {k: sum(times[s][1][k] * 2048 / times[s][0] for s in [(2080, 6144), (6144, 2080)]) / 1e3
               for k in kinds}
    return ("c2048 sparse block (2048 experts, wi 6144x2080 + wo 2080x6144), GPTQ alone, extrapolated as "
            "batch ms x 2048 / E: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--experts", default=None, help="E, or auto (GPU: by free memory); default 16 on GPU, 4 on CPU")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side; median reported")
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated ROWSxCOLS")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--block-size", type=int, default=128,
                        help="GPTQ lazy-batch width (128 suits GPUs; on CPU 32 keeps blocks in cache)")
    parser.add_argument("--fused", action="store_true", help="also time the Triton column loop (CUDA and Triton)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this .md file")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no CUDA device; use --device cpu")
    if args.fused and unavailable(device):
        raise SystemExit(f"error: --fused: {unavailable(device)}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.repeats < 1:
        raise SystemExit("error: --repeats must be >= 1")
    try:
        cfg = GPTQConfig(QuantSpec("ternary"), block_size=args.block_size)
    except ValueError as exc:
        raise SystemExit(f"error: --block-size: {exc}") from None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"

    # Warm up library loading (LAPACK, cuSOLVER, kernels) on a small problem first.
    gptq_quantize(*make_inputs(2, 64, 256, device), replace(cfg, loop="torch"))
    lines = [
        f"GPTQ ternary, block {cfg.block_size}, damp {cfg.damp}; median of {args.repeats}; "
        f"torch {torch.__version__}; {name}",
        "",
        "| shape (rows x cols) | device | E | per-expert loop ms | batched ms | speedup |"
        + (" fused ms | fused vs batched | codes equal | max error diff |" if args.fused else ""),
        "|---|---|---|---|---|---|" + ("---|---|---|---|" if args.fused else ""),
    ]
    times = {}
    for rows, cols in parse_shapes(args.shapes):
        experts = pick_experts(args.experts or ("16" if device.type == "cuda" else "4"), device, rows, cols)
        print(f"bench {rows}x{cols} E={experts} on {device} ...", file=sys.stderr, flush=True)
        row = bench_shape(rows, cols, experts, device, args.repeats, cfg, args.fused)
        times[(rows, cols)] = (experts, row)
        line = (f"| {rows}x{cols} | {device.type} | {experts} | {row['looped']:.0f} | {row['batched']:.0f} "
                f"| {row['looped'] / row['batched']:.2f}x |")
        if args.fused:
            line += (f" {row['fused']:.0f} | {row['batched'] / row['fused']:.2f}x | {row['codes_equal']:.4%} "
                     f"| {row['error_diff']:.1e} |")
        lines.append(line)
    extrapolated = c2048_line(times)
    if extrapolated:
        lines += ["", extrapolated]
    emit_table(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
