"""Benchmark packed experts on the CPU against dense torch, matrix by matrix and end to end.

Part 1, per shape (rows x cols of one expert matrix, i.i.d. ternary codes at --p-zero coded
with a dictionary fitted to their distribution) and token count: medians of `PackedLinear` (the native
decode-matmul, from the matrix's 2-bit lookup layout) on an fp32 and on a bf16 x against `F.linear` on
the same weights dense in fp32 and in bf16, the ratios in the same dtype (packed / dense: below 1 is
faster), and two bytes-read floors, each the bytes over the memory bandwidth measured here (a large
fp32 sum on all threads) with the fraction of it the packed product reaches: the stored packed
matrix (codewords, row offsets, grids) and what a product reads (lookup layout, grids). Then the
one-time cost of each shape's lookup layout (built from the codewords on a matrix's first product)
against one 1-token product, and the same timing rows for bit-packed b-bit experts (uniform random
codes, one grid a row; stored = read) of --bits-shape. With --beyond N,..: per shape and N, the
lookup layout's product against PackedLinear's other path (rows decoded to fp32 a block at a time,
BLAS), which it replaces at every token count.

Part 2 (--e2e): a random Mixtral-shaped model (`scripts/bench_decoder.py` writes it and makes
its packed rtn-ternary form), one greedy decoder step at batch 1 of our runtime (fp32) on the
original and on the packed model, transformers' own cached step (fp32), and the bare bf16
matvecs of the active expert weights (top-k experts x 3 matrices x layers, `F.linear`, distinct
weights per layer and expert so none stays in cache): what a dense bf16 engine reading only the
active experts cannot beat.

    python scripts/bench_cpu.py --e2e                    # the tables of docs/cpu.md
    python scripts/bench_cpu.py --shapes 768x3072,4096x14336 --tokens 32 --bits-shape "" --beyond 64,128,256,512
    python scripts/bench_cpu.py --shapes 97x1025 --tokens 1,3 --bits-shape 30x64 --repeats 1   # tiny
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_decoder  # noqa: E402
from bench_codec import random_ternary  # noqa: E402
from bench_gptq import emit_table  # noqa: E402

from qmoe_cli.codec.bitpack import pack_bits  # noqa: E402
from qmoe_cli.codec.cpu_matmul import best_isa, isa_code, ternary_layout  # noqa: E402
from qmoe_cli.codec.dictionary import Codebook, DictionarySpec, fit_dictionary  # noqa: E402
from qmoe_cli.codec.rows import encode_matrix  # noqa: E402
from qmoe_cli.formats.packed import BitpackedMatrix, DictionaryMatrix, PackedLinear  # noqa: E402
from qmoe_cli.quant.grids import QuantSpec  # noqa: E402

DEFAULT_SHAPES = "768x3072,3072x768,4096x14336,14336x4096"


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up: first-touch, caches, the kernels' build
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def bandwidth_gbs(repeats: int) -> float:
    """GB/s of reading a 256 MB fp32 tensor on all threads (`sum`): the floor's bandwidth."""
    big = torch.ones(1 << 26)
    return big.numel() * 4 / median_ms(lambda: big.sum(), repeats) / 1e6


def packed_matrix(rows: int, cols: int, p_zero: float, dictionary_size: int) -> DictionaryMatrix:
    codes = random_ternary(rows, cols, p_zero)
    spec = DictionarySpec(dictionary_size)
    q = [(1 - p_zero) / 2, p_zero, (1 - p_zero) / 2]  # the codes' own model: every symbol is in the dictionary
    book = Codebook.from_sequences(fit_dictionary([q[a] * q[b] for a in range(3) for b in range(3)], spec),
                                   spec.max_len)
    words, offsets = encode_matrix(codes, book)
    g = torch.Generator().manual_seed(1)
    lo, hi = -torch.rand(rows, 1, generator=g) - 0.1, torch.rand(rows, 1, generator=g) + 0.1
    lo, hi = lo.bfloat16().float(), hi.bfloat16().float()  # the quantizer's grids are bf16-representable
    return DictionaryMatrix({"words": words, "offsets": offsets, "lo": lo, "hi": hi}, book, rows, cols,
                            QuantSpec("ternary"), "bench")


def packed_bytes(m: DictionaryMatrix) -> int:
    """The stored matrix: codewords, row offsets, grids (not the dictionary, shared by all)."""
    return m.words.numel() * 2 + m.offsets.numel() * 4 + (m.lo.numel() + m.hi.numel()) * 4


def layout_of(m: DictionaryMatrix) -> torch.Tensor:
    return ternary_layout(m.words, m.offsets, m.book.masks, m.cols)


def bitpacked_matrix(rows: int, cols: int, bits: int) -> BitpackedMatrix:
    """Uniform random b-bit codes with one random grid a row."""
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (rows, cols), generator=g, dtype=torch.uint8)
    scale, zero = torch.rand(rows, 1, generator=g) * 0.01 + 1e-3, torch.randint(0, 1 << bits, (rows, 1), generator=g)
    return BitpackedMatrix({"packed": pack_bits(codes, bits), "scale": scale, "zero": zero.float()}, rows, cols,
                           QuantSpec(str(bits)), "bench")


def timing_rows(label: str, m: DictionaryMatrix | BitpackedMatrix, stored: int, read: int, args: argparse.Namespace,
                gbs: float) -> list[str]:
    """One row per token count: `PackedLinear(m)` on fp32 and bf16 x against dense `F.linear`,
    with the floors of the `stored` and the `read` bytes."""
    rows, cols = m.rows, m.cols
    linear, dense = PackedLinear(m), m.dense(0, rows)
    dense_bf16 = dense.bfloat16()
    floor, read_floor = stored / gbs / 1e6, read / gbs / 1e6  # ms
    out = []
    for n in args.tokens:
        xs = [torch.randn(n, cols) for _ in range(4)]  # rotated, so one input is not the only one cached
        xb = [x.bfloat16() for x in xs]
        step = iter(range(1 << 30))
        packed = median_ms(lambda: linear(xs[next(step) % 4]), args.repeats)
        packed_bf16 = median_ms(lambda: linear(xb[next(step) % 4]), args.repeats)
        fp32 = median_ms(lambda: F.linear(xs[next(step) % 4], dense), args.repeats)
        bf16 = median_ms(lambda: F.linear(xb[next(step) % 4], dense_bf16), args.repeats)
        best = min(packed, packed_bf16)
        out.append(f"| {label} | {n} | {8 * stored / (rows * cols):.3f} | {8 * read / (rows * cols):.3f} "
                   f"| {packed:.3f} | {packed_bf16:.3f} | {fp32:.3f} | {bf16:.3f} | {packed / fp32:.2f} "
                   f"| {packed_bf16 / bf16:.2f} | {floor:.3f} | {floor / best:.2f} | {read_floor:.3f} "
                   f"| {read_floor / best:.2f} |")
    return out


def shape_rows(rows: int, cols: int, args: argparse.Namespace, gbs: float) -> tuple[list[str], str]:
    """The timing rows of one ternary shape, and its lookup layout's row: build ms against one
    1-token fp32 product."""
    m = packed_matrix(rows, cols, args.p_zero, args.dictionary)
    layout, stored = layout_of(m), packed_bytes(m)  # before the first product, which drops the codewords
    read = layout.numel() * 4 + (m.lo.numel() + m.hi.numel()) * 4
    build = median_ms(lambda: layout_of(m), args.repeats)
    linear, x = PackedLinear(m), torch.randn(1, cols)
    product = median_ms(lambda: linear(x), args.repeats)
    return (timing_rows(f"{rows}x{cols}", m, stored, read, args, gbs),
            f"| {rows}x{cols} | {8 * stored / (rows * cols):.3f} | {8 * read / (rows * cols):.3f} "
            f"| {build:.3f} | {product:.3f} | {build / product:.1f} |")


def beyond_rows(args: argparse.Namespace) -> list[str]:
    """Per shape and --beyond token count: the lookup layout's product against decoded rows + BLAS."""
    out = []
    for rows, cols in args.shapes:
        linear = PackedLinear(packed_matrix(rows, cols, args.p_zero, args.dictionary))
        for n in args.beyond:
            x = torch.randn(n, cols)
            lookup, decoded = (median_ms(lambda: fn(x), args.repeats) for fn in (linear, linear.decoded))
            out.append(f"| {rows}x{cols} | {n} | {lookup:.2f} | {decoded:.2f} | {lookup / decoded:.2f} |")
    return out


def bits_rows(args: argparse.Namespace, gbs: float) -> list[str]:
    """One row per b (and token count) of bit-packed experts of --bits-shape."""
    rows, cols = args.bits_shape
    out = []
    for bits in args.bits:
        m = bitpacked_matrix(rows, cols, bits)
        nbytes = m.packed.numel() + 4 * (m.grid_tensors["scale"].numel() + m.grid_tensors["zero"].numel())
        out += timing_rows(f"{bits}-bit {rows}x{cols}", m, nbytes, nbytes, args, gbs)
    return out


def e2e_rows(args: argparse.Namespace) -> list[str]:
    """ms per decoder step at batch 1: our fp32 original, packed, transformers fp32, bare bf16 matvecs."""
    import transformers

    d = bench_decoder.parse_args(["--family", "mixtral", "--hidden", str(args.hidden), "--expert-width",
                                  str(args.expert_width), "--experts", str(args.experts), "--top-k", "2",
                                  "--layers", str(args.layers), "--heads", "8", "--kv-heads", "2", "--vocab", "1024",
                                  "--batches", "1", "--steps", str(args.steps), "--prefills", "1", "--device", "cpu",
                                  "--dtype", "float32"])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        print("writing and packing a random Mixtral-shaped model", file=sys.stderr)
        bench_decoder.write_model(root / "model", d)
        packed, _ = bench_decoder.compress(root / "model", root, d.vocab, "cpu")
        ours = {name: bench_decoder.measure(path, d, [1])[1][1] for name, path in
                (("original", root / "model"), ("packed", packed))}
        hf = transformers.AutoModelForCausalLM.from_pretrained(root / "model", dtype=torch.float32).eval()
        ours["transformers"] = hf_step_ms(hf, d)
    ours["bf16 matvecs"] = active_matvec_ms(args)
    return [f"| {name} | {ms:.2f} | {ms / ours['bf16 matvecs']:.2f} |" for name, ms in ours.items()]


@torch.no_grad()
def hf_step_ms(model, d: argparse.Namespace) -> float:
    """Median ms of one cached greedy step of a transformers model at batch 1."""
    ids = torch.randint(0, d.vocab, (1, d.prompt_tokens), generator=torch.Generator().manual_seed(1))
    out = model(input_ids=ids, use_cache=True)
    cache, last = out.past_key_values, out.logits[:, -1:].argmax(-1)
    times = []
    for _ in range(d.warmup + d.steps):
        start = time.perf_counter()
        out = model(input_ids=last, past_key_values=cache, use_cache=True)
        cache, last = out.past_key_values, out.logits[:, -1:].argmax(-1)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times[d.warmup:])


def active_matvec_ms(args: argparse.Namespace) -> float:
    """Median ms of the bf16 matvecs of one token's active experts (top-2 x 3 matrices x layers)."""
    h, f = args.hidden, args.expert_width
    weights = [[torch.randn(f, h).bfloat16(), torch.randn(f, h).bfloat16(), torch.randn(h, f).bfloat16()]
               for _ in range(2 * args.layers)]
    x, u = torch.randn(1, h).bfloat16(), torch.randn(1, f).bfloat16()

    def step() -> None:
        for w1, w3, w2 in weights:
            F.linear(x, w1), F.linear(x, w3), F.linear(u, w2)

    return median_ms(step, args.steps)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated ROWSxCOLS")
    parser.add_argument("--tokens", default="1,8,32", help="comma-separated token counts")
    parser.add_argument("--p-zero", dest="p_zero", type=float, default=0.9, help="share of zero weights")
    parser.add_argument("--dictionary", type=int, default=1 << 16, help="codewords in the fitted dictionary")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per measurement; median reported")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--bits-shape", dest="bits_shape", default="4096x14336",
                        help="ROWSxCOLS of the bit-packed b-bit rows ('' for none)")
    parser.add_argument("--bits", default="2,3,4,8", help="comma-separated b of the bit-packed rows")
    parser.add_argument("--beyond", default="", help="comma-separated token counts: the lookup layout against "
                        "decoded rows + BLAS")
    parser.add_argument("--e2e", action="store_true", help="also time the Mixtral-shaped model end to end")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--expert-width", dest="expert_width", type=int, default=3584)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20, help="timed decoder steps (e2e)")
    parser.add_argument("--out", type=Path, default=None, help="also write the tables to this .md file")
    args = parser.parse_args(argv)
    try:
        args.shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
        args.tokens = [int(t) for t in args.tokens.split(",")]
        args.bits_shape = tuple(int(v) for v in args.bits_shape.split("x")) if args.bits_shape else None
        args.bits = [int(b) for b in args.bits.split(",")]
        args.beyond = [int(t) for t in args.beyond.split(",")] if args.beyond else []
        isa_code(None)
    except ValueError as exc:
        parser.error(str(exc))
    if not 0 < args.p_zero < 1 or args.repeats < 1 or args.steps < 1 or min(args.tokens + args.beyond) < 1:
        parser.error("--p-zero must be in (0, 1); --repeats, --steps, --tokens and --beyond must be >= 1")
    if not all(1 <= b <= 8 for b in args.bits):
        parser.error(f"--bits must be in 1..8, got {args.bits}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    gbs = bandwidth_gbs(args.repeats)
    header = ("| {} | tokens | bits/weight stored | bits/weight read | packed fp32 ms | packed bf16 ms | dense fp32 ms "
              "| dense bf16 ms | packed/dense fp32 | packed/dense bf16 | floor ms (stored) | of it | floor ms (read) "
              "| of it |")
    rule = "|---" * 14 + "|"
    lines = [f"# packed ternary (p_zero {args.p_zero}) vs dense on the CPU: {torch.get_num_threads()} threads, kernel "
             f"variant {best_isa() if isa_code(None) < 0 else isa_code(None)}, medians of {args.repeats}, "
             f"bandwidth {gbs:.1f} GB/s", "", header.format("shape"), rule]
    layouts = ["", f"# the lookup layout, built once per ternary matrix: {torch.get_num_threads()} threads, medians of "
               f"{args.repeats}", "", "| shape | bits/weight stored | bits/weight of the layout | build ms "
               "| 1-token fp32 product ms | build / product |", "|---|---|---|---|---|---|"]
    for rows, cols in args.shapes:
        timings, layout = shape_rows(rows, cols, args, gbs)
        lines += timings
        layouts.append(layout)
    lines += layouts
    if args.beyond:
        lines += ["", f"# many tokens, fp32 x: the lookup layout against decoded rows + BLAS (PackedLinear.decoded): "
                  f"{torch.get_num_threads()} threads, medians of {args.repeats}", "",
                  "| shape | tokens | lookup ms | decoded + BLAS ms | lookup / decoded |", "|---|---|---|---|---|"]
        lines += beyond_rows(args)
    if args.bits_shape:
        lines += ["", f"# bit-packed b-bit experts (one grid a row) vs dense: {torch.get_num_threads()} threads, "
                  f"medians of {args.repeats}", "", header.format("bits shape"), rule]
        lines += bits_rows(args, gbs)
    if args.e2e:
        lines += ["", f"# decoder step at batch 1, Mixtral-shaped: hidden {args.hidden}, {args.experts} experts of "
                  f"{args.expert_width}, top-2, {args.layers} layers, median of {args.steps} steps", "",
                  "| what | ms/token | / bf16 matvecs |", "|---|---|---|"]
        lines += e2e_rows(args)
    emit_table(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
