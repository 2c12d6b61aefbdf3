"""`qmoe info`: what a quantized or packed checkpoint holds and how many bits its experts take.

Read from the manifest (checked against its own checksum), safetensors headers and the small
checksummed files opening a checkpoint reads (tokenizer; a packed one's dictionary), so it is
instant even for switch-c2048; `verify` additionally checks every file's checksum and validates
every expert matrix as `qmoe eval` would.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from ..errors import QmoeError
from . import packed, quantized
from .quantized_manifest import read_manifest
from .safetensors_io import SafetensorsFile
from .stats import LayerSize


def checkpoint_info(directory: Path, verify: bool = False) -> dict[str, Any]:
    """One JSON-ready object: kind, source, settings, total_bytes, bits per expert weight
    (codes only and all-in), entropy bound, and `layers`, one entry per sparse block."""
    if not directory.is_dir():
        raise QmoeError(f"{directory}: not a directory")
    manifest = read_manifest(directory)
    if manifest["kind"] == packed.KIND:
        weights = packed.PackedWeights.open(directory)
        if verify:
            _verify(weights)
        info = {**weights.manifest.totals, "codec": weights.manifest.codec, "layers": weights.manifest.layers}
        info.pop("name")
    else:
        weights = quantized.QuantizedWeights.open(directory)
        if verify:
            weights.verify()
        info = _quantized_sizes(weights)
        info.pop("name")
    weights.close()
    total = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
    entropy = info.get("entropy_bits_per_weight")
    return {"path": str(directory), "kind": manifest["kind"], "source": manifest["source"],
            "settings": manifest["settings"], "total_bytes": total, **info,
            "ratio_to_entropy": info["bits_per_weight_codes"] / entropy if entropy else None}


def _quantized_sizes(weights: quantized.QuantizedWeights) -> dict[str, Any]:
    """Bytes of the stored uint8 codes and grids per sparse block (its shared expert's
    included), from the file headers."""
    layers, total = [], LayerSize()
    for stack, i in weights.arch.sparse_blocks():
        layer = LayerSize()
        names = [quantized.expert_file(stack, i, group)
                 for group in quantized.expert_groups(weights.arch.num_experts, weights.group_size)]
        for name in names + ([quantized.shared_file(stack, i)] if weights.shared else []):
            path = weights.directory / name
            if not path.is_file():
                raise QmoeError(f"{path}: missing; the quantized checkpoint is incomplete")
            file = SafetensorsFile(path)
            for key, entry in file.entries.items():
                layer.all_in_bytes += entry.end - entry.begin
                if key.endswith(".codes"):
                    layer.weights += math.prod(entry.shape)
                    layer.code_bytes += entry.end - entry.begin
            file.close()
        layers.append(layer.summary(f"{stack}.{i}"))
        total.weights += layer.weights
        total.code_bytes += layer.code_bytes
        total.all_in_bytes += layer.all_in_bytes
    return {**total.summary("all"), "layers": layers}


def _verify(weights: packed.PackedWeights) -> None:
    """Check every file's checksum and validate every expert matrix (raises QmoeError)."""
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:  # sha256 releases the GIL
        list(pool.map(weights.verify_file, weights.manifest.files))
    for stack, i in weights.arch.sparse_blocks():
        bank = weights.experts(stack, i)
        bank.load(range(weights.arch.num_experts), torch.device("cpu"), torch.float32)
        if bank.stores_shared:
            bank.shared(torch.device("cpu"), torch.float32)
