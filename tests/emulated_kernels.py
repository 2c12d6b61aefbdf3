"""The qmoe CUDA ops in plain torch on the CPU, for the duration of `emulated_kernels()`.

What each op computes is specified in `kernels/decode_matmul.h` and `qmoe_cli/kernels/ops.py`;
here it is computed the obvious way: every expert matrix decoded whole with the reference
decoders (`decode_dense_reference`, `unpack_bits`), the grid values rounded to x's dtype, each
product summed in fp64 and rounded once, outputs that no tile covers left NaN. Registered for the
CPU dispatch key, so the GPU-side orchestration (`DeviceExperts`: the routing plans, gate and up
stacked into one matrix, the activation, top-k assignments, heavy experts on the dense path) runs
and is checked on a machine without a GPU, by the same tests that run the real kernels on one.
It says nothing about the kernels themselves; tests/test_kernels.py checks those on a GPU.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from qmoe_cli.codec.bitpack import row_bytes, unpack_bits
from qmoe_cli.kernels.ops import TILE_TOKENS, decode_dense_reference, define_ops, host_plan


def _ternary_weights(words, bases, offsets, masks, lo, hi, expert: int, cols: int) -> torch.Tensor:
    """Expert `expert`'s weights [rows, cols] fp32."""
    base = 0 if bases is None else int(bases[expert])
    mine = words[base:base + int(offsets[expert, -1])]
    return decode_dense_reference(mine, offsets[expert], masks, lo[expert, :, None], hi[expert, :, None], cols)


def _bitpacked_weights(packed, scale, zero, bits: int, group_cols: int, expert: int, cols: int,
                       dtype: torch.dtype) -> torch.Tensor:
    """Expert `expert`'s weights [rows, cols] in `dtype`: as the kernels, scale * (code - zero) in
    fp32, rounded once."""
    stream = packed[expert].contiguous().view(torch.uint8)[:, :row_bytes(cols, bits)]  # the device layout's bytes
    codes = unpack_bits(stream, bits, cols).float()  # [rows, cols]
    group = torch.arange(cols) // group_cols
    return (scale[expert][:, group] * (codes - zero[expert][:, group])).to(dtype)


def _tiles(x, x_transposed: bool, tiles, order, relu: bool, out_transposed: bool, rows: int, weights) -> torch.Tensor:
    """The tile ops, given weights(expert) -> [rows, cols] already in x's dtype."""
    xt = x if x_transposed else x.T  # [cols, n]
    n = xt.shape[1]
    if tiles is None:
        tiles = torch.tensor([(0, p, min(TILE_TOKENS, n - p)) for p in range(0, n, TILE_TOKENS)]).reshape(-1, 3)
    out = torch.full((rows, n) if out_transposed else (n, rows), float("nan"), dtype=x.dtype)
    for expert, p0, count in tiles.tolist():
        if count <= 0:
            continue
        assert count <= TILE_TOKENS and p0 + count <= n, f"tile {expert, p0, count} outside {n} positions"
        y = weights(expert).double() @ xt[:, p0:p0 + count].double()  # [rows, count]
        y = (y.clamp(min=0) if relu else y).to(x.dtype)
        dest = torch.arange(p0, p0 + count) if order is None else order[p0:p0 + count].long()
        if out_transposed:
            out[:, dest] = y
        else:
            out[dest] = y.T
    return out


def ternary_tiles(words, bases, offsets, masks, lo, hi, x, x_transposed, tiles, order, relu, out_transposed):
    cols = x.shape[0] if x_transposed else x.shape[1]
    return _tiles(x, x_transposed, tiles, order, relu, out_transposed, offsets.shape[1] - 1,
                  lambda e: _ternary_weights(words, bases, offsets, masks, lo, hi, e, cols).to(x.dtype))


def bitpacked_tiles(packed, scale, zero, bits, group_cols, x, x_transposed, tiles, order, relu, out_transposed):
    cols = x.shape[0] if x_transposed else x.shape[1]
    return _tiles(x, x_transposed, tiles, order, relu, out_transposed, packed.shape[1],
                  lambda e: _bitpacked_weights(packed, scale, zero, bits, group_cols, e, cols, x.dtype))


def ternary_dense(words, bases, offsets, masks, lo, hi, expert, cols, dtype):
    return _ternary_weights(words, bases, offsets, masks, lo, hi, expert, cols).to(dtype)


def bitpacked_dense(packed, scale, zero, bits, group_cols, cols, expert, dtype):
    return _bitpacked_weights(packed, scale, zero, bits, group_cols, expert, cols, dtype)


def route_plan(index, num_experts):
    """Stable sort by expert; tiles of up to 32 tokens of one expert, then zero (unused) slots."""
    n = index.shape[0]
    assert 1 <= n <= 1024 and bool(((index >= 0) & (index < num_experts)).all())
    tiles, heavy = host_plan(torch.bincount(index, minlength=num_experts).tolist(), threshold=n)
    assert not heavy
    padded = torch.zeros(n, 3, dtype=torch.int32)
    padded[:tiles.shape[0]] = tiles
    return torch.argsort(index, stable=True).to(torch.int32), padded


def gather_transpose(x, order):
    return x[order.long()].T.contiguous()


_OPS = (ternary_tiles, bitpacked_tiles, ternary_dense, bitpacked_dense, route_plan, gather_transpose)


@contextlib.contextmanager
def emulated_kernels() -> Iterator[None]:
    """The qmoe ops run on CPU tensors (as above) inside the block, and only there."""
    define_ops()
    library = torch.library.Library("qmoe", "IMPL")
    try:
        for op in _OPS:
            library.impl(op.__name__, op, "CPU")
        yield
    finally:
        library._destroy()
