"""`qmoe info`: what a checkpoint of any format holds, and for a compressed one how many bits its
experts take.

Its format (`registry.detect`) opens it and describes it: a compressed checkpoint from its
manifest (checked against its own checksum), safetensors headers and the small checksummed files
opening it reads (tokenizer; a packed one's dictionary), so it is instant even for switch-c2048;
an original one from its config.json and shard headers. `verify` additionally checks every file's
checksum and validates every expert matrix as `qmoe eval` would.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import QmoeError
from .registry import FORMATS, detect


def checkpoint_info(directory: Path, verify: bool = False) -> dict[str, Any]:
    """One JSON-ready object: path, kind, source (and a compressed checkpoint's settings),
    total_bytes, then what its format reports: for a compressed checkpoint bits per expert weight
    (codes only and all-in), the entropy bound and `layers`, one entry per sparse block."""
    if not directory.is_dir():
        raise QmoeError(f"{directory}: not a directory")
    fmt = detect(str(directory))
    weights = fmt.open(str(directory))
    try:
        if verify:
            fmt.verify(weights)
        head, sizes = fmt.describe(weights)
    finally:
        weights.close()
    total = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
    return {"path": str(directory), "kind": fmt.kind, **head, "total_bytes": total, **sizes}


def info_lines(info: dict[str, Any], verified: bool) -> list[str]:
    """`qmoe info`'s text: the format's headline, then what the object holds (codec, expert bits
    and the table of sparse blocks)."""
    lines = [f"{info['path']}: {FORMATS[info['kind']].headline(info)}, {info['total_bytes'] / 1e6:.2f} MB"
             + (", verified" if verified else "")]
    if "codec" in info:
        codec = info["codec"]
        lines.append("codec: " + (f"dictionary of {codec['size']} codewords, up to {codec['max_pairs']} pairs"
                                  if codec["type"] == "dictionary" else f"{codec['bits']}-bit codes, bit-packed"))
    if "layers" not in info:
        return lines
    entropy = info["entropy_bits_per_weight"]
    lines.append(f"expert weights {info['weights']}: {info['bits_per_weight_codes']:.4f} bits/weight codes, "
                 f"{info['bits_per_weight_all_in']:.4f} all-in" + (
                     f", entropy {entropy:.4f} (codes/entropy {info['ratio_to_entropy']:.3f})" if entropy else ""))
    lines.append(f"{'layer':<12} {'weights':>12} {'codes b/w':>10} {'all-in b/w':>11} {'entropy b/w':>12}")
    for layer in info["layers"]:
        e = layer["entropy_bits_per_weight"]
        lines.append(f"{layer['name']:<12} {layer['weights']:>12} {layer['bits_per_weight_codes']:>10.4f} "
                     f"{layer['bits_per_weight_all_in']:>11.4f} {'-' if e is None else f'{e:.4f}':>12}")
    return lines
