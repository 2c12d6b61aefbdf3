"""The CUDA decode-matmul kernels against the CPU codec, and the pieces testable without a GPU.

Always: the kernels' dictionary form (`codebook_masks`) against `Codebook.table`, its plain-torch
decode against the C++/Python codec, and the ops' fake implementations. With nvcc and a CUDA
torch: the build. With a GPU: the kernels against decode_dense + an fp32 matmul, and opcheck.
"""

from __future__ import annotations

import functools
import os
import shutil

import pytest
import torch
from test_codec_reference import fixed_probs, ternary
from torch._subclasses.fake_tensor import FakeTensorMode

from qmoe_cli.codec.dictionary import Codebook, DictionarySpec, build_dictionary
from qmoe_cli.codec.rows import decode_dense as codec_decode_dense
from qmoe_cli.codec.rows import encode_matrix
from qmoe_cli.kernels import ops
from qmoe_cli.kernels.ops import codebook_masks, decode_dense_reference

HAS_TOOLCHAIN = bool(shutil.which("nvcc") or os.environ.get("CUDA_HOME")) and bool(torch.version.cuda)
needs_toolchain = pytest.mark.skipif(not HAS_TOOLCHAIN, reason="needs nvcc and a CUDA build of torch")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
SHAPES = [(768, 3072), (3072, 768), (1024, 4096), (4096, 1024), (2080, 6144), (6144, 2080), (97, 1025), (5, 29)]


@functools.cache
def book(p_zero: float, size: int = 1 << 16, max_len: int = 14) -> Codebook:
    return Codebook.from_sequences(build_dictionary(fixed_probs(p_zero), DictionarySpec(size, max_len)), max_len)


def encoded(rows: int, cols: int, p_zero: float, seed: int, size: int = 1 << 16):
    """(words, offsets, lo [rows, 1], hi [rows, 1]) of random ternary codes, on the CPU."""
    codes = ternary(rows, cols, p_zero, seed)
    words, offsets = encode_matrix(codes, book(p_zero, size))
    g = torch.Generator().manual_seed(seed)
    return words, offsets, -torch.rand(rows, 1, generator=g) - 0.1, torch.rand(rows, 1, generator=g) + 0.1


@pytest.mark.parametrize("size,max_len", [(1 << 16, 14), (300, 3), (9, 1)])
def test_masks_hold_the_table_and_lengths(size: int, max_len: int) -> None:
    b = book(0.9, size, max_len)
    masks = codebook_masks(b).long() & 0xFFFFFFFF  # [size, 2], as the GPU reads them (unsigned)
    assert masks.shape == (b.size, 2)
    assert torch.equal(masks[:, 0] >> 28, b.lengths.long())
    positions = torch.arange(28)
    lo_bits, hi_bits = (masks[:, :1] >> positions) & 1, (masks[:, 1:] >> positions) & 1
    inside = positions < 2 * b.lengths.long()[:, None]
    codes = torch.ones(b.size, 28, dtype=torch.long)
    codes[:, :b.table.shape[1]] = b.table.long()
    assert torch.equal(lo_bits.bool(), (codes == 0) & inside)
    assert torch.equal(hi_bits.bool(), (codes == 2) & inside)


def test_masks_reject_codewords_longer_than_28_weights() -> None:
    with pytest.raises(ValueError, match="14 pairs"):
        codebook_masks(book(0.95, 4096, 20))


@pytest.mark.parametrize("rows,cols", [(5, 29), (97, 1025), (33, 64), (1, 1), (3, 2)])
def test_reference_decode_of_masks_equals_the_codec(rows: int, cols: int) -> None:
    words, offsets, lo, hi = encoded(rows, cols, 0.9, seed=rows + cols, size=4096)
    expected = codec_decode_dense(words, offsets, book(0.9, 4096), lo, hi, cols, cols, (0, rows))
    got = decode_dense_reference(words, offsets, codebook_masks(book(0.9, 4096)), lo, hi, cols)
    assert torch.equal(got, expected)


def test_fake_implementations_give_shapes_without_the_library() -> None:
    with FakeTensorMode():
        words, offsets = torch.empty(50, dtype=torch.int16), torch.empty(8, dtype=torch.int32)
        masks, lo = torch.empty(4096, 2, dtype=torch.int32), torch.empty(7, 1)
        x = torch.empty(4, 100, dtype=torch.bfloat16)
        y = torch.ops.qmoe.decode_matmul(words, offsets, masks, lo, lo, x)
        w = torch.ops.qmoe.decode_dense(words, offsets, masks, lo, lo, 100)
    assert (y.shape, y.dtype) == ((4, 7), torch.bfloat16)
    assert (w.shape, w.dtype) == ((7, 100), torch.bfloat16)


def test_grouped_grids_are_rejected_with_the_shape() -> None:
    with pytest.raises(ValueError, match=r"one grid per row.*\[3, 2\]"):
        ops.decode_matmul(torch.empty(0, dtype=torch.int16), torch.zeros(4, dtype=torch.int32),
                          torch.zeros(9, 2, dtype=torch.int32), torch.zeros(3, 2), torch.zeros(3, 2),
                          torch.zeros(1, 8, dtype=torch.bfloat16))


@needs_toolchain
def test_kernels_compile() -> None:
    build = ops.build_kernels()
    assert build.archs == ("80", "90") and build.nvcc and build.library.endswith(".so")


def _on_gpu(rows: int, cols: int, p_zero: float, seed: int):
    words, offsets, lo, hi = encoded(rows, cols, p_zero, seed)
    masks = codebook_masks(book(p_zero))
    reference = codec_decode_dense(words, offsets, book(p_zero), lo, hi, cols, cols, (0, rows))  # [rows, cols] fp32
    return [t.cuda() for t in (words, offsets, masks, lo, hi)], reference.cuda()


def _poison(numel: int) -> None:
    """Leave a NaN block the size of the next output in the caching allocator, which hands it out
    again to the op's at::empty: rows the kernel does not write stay NaN and fail the check."""
    torch.full((numel,), float("nan"), dtype=torch.bfloat16, device="cuda")


def _rel_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.float() - expected).norm() / expected.norm().clamp(min=1e-12))


@needs_gpu
@pytest.mark.parametrize("rows,cols", SHAPES)
def test_decode_matmul_matches_the_cpu_reference(rows: int, cols: int) -> None:
    assert ops.kernel_library() is not None
    (words, offsets, masks, lo, hi), weights = _on_gpu(rows, cols, 0.9, seed=rows * 7 + cols)
    for tokens in (1, 4, 16, 32, 48):  # 48: the decode-to-scratch + torch.matmul path
        x = torch.randn(tokens, cols, device="cuda").to(torch.bfloat16)
        expected = x.float() @ weights.T
        _poison(tokens * rows)
        y = ops.decode_matmul(words, offsets, masks, lo, hi, x)
        assert y.shape == (tokens, rows) and y.dtype == torch.bfloat16
        assert not y.isnan().any(), f"{rows}x{cols}, {tokens} tokens: unwritten outputs"
        # bf16 output rounding alone is ~2e-3; plain torch bf16 matmul lands in the same range
        assert _rel_err(y, expected) <= 1e-2, f"{rows}x{cols}, {tokens} tokens"


@needs_gpu
@pytest.mark.parametrize("rows,cols", [(97, 1025), (5, 29), (768, 3072)])
def test_decode_dense_matches_the_cpu_reference(rows: int, cols: int) -> None:
    assert ops.kernel_library() is not None
    (words, offsets, masks, lo, hi), weights = _on_gpu(rows, cols, 0.75, seed=rows + cols)
    _poison(rows * cols)
    got = ops.decode_dense(words, offsets, masks, lo, hi, cols)
    assert torch.equal(got, weights.to(torch.bfloat16))  # exact: each weight is lo, 0 or hi rounded once


@needs_gpu
def test_binding_names_the_bad_argument() -> None:
    assert ops.kernel_library() is not None
    (words, offsets, masks, lo, hi), _ = _on_gpu(5, 29, 0.9, seed=1)
    x = torch.randn(2, 29, device="cuda")  # fp32, not bf16
    with pytest.raises(RuntimeError, match="x must be BFloat16, got Float"):
        torch.ops.qmoe.decode_matmul(words, offsets, masks, lo, hi, x)
    with pytest.raises(RuntimeError, match="offsets must be on cuda"):
        torch.ops.qmoe.decode_matmul(words, offsets.cpu(), masks, lo, hi, x.to(torch.bfloat16))


@needs_gpu
def test_opcheck() -> None:
    assert ops.kernel_library() is not None
    (words, offsets, masks, lo, hi), _ = _on_gpu(97, 1025, 0.9, seed=3)
    x = torch.randn(4, 1025, device="cuda").to(torch.bfloat16)
    torch.library.opcheck(torch.ops.qmoe.decode_matmul.default, (words, offsets, masks, lo, hi, x))
    torch.library.opcheck(torch.ops.qmoe.decode_dense.default, (words, offsets, masks, lo, hi, 1025))
