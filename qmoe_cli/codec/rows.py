"""Encode and decode whole matrices of ternary codes, row by row, with a `Codebook`.

One encoded matrix is `words` [total] int16 (each a uint16 codeword index; torch has few uint16
ops) plus `offsets` [rows + 1] int32: row r is words[offsets[r]:offsets[r + 1]]. Offsets are
implied by the codewords (`row_offsets`), so the packed format stores only the words. The C++ codec
does the work, parallel over rows on `torch.get_num_threads()` threads; without it the
pure-Python reference of `dictionary.py` does, slowly.
"""

from __future__ import annotations

import torch

from .dictionary import Codebook, decode_row, encode_row, pair_symbols
from .native import codec_extension


def encode_matrix(codes: torch.Tensor, book: Codebook) -> tuple[torch.Tensor, torch.Tensor]:
    """Ternary codes [rows, cols] uint8 -> (words [total] int16, offsets [rows + 1] int32)."""
    codes = codes.contiguous()
    ext = codec_extension()
    if ext is not None:
        words, offsets = ext.encode(codes, book.children, torch.get_num_threads())
        return words, offsets
    if codes.numel() and int(codes.max()) > 2:
        raise ValueError(f"ternary codes are 0, 1, 2; got {int(codes.max())}")
    index = {seq: k for k, seq in enumerate(book.sequences)}
    rows = [encode_row(symbols.tolist(), index, book.max_len) for symbols in pair_symbols(codes)]
    offsets = torch.tensor([0] + [len(r) for r in rows], dtype=torch.int64).cumsum(0).to(torch.int32)
    flat = [w for r in rows for w in r]
    return torch.tensor(flat, dtype=torch.int32).to(torch.int16), offsets


def row_offsets(words: torch.Tensor, book: Codebook, rows: int, width: int) -> torch.Tensor:
    """The row offsets [rows + 1] int32 of an encoded matrix, rebuilt from its codewords alone.

    Every row decodes to exactly `width` codes (width + 1 for an odd width: the padded last
    pair), so row r ends where the running sum of codeword lengths reaches (r + 1) x that span:
    offsets need not be stored (0 bits instead of 32 a row). One vectorized cumsum and search,
    no decoding; it is also the loader's bounds check: ValueError unless every row ends exactly
    on a codeword boundary and the codewords hold exactly the rows (no word before the first
    row or after the last). `words` [total] int16 must already be inside the dictionary.
    """
    span, total = width + width % 2, words.numel()
    if total >= 1 << 31:
        raise ValueError(f"{total} codewords do not fit int32 offsets")
    ends = book.weights[words.long() & 0xFFFF].cumsum(0)  # [total] int64: codes through word k
    decoded = int(ends[-1]) if total else 0
    if decoded != rows * span:
        raise ValueError(f"the {total} codewords decode to {decoded} codes, not {rows} rows of {span}")
    targets = torch.arange(1, rows + 1, dtype=torch.int64) * span
    last = torch.searchsorted(ends, targets)  # [rows]: the word where each row's span is reached
    bad = torch.nonzero(ends[last] != targets)
    if bad.numel():
        r = int(bad[0])
        raise ValueError(f"row {r}'s codewords decode past its width {width} (a codeword crosses into row {r + 1})")
    return torch.cat([torch.zeros(1, dtype=torch.int64), last + 1]).to(torch.int32)


def row_widths(words: torch.Tensor, offsets: torch.Tensor, book: Codebook) -> torch.Tensor:
    """Codes each row decodes to, [rows] int64, in a few vectorized passes (no decoding).

    The bounds check of matrices given with offsets: a row may be used only if this equals its
    width (or width + 1, the padding of an odd width). Assumes offsets are monotone within
    [0, words.numel()] and every word is a valid codeword; check those first.
    """
    ends = torch.cat([torch.zeros(1, dtype=torch.int64), book.weights[words.long() & 0xFFFF].cumsum(0)])
    return ends[offsets[1:].long()] - ends[offsets[:-1].long()]


def decode_matrix(words: torch.Tensor, offsets: torch.Tensor, book: Codebook, width: int,
                  rows: tuple[int, int] | None = None) -> torch.Tensor:
    """Rows [begin, end) (default all) of an encoded matrix -> ternary codes [end - begin, width] uint8."""
    begin, end = rows or (0, offsets.numel() - 1)
    ext = codec_extension()
    if ext is not None:
        return ext.decode(words, offsets, book.table, book.lengths, width, begin, end, torch.get_num_threads())
    sequences, bounds = book.sequences, offsets.tolist()
    out = [decode_row((words[bounds[r]:bounds[r + 1]].long() & 0xFFFF).tolist(), sequences, width)
           for r in range(begin, end)]
    return torch.tensor(out, dtype=torch.uint8).reshape(end - begin, width)


def decode_dense(words: torch.Tensor, offsets: torch.Tensor, book: Codebook, lo: torch.Tensor, hi: torch.Tensor,
                 group_cols: int, width: int, rows: tuple[int, int]) -> torch.Tensor:
    """Rows [begin, end) as weights [end - begin, width] fp32: code 0 -> lo, 1 -> 0, 2 -> hi,
    with lo/hi [rows, groups] fp32 and column c in grid c // group_cols."""
    begin, end = rows
    ext = codec_extension()
    if ext is not None:
        return ext.decode_dense(words, offsets, book.table, book.lengths, lo, hi, width, group_cols, begin, end,
                                torch.get_num_threads())
    codes = decode_matrix(words, offsets, book, width, rows).long()
    group = torch.arange(width) // group_cols
    lo_cols, hi_cols = lo[begin:end][:, group], hi[begin:end][:, group]
    return torch.where(codes == 0, lo_cols, torch.where(codes == 2, hi_cols, torch.zeros(())))
