"""Benchmark the C++ dictionary codec and the CPU decode-matmul.

For each shape (rows x cols of one expert matrix) with i.i.d. ternary codes at --p-zero:
encode and decode throughput in weights/s on one thread and on all of torch's threads, and the
time of the CPU decode-matmul (`PackedLinear`) at 1 and 16 tokens against a dense fp32
`F.linear` of the same matrix, run in the same process. Prints a markdown table of medians on stdout.

    python scripts/bench_codec.py
    python scripts/bench_codec.py --shapes 768x3072 --p-zero 0.75 --repeats 9 --out codec.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from benchlib import emit_table, median_ms, parse_shapes

from qmoe_cli.codec.dictionary import Codebook, fit_dictionary, pair_symbols, symbol_frequencies
from qmoe_cli.codec.native import codec_extension
from qmoe_cli.codec.rows import decode_matrix, encode_matrix
from qmoe_cli.execute.linear import PackedLinear
from qmoe_cli.formats.packed import DictionaryMatrix
from qmoe_cli.quant.grids import QuantSpec

DEFAULT_SHAPES = "768x3072,3072x768,2080x6144,6144x2080"
TOKENS = (1, 16)  # PackedLinear: the lookup layout's product (built on the warm-up call)
CPU = torch.device("cpu")


def random_ternary(rows: int, cols: int, p_zero: float, seed: int = 0) -> torch.Tensor:
    """I.i.d. codes [rows, cols] uint8: 1 (zero) with p_zero, else 0 or 2 with equal odds."""
    u = torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed))
    return torch.where(u < p_zero, 1, torch.where(u < (1 + p_zero) / 2, 0, 2)).to(torch.uint8)


def with_threads(threads: int, fn):
    def run():
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return fn()
        finally:
            torch.set_num_threads(before)
    return run


def bench_shape(rows: int, cols: int, book: Codebook, codes: torch.Tensor, repeats: int,
                threads: int) -> dict[str, float]:
    n = codes.numel()
    words, offsets = encode_matrix(codes, book)
    out = {"bits": 16 * words.numel() / n}
    for label, t in (("1", 1), ("all", threads)):
        out[f"enc_{label}"] = n / median_ms(with_threads(t, lambda: encode_matrix(codes, book)), CPU, repeats) / 1e3
        out[f"dec_{label}"] = n / median_ms(with_threads(t, lambda: decode_matrix(words, offsets, book, cols)),
                                            CPU, repeats) / 1e3
    g = torch.Generator().manual_seed(1)
    lo, hi = -torch.rand(rows, 1, generator=g), torch.rand(rows, 1, generator=g)
    matrix = DictionaryMatrix({"words": words, "offsets": offsets, "lo": lo, "hi": hi}, book, rows, cols,
                              QuantSpec("ternary"), "bench")
    packed = PackedLinear(matrix)
    dense = matrix.dense(0, rows)
    for tokens in TOKENS:
        xs = [torch.randn(tokens, cols, generator=g) for _ in range(8)]  # rotated so no input stays cached
        step = iter(range(1 << 30))
        out[f"dense_{tokens}"] = median_ms(lambda: F.linear(xs[next(step) % 8], dense), CPU, repeats)
        out[f"packed_{tokens}"] = median_ms(lambda: packed(xs[next(step) % 8]), CPU, repeats)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated ROWSxCOLS")
    parser.add_argument("--p-zero", type=float, default=0.9, help="share of zero weights (0.9: QMoE's models)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement; median reported")
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this .md file")
    args = parser.parse_args(argv)
    if not 0 < args.p_zero < 1 or args.repeats < 1:
        raise SystemExit("error: --p-zero must be in (0, 1) and --repeats >= 1")
    if codec_extension() is None:
        raise SystemExit("error: the C++ codec could not be built; there is nothing fast to measure")
    threads = torch.get_num_threads()
    sample = random_ternary(256, 3072, args.p_zero, seed=99)
    book = Codebook.from_sequences(fit_dictionary(symbol_frequencies(pair_symbols(sample)).tolist()), 14)
    lines = [
        f"dictionary codec, P(zero) {args.p_zero}, fitted 65536 x 14-pair dictionary; median of {args.repeats}; "
        f"torch {torch.__version__}; cpu, all = {threads} threads",
        "",
        "| shape | bits/weight | encode Mw/s 1 thr | encode Mw/s all | decode Mw/s 1 thr | decode Mw/s all "
        + "".join(f"| dense fp32 ms {t} tok | packed ms {t} tok " for t in TOKENS) + "|",
        "|---" * (6 + 2 * len(TOKENS)) + "|",
    ]
    for rows, cols in parse_shapes(args.shapes):
        print(f"bench {rows}x{cols} ...", file=sys.stderr, flush=True)
        r = bench_shape(rows, cols, book, random_ternary(rows, cols, args.p_zero), args.repeats, threads)
        lines.append(f"| {rows}x{cols} | {r['bits']:.3f} | {r['enc_1']:.0f} | {r['enc_all']:.0f} | {r['dec_1']:.0f} "
                     f"| {r['dec_all']:.0f} "
                     + "".join(f"| {r[f'dense_{t}']:.3f} | {r[f'packed_{t}']:.3f} " for t in TOKENS) + "|")
    emit_table(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
