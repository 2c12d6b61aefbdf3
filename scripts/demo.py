"""Compress and pack a model at several settings; print a markdown table of validation losses
and packed sizes.

    python scripts/demo.py                       # the embedded tiny-switch model, CPU
    python scripts/demo.py --model switch-base-8 --device cuda --calib-samples 128

For each method (gptq, rtn) and bit width (ternary, 2, 4) it runs `qmoe compress --pack` into a
temporary directory and `qmoe eval` on the *packed* result, next to the uncompressed model.
Bits per expert weight are those of the packed checkpoint (`qmoe info`): codes only, and all-in
with row offsets and per-row grids; the entropy column is the empirical entropy of the codes,
the bound for any coder of them (pairs of weights for ternary).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def qmoe(*args: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "qmoe_cli", *args, "--json"], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"qmoe {' '.join(args)} failed:\n{done.stderr}")
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-switch")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--calib-samples", default="128")
    parser.add_argument("--samples", default=None, help="validation samples (default: qmoe eval's, 128)")
    args = parser.parse_args()
    common = ["--device", args.device]
    samples = ["--samples", args.samples] if args.samples else []  # the quick start's numbers by default
    original = qmoe("eval", "--model", args.model, *samples, *common)["loss"]
    print("| method | bits | validation loss (packed) | bits/weight packed | all-in | entropy bound |")
    print("|---|---|---|---|---|---|")
    print(f"| original (fp32) | - | {original:.4f} | 32 | 32 | - |", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for bits in ("ternary", "2", "4"):
            for method in ("gptq", "rtn"):
                out = Path(tmp) / f"{method}-{bits}"
                packed = qmoe("compress", "--model", args.model, "--bits", bits, "--method", method,
                              "--calib-samples", args.calib_samples, "--out", str(out), "--pack", *common)["packed"]
                loss = qmoe("eval", "--model", packed["path"], *samples, *common)["loss"]
                print(f"| {method} | {bits} | {loss:.4f} | {packed['bits_per_weight_codes']:.3f} "
                      f"| {packed['bits_per_weight_all_in']:.3f} | {packed['entropy_bits_per_weight']:.3f} |",
                      flush=True)


if __name__ == "__main__":
    main()
