"""Compress a model at several settings and print a markdown table of validation losses.

    python scripts/demo.py                       # the embedded tiny-switch model, CPU
    python scripts/demo.py --model switch-base-8 --device cuda --calib-samples 128

For each method (gptq, rtn) and bit width (ternary, 2, 4) it runs `qmoe compress` into a
temporary directory and `qmoe eval` on the result, next to the uncompressed model. The last
column is the empirical entropy of the expert codes in bits per weight: the bound an entropy
coder (`qmoe pack`) can approach, not a packed size.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from qmoe_cli.safetensors_io import SafetensorsFile


def qmoe(*args: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "qmoe_cli", *args, "--json"], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"qmoe {' '.join(args)} failed:\n{done.stderr}")
    return json.loads(done.stdout)


def code_entropy(directory: Path) -> float:
    """Empirical entropy (bits/weight) of all expert codes of a quantized checkpoint."""
    counts = torch.zeros(256, dtype=torch.float64)
    for path in sorted((directory / "experts").rglob("*.safetensors")):
        file = SafetensorsFile(path)
        for key in file.keys():
            if key.endswith(".codes"):
                counts += torch.bincount(file.read(key).flatten().long(), minlength=256).double()
        file.close()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log2()).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-switch")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--calib-samples", default="128")
    parser.add_argument("--samples", default="256", help="validation samples")
    args = parser.parse_args()
    common = ["--device", args.device]
    rows = [("original", "-", qmoe("eval", "--model", args.model, "--samples", args.samples, *common)["loss"], math.nan)]
    with tempfile.TemporaryDirectory() as tmp:
        for bits in ("ternary", "2", "4"):
            for method in ("gptq", "rtn"):
                out = Path(tmp) / f"{method}-{bits}"
                qmoe("compress", "--model", args.model, "--bits", bits, "--method", method,
                     "--calib-samples", args.calib_samples, "--out", str(out), *common)
                loss = qmoe("eval", "--model", str(out), "--samples", args.samples, *common)["loss"]
                rows.append((method, bits, loss, code_entropy(out)))
    print("| method | bits | validation loss | code entropy (bits/weight) |")
    print("|---|---|---|---|")
    for method, bits, loss, entropy in rows:
        print(f"| {method} | {bits} | {loss:.4f} | {'-' if math.isnan(entropy) else f'{entropy:.3f}'} |")


if __name__ == "__main__":
    main()
