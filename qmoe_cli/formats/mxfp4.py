"""MXFP4 original checkpoints, the format GPT-OSS ships its experts in.

Their `config.json` carries `"quantization_config": {"quant_method": "mxfp4", ...}`; each fused
expert tensor `X` (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`) is stored as two uint8
tensors: `X_blocks` [E, out, in / 32, 16], two FP4 (E2M1) values per byte, low nibble first,
and `X_scales` [E, out, in / 32], one power-of-two scale per 32 values as a biased exponent
byte (E8M0: 2^(byte - 127)). Dequantized and transposed, they are the bf16 checkpoint's tensor
[E, in, out] (`x @ W`): transformers' `convert_moe_packed_tensors`, which this matches bit for
bit (tests/test_mxfp4.py). Everything else (attention, router, embeddings, biases) is stored
unquantized. Here dequantization happens per tensor row (one expert) on read, so no bf16 copy
of the checkpoint is needed.

Precision: an E2M1 value times a power of two is exact in bf16 and fp32, so reading loses
nothing; compression starts from exactly the published values, and only our own quantization
(per-row grids, which do not align with MXFP4's 32-value blocks) loses precision.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import QmoeError

BLOCKS, SCALES = "_blocks", "_scales"
# E2M1: sign, 2 exponent bits, 1 mantissa bit; index = the nibble
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
SCALE_BIAS = 127


@dataclass(frozen=True)
class Mxfp4:
    """The MXFP4 scheme of a checkpoint: 32 values per scale, as the OCP MX format fixes."""

    block: int = 32


def mxfp4_scheme(raw: dict[str, Any], path: Path) -> Mxfp4 | None:
    """Mxfp4() when `config.json` (at `path`, parsed as `raw`) declares quant_method mxfp4, else None."""
    config = raw.get("quantization_config")
    if not isinstance(config, dict) or config.get("quant_method") != "mxfp4":
        return None
    if raw.get("model_type") != "gpt_oss":
        raise QmoeError(f"{path}: quantization_config mxfp4 is read for gpt_oss checkpoints only, "
                        f"not {raw.get('model_type')!r}")
    return Mxfp4()


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """blocks [..., out, G, 16] uint8 and scales [..., out, G] uint8 -> the weight [..., G * 32, out]
    in `dtype` (transposed, as the unquantized checkpoint stores it: `x @ W`)."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 blocks [..., G, 16] uint8 and scales [..., G] uint8 must match, got "
                         f"{blocks.dtype}{list(blocks.shape)} and {scales.dtype}{list(scales.shape)}")
    # One lookup per byte (its two values, low nibble first) and one per scale byte: a third of
    # the time of decoding nibbles separately. Every product is exact (a power of two).
    values = _PAIRS[blocks.long()].flatten(-2)  # [..., out, G, 32] fp32
    out = values * _POWERS[scales.long()][..., None]
    return out.flatten(-2).transpose(-1, -2).to(dtype)


_FP4 = torch.tensor(FP4_VALUES, dtype=torch.float32)
_PAIRS = torch.stack([_FP4.repeat(16), _FP4.repeat_interleave(16)], dim=-1)  # [256, 2]: byte -> (low, high)
_POWERS = torch.ldexp(torch.ones(256), torch.arange(256) - SCALE_BIAS)  # [256]: scale byte -> 2^(byte - 127)


def split_mxfp4_names(weight_map: dict[str, str], path: Path) -> tuple[dict[str, str], dict[str, tuple[str, str]]]:
    """The weight map without `X_blocks`/`X_scales` pairs, and those pairs by the name `X` they
    stand for ({X: (blocks file, scales file)}); QmoeError naming a half without its other half."""
    pairs: dict[str, tuple[str, str]] = {}
    for name, file in weight_map.items():
        if name.endswith(BLOCKS):
            base = name[: -len(BLOCKS)]
            if base + SCALES not in weight_map:
                raise QmoeError(f"{path}: MXFP4 tensor '{name}' has no '{base + SCALES}' in the checkpoint")
            pairs[base] = (file, weight_map[base + SCALES])
    orphans = [n for n in weight_map if n.endswith(SCALES) and n[: -len(SCALES)] not in pairs]
    if orphans:
        raise QmoeError(f"{path}: MXFP4 scales '{orphans[0]}' have no '{orphans[0][:-len(SCALES)] + BLOCKS}'")
    rest = {n: f for n, f in weight_map.items()
            if not (n.endswith((BLOCKS, SCALES)) and n.rsplit("_", 1)[0] in pairs)}
    return rest, pairs
