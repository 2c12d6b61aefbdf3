"""GPTQ's in-block column loop as one Triton kernel (`gptq._columns` is the reference).

Why: inside a lazy-batch block, GPTQ quantizes one column, scales its rounding error by
1/Hinv_ii and subtracts err x Hinv[i, i:] from the columns to its right. In torch that is a
handful of tiny kernels per column; at expert shapes on a GPU each takes a few microseconds of
launch and almost no work, so the loop's time grows with the number of columns, not the work
(16 experts of 768x3072: 0.82 s on an H100, ~0.3 TFLOP/s). Rows are independent inside a block
(a row's error feedback stays in that row), so one program per (expert, tile of rows) can keep
its tile of the block, [BLOCK_R, B] fp32, in registers and walk all the block's columns itself,
reading H^-1's row i (shared by every program of the expert, so served from cache); no
synchronisation between programs. One launch per block instead of ~8 per column.

Same arithmetic as `gptq._columns`: the same comparisons for ternary codes, IEEE division
(`div_rn`) for the error and for w / scale, round-half-to-even like `torch.round`. The GPU may
contract `w - err * h` into one fused multiply-add (one rounding instead of two), so the two
loops agree to float rounding, not bit for bit; tests compare codes, values and the GPTQ error.

Triton is optional (not a dependency of the package): `unavailable(device)` says why this path
cannot run, and the kernel exists only when Triton imports. CPU tensors run under Triton's
interpreter (TRITON_INTERPRET=1, read by Triton when this module is imported): that is how the
kernel is tested without a GPU.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from .grids import Grid, TernaryGrid

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch loop runs instead; `unavailable` says so
    triton = None

TILE = 4096  # fp32 values of the block a program holds in registers: 32 per thread at 4 warps


def unavailable(device: torch.device) -> str:
    """Why the fused loop cannot run on `device` ("" if it can)."""
    if triton is None:
        return "Triton is not installed (pip install triton; it comes with CUDA builds of torch)"
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return ""
    return f"tensors on {device}: Triton compiles for CUDA devices (CPU tensors only under TRITON_INTERPRET=1)"


def columns(w1: Tensor, err1: Tensor, hinv1: Tensor, codes1: Tensor, q1: Tensor, grid: Grid, a: int, b: int) -> None:
    """`gptq._columns` in one launch: columns [a, b) of a block, in place.

    w1, err1 [E, rows, B] fp32 contiguous; hinv1 [E, B, B] fp32 upper (a view of H^-1);
    codes1 [E, rows, B] uint8, q1 [E, rows, B] fp32 (views, last dim contiguous); grid aligned
    to columns [a, b) ([E, rows, b - a]) or one per row ([E, rows, 1]).
    """
    reason = unavailable(w1.device)
    if reason:
        raise RuntimeError(f"gptq_triton.columns: {reason}")
    E, rows, width = w1.shape
    for name, t in (("w1", w1), ("err1", err1), ("codes1", codes1), ("q1", q1), ("hinv1", hinv1)):
        if t.stride(-1) != 1:
            raise ValueError(f"gptq_triton.columns: {name} must have a contiguous last dim, strides {t.stride()}")
    if err1.stride() != w1.stride():
        raise ValueError(f"gptq_triton.columns: err1 strides {err1.stride()} differ from w1's {w1.stride()}")
    if codes1.stride() != q1.stride():
        raise ValueError(f"gptq_triton.columns: codes1 strides {codes1.stride()} differ from q1's {q1.stride()}")
    first, second = grid.tensors().values()  # (lo, hi) or (scale, zero): [E, rows, b - a or 1]
    first, second = first.contiguous(), second.contiguous()
    ternary = isinstance(grid, TernaryGrid)
    block_b = triton.next_power_of_2(width)
    block_r = max(1, min(triton.next_power_of_2(rows), TILE // block_b))
    _columns_kernel[(triton.cdiv(rows, block_r), E)](
        w1, err1, hinv1, first, second, codes1, q1, rows, width, a, b,
        w1.stride(0), w1.stride(1), hinv1.stride(0), hinv1.stride(1),
        first.stride(0), first.stride(1), first.stride(2) if first.shape[-1] > 1 else 0,
        codes1.stride(0), codes1.stride(1),
        TERNARY=ternary, MAXQ=0.0 if ternary else float(grid.maxq), BLOCK_R=block_r, BLOCK_B=block_b,
    )


if triton is not None:

    @triton.jit
    def _round_half_even(x):
        """torch.round: to nearest, ties to even (exact for |x| < 2^22, and clamped beyond)."""
        r = tl.floor(x + 0.5)
        odd = r - 2.0 * tl.floor(r * 0.5) == 1.0
        return tl.where((r - x == 0.5) & odd, r - 1.0, r)

    @triton.jit
    def _columns_kernel(W, ERR, H, P1, P2, C, Q, rows, width, a, b,
                        sw_e, sw_r, sh_e, sh_r, sp_e, sp_r, sp_c, sc_e, sc_r,
                        TERNARY: tl.constexpr, MAXQ: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr):
        e = tl.program_id(1).to(tl.int64)  # int64: e x stride passes 2^31 for big expert groups
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R] rows of this tile
        k = tl.arange(0, BLOCK_B)  # [BLOCK_B] columns of the block
        live = r < rows
        tile = W + e * sw_e + r[:, None] * sw_r + k[None, :]
        w = tl.load(tile, mask=live[:, None] & (k < width)[None, :], other=0.0)  # [BLOCK_R, BLOCK_B]
        for i in range(a, b):
            col = tl.sum(tl.where(k[None, :] == i, w, 0.0), axis=1)  # w[:, i], exactly (x + 0 = x)
            p = e * sp_e + r * sp_r + (i - a) * sp_c
            first = tl.load(P1 + p, mask=live, other=1.0)
            second = tl.load(P2 + p, mask=live, other=1.0)
            if TERNARY:  # TernaryGrid.encode / decode: lo = first, hi = second
                code = tl.where((col < first * 0.5) & (first < 0.0), 0, 1)
                code = tl.where((col > second * 0.5) & (second > 0.0), 2, code)
                qv = tl.where(code == 0, first, tl.where(code == 2, second, 0.0))
            else:  # IntGrid.encode / decode: scale = first, zero = second
                level = tl.minimum(tl.maximum(_round_half_even(tl.div_rn(col, first)) + second, 0.0), MAXQ)
                qv = first * (level - second)
                code = level.to(tl.int32)
            d = tl.load(H + e * sh_e + i * sh_r + i + r * 0)  # Hinv[i, i], broadcast to [BLOCK_R]
            err = tl.div_rn(col - qv, d)
            h = tl.load(H + e * sh_e + i * sh_r + k, mask=(k >= i) & (k < width), other=0.0)  # Hinv[i, :]
            # Columns left of i are done: keep them as they are even when err is not finite.
            w = tl.where(k[None, :] >= i, w - err[:, None] * h[None, :], w)
            out = e * sc_e + r * sc_r + i
            tl.store(C + out, code.to(tl.uint8), mask=live)
            tl.store(Q + out, qv, mask=live)
            tl.store(ERR + e * sw_e + r * sw_r + i, err, mask=live)
        tl.store(tile, w, mask=live[:, None] & (k < width)[None, :])
