"""Packed and quantized experts compute the same function on the same device and dtype.

The contract (`qmoe_cli.kernels.round_once_linear`): the grid values rounded to the run dtype,
products summed in fp32, the output rounded once. Here on the CPU, for every packed path (the
sparse product from the codewords, the decode-in-row-blocks product, bit-packed b-bit) against
the quantized checkpoint's `GridLinear` and an fp64 reference; tests/test_kernels.py holds the
GPU kernels to the same reference.

Why it matters: before, in bf16 the packed sparse path summed with the fp32 grid while the
quantized path used the grid rounded to bf16, and on CUDA the packed path ran each matrix as
several 4 MB row-block GEMMs, each a different cuBLAS problem shape that may split and reduce
the sum in bf16 differently from the quantized path's single GEMM: the two checkpoints' eval
losses drifted apart (3.6e-4 relative on a switch-base-128-shaped model).
"""

from __future__ import annotations

import pytest
import torch
from packed_experts import assert_contract, bitpacked_matrix, ternary_matrix

from qmoe_cli.codec.cpu_matmul import BITS_MAX_TOKENS
from qmoe_cli.execute.linear import GridLinear, PackedLinear

TOKENS = (1, 7, BITS_MAX_TOKENS, BITS_MAX_TOKENS + 1, 64)  # b-bit: the kernel up to 32, row blocks beyond


def _assert_same_function(packed: torch.Tensor, quantized: torch.Tensor, x: torch.Tensor,
                          weights: torch.Tensor) -> None:
    # fp32 sums in a different order may round a value sitting on a rounding boundary the other
    # way: rare, and never by more than the fp32 sum's error. Summing with the unrounded fp32 grid
    # (the old packed path) moves a third of the bf16 outputs, some by many units.
    for got in (packed, quantized):
        assert_contract(got, x, weights)
    assert float((packed == quantized).float().mean()) >= 0.99


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_packed_ternary_equals_quantized_in_16_bit(dtype: torch.dtype) -> None:
    matrix = ternary_matrix(700, 300, seed=5)
    linear = PackedLinear(matrix)
    linear.block_rows = 256  # several row blocks, as a d_ff x d_model matrix at Switch scale has
    weights = matrix.dense(0, matrix.rows)  # [rows, cols] fp32, what the quantized checkpoint dequantizes to
    quantized = GridLinear(weights.to(dtype))
    for n in TOKENS:
        x = torch.randn(n, matrix.cols, generator=torch.Generator().manual_seed(n)).to(dtype)
        _assert_same_function(linear(x), quantized(x), x, weights)


@pytest.mark.parametrize("bits,group", [(2, None), (3, 48), (4, None), (8, 32)])
def test_packed_bbit_equals_quantized_in_bf16(bits: int, group: int | None) -> None:
    matrix = bitpacked_matrix(300, 257, bits, group, seed=bits)
    linear = PackedLinear(matrix)
    weights = matrix.dense(0, matrix.rows)
    quantized = GridLinear(weights.to(torch.bfloat16))
    for n in TOKENS:
        x = torch.randn(n, matrix.cols, generator=torch.Generator().manual_seed(n)).to(torch.bfloat16)
        _assert_same_function(linear(x), quantized(x), x, weights)


def test_fp32_is_unchanged_by_the_contract() -> None:
    matrix = ternary_matrix(97, 1025, seed=2)
    weights = matrix.dense(0, matrix.rows)
    x = torch.randn(40, 1025, generator=torch.Generator().manual_seed(0))
    assert torch.equal(GridLinear(weights)(x), x @ weights.T)
    assert torch.allclose(PackedLinear(matrix)(x[:5]), x[:5] @ weights.T, rtol=1e-5, atol=1e-5)
