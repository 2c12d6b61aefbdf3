"""Benchmark one decoder-family sparse block (top-k SwiGLU experts) on the GPU: packed ternary vs bf16 experts.

Shapes (--shapes): `mixtral` (Mixtral-8x7B: d_model 4096, d_ff 14336, 8 experts, top-2) and
`qwen3` (Qwen3-30B-A3B: d_model 2048, d_ff 768, 128 experts, top-8), every expert distinct
(ternary at P(zero) --p-zero, dictionary-coded; the bf16 experts are the same weights). The block
is built through the Architecture interface with random weights and run as `qmoe eval` runs it
(`run.stream.sparse_feed_forward`: norm, fp32 router and top-k, the experts, the weighted sum in
slot order, the residual):

    packed: the grouped path (`DeviceExperts`): all k slots of every token in one call, gate and
        up in one tile launch, silu(gate) * up, down; no host sync in the experts up to
        DENSE_TOKENS_THRESHOLD tokens (the runner's routing syncs once, on both sides);
    bf16: the same runner with the experts as bf16 `GatedMLP` modules (the per-expert path an
        original checkpoint runs);
    bf16 matmuls only: with the routing known on the host, per active expert the three bf16
        matmuls, the activation and the weighted add: the floor of a per-expert bf16 block.

Medians of CUDA-event times per call, fresh random tokens per call (16 sets); `rel. diff` is the
relative distance of the packed block's expert output from the bf16 one's on the same tokens
(both compute the same weights, so it is bf16 rounding: ~1e-2 at most). A markdown table on
stdout (and to --out); progress on stderr. Needs a CUDA GPU and the built kernels.

    python scripts/bench_moe_block.py
    python scripts/bench_moe_block.py --shapes qwen3 --tokens 1,8,32 --repeats 50 --out moe.md
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_block import event_ms  # noqa: E402
from bench_kernel import encode_pool, pooled_ternary, symbol_probs  # noqa: E402
from benchlib import emit_table  # noqa: E402

from qmoe_cli.arch import Architecture, architecture_from_config  # noqa: E402
from qmoe_cli.codec.dictionary import Codebook, DictionarySpec, fit_dictionary  # noqa: E402
from qmoe_cli.execute.grouped import DeviceExperts  # noqa: E402
from qmoe_cli.formats.packed import DictionaryMatrix  # noqa: E402
from qmoe_cli.kernels import DENSE_TOKENS_THRESHOLD, codebook_masks, kernel_library  # noqa: E402
from qmoe_cli.quant.grids import QuantSpec  # noqa: E402
from qmoe_cli.run.stream import ListBuffer, RunConfig, sparse_feed_forward  # noqa: E402

_ATTENTION = {"vocab_size": 32000, "num_hidden_layers": 1, "num_attention_heads": 16, "num_key_value_heads": 4}
SHAPES = {  # Hugging Face config.json fields of one sparse block of each model (attention is not run)
    "mixtral": {**_ATTENTION, "model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336,
                "num_local_experts": 8, "num_experts_per_tok": 2},
    "qwen3": {**_ATTENTION, "model_type": "qwen3_moe", "hidden_size": 2048, "intermediate_size": 6144,
              "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True},
}


@dataclass(frozen=True)
class TernaryPart:
    """One expert matrix: its codes [rows, cols] uint8 (0 = lo, 1 = zero, 2 = hi) and grid, and the
    same dictionary-coded (`DictionaryMatrix`, what a packed checkpoint holds)."""

    codes: torch.Tensor
    lo: torch.Tensor  # [rows] fp32
    hi: torch.Tensor  # [rows] fp32
    coded: DictionaryMatrix

    def dense(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The weights [rows, cols] in `dtype` on `device` (each grid value rounded once, as the kernels)."""
        codes = self.codes.to(device)
        lo, hi = self.lo.to(device)[:, None], self.hi.to(device)[:, None]
        return torch.where(codes == 0, lo, torch.where(codes == 2, hi, torch.zeros((), device=device))).to(dtype)


def make_experts(arch: Architecture, book: Codebook, p_zero: float, seed: int) -> list[dict[str, TernaryPart]]:
    """Every expert's matrices, {name: TernaryPart}, random ternary with one grid per row. Rows are
    drawn from pools of encoded random rows (`pooled_ternary`): encoding gigabytes of weights row
    by row would take minutes."""
    gen = torch.Generator().manual_seed(seed)
    shapes = arch.expert.shapes
    pools = {cols: encode_pool(cols, p_zero, book, gen) for cols in sorted({c for _, c in shapes.values()})}
    experts = []
    for e in range(arch.num_experts):
        parts = {}
        for name in arch.expert.matrices:
            rows, cols = shapes[name]
            words, offsets, codes = pooled_ternary(rows, pools[cols], gen)
            lo, hi = -torch.rand(rows, generator=gen) * 0.1, torch.rand(rows, generator=gen) * 0.1
            lo, hi = lo.bfloat16().float(), hi.bfloat16().float()  # bf16-representable, as the quantizer stores them
            coded = DictionaryMatrix({"words": words, "offsets": offsets, "lo": lo[:, None], "hi": hi[:, None]}, book,
                                     rows, cols, QuantSpec("ternary"), f"expert {e} {name}")
            parts[name] = TernaryPart(codes, lo, hi, coded)
        experts.append(parts)
    return experts


class Bank:
    """An ExpertBank of bf16 experts (`load`) or, given, the packed grouped path (`routed`)."""

    def __init__(self, arch: Architecture, dense: list[dict[str, torch.Tensor]], packed: DeviceExperts | None):
        self.arch, self.dense, self.packed, self.num_experts = arch, dense, packed, arch.num_experts

    def load(self, ids: Sequence[int], device: torch.device, dtype: torch.dtype) -> list[nn.Module]:
        return [self.arch.make_expert(self.dense[j]) for j in ids]

    def routed(self, device: torch.device, dtype: torch.dtype) -> DeviceExperts | None:
        return self.packed


def bench_shape(name: str, args: argparse.Namespace, book: Codebook, device: torch.device) -> list[str]:
    """The table rows of one shape (one per token count)."""
    arch = architecture_from_config(SHAPES[name])
    print(f"{name}: making {arch.num_experts} experts {arch.expert.shapes}", file=sys.stderr)
    experts = make_experts(arch, book, args.p_zero, seed=1)
    masks = codebook_masks(book).to(device)
    packed = DeviceExperts.upload(arch.expert, QuantSpec("ternary"), ((e, {m: p.coded for m, p in parts.items()})
                                                                      for e, parts in enumerate(experts)), masks,
                                  device)
    dense = [{m: p.dense(device, torch.bfloat16) for m, p in parts.items()} for parts in experts]
    del experts
    blocks = {}
    for side, routed in (("packed", packed), ("bf16", None)):
        with torch.device(device):
            block = arch.block("decoder", 0, Bank(arch, dense, routed)).to(torch.bfloat16).eval()
        blocks[side] = block
    torch.nn.init.normal_(blocks["bf16"].moe.gate.weight, 0, 1.0)  # spread tokens over all experts
    blocks["packed"].load_state_dict(blocks["bf16"].state_dict())  # the same router and norm
    run = RunConfig(device, torch.bfloat16, progress=False)
    packed_mb = sum(m.words.numel() * 2 + (m.offsets.numel() + 2 * m.lo.numel()) * 4
                    for m in (packed.first, packed.second)) / 1e6
    dense_mb = sum(w.numel() * 2 for parts in dense for w in parts.values()) / 1e6
    gate, up, down = arch.expert.matrices
    k, d = arch.config.top_k, arch.d_model
    gen = torch.Generator().manual_seed(2)
    lines = []
    for n in args.tokens:
        xs = [torch.randn(n, d, generator=gen).to(device, torch.bfloat16) for _ in range(16)]

        def block_call(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
            buffer = ListBuffer.of(x.clone())
            sparse_feed_forward(block, buffer, run)
            return buffer.data

        times = {side: event_ms(lambda i, b=block: block_call(b, xs[i % 16]), args.warmup, args.repeats)
                 for side, block in blocks.items()}
        plans = []  # per call: (expert, its tokens on the device, their weights) of every active expert
        for _ in range(16):
            index = torch.rand(n, arch.num_experts, generator=gen).argsort(dim=1)[:, :k]
            weight = torch.rand(n, k, generator=gen)
            plans.append([(e, *(t.to(device) for t in (torch.nonzero(index == e)[:, 0], weight[index == e])))
                          for e in index.unique().tolist()])

        def matmuls(i: int) -> None:
            x, out = xs[i % 16], torch.zeros_like(xs[i % 16])
            for e, tokens, w in plans[i % 16]:
                h = x.index_select(0, tokens)
                a = F.silu(h @ dense[e][gate].T) * (h @ dense[e][up].T)
                out.index_add_(0, tokens, (a @ dense[e][down].T) * w.to(x.dtype)[:, None])

        floor = event_ms(matmuls, args.warmup, args.repeats)
        with torch.no_grad():
            y = {side: (block_call(block, xs[0]) - xs[0]).double() for side, block in blocks.items()}
        rel = float((y["packed"] - y["bf16"]).norm() / y["bf16"].norm())
        lines.append(f"| {name} | {n} | {times['packed'] * 1e3:.1f} | {times['bf16'] * 1e3:.1f} | {floor * 1e3:.1f} "
                     f"| {times['bf16'] / times['packed']:.2f} | {floor / times['packed']:.2f} | {rel:.1e} "
                     f"| {packed_mb:.0f} | {dense_mb:.0f} |")
        print(lines[-1], file=sys.stderr)
    return lines


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="mixtral,qwen3", help=f"Comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--tokens", default="1,8,32", help="Comma-separated token counts per call")
    parser.add_argument("--p-zero", type=float, default=0.9)
    parser.add_argument("--dictionary-size", type=int, default=1 << 16)
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None, help="Also write the markdown table here.")
    args = parser.parse_args(argv)
    args.shapes = args.shapes.split(",")
    unknown = [s for s in args.shapes if s not in SHAPES]
    if unknown:
        parser.error(f"--shapes: unknown {', '.join(unknown)} (known: {', '.join(SHAPES)})")
    try:
        args.tokens = [int(t) for t in args.tokens.split(",")]
    except ValueError:
        parser.error(f"--tokens must be comma-separated integers, got {args.tokens!r}")
    if min(args.tokens) < 1 or not 0 < args.p_zero < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("--tokens must be >= 1, --p-zero in (0, 1), --repeats >= 1 and --warmup >= 0")
    return args


def fitted_book(p_zero: float, size: int) -> Codebook:
    """A dictionary fitted to i.i.d. ternary weights at P(zero) `p_zero` (codewords of <= 14 pairs)."""
    return Codebook.from_sequences(fit_dictionary(symbol_probs(p_zero), DictionarySpec(size, 14)), 14)


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: scripts/bench_moe_block.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    if kernel_library() is None:
        raise SystemExit("error: the CUDA kernels could not be built; run `qmoe build-kernels` for the reason")
    device = torch.device("cuda", torch.cuda.current_device())
    print("fitting a dictionary", file=sys.stderr)
    book = fitted_book(args.p_zero, args.dictionary_size)
    lines = [f"# one decoder-family sparse block on {torch.cuda.get_device_name()}: packed ternary (P(zero) "
             f"{args.p_zero}) vs bf16 experts, median of {args.repeats} calls, CUDA events", "",
             "| shape | tokens | packed us | bf16 us | bf16 matmuls only us | speedup vs bf16 "
             "| speedup vs matmuls only | rel. diff | packed expert MB | bf16 expert MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    with torch.no_grad():
        for name in args.shapes:
            lines += bench_shape(name, args, book, device)
            torch.cuda.empty_cache()
    lines += ["", f"mixtral: {SHAPES['mixtral']['hidden_size']}x{SHAPES['mixtral']['intermediate_size']}, 8 experts, "
              "top-2; qwen3: 2048x768, 128 experts, top-8. Packed path: fused tiles up to "
              f"{DENSE_TOKENS_THRESHOLD} tokens per expert, decode + tensor cores beyond."]
    emit_table(lines, args.out)


if __name__ == "__main__":
    main()
