"""The native CPU decode-matmul of packed experts (`kernels/cpu_matmul*.cpp`): y = x Wᵀ, SIMD
(AVX-512 or AVX2, picked at run time, or portable C++), rows split over torch's threads.
Ternary matrices are multiplied from their lookup layout (2 bits a weight, codes aligned to groups
of 4 input columns; `ternary_layout` builds it once per matrix from the dictionary code), b-bit
matrices straight from their bit-packed codes.

Numerics are `round_once_linear`'s: the weights in x's dtype (ternary grids rounded by the
caller; b-bit weights rounded in the kernel), products summed in fp32, rounded once to x's dtype.
Only the summation order differs from a dense product, by at most ~eps(fp32) x (nonzero terms)
x max|w x| (`tests/test_cpu_matmul.py` states the bound it checks).

`QMOE_CPU_ISA` (portable | avx2 | avx512) forces a variant for the whole process, for benchmarks
and for checking a variant on a machine that runs a better one; the `isa` argument does the same
for one call. Without a compiler the callers keep their previous paths (one warning).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

from ..native_build import NativeBuild, load_optional
from ..resources import shipped_dir

ISAS = {"portable": 0, "avx2": 1, "avx512": 2}
_ROUND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
# Up to here the b-bit kernel beats decoding to fp32 plus BLAS; the ternary lookup beats it at any
# token count (docs/cpu.md).
BITS_MAX_TOKENS = 32


def cpu_matmul_build() -> NativeBuild:
    native = shipped_dir("native")
    return NativeBuild(name="qmoe_cpu_matmul", sources=(native / "cpu_matmul.cpp", native / "cpu_matmul_bits.cpp"),
                       headers=(native / "cpu_matmul.h",), what="the CPU decode-matmul",
                       usual="10-30 s", extra_cflags=("-O3", "-fopenmp"),
                       extra_ldflags=("-fopenmp",), is_python_module=False, timeout_s=900.0)


@functools.cache
def cpu_matmul_extension() -> Any | None:
    """The compiled kernels' ops (`torch.ops.qmoe_cpu_matmul`), or None (after one warning) when
    they cannot be built."""
    return load_optional(cpu_matmul_build(), "packed experts use the slower decode path")


def isa_code(isa: str | None) -> int:
    """The kernels' variant number of `isa` (None: `QMOE_CPU_ISA`, else the best the CPU runs: -1)."""
    isa = isa or os.environ.get("QMOE_CPU_ISA") or None
    if isa is None:
        return -1
    if isa not in ISAS:
        raise ValueError(f"QMOE_CPU_ISA / isa must be one of {', '.join(ISAS)}, got {isa!r}")
    return ISAS[isa]


def best_isa() -> str | None:
    """The fastest variant this CPU runs, or None without the kernels."""
    ext = cpu_matmul_extension()
    return None if ext is None else {v: k for k, v in ISAS.items()}[ext.best_isa()]


def ternary_grids(lo: torch.Tensor, hi: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """lo/hi [rows, 1] fp32 -> [rows] fp32 rounded to `dtype`, as `ternary_matmul` takes them
    (`round_once_linear`: the grid in x's dtype); callers that multiply often keep the result."""
    return tuple(g.reshape(-1).to(dtype).float().contiguous() for g in (lo, hi))


def ternary_layout(words: torch.Tensor, offsets: torch.Tensor, masks: torch.Tensor, cols: int,
                   isa: str | None = None) -> torch.Tensor | None:
    """The lookup layout [ceil(rows / 16), ceil(cols / 16), 16] int32 of a dictionary-coded ternary
    matrix [rows, cols] (words [total] int16, offsets [rows + 1] int32, masks [size, 2] int32 =
    `Codebook.masks`): 2 bits a weight, built once per matrix in the time of 7-10 one-token
    products (docs/cpu.md). RuntimeError on a malformed matrix; None without the kernels."""
    ext = cpu_matmul_extension()
    return None if ext is None else ext.ternary_layout(words, offsets, masks, cols, isa_code(isa))


def ternary_unpack(layout: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, cols: int, rows: tuple[int, int],
                   ) -> torch.Tensor:
    """Rows [begin, end) of a ternary matrix in its lookup layout as weights [end - begin, cols]
    fp32 (lo/hi [rows, 1] fp32), what `rows.decode_dense` gives from its codewords. Needs the
    kernels (a layout exists only where they run)."""
    return cpu_matmul_extension().ternary_unpack(layout, lo.reshape(-1).contiguous(), hi.reshape(-1).contiguous(),
                                                 cols, *rows)


def ternary_matmul(layout: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, x: torch.Tensor,
                   isa: str | None = None) -> torch.Tensor | None:
    """x [n, cols] fp32/bf16/fp16 @ Wᵀ -> [n, rows] in x's dtype, for a ternary W in its lookup
    layout (`ternary_layout`), lo/hi: [rows, 1] fp32 (one grid per row), or
    `ternary_grids(lo, hi, x.dtype)` already. None without the kernels."""
    ext = cpu_matmul_extension()
    if ext is None:
        return None
    if lo.dim() != 1:
        lo, hi = ternary_grids(lo, hi, x.dtype)
    x_dtype = x.dtype
    if x_dtype != torch.bfloat16:  # bf16 goes in as it is (exact in fp32), anything else as fp32
        x = x.float()
    y = ext.ternary_matmul(layout, lo, hi, x.contiguous(), isa_code(isa))
    return y if y.dtype == x_dtype else y.to(x_dtype)  # fp32 and bf16 come back in their dtype


def bitpacked_matmul(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, x: torch.Tensor, bits: int,
                     group_cols: int, isa: str | None = None) -> torch.Tensor | None:
    """x [n, cols] fp32/bf16/fp16 @ Wᵀ -> [n, rows] in x's dtype, for a bit-packed W: packed
    [rows, ceil(cols * bits / 8)] uint8, scale/zero [rows, groups] fp32, W = scale * (q - zero)
    (grids of `group_cols` columns). None without the kernels or for another dtype of x."""
    ext = cpu_matmul_extension()
    if ext is None or x.dtype not in _ROUND:
        return None
    y = ext.bitpacked_matmul(packed, scale, zero, x.float().contiguous(), bits, group_cols, _ROUND[x.dtype],
                             isa_code(isa))
    return y.to(x.dtype)
