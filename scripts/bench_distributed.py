"""Benchmark `qmoe compress` in one process against torchrun ranks on the same CPU cores.

Builds a random Switch model big enough that compression, not start-up, takes the time
(default: d_model 256, d_ff 1024, 16 experts, 2 + 2 sparse blocks) and random pre-tokenized
calibration samples, then times whole `qmoe compress` commands, wall clock, start-up included:

- `1 process, T threads`: `python -m qmoe_cli compress` with OMP_NUM_THREADS=T;
- `torchrun, N ranks x T threads`: `torchrun --standalone --nproc-per-node N -m qmoe_cli compress`
  (gloo) with T = cores / N threads per rank, so every row uses the same cores.

Prints a markdown table: median wall time of --repeats runs and speedup over the first row
(one process on every core); the payload bytes rank 0 hands to or receives from collectives per
MoE block (mean and max over blocks: they follow the block's tokens) beside what the previous
design (fp64 Hessian sums reduced onto each expert's owner, codes broadcast one byte a weight)
sent per block and rank, E x (d_model^2 + d_ff^2) x 8 + 3 x E x d_model x d_ff bytes plus grids
(measured at 155.5 MB on the default model when that design was current), and the drop; and the
share of expert codes equal to the one-process run with as many threads per process (same
arithmetic: expect 100%) and to the first row (the thread count itself changes LAPACK's
rounding, which GPTQ can amplify on ill-conditioned Hessians).

    python scripts/bench_distributed.py --ranks 2 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from benchlib import emit_table

from qmoe_cli.arch.switch.config import SwitchConfig
from qmoe_cli.arch.switch.model import random_model, save_pretrained
from qmoe_cli.formats.safetensors_io import SafetensorsFile


def make_model(directory: Path, d_model: int, d_ff: int, experts: int, layers: int) -> SwitchConfig:
    """A random Switch model with every block sparse; routers spread so every expert gets tokens."""
    config = SwitchConfig(vocab_size=512, d_model=d_model, d_kv=d_model // 4, d_ff=d_ff, num_heads=4,
                          num_layers=layers, num_decoder_layers=layers, num_experts=experts,
                          encoder_sparse_step=1, decoder_sparse_step=1)
    save_pretrained(random_model(config), directory)
    return config


def make_calibration(path: Path, samples: int, length: int) -> None:
    """Pre-tokenized random samples: `length` input ids and length // 4 labels each."""
    g = torch.Generator().manual_seed(1)
    rows = [{"input_ids": torch.randint(3, 512, (length,), generator=g).tolist() + [1],
             "labels": torch.randint(3, 512, (length // 4,), generator=g).tolist() + [1]} for _ in range(samples)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@dataclass(frozen=True)
class Setup:
    """One row of the table: how many processes (None: no torchrun) with how many threads each."""

    ranks: int | None
    threads: int

    @property
    def label(self) -> str:
        if self.ranks is None:
            return f"1 process, {self.threads} thread" + "s" * (self.threads > 1)
        return (f"torchrun, {self.ranks} rank" + "s" * (self.ranks > 1)
                + f" x {self.threads} thread" + "s" * (self.threads > 1))


def run_compress(setup: Setup, model: Path, calib: Path, samples: int, out: Path) -> tuple[float, dict]:
    """Wall seconds and JSON summary of one `qmoe compress` command."""
    env = {**os.environ, "OMP_NUM_THREADS": str(setup.threads), "OMP_WAIT_POLICY": "PASSIVE"}
    launcher = ([sys.executable] if setup.ranks is None else
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(setup.ranks)])
    command = [*launcher, "-m", "qmoe_cli", "compress", "--model", str(model), "--calib", str(calib),
               "--calib-samples", str(samples), "--device", "cpu", "--out", str(out), "--json"]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"error: {' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return seconds, json.loads(done.stdout)


def reduction_design_bytes(config: SwitchConfig) -> int:
    """Bytes per MoE block and rank of the previous design: every expert's fp64 X^T X sums of
    wi's (d_model^2) and wo's (d_ff^2) inputs reduced, wi's codes broadcast for wo's Hessians and
    both matrices' codes again when done (one byte a weight), with per-row fp32 (lo, hi) grids."""
    e, d, f = config.num_experts, config.d_model, config.d_ff
    hessians = e * (d * d + f * f) * 8
    codes = e * (f * d + f * 8) + e * (f * d + f * 8 + d * f + d * 8)
    return hessians + codes


def agreement(a: Path, b: Path) -> float:
    """Share of expert code positions equal in two quantized checkpoints."""
    same = total = 0
    for path in sorted((a / "experts").rglob("*.safetensors")):
        left, right = SafetensorsFile(path), SafetensorsFile(b / path.relative_to(a))
        for key in (k for k in left.entries if k.endswith(".codes")):
            x, y = left.read(key), right.read(key)
            same, total = same + int((x == y).sum()), total + x.numel()
    return same / total


def table_lines(config: SwitchConfig, args: argparse.Namespace, setups: list[Setup],
                results: dict[Setup, tuple[float, dict, Path]]) -> list[str]:
    """The markdown table: one row per setup."""
    base_time, _, base_out = results[setups[0]]
    reduction_mb = reduction_design_bytes(config) / 1e6
    lines = [
        f"qmoe compress, ternary GPTQ, {config.num_experts} experts, d_model {config.d_model}, d_ff {config.d_ff}, "
        f"{2 * args.layers} sparse blocks, {args.samples} samples x {args.length} tokens; {args.cores} CPU cores, "
        f"torch {torch.__version__}; median of {args.repeats}",
        "",
        "| run | wall s | speedup | MB per MoE block, rank 0 (mean / max) | reduction design MB | drop (mean / max) "
        "| codes = 1 process, same threads | codes = first row |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for setup in setups:
        seconds, summary, out = results[setup]
        per_block = [summary["communicated_bytes"][b] / 1e6 for b in summary["blocks"]]
        mean, peak = statistics.mean(per_block), max(per_block)
        twin = results[Setup(None, setup.threads)][2]
        distributed = setup.ranks is not None and setup.ranks > 1
        estimate = reduction_mb if distributed else 0.0
        drop = f"{estimate / mean:.1f}x / {estimate / peak:.1f}x" if distributed else "-"
        lines.append(f"| {setup.label} | {seconds:.1f} | {base_time / seconds:.2f}x | {mean:.2f} / {peak:.2f} "
                     f"| {estimate:.1f} | {drop} | {agreement(twin, out):.4%} | {agreement(base_out, out):.4%} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", default="2", help="comma-separated torchrun world sizes, e.g. 1,2")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per row; median reported")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--d-ff", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--layers", type=int, default=2, help="blocks per stack, all sparse")
    parser.add_argument("--samples", type=int, default=128, help="calibration samples")
    parser.add_argument("--length", type=int, default=128, help="input tokens per sample")
    parser.add_argument("--cores", type=int, default=os.cpu_count(), help="cores every row may use")
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this .md file")
    args = parser.parse_args(argv)
    try:
        world_sizes = [int(r) for r in args.ranks.split(",")]
    except ValueError:
        raise SystemExit(f"error: --ranks: {args.ranks!r} is not a comma-separated list of integers") from None
    if args.repeats < 1 or min(world_sizes) < 1 or args.cores < 1:
        raise SystemExit("error: --repeats, --ranks and --cores must be >= 1")

    # Every torchrun row gets a 1-process row with as many threads per process: the same
    # arithmetic, so its codes must match; thread counts alone change LAPACK's rounding.
    setups = [Setup(None, args.cores)]
    for ranks in world_sizes:
        threads = max(1, args.cores // ranks)
        setups += [s for s in (Setup(None, threads), Setup(ranks, threads)) if s not in setups]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = make_model(root / "model", args.d_model, args.d_ff, args.experts, args.layers)
        make_calibration(root / "calib.jsonl", args.samples, args.length)
        results = {}
        for setup in setups:
            times = []
            for k in range(args.repeats):
                print(f"run {k + 1}/{args.repeats}: {setup.label} ...", file=sys.stderr, flush=True)
                out = root / f"out-{len(results)}-{k}"
                seconds, summary = run_compress(setup, root / "model", root / "calib.jsonl", args.samples, out)
                times.append(seconds)
            results[setup] = (statistics.median(times), summary, out)
        lines = table_lines(config, args, setups, results)
    emit_table(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
