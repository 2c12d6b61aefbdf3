"""Benchmark the fused decode-matmul kernel against torch's bf16 matmul on the decoded weights.

For each shape (rows x cols, out x in) and P(zero), random ternary weights are dictionary-coded
with a dictionary fitted to that P(zero); then y = x @ W.T is timed at 1, 4, 16 and 32 tokens for
`qmoe_cli.kernels.decode_matmul` (compressed weights) and `torch.matmul` (dense bf16 W), with CUDA
events, after warm-up, median over --repeats. Each side cycles through copies of its weights
(clones of --copies distinct ones) until together they exceed L2 (50 MB on H100), so neither
side gets its weights from cache; x, re-read by every row, may stay cached as in a model. Prints a markdown table on stdout (and to --out); progress on stderr.

    python scripts/bench_kernel.py
    python scripts/bench_kernel.py --shapes 2080x6144 --tokens 1,32 --out kernel.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gptq import emit_table, parse_shapes  # noqa: E402

from qmoe_cli.codec.dictionary import Codebook, DictionarySpec, fit_dictionary  # noqa: E402
from qmoe_cli.codec.rows import encode_matrix  # noqa: E402
from qmoe_cli.kernels import codebook_masks, decode_matmul, kernel_library  # noqa: E402

DEFAULT_SHAPES = "768x3072,3072x768,1024x4096,4096x1024,2080x6144,6144x2080"
L2_BYTES = 64 << 20  # a little above the largest L2 we target (H100: 50 MB)


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


def bench(rows: int, cols: int, p_zero: float, book: Codebook, tokens: list[int], args: argparse.Namespace) -> list[str]:
    gen = torch.Generator().manual_seed(rows * 31 + cols)
    masks = codebook_masks(book).cuda()
    packed, dense = [], []
    for _ in range(args.copies):
        codes = ternary(rows, cols, p_zero, gen)
        words, offsets = encode_matrix(codes, book)
        lo, hi = -torch.rand(rows, 1, generator=gen), torch.rand(rows, 1, generator=gen)
        packed.append([t.cuda() for t in (words, offsets, lo, hi)])
        w = torch.where(codes == 0, lo, torch.where(codes == 2, hi, torch.zeros(())))
        dense.append(w.to(torch.bfloat16).cuda())
    # What the kernel must read per call: codewords, row offsets, the row grids (the mask table
    # is shared by every matrix of a model and stays in L2).
    words, offsets = packed[0][0], packed[0][1]
    read, dense_bytes = words.numel() * 2 + offsets.numel() * 4 + rows * 8, rows * cols * 2
    # The compressed weights are ~10x smaller, so each side gets its own number of copies
    # (clones of the distinct ones) to exceed L2: otherwise the kernel would read from cache.
    packed = [[t.clone() for t in packed[i % args.copies]] for i in range(max(args.copies, -(-L2_BYTES // read)))]
    dense = [dense[i % args.copies].clone() for i in range(max(args.copies, -(-L2_BYTES // dense_bytes)))]
    lines = []
    for n in tokens:
        xs = [torch.randn(n, cols, generator=gen).to(torch.bfloat16).cuda() for _ in range(args.copies)]
        ours = event_ms(lambda i: decode_matmul(packed[i][0], packed[i][1], masks, packed[i][2], packed[i][3],
                                                xs[i % len(xs)]), len(packed), args.warmup, args.repeats)
        theirs = event_ms(lambda i: xs[i % len(xs)] @ dense[i].T, len(dense), args.warmup, args.repeats)
        lines.append(f"| {rows}x{cols} | {p_zero} | {n} | {16 * words.numel() / (rows * cols):.3f} | {read / 1e6:.3f} "
                     f"| {ours * 1e3:.1f} | {read / ours / 1e6:.0f} | {theirs * 1e3:.1f} "
                     f"| {dense_bytes / theirs / 1e6:.0f} | {theirs / ours:.2f} |")
        print(lines[-1], file=sys.stderr)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="ROWSxCOLS,... (default: Switch's expert shapes)")
    parser.add_argument("--p-zero", default="0.9,0.75", help="P(zero) of the random ternary weights")
    parser.add_argument("--tokens", default="1,4,16,32")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--copies", type=int, default=4, help="Distinct weight/input copies (cloned further until they exceed L2)")
    parser.add_argument("--out", type=Path, default=None, help="Also write the markdown table here.")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: scripts/bench_kernel.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    if kernel_library() is None:
        raise SystemExit("error: the CUDA kernels could not be built; run `qmoe build-kernels` for the reason")
    tokens = [int(t) for t in args.tokens.split(",")]
    header = [f"# decode_matmul vs torch bf16 matmul on {torch.cuda.get_device_name()} "
              f"(median of {args.repeats}, CUDA events)", "",
              "| shape | P(zero) | tokens | bits/weight | MB read | ours us | ours GB/s | torch us | torch GB/s "
              "| speedup |", "|---|---|---|---|---|---|---|---|---|---|"]
    lines = list(header)
    for p_zero in (float(p) for p in args.p_zero.split(",")):
        print(f"fitting a dictionary for P(zero) = {p_zero}", file=sys.stderr)
        book = Codebook.from_sequences(fit_dictionary(symbol_probs(p_zero), DictionarySpec()), 14)
        for rows, cols in parse_shapes(args.shapes):
            lines += bench(rows, cols, p_zero, book, tokens, args)
    emit_table(lines, args.out)


if __name__ == "__main__":
    main()
