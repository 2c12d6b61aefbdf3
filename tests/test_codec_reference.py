"""The reference dictionary code: best-first selection, prefix-closed, lossless, and its rate.

Rates are measured with the C++ codec (checked against the reference in test_codec_native.py),
so the samples can be large enough that differences of 0.2% are not noise.
"""

from __future__ import annotations

import functools
import itertools
import math

import pytest
import torch

from qmoe_cli.codec.dictionary import (
    Codebook,
    DictionarySpec,
    build_dictionary,
    decode_row,
    encode_row,
    fit_dictionary,
    pair_symbols,
    parse_statistics,
    symbol_frequencies,
)
from qmoe_cli.codec.rows import encode_matrix


def ternary(rows: int, cols: int, p_zero: float, seed: int, p_lo: float | None = None) -> torch.Tensor:
    """I.i.d. ternary codes [rows, cols] uint8: 1 (zero) with p_zero, else 0 (with p_lo,
    default half the rest) or 2."""
    p_lo = (1 - p_zero) / 2 if p_lo is None else p_lo
    u = torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed))
    return torch.where(u < p_zero, 1, torch.where(u < p_zero + p_lo, 0, 2)).to(torch.uint8)


def fixed_probs(p_zero: float) -> list[float]:
    q = [(1 - p_zero) / 2, p_zero, (1 - p_zero) / 2]
    return [q[a] * q[b] for a in range(3) for b in range(3)]


@pytest.fixture(scope="module")
def code_0885():
    dictionary = build_dictionary(fixed_probs(0.885))
    return dictionary, {seq: i for i, seq in enumerate(dictionary)}


def _bits_per_weight(codes: torch.Tensor, book: Codebook) -> float:
    words, _ = encode_matrix(codes, book)
    return 16 * words.numel() / codes.numel()


def test_dictionary_is_full_prefix_closed_and_holds_every_symbol(code_0885) -> None:
    dictionary, index = code_0885
    assert len(dictionary) == 1 << 16 and len(index) == len(dictionary)
    assert all((s,) in index for s in range(9))
    assert all(seq[:-1] in index for seq in dictionary if len(seq) > 1)
    assert max(len(seq) for seq in dictionary) == 14


@pytest.mark.parametrize("first", [None, [0.3, 0.02, 0.1, 0.05, 0.2, 0.05, 0.1, 0.08, 0.1]])
def test_best_first_search_equals_sorting_every_sequence(first) -> None:
    probs = [0.02, 0.1, 0.03, 0.1, 0.5, 0.1, 0.05, 0.07, 0.03]
    spec = DictionarySpec(size=300, max_len=4)
    lp, lf = [math.log(p) for p in probs], [math.log(p) for p in (first or probs)]
    every = [seq for n in range(1, 5) for seq in itertools.product(range(9), repeat=n)]
    # -log weight accumulated in sequence order, as the search does: equal weights whose float
    # sums differ in the last bit are ordered by the floats, the same on every machine
    ranked = sorted(every, key=lambda seq: (functools.reduce(lambda k, s: k - lp[s], seq[1:], -lf[seq[0]]),
                                            len(seq), seq))
    assert build_dictionary(probs, spec, first) == ranked[:300]


@pytest.mark.parametrize("width", [1, 2, 27, 28, 29, 768, 2080])
@pytest.mark.parametrize("p_zero", [0.5, 0.885, 0.99])
def test_round_trip_is_lossless(code_0885, width: int, p_zero: float) -> None:
    dictionary, index = code_0885
    codes = ternary(6, width, p_zero, seed=width)
    codes[0] = 1  # an all-zero row
    codes[1] = torch.arange(width) % 2 * 2  # an all-nonzero row: the worst case
    for row, symbols in zip(codes, pair_symbols(codes)):
        words = encode_row(symbols.tolist(), index, 14)
        assert decode_row(words, dictionary, width) == row.tolist()


def test_rate_at_the_paper_distribution() -> None:
    codes = ternary(256, 3072, 0.885, seed=1)  # entropy 0.630
    fixed = Codebook.from_sequences(build_dictionary(fixed_probs(0.885)), 14)
    fitted = Codebook.from_sequences(fit_dictionary(symbol_frequencies(pair_symbols(codes)).tolist()), 14)
    assert _bits_per_weight(codes, fixed) <= 0.74
    assert _bits_per_weight(codes, fitted) <= 0.72  # the parse-aware fit gains ~2.7%


def test_parse_statistics_predict_the_measured_rate() -> None:
    codes = ternary(256, 3072, 0.885, seed=3)
    book = Codebook.from_sequences(build_dictionary(fixed_probs(0.885)), 14)
    _, pairs_per_word = parse_statistics(book, fixed_probs(0.885))
    assert _bits_per_weight(codes, book) == pytest.approx(8 / pairs_per_word, rel=0.01)


@pytest.mark.parametrize("p_zero,p_lo", [(0.80, None), (0.95, None), (0.885, 0.08)])
def test_fitted_dictionary_beats_the_fixed_one(p_zero: float, p_lo: float | None) -> None:
    fixed = Codebook.from_sequences(build_dictionary(fixed_probs(0.885)), 14)
    codes = ternary(256, 3072, p_zero, seed=2, p_lo=p_lo)
    fitted = Codebook.from_sequences(fit_dictionary(symbol_frequencies(pair_symbols(codes)).tolist()), 14)
    assert _bits_per_weight(codes, fitted) < _bits_per_weight(codes, fixed)


def test_codebook_rejects_what_cannot_encode_or_decode() -> None:
    book = Codebook.from_sequences(build_dictionary(fixed_probs(0.885), DictionarySpec(size=50, max_len=3)), 3)
    with pytest.raises(ValueError, match="lengths"):
        Codebook(book.symbols, torch.zeros_like(book.lengths))
    with pytest.raises(ValueError, match="symbols"):
        Codebook(book.symbols + 9, book.lengths)
    with pytest.raises(ValueError, match="prefix-closed"):
        Codebook.from_sequences([(s,) for s in range(9)] + [(4, 4, 4)], 3).children
    with pytest.raises(ValueError, match="single symbol"):
        Codebook.from_sequences([(s,) for s in range(8)] + [(0, 0)], 3).children


def test_spec_validation() -> None:
    with pytest.raises(ValueError, match="size"):
        DictionarySpec(size=8)
    with pytest.raises(ValueError, match="max_len"):
        DictionarySpec(max_len=0)
