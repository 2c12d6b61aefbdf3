"""The variable-to-fixed (Tunstall-style) dictionary of QMoE, fitted to the model being packed.

Ternary codes (0: lo, 1: zero, 2: hi) are read in pairs, giving 9 symbols (3a + b). The
dictionary holds the `size` most probable symbol sequences of length 1..`max_len` under an
i.i.d. model of the measured symbol frequencies. Taking the most probable sequences makes the
set prefix-closed (a prefix is at least as probable as any extension; ties put the shorter
first), and every single symbol is in it, so greedy longest-match parsing always succeeds and
each codeword is one fixed-width index. This is the pure-Python reference of the algorithm.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Sequence

import torch

NUM_SYMBOLS = 9  # pairs of ternary codes
ZERO_SYMBOL = 4  # the pair (zero, zero): 3 * 1 + 1
# Symbols never seen still get a little probability: every single symbol must be in the
# dictionary and the ordering must be defined.
_FLOOR = 1e-9


@dataclass(frozen=True)
class DictionarySpec:
    size: int = 1 << 16  # codewords: 16-bit indices
    max_len: int = 14  # symbols (pairs) per codeword: 28 weights, as the QMoE kernel expects

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or not NUM_SYMBOLS <= self.size <= 1 << 16:
            raise ValueError(f"DictionarySpec.size must be in [{NUM_SYMBOLS}, 65536], got {self.size!r}")
        if not isinstance(self.max_len, int) or self.max_len < 1:
            raise ValueError(f"DictionarySpec.max_len must be an integer >= 1, got {self.max_len!r}")


def pair_symbols(codes: torch.Tensor) -> torch.Tensor:
    """Ternary codes [rows, cols] uint8 -> symbols [rows, ceil(cols/2)] int64; an odd width
    pads its last pair with the zero code."""
    rows, cols = codes.shape
    if cols % 2:
        codes = torch.cat([codes, torch.ones(rows, 1, dtype=codes.dtype)], dim=1)
    pairs = codes.long().view(rows, -1, 2)
    return pairs[..., 0] * 3 + pairs[..., 1]


def symbol_frequencies(symbols: torch.Tensor) -> torch.Tensor:
    """Empirical distribution [9] fp64 of the symbols of any tensor."""
    counts = torch.bincount(symbols.flatten(), minlength=NUM_SYMBOLS).double()
    return counts / counts.sum().clamp(min=1)


def build_dictionary(probs: Sequence[float], spec: DictionarySpec = DictionarySpec()) -> list[tuple[int, ...]]:
    """The `spec.size` most probable sequences, in the order they were chosen (index = codeword).

    Best-first search over the 9-ary tree of sequences with a heap keyed by (-log p, length,
    sequence): deterministic, and a prefix always precedes its extensions.
    """
    logp = [math.log(max(float(p), _FLOOR)) for p in probs]
    if len(logp) != NUM_SYMBOLS:
        raise ValueError(f"build_dictionary needs {NUM_SYMBOLS} symbol probabilities, got {len(logp)}")
    heap = [(-logp[s], 1, (s,)) for s in range(NUM_SYMBOLS)]
    heapq.heapify(heap)
    chosen: list[tuple[int, ...]] = []
    while len(chosen) < spec.size and heap:
        neg, length, seq = heapq.heappop(heap)
        chosen.append(seq)
        if length < spec.max_len:
            for s in range(NUM_SYMBOLS):
                heapq.heappush(heap, (neg - logp[s], length + 1, seq + (s,)))
    return chosen


def encode_row(symbols: Sequence[int], index: dict[tuple[int, ...], int], max_len: int) -> list[int]:
    """Greedy longest match of one row's symbols -> codewords (reference, slow)."""
    out, i, n = [], 0, len(symbols)
    while i < n:
        length = 1
        while length < max_len and i + length < n and tuple(symbols[i:i + length + 1]) in index:
            length += 1
        out.append(index[tuple(symbols[i:i + length])])
        i += length
    return out


def decode_row(codewords: Sequence[int], dictionary: Sequence[tuple[int, ...]], width: int) -> list[int]:
    """Codewords of one row -> its `width` ternary codes (reference)."""
    codes: list[int] = []
    for word in codewords:
        for symbol in dictionary[word]:
            codes.extend((symbol // 3, symbol % 3))
    if len(codes) not in (width, width + 1):
        raise ValueError(f"decoded {len(codes)} codes for a row of width {width}")
    return codes[:width]
