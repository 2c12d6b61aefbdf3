"""The C++ codec against the pure-Python reference: same codewords, lossless, bounds-checked."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_codec_reference import fixed_probs, ternary

from qmoe_cli.codec.bitpack import pack_bits, row_bytes, unpack_bits
from qmoe_cli.codec.dictionary import Codebook, DictionarySpec, build_dictionary, encode_row, pair_symbols
from qmoe_cli.codec.native import codec_extension
from qmoe_cli.codec.rows import decode_dense, decode_matrix, encode_matrix, row_offsets, row_widths

WIDTHS = [1, 2, 27, 28, 29, 768, 3072, 2080]

pytestmark = pytest.mark.skipif(codec_extension() is None, reason="the C++ codec could not be built here")


@pytest.fixture(scope="module")
def book() -> Codebook:
    return Codebook.from_sequences(build_dictionary(fixed_probs(0.885)), 14)


@pytest.fixture(scope="module")
def index(book: Codebook) -> dict:
    return {seq: k for k, seq in enumerate(book.sequences)}


def _reference_words(codes: torch.Tensor, index: dict, max_len: int) -> list[list[int]]:
    return [encode_row(symbols.tolist(), index, max_len) for symbols in pair_symbols(codes)]


@settings(max_examples=40, deadline=None)
@given(width=st.sampled_from(WIDTHS), rows=st.integers(1, 5), p_zero=st.floats(0.5, 0.99),
       special=st.sampled_from(["none", "zeros", "nonzeros"]), seed=st.integers(0, 2**31 - 1))
def test_round_trip_equals_reference(book: Codebook, index: dict, width: int, rows: int, p_zero: float,
                                     special: str, seed: int) -> None:
    codes = ternary(rows, width, p_zero, seed)
    if special == "zeros":
        codes[0] = 1
    elif special == "nonzeros":  # every weight non-zero: the longest encoding
        codes[-1] = torch.randint(0, 2, (width,), generator=torch.Generator().manual_seed(seed)) * 2
    words, offsets = encode_matrix(codes, book)
    reference = _reference_words(codes, index, book.max_len)
    assert (words.long() & 0xFFFF).tolist() == [w for row in reference for w in row]
    assert offsets.diff().tolist() == [len(row) for row in reference]
    assert torch.equal(decode_matrix(words, offsets, book, width), codes)
    assert row_widths(words, offsets, book).tolist() == [width + width % 2] * rows
    assert torch.equal(row_offsets(words, book, rows, width), offsets)  # what the packed format stores: none


def _offsets_reference(words: torch.Tensor, book: Codebook, rows: int, width: int) -> list[int] | None:
    """Walk the codewords one by one; None where a row does not end on a codeword boundary."""
    offsets, filled = [0], 0
    for k, word in enumerate((words.long() & 0xFFFF).tolist()):
        filled += 2 * int(book.lengths[word])
        if filled > width + width % 2:
            return None
        if filled == width + width % 2:
            offsets.append(k + 1)
            filled = 0
    return offsets if len(offsets) == rows + 1 and filled == 0 else None


@pytest.mark.parametrize("width", [1, 29, 768])
def test_row_offsets_are_rebuilt_or_refused_like_a_walk_over_the_codewords(book: Codebook, width: int) -> None:
    rows = 6
    words, offsets = encode_matrix(ternary(rows, width, 0.85, seed=width), book)
    g = torch.Generator().manual_seed(width)
    cases = [words, words[:-1], torch.cat([words, words[:1]]), words[1:]]
    for _ in range(20):  # random codewords swapped in: most break a row boundary, some keep it
        bad = words.clone()
        word = int(torch.randint(0, book.size, (1,), generator=g))
        bad[torch.randint(0, words.numel(), (1,), generator=g)] = word - (1 << 16) * (word >= 1 << 15)
        cases.append(bad)
    for case in cases:
        expected = _offsets_reference(case, book, rows, width)
        if expected is None:
            with pytest.raises(ValueError):
                row_offsets(case, book, rows, width)
        else:
            assert row_offsets(case, book, rows, width).tolist() == expected
    assert row_offsets(words, book, rows, width).dtype == torch.int32


@pytest.mark.parametrize("group_cols", [None, 7])
def test_decode_dense_maps_codes_to_the_row_grids(book: Codebook, group_cols: int | None) -> None:
    codes = ternary(9, 29, 0.7, seed=5)
    words, offsets = encode_matrix(codes, book)
    cols = group_cols or 29
    groups = -(-29 // cols)
    lo, hi = -torch.rand(9, groups), torch.rand(9, groups)
    got = decode_dense(words, offsets, book, lo, hi, cols, 29, (2, 8))
    column_group = torch.arange(29) // cols
    expected = torch.where(codes == 0, lo[:, column_group], torch.where(codes == 2, hi[:, column_group], 0.0))
    assert torch.equal(got, expected[2:8])


def test_small_dictionaries_and_short_codewords_round_trip() -> None:
    small = Codebook.from_sequences(build_dictionary(fixed_probs(0.9), DictionarySpec(size=40, max_len=3)), 3)
    codes = ternary(4, 101, 0.9, seed=1)
    words, offsets = encode_matrix(codes, small)
    ref = _reference_words(codes, {s: k for k, s in enumerate(small.sequences)}, 3)
    assert (words.long() & 0xFFFF).tolist() == [w for row in ref for w in row]
    assert torch.equal(decode_matrix(words, offsets, small, 101), codes)


def test_threads_do_not_change_the_output(book: Codebook) -> None:
    codes = ternary(37, 300, 0.85, seed=9)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = encode_matrix(codes, book)
        torch.set_num_threads(2)
        two = encode_matrix(codes, book)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


def test_bad_inputs_raise_instead_of_touching_memory(book: Codebook) -> None:
    codes = ternary(3, 40, 0.8, seed=4)
    with pytest.raises(RuntimeError, match="ternary codes are 0, 1, 2"):
        encode_matrix(torch.full((2, 5), 3, dtype=torch.uint8), book)
    words, offsets = encode_matrix(codes, book)
    ext = codec_extension()
    bad = offsets.clone()
    bad[1] = words.numel() + 5
    with pytest.raises(RuntimeError, match="outside"):
        ext.decode(words, bad, book.table, book.lengths, 40, 0, 3, 1)
    with pytest.raises(RuntimeError, match="decodes"):
        ext.decode(words, offsets, book.table, book.lengths, 12, 0, 3, 1)  # rows longer than 12
    with pytest.raises(RuntimeError, match="decodes to"):
        ext.decode(words, offsets, book.table, book.lengths, 400, 0, 3, 1)  # rows shorter than 400
    with pytest.raises(RuntimeError, match="outside the matrix"):
        ext.decode(words, offsets, book.table, book.lengths, 40, 0, 4, 1)
    small = Codebook(book.symbols[:100].contiguous(), book.lengths[:100].contiguous())
    big_word = torch.tensor([-1], dtype=torch.int16)  # codeword 65535 as stored bits
    with pytest.raises(RuntimeError, match="beyond the dictionary"):
        ext.decode(big_word, torch.tensor([0, 1], dtype=torch.int32), small.table, small.lengths, 28, 0, 1, 1)
    with pytest.raises(RuntimeError, match="must be"):
        ext.decode(words.int(), offsets, book.table, book.lengths, 40, 0, 3, 1)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("cols", [1, 3, 29, 768])
def test_bitpack_round_trip(bits: int, cols: int) -> None:
    codes = torch.randint(0, 1 << bits, (5, cols), dtype=torch.uint8, generator=torch.Generator().manual_seed(cols))
    packed = pack_bits(codes, bits)
    assert packed.shape == (5, row_bytes(cols, bits)) == (5, (cols * bits + 7) // 8)
    assert torch.equal(unpack_bits(packed, bits, cols), codes)
    assert torch.equal(unpack_bits(packed[2:4], bits, cols), codes[2:4])  # rows unpack alone
