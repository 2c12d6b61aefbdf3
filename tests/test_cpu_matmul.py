"""The native CPU decode-matmul (`codec/cpu_matmul.py`, `kernels/cpu_matmul*.cpp`) against the plain
reference: the weights built from the codes themselves (no decoder involved), rounded to x's dtype,
the product summed in fp64. Every SIMD variant this CPU runs is forced in turn.

Tolerance, from the arithmetic: the kernels sum n = cols products in fp32 in some order, so each
output is within gamma_n = n * eps32 / (1 - n * eps32) of sum |x_c w_c| (the standard bound for
recursive summation, which any blocking only tightens), plus, for a bf16/fp16 x, half an ulp of
the result's rounding to x's dtype (eps(dtype) * |y|)."""

from __future__ import annotations

import pytest
import torch
from test_codec_reference import fixed_probs, ternary

from qmoe_cli.codec.bitpack import pack_bits
from qmoe_cli.codec.cpu_matmul import (
    ISAS,
    best_isa,
    bitpacked_matmul,
    cpu_matmul_extension,
    ternary_grids,
    ternary_layout,
    ternary_matmul,
    ternary_unpack,
)
from qmoe_cli.codec.dictionary import Codebook, DictionarySpec, build_dictionary
from qmoe_cli.codec.rows import encode_matrix

pytestmark = pytest.mark.skipif(cpu_matmul_extension() is None, reason="the CPU decode-matmul could not be built")
EPS = {torch.float32: 0.0, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}  # half an ulp of the output
TOKENS = (1, 2, 3, 7, 8, 9, 16, 31, 32)


def runnable_isas() -> list[str]:
    best = best_isa()
    return [isa for isa, code in ISAS.items() if best is not None and code <= ISAS[best]]


ALL_ISAS = pytest.mark.parametrize("isa", list(ISAS))


def skip_unless_runs(isa: str) -> None:
    if isa not in runnable_isas():
        pytest.skip(f"this CPU does not run the {isa} variant")


def assert_close(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """y [n, rows] against x [n, cols] @ w [rows, cols]ᵀ (w already in x's dtype), module docstring's bound."""
    xd, wd = x.double(), w.double()
    ref = xd @ wd.T
    n = x.shape[1]
    gamma = n * 2.0 ** -24 / (1 - n * 2.0 ** -24)
    bound = gamma * (xd.abs() @ wd.abs().T) + EPS[x.dtype] * ref.abs() + 1e-30
    err = (y.double() - ref).abs()
    worst = float((err / bound).max()) if err.numel() else 0.0
    assert worst <= 1.0, f"error {float(err.max()):.3g} exceeds the bound by {worst:.2f}x"


def book(size: int, p_zero: float = 0.9, max_len: int = 14) -> Codebook:
    return Codebook.from_sequences(build_dictionary(fixed_probs(p_zero), DictionarySpec(size, max_len)), max_len)


def special_codes(rows: int, cols: int, seed: int, p_zero: float) -> torch.Tensor:
    """Random ternary codes; rows 0 and 1 (when there are more than 2) all zero and all non-zero:
    the longest and the shortest runs of codewords."""
    codes = ternary(rows, cols, p_zero, seed)
    if rows > 2:
        codes[0], codes[1] = 1, torch.randint(0, 2, (cols,), generator=torch.Generator().manual_seed(seed)) * 2
    return codes


def ternary_case(rows: int, cols: int, seed: int, size: int = 4096, p_zero: float = 0.9):
    """(codes, lookup layout, lo [rows, 1], hi, W [rows, cols] fp32 from the codes themselves)."""
    codes, b = special_codes(rows, cols, seed, p_zero), book(size, p_zero)
    g = torch.Generator().manual_seed(seed + 1)
    lo, hi = -torch.rand(rows, 1, generator=g) - 0.1, torch.rand(rows, 1, generator=g) + 0.1
    w = torch.where(codes == 0, lo, torch.where(codes == 2, hi, torch.zeros(())))
    return codes, ternary_layout(*encode_matrix(codes, b), b.masks, cols), lo, hi, w


def coded_case(rows: int, cols: int, seed: int, size: int = 512):
    """(words, offsets, masks) of a random ternary matrix."""
    b = book(size)
    return *encode_matrix(ternary(rows, cols, 0.9, seed), b), b.masks


def unpacked(layout: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The ternary codes [rows, cols] uint8 a lookup layout holds, by its definition: byte k of row
    i's word in chunk c is the lo nibble | hi nibble << 4 of columns 16c + 4k .. 16c + 4k + 3."""
    blocks, chunks, _ = layout.shape
    bit = torch.arange(32, dtype=torch.int32)
    bits = (layout.unsqueeze(-1) >> bit) & 1  # [blocks, chunks, 16 rows, 32 bits]: bit 8k + 4h + j
    bits = bits.reshape(blocks, chunks, 16, 4, 2, 4).permute(0, 2, 1, 3, 4, 5)  # [b, rows, c, k, h, j]
    lo, hi = (bits[..., h, :].reshape(16 * blocks, 16 * chunks) for h in (0, 1))
    assert not bool((lo & hi).any()), "a weight is both lo and hi"
    assert not bool(lo[rows:].any() or hi[rows:].any() or lo[:, cols:].any() or hi[:, cols:].any()), "padding"
    return (1 - lo + hi)[:rows, :cols].to(torch.uint8)


@pytest.mark.parametrize("rows, cols, size, p_zero", [(97, 1025, 4096, 0.9), (64, 28, 4096, 0.9), (5, 1, 4096, 0.9),
                                                      (33, 30, 4096, 0.9), (40, 3001, 1 << 16, 0.9),
                                                      (23, 301, 2048, 0.3)])
def test_the_lookup_layout_holds_the_codes(rows: int, cols: int, size: int, p_zero: float) -> None:
    """Odd shapes (padding rows and columns, an odd width's padded pair), the full dictionary and
    a dense one (codewords of many non-zero weights, spilling across 64-bit words), built by every
    variant this CPU runs; and rows decoded from it are the matrix's weights."""
    codes, b = special_codes(rows, cols, rows + cols, p_zero), book(size, p_zero)
    words, offsets = encode_matrix(codes, b)
    for isa in runnable_isas():
        layout = ternary_layout(words, offsets, b.masks, cols, isa)
        assert layout.shape == (-(-rows // 16), -(-cols // 16), 16) and layout.dtype == torch.int32
        assert torch.equal(unpacked(layout, rows, cols), codes)
    lo, hi = -torch.rand(rows, 1) - 0.1, torch.rand(rows, 1) + 0.1
    w = torch.where(codes == 0, lo, torch.where(codes == 2, hi, torch.zeros(())))
    for begin, end in ((0, rows), (rows // 3, rows - 1), (rows, rows)):  # the decoded rows, exactly
        assert torch.equal(ternary_unpack(layout, lo, hi, cols, (begin, end)), w[begin:end])


@ALL_ISAS
@pytest.mark.parametrize("rows, cols, p_zero", [(97, 1025, 0.9), (64, 28, 0.9), (5, 1, 0.9), (33, 30, 0.9),
                                                (23, 301, 0.3)])
def test_ternary_equals_the_reference(isa: str, rows: int, cols: int, p_zero: float) -> None:
    skip_unless_runs(isa)
    _, layout, lo, hi, w = ternary_case(rows, cols, seed=rows + cols, p_zero=p_zero)
    for n in TOKENS:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            x = torch.randn(n, cols, generator=torch.Generator().manual_seed(n)).to(dtype)
            y = ternary_matmul(layout, lo, hi, x, isa)
            assert y.dtype == dtype and y.shape == (n, rows)
            # the grid is rounded to x's dtype (round_once_linear): W of lo/hi rounded
            assert_close(y, x, torch.where(w == 0, w, w.to(dtype).float()).to(dtype))


def test_grids_may_come_rounded() -> None:
    _, layout, lo, hi, _ = ternary_case(9, 70, seed=13, size=512)
    x = torch.randn(5, 70, generator=torch.Generator().manual_seed(14)).bfloat16()
    assert torch.equal(ternary_matmul(layout, *ternary_grids(lo, hi, x.dtype), x), ternary_matmul(layout, lo, hi, x))


@ALL_ISAS
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [None, 32, 40])  # 40: chunks straddle grids, the portable path
def test_bitpacked_equals_the_reference(isa: str, bits: int, group: int | None) -> None:
    skip_unless_runs(isa)
    rows, cols = 37, 1025
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (rows, cols), generator=g, dtype=torch.uint8)
    group_cols = group or cols
    groups = -(-cols // group_cols)
    scale = torch.rand(rows, groups, generator=g) * 0.1 + 1e-3
    zero = torch.randint(0, 1 << bits, (rows, groups), generator=g).float()
    col_group = torch.arange(cols) // group_cols
    w = scale[:, col_group] * (codes.float() - zero[:, col_group])
    packed = pack_bits(codes, bits)
    for n in (1, 3, 8, 9, 32):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            x = torch.randn(n, cols, generator=g).to(dtype)
            y = bitpacked_matmul(packed, scale, zero, x, bits, group_cols, isa)
            assert y.dtype == dtype and y.shape == (n, rows)
            assert_close(y, x, w.to(dtype))


def test_threads_do_not_change_the_output() -> None:
    words, offsets, masks = coded_case(97, 1025, seed=9, size=4096)
    _, layout, lo, hi, _ = ternary_case(97, 1025, seed=9)
    x = torch.randn(9, 1025, generator=torch.Generator().manual_seed(9))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, layout_one = ternary_matmul(layout, lo, hi, x), ternary_layout(words, offsets, masks, 1025)
        torch.set_num_threads(2)
        two, layout_two = ternary_matmul(layout, lo, hi, x), ternary_layout(words, offsets, masks, 1025)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)  # rows are independent: the split cannot change a sum
    assert torch.equal(layout_one, layout_two)


def test_malformed_matrices_raise_instead_of_reading_out_of_bounds() -> None:
    words, offsets, masks = coded_case(8, 100, seed=5)
    bad = words.clone()
    bad[3] = 600  # beyond the 512 codewords
    with pytest.raises(RuntimeError, match="beyond the dictionary"):
        ternary_layout(bad, offsets, masks, 100)
    with pytest.raises(RuntimeError, match="does not decode to its width"):
        ternary_layout(words, offsets, masks, 60)
    shifted = offsets.clone()
    shifted[2], shifted[3] = int(offsets[3]), int(offsets[2])  # row 2 runs backwards
    with pytest.raises(RuntimeError, match="codeword range"):
        ternary_layout(words, shifted, masks, 100)
    layout = ternary_layout(words, offsets, masks, 100)
    lo, hi = torch.rand(8, 1), torch.rand(8, 1)
    for isa in runnable_isas():
        with pytest.raises(RuntimeError, match=r"the layout of 8 rows of width 60 must be \[1, 4, 16\]"):
            ternary_matmul(layout, lo, hi, torch.randn(2, 60), isa)
        with pytest.raises(RuntimeError, match=r"the layout of 17 rows"):
            ternary_matmul(layout, torch.rand(17, 1), torch.rand(17, 1), torch.randn(2, 100), isa)
    with pytest.raises(RuntimeError, match=r"rows \[3, 9\) are not within the 8"):
        ternary_unpack(layout, lo, hi, 100, (3, 9))
    with pytest.raises(RuntimeError, match=r"the layout of 8 rows of width 60"):
        ternary_unpack(layout, lo, hi, 60, (0, 8))


def test_bad_variant_names_and_unsupported_variants_are_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    _, layout, lo, hi, _ = ternary_case(4, 20, seed=6, size=512)
    with pytest.raises(ValueError, match="QMOE_CPU_ISA / isa must be one of portable, avx2, avx512, got 'sse'"):
        ternary_matmul(layout, lo, hi, torch.randn(1, 20), "sse")
    monkeypatch.setenv("QMOE_CPU_ISA", "portable")
    forced = ternary_matmul(layout, lo, hi, torch.ones(1, 20))
    assert torch.equal(forced, ternary_matmul(layout, lo, hi, torch.ones(1, 20), "portable"))
    if best_isa() != "avx512":
        with pytest.raises(RuntimeError, match="not supported by this CPU"):
            ternary_matmul(layout, lo, hi, torch.randn(1, 20), "avx512")
