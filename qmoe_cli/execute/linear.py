"""The CPU products of compressed expert matrices, as modules an expert FFN is built from.

`GridLinear` multiplies a quantized checkpoint's matrix, dequantized once when loaded;
`PackedLinear` multiplies a packed one that is never dense whole. Both follow
`kernels.round_once_linear`'s numerics (grid values rounded to x's dtype, fp32 sums, one
rounding), so a quantized checkpoint computes what its packed form computes on the same device
and dtype, and the GPU path (`grouped`) computes the same function again.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from ..kernels import round_once_linear

BLOCK_BYTES = 1 << 22  # fp32 bytes of weights one decode-matmul step materialises


class CodedMatrix(Protocol):
    """What `PackedLinear` needs of a validated packed matrix [rows, cols] (`formats.packed`)."""

    rows: int
    cols: int

    def dense(self, begin: int, end: int) -> torch.Tensor:
        """Rows [begin, end) decoded -> [end - begin, cols] fp32."""
        ...

    def sparse_matmul(self, x: torch.Tensor) -> torch.Tensor | None:
        """x [n, cols] (CPU) @ Wᵀ -> [n, rows] in x's dtype without a dense W, with
        `round_once_linear`'s numerics; None where the storage has no such product for this x, or
        where decoding to fp32 plus BLAS is faster."""
        ...


class GridLinear(nn.Module):
    """y = x Wᵀ for a dequantized expert matrix W [out, in] (in the run dtype), with the numerics
    of every compressed expert linear (`round_once_linear`), so a quantized checkpoint computes
    what its packed form computes on the same device and dtype."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        # A buffer, not a plain attribute: moving or swapping a module's tensors (the host
        # streamer in `run/resident.py`) must reach it; not persistent, it is no checkpoint tensor.
        self.register_buffer("weight", weight, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [n, in] -> [n, out], in x's dtype."""
        return round_once_linear(x, self.weight)


class PackedLinear(nn.Module):
    """y = x Wᵀ for a packed W [out, in] that is never dense whole: the CPU decode-matmul.

    On the CPU, the matrix's own product where it has one (`CodedMatrix.sparse_matmul`: a ternary
    matrix's lookup layout at any token count, b-bit codes up to 32 tokens; docs/cpu.md).
    Otherwise: decoded a block of rows at a time (at most 4 MB of fp32), multiplied with BLAS,
    dropped. Either way with `round_once_linear`'s numerics: the grid rounded to x's dtype, fp32
    sums, one rounding, so the row blocks (each its own BLAS problem shape) give what one product
    over the whole matrix gives, and what the quantized checkpoint gives.
    """

    def __init__(self, matrix: CodedMatrix):
        super().__init__()
        self.matrix = matrix
        self.block_rows = max(1, BLOCK_BYTES // (4 * matrix.cols))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [n, in] -> [n, out], in x's dtype and device."""
        if x.device.type == "cpu":
            y = self.matrix.sparse_matmul(x)
            if y is not None:
                return y
        return self.decoded(x)

    def decoded(self, x: torch.Tensor) -> torch.Tensor:
        """The same product from rows decoded a block at a time to fp32, for BLAS: the path on
        other devices and for matrices without a product of their own."""
        parts = []
        for begin in range(0, self.matrix.rows, self.block_rows):
            end = min(self.matrix.rows, begin + self.block_rows)
            parts.append(round_once_linear(x, self.matrix.dense(begin, end).to(device=x.device, dtype=x.dtype)))
        return torch.cat(parts, dim=-1)
