"""FP8 block-scaled original checkpoints, the format DeepSeek-V3/R1 (and many later MoEs) ship.

Their `config.json` carries `"quantization_config": {"quant_method": "fp8", "fmt": "e4m3",
"weight_block_size": [128, 128], "activation_scheme": "dynamic"}`; each linear weight `X` is
stored as `float8_e4m3fn` with an fp32 tensor `X_scale_inv` of shape
[ceil(rows / 128), ceil(cols / 128)] beside it (the last block of a row or column may be partial),
and the weight is the fp8 value (as fp32) times the scale of its block. That is what DeepSeek's
`inference/fp8_cast_bf16.py` computes (fp32 product, then the model dtype) and what
transformers' `FineGrainedFP8` does when it dequantizes; here it happens per tensor on read, so
no converted copy of the checkpoint (1.3 TB for DeepSeek-V3) is needed. Which tensors are fp8
is read from their dtype; the others (embeddings, norms, routers, head) are used as stored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import QmoeError

FP8 = torch.float8_e4m3fn
SCALE_SUFFIX = "_scale_inv"  # `X.weight` is scaled by `X.weight_scale_inv`


@dataclass(frozen=True)
class BlockFp8:
    """Block size of an fp8 checkpoint's weight scales: one scale per `rows x cols` block."""

    rows: int = 128
    cols: int = 128

    def __post_init__(self) -> None:
        for field in ("rows", "cols"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"BlockFp8.{field} must be a positive integer, got {value!r}")

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """The scale grid of a [rows, cols] weight: partial edge blocks count as blocks."""
        return math.ceil(shape[0] / self.rows), math.ceil(shape[1] / self.cols)


def block_fp8_scheme(raw: dict[str, Any], path: Path) -> BlockFp8 | None:
    """The block-fp8 scheme `config.json` (at `path`, parsed as `raw`) declares, None when it
    declares no quantization; QmoeError naming the file and the value for any other scheme."""
    config = raw.get("quantization_config")
    if config is None:
        return None
    if not isinstance(config, dict):
        raise QmoeError(f"{path}: quantization_config must be an object, got {config!r}")
    if config.get("quant_method") == "mxfp4":  # GPT-OSS's experts: `mxfp4.py` reads them
        return None
    method, fmt = config.get("quant_method"), config.get("fmt", "e4m3")  # transformers writes no fmt
    if method != "fp8" or fmt != "e4m3":
        raise QmoeError(f"{path}: quantization_config quant_method {method!r} fmt {fmt!r} is not supported; "
                        "qmoe reads unquantized checkpoints and block-scaled fp8 (quant_method 'fp8', fmt 'e4m3')")
    activations = config.get("activation_scheme", "dynamic")
    if activations != "dynamic":  # static schemes ship activation scales qmoe would silently ignore
        raise QmoeError(f"{path}: quantization_config activation_scheme {activations!r} is not supported "
                        "(only 'dynamic')")
    scale_fmt = config.get("scale_fmt", "float")
    if scale_fmt not in ("float", "ue8m0"):  # ue8m0: power-of-two scales, still stored as floats
        raise QmoeError(f"{path}: quantization_config scale_fmt {scale_fmt!r} is not supported ('float' or 'ue8m0')")
    block = config.get("weight_block_size")
    if not isinstance(block, list) or len(block) != 2:
        raise QmoeError(f"{path}: quantization_config weight_block_size {block!r} is not supported; "
                        "qmoe reads block-scaled fp8 ([rows, cols], e.g. [128, 128]), not per-tensor scales")
    try:
        return BlockFp8(*block)
    except ValueError:
        raise QmoeError(f"{path}: quantization_config weight_block_size {block!r} "
                        "must be two positive integers") from None


def dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, block: BlockFp8, dtype: torch.dtype) -> torch.Tensor:
    """[rows, cols] float8_e4m3fn weight times its [ceil(rows/b), ceil(cols/b)] fp32 block scales
    -> [rows, cols] `dtype`. The product is taken in fp32 and rounded to `dtype` once, as
    DeepSeek's converter does. Memory: one fp32 copy of the weight (scaled in place, one row of
    blocks at a time) plus the `dtype` result; the caller checks the scale's shape."""
    out = weight.to(torch.float32)  # [rows, cols] fp32
    scale = scale_inv.to(torch.float32)
    for i in range(scale.shape[0]):
        # [cols] fp32: block j's scale repeated over its columns, the last block cut short
        row_scale = scale[i].repeat_interleave(block.cols)[:out.shape[1]]
        out[i * block.rows:(i + 1) * block.rows].mul_(row_scale)
    return out if dtype == torch.float32 else out.to(dtype)
