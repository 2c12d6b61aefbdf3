"""Benchmark one compressed expert matrix on the GPU against torch's bf16 matmul on its dense weights.

For each shape (rows x cols, out x in) and format, random weights are compressed: ternary
(P(zero) --p-zero, dictionary-coded with a dictionary fitted to it) or b-bit (bit-packed, one
grid per row); then y = x @ W.T is timed at each token count for the compressed path
(`qmoe_cli.kernels.decode_matmul` for ternary, the b-bit tile kernel otherwise: fused tiles up to
DENSE_TOKENS_THRESHOLD tokens, decode + tensor cores beyond) and `torch.matmul` (dense bf16 W),
with CUDA events, after warm-up, median over --repeats. Each side cycles through copies of its
weights (clones of --copies distinct ones) until together they exceed L2 (50 MB on H100), so
neither side gets its weights from cache; x, re-read by every row, may stay cached as in a model.
The last column says, per shape and format, the largest token count still faster than bf16
(the fused path's crossover, what DENSE_TOKENS_THRESHOLD should be set from). Prints a markdown
table on stdout (and to --out); progress on stderr.

    python scripts/bench_kernel.py
    python scripts/bench_kernel.py --shapes 2080x6144 --tokens 1,32 --formats ternary,4 --out kernel.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import emit_table, parse_shapes  # noqa: E402

from qmoe_cli.codec.bitpack import pack_bits  # noqa: E402
from qmoe_cli.codec.dictionary import Codebook, DictionarySpec, fit_dictionary  # noqa: E402
from qmoe_cli.codec.rows import encode_matrix  # noqa: E402
from qmoe_cli.kernels import (  # noqa: E402
                              DENSE_TOKENS_THRESHOLD,
                              bitpacked_dense,
                              bitpacked_tiles,
                              codebook_masks,
                              decode_matmul,
                              device_bitpacked,
                              kernel_library,
                              round_once_linear,
)

DEFAULT_SHAPES = "768x3072,3072x768,1024x4096,4096x1024,2080x6144,6144x2080"
L2_BYTES = 64 << 20  # a little above the largest L2 we target (H100: 50 MB)
Matmul = Callable[[int, torch.Tensor], torch.Tensor]  # (copy, x [n, cols] bf16) -> [n, rows]


def ternary(rows: int, cols: int, p_zero: float, gen: torch.Generator) -> torch.Tensor:
    """I.i.d. ternary codes [rows, cols] uint8 (1 = zero with p_zero, else 0 or 2 equally)."""
    u = torch.rand(rows, cols, generator=gen)
    return torch.where(u < p_zero, 1, torch.where(u < (1 + p_zero) / 2, 0, 2)).to(torch.uint8)


def symbol_probs(p_zero: float) -> list[float]:
    q = [(1 - p_zero) / 2, p_zero, (1 - p_zero) / 2]
    return [q[a] * q[b] for a in range(3) for b in range(3)]


def event_ms(fn: Callable[[int], object], copies: int, warmup: int, repeats: int) -> float:
    """Median ms of fn(i) (i cycling over copies), each call timed alone with CUDA events."""
    for i in range(warmup):
        fn(i % copies)
    times = []
    for i in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(i % copies)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


Pool = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # words, offsets, codes of encoded random rows


def encode_pool(cols: int, p_zero: float, book: Codebook, gen: torch.Generator, pool: int = 512) -> Pool:
    """`pool` random ternary rows of width `cols`, dictionary-coded: (words, offsets, codes)."""
    codes = ternary(pool, cols, p_zero, gen)
    words, offsets = encode_matrix(codes, book)
    return words, offsets, codes


def pooled_ternary(rows: int, pool: Pool, gen: torch.Generator) -> Pool:
    """A random dictionary-coded ternary matrix made of rows drawn from a pool of encoded random
    rows: (words [total] int16, offsets [rows + 1] int32, codes [rows, cols] uint8). Encoding on
    the CPU runs at about a million weights a second per core, too slow for the gigabytes of
    weights the benchmarks need; rows drawn from a pool keep the codeword statistics and give
    every matrix its own memory."""
    pool_words, pool_offsets, pool_codes = pool
    pick = torch.randint(0, pool_codes.shape[0], (rows,), generator=gen)
    lengths = pool_offsets.diff().long()[pick]
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    within = torch.arange(int(offsets[-1])) - torch.repeat_interleave(offsets[:-1], lengths)
    words = pool_words[torch.repeat_interleave(pool_offsets[:-1].long()[pick], lengths) + within]
    return words, offsets.to(torch.int32), pool_codes[pick]


def ternary_side(rows: int, cols: int, p_zero: float, book: Codebook, copies: int,
                 gen: torch.Generator) -> tuple[Matmul, int, list[torch.Tensor]]:
    """(matmul over compressed copies, bytes one call reads, the dense bf16 weights of each copy)."""
    masks = codebook_masks(book).cuda()
    pool = encode_pool(cols, p_zero, book, gen)
    packed, dense = [], []
    for _ in range(copies):
        words, offsets, codes = pooled_ternary(rows, pool, gen)
        lo, hi = -torch.rand(rows, 1, generator=gen), torch.rand(rows, 1, generator=gen)
        packed.append([t.cuda() for t in (words, offsets, lo, hi)])
        dense.append(torch.where(codes == 0, lo, torch.where(codes == 2, hi, torch.zeros(()))).to(torch.bfloat16))
    # What one call reads: codewords, row offsets, row grids (the mask table is shared by every
    # matrix of a model and stays in L2).
    read = packed[0][0].numel() * 2 + packed[0][1].numel() * 4 + rows * 8
    packed = [[t.clone() for t in packed[i % copies]] for i in range(max(copies, -(-L2_BYTES // read)))]
    return (lambda i, x: decode_matmul(packed[i][0], packed[i][1], masks, packed[i][2], packed[i][3], x)), read, dense


def bitpacked_side(rows: int, cols: int, bits: int, copies: int,
                   gen: torch.Generator) -> tuple[Matmul, int, list[torch.Tensor]]:
    packed, dense = [], []
    for _ in range(copies):
        codes = torch.randint(0, 1 << bits, (rows, cols), generator=gen, dtype=torch.uint8)
        scale = torch.rand(rows, 1, generator=gen) * 0.01 + 1e-3
        zero = torch.full((rows, 1), float((1 << bits) // 2))
        words = device_bitpacked(pack_bits(codes, bits), bits, cols)[None]
        packed.append([t.cuda() for t in (words, scale[None], zero[None])])
        dense.append((scale * (codes.float() - zero)).to(torch.bfloat16))
    read = packed[0][0].numel() * 4 + rows * 8
    packed = [[t.clone() for t in packed[i % copies]] for i in range(max(copies, -(-L2_BYTES // read)))]

    def matmul(i: int, x: torch.Tensor) -> torch.Tensor:
        words, scale, zero = packed[i]
        if x.shape[0] > DENSE_TOKENS_THRESHOLD:
            return round_once_linear(x, bitpacked_dense(words, scale, zero, bits, cols, cols, 0, x.dtype))
        xt = x.reshape(-1, 1) if x.shape[0] == 1 else x.T.contiguous()
        return bitpacked_tiles(words, scale, zero, bits, cols, xt, None, None, relu=False, out_transposed=False)

    return matmul, read, dense


def bench(rows: int, cols: int, fmt: str, side: tuple[Matmul, int, list[torch.Tensor]], tokens: list[int],
          args: argparse.Namespace, gen: torch.Generator) -> list[str]:
    ours_fn, read, dense = side
    dense_bytes = rows * cols * 2
    dense = [dense[i % len(dense)].cuda() for i in range(max(len(dense), -(-L2_BYTES // dense_bytes)))]
    rows_out, faster_up_to = [], 0
    for n in tokens:
        xs = [torch.randn(n, cols, generator=gen).to(torch.bfloat16).cuda() for _ in range(args.copies)]
        ours = event_ms(lambda i: ours_fn(i, xs[i % len(xs)]), max(args.copies, -(-L2_BYTES // read)), args.warmup,
                       args.repeats)
        theirs = event_ms(lambda i: xs[i % len(xs)] @ dense[i].T, len(dense), args.warmup, args.repeats)
        if theirs >= ours:
            faster_up_to = n
        path = "fused" if n <= DENSE_TOKENS_THRESHOLD else "dense"
        rows_out.append(f"| {rows}x{cols} | {fmt} | {n} | {path} | {8 * read / (rows * cols):.3f} "
                        f"| {read / 1e6:.3f} | {ours * 1e3:.1f} | {read / ours / 1e6:.0f} | {theirs * 1e3:.1f} "
                        f"| {dense_bytes / theirs / 1e6:.0f} | {theirs / ours:.2f} |")
        print(rows_out[-1], file=sys.stderr)
    return [line + f" {faster_up_to} |" for line in rows_out]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="ROWSxCOLS,... (default: Switch's expert shapes)")
    parser.add_argument("--formats", default="ternary", help="ternary and/or bit widths, e.g. ternary,4,2")
    parser.add_argument("--p-zero", type=float, default=0.9, help="P(zero) of the random ternary weights")
    parser.add_argument("--tokens", default="1,8,16,32,64")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--copies", type=int, default=4,
                        help="Distinct weight/input copies (cloned further until they exceed L2)")
    parser.add_argument("--out", type=Path, default=None, help="Also write the markdown table here.")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: scripts/bench_kernel.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    if kernel_library() is None:
        raise SystemExit("error: the CUDA kernels could not be built; run `qmoe build-kernels` for the reason")
    formats = args.formats.split(",")
    if any(f != "ternary" and f not in ("2", "3", "4", "8") for f in formats):
        raise SystemExit(f"error: --formats: each must be ternary, 2, 3, 4 or 8, got {args.formats!r}")
    tokens = [int(t) for t in args.tokens.split(",")]
    lines = [f"# compressed matmul vs torch bf16 matmul on {torch.cuda.get_device_name()} "
             f"(median of {args.repeats}, CUDA events; ternary at P(zero) {args.p_zero}; "
             f"fused up to {DENSE_TOKENS_THRESHOLD} tokens)", "",
             "| shape | format | tokens | path | bits/weight | MB read | ours us | ours GB/s | torch us | torch GB/s "
             "| speedup | faster up to |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    book = None
    if "ternary" in formats:
        print(f"fitting a dictionary for P(zero) = {args.p_zero}", file=sys.stderr)
        book = Codebook.from_sequences(fit_dictionary(symbol_probs(args.p_zero), DictionarySpec()), 14)
    for fmt in formats:
        for rows, cols in parse_shapes(args.shapes):
            gen = torch.Generator().manual_seed(rows * 31 + cols)
            side = (ternary_side(rows, cols, args.p_zero, book, args.copies, gen) if fmt == "ternary"
                    else bitpacked_side(rows, cols, int(fmt), args.copies, gen))
            lines += bench(rows, cols, fmt if fmt == "ternary" else f"{fmt}-bit", side, tokens, args, gen)
    emit_table(lines, args.out)


if __name__ == "__main__":
    main()
