"""Per-sparse-block cost of `qmoe compress` + `qmoe pack` at real Switch layer shapes.

Writes a random-weight checkpoint with `make_switch_like.py` (default: switch-base-128's
block shapes, d_model 768, d_ff 3072, with `--experts` experts, one sparse block per stack),
then runs, as separate processes of this checkout:

- `qmoe compress --bits ternary --method gptq` on the checkpoint's calibration file: seconds per
  sparse block (from its per-block line on stderr) and the process's peak resident memory
  (`wait4`), which does not grow with the number of experts or blocks (tested in test_memory);
- `qmoe pack` twice: the dictionary fitted on every expert matrix (`--sample-matrices 0`) and on
  a sample of `--sample` matrices, for the rate cost of sampling and the pack throughput.

Prints two markdown tables: one row per sparse block (tokens per expert, compress seconds, peak
host memory, zeros, bits per weight of the packed codes and all-in, entropy bound) and one per
pack run. Timings are wall clock and only mean something on an idle machine; say what ran them.

    python scripts/bench_scale.py --experts 4 --work /tmp/bench-scale
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from make_switch_like import DTYPES, SHAPES, switch_config, write_checkpoint

ROOT = Path(__file__).resolve().parents[1]
BLOCK_LINE = re.compile(r"^(\S+): tokens/expert .*, ([0-9.]+)s")


def run(args: list[str]) -> tuple[str, str, float, float]:
    """`python -m qmoe_cli ARGS` -> (stdout, stderr, wall seconds, peak RSS in GB)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen([sys.executable, "-m", "qmoe_cli", *args], stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if process.returncode != 0:
        raise SystemExit(f"qmoe {' '.join(args)} failed ({process.returncode}):\n{stderr[-2000:]}")
    return stdout, stderr, seconds, usage.ru_maxrss * 1024 / 1e9  # Linux: ru_maxrss in KB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="switch-base")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--sparse-blocks", type=int, default=1, help="per stack")
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--calib-tokens", type=int, default=128)
    parser.add_argument("--sample", type=int, default=4, help="matrices for the sampled dictionary fit")
    parser.add_argument("--work", type=Path, default=None, help="directory for the checkpoints (default: a temp dir)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-scale-"))
    shape = SHAPES[args.shape]
    config = switch_config(shape, args.experts, args.sparse_blocks)
    model = work / "model"
    if not model.exists():
        write_checkpoint(model, config, args.shape, "safetensors", DTYPES[shape.dtype], 0, 2_000_000_000,
                         args.calib_samples, args.calib_tokens)
    quantized = work / "quantized"
    stdout, stderr, seconds, rss = run(["compress", "--model", str(model), "--calib", str(model / "calibration.jsonl"),
                                       "--calib-samples", str(args.calib_samples), "--out", str(quantized),
                                       "--device", "cpu", "--json"])
    block_seconds = {m.group(1): float(m.group(2)) for m in map(BLOCK_LINE.match, stderr.splitlines()) if m}
    summary = json.loads(stdout)
    packs = {}
    for sample in (0, args.sample):
        out = work / f"packed-{sample}"
        stdout, _, _, pack_rss = run(["pack", str(quantized), "--out", str(out), "--sample-matrices", str(sample),
                                      "--json"])
        packs[sample] = (json.loads(stdout), pack_rss)
    print(f"{args.shape} blocks: d_model {config.d_model}, d_ff {config.d_ff}, {config.num_experts} experts, "
          f"{args.calib_samples} x {args.calib_tokens}-token calibration samples; compress {seconds:.0f} s in all\n")
    print("| sparse block | tokens/expert (median) | compress s | peak host GB (process) | zeros | "
          "bits/weight codes | all-in | entropy | codes/entropy |")
    print("|---|---|---|---|---|---|---|---|---|")
    info = packs[0][0]
    for layer in info["layers"]:
        name, block = layer["name"], summary["blocks"][layer["name"]]
        print(f"| {name} | {block['tokens_median']} | {block_seconds.get(name, float('nan')):.1f} | {rss:.2f} | "
              f"{block['zero_fraction']:.1%} | {layer['bits_per_weight_codes']:.4f} | "
              f"{layer['bits_per_weight_all_in']:.4f} | {layer['entropy_bits_per_weight']:.4f} | "
              f"{layer['bits_per_weight_codes'] / layer['entropy_bits_per_weight']:.3f}x |")
    print("\n| pack: dictionary fitted on | bits/weight codes | all-in | codes/entropy | pack s | MB/s read | "
          "M weights/s | peak host GB |")
    print("|---|---|---|---|---|---|---|---|")
    total = len(info["layers"]) * config.num_experts * 2
    for sample, (packed, pack_rss) in packs.items():
        t = packed["throughput"]
        label = f"all {total} matrices" if sample == 0 else f"{min(sample, total)} of {total} matrices"
        print(f"| {label} | {packed['bits_per_weight_codes']:.4f} | {packed['bits_per_weight_all_in']:.4f} | "
              f"{packed['ratio_to_entropy']:.3f}x | {t['seconds']:.1f} | {t['mb_per_s']:.1f} | "
              f"{t['weights_per_s'] / 1e6:.2f} | {pack_rss:.2f} |")


if __name__ == "__main__":
    main()
