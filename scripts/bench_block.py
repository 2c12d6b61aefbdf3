"""Benchmark one sparse block on the GPU at a few tokens: packed experts vs the same block with bf16 experts.

The block is the sparse feed-forward sublayer as the model runs it (`MoEBlock.feed_forward`:
norm, fp32 router, each token's expert wi, relu, wo, scaling by the router probability,
residual), built through the Architecture interface with random weights at switch-c2048 shapes
by default (d_model 2080, d_ff 6144, 2048 experts). Packed: the grouped path (`DeviceExperts`,
no host sync up to DENSE_TOKENS_THRESHOLD tokens). bf16: the runtime's per-expert path over bf16
weights (what an original checkpoint runs), and, as the floor of any bf16 implementation, the two
matmuls of the routed experts alone with routing already known on the host ("bf16 matmuls only").

2048 distinct bf16 experts of that shape take 105 GB, so --distinct experts (ternary at P(zero)
0.9, dictionary-coded, and the same weights in bf16) are aliased to all of them (expert e is
distinct e % D); the default D = 64 puts 3.3 GB of bf16 and 0.3 GB of packed weights in play,
far beyond L2, and every call routes fresh random tokens. Medians of CUDA-event times per call;
a markdown table on stdout (and to --out).

    python scripts/bench_block.py
    python scripts/bench_block.py --d-model 768 --d-ff 3072 --experts 128 --tokens 1,8,32
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernel import encode_pool, pooled_ternary, symbol_probs  # noqa: E402
from benchlib import emit_table  # noqa: E402

from qmoe_cli.arch import Architecture, architecture_from_config  # noqa: E402
from qmoe_cli.codec.dictionary import Codebook, DictionarySpec, fit_dictionary  # noqa: E402
from qmoe_cli.execute.grouped import DeviceExperts, DeviceTernary  # noqa: E402
from qmoe_cli.kernels import DENSE_TOKENS_THRESHOLD, codebook_masks, kernel_library  # noqa: E402


class Bank:
    """An ExpertBank over D distinct bf16 experts aliased to E (`load`) and, if given, the packed
    grouped path (`routed`)."""

    def __init__(self, arch: Architecture, wi: list[torch.Tensor], wo: list[torch.Tensor],
                 device_experts: DeviceExperts | None):
        self.arch, self.wi, self.wo, self.num_experts = arch, wi, wo, arch.num_experts
        self.device_experts = device_experts

    def load(self, ids: Sequence[int], device: torch.device, dtype: torch.dtype) -> list[nn.Module]:
        d = len(self.wi)
        return [self.arch.make_expert({"wi": self.wi[j % d], "wo": self.wo[j % d]}) for j in ids]

    def routed(self, device: torch.device, dtype: torch.dtype) -> DeviceExperts | None:
        return self.device_experts


def make_weights(args: argparse.Namespace, book: Codebook, device: torch.device):
    """(DeviceExperts over all experts, bf16 wi list, bf16 wo list), D distinct experts."""
    gen = torch.Generator().manual_seed(0)
    shapes = {"wi": (args.d_ff, args.d_model), "wo": (args.d_model, args.d_ff)}
    parts: dict[str, list] = {"wi": [], "wo": []}
    dense: dict[str, list[torch.Tensor]] = {"wi": [], "wo": []}
    pools = {name: encode_pool(cols, 0.9, book, gen) for name, (_, cols) in shapes.items()}
    for _ in range(args.distinct):
        for name, (rows, cols) in shapes.items():
            words, offsets, codes = pooled_ternary(rows, pools[name], gen)
            lo, hi = -torch.rand(rows, generator=gen) * 0.1, torch.rand(rows, generator=gen) * 0.1
            parts[name].append((words, offsets, lo, hi))
            w = torch.where(codes == 0, lo[:, None], torch.where(codes == 2, hi[:, None], torch.zeros(())))
            dense[name].append(w.to(device=device, dtype=torch.bfloat16))
    masks = codebook_masks(book).to(device)
    alias = torch.arange(args.experts) % args.distinct
    matrices = []
    for name, (rows, cols) in shapes.items():
        words = [p[0] for p in parts[name]]
        sizes = torch.tensor([w.numel() for w in words])
        bases = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)[:-1]])[alias]
        matrices.append(DeviceTernary(torch.cat(words).to(device), bases.to(device),
                                      torch.stack([p[1] for p in parts[name]])[alias].to(device), masks,
                                      torch.stack([p[2] for p in parts[name]])[alias].to(device),
                                      torch.stack([p[3] for p in parts[name]])[alias].to(device), cols))
    return DeviceExperts(matrices[0], matrices[1], args.experts, device), dense["wi"], dense["wo"]


def event_ms(fn: Callable[[int], object], warmup: int, repeats: int) -> float:
    for i in range(warmup):
        fn(i)
    times = []
    for i in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(i)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=2080)
    parser.add_argument("--d-ff", type=int, default=6144)
    parser.add_argument("--experts", type=int, default=2048)
    parser.add_argument("--distinct", type=int, default=64, help="Distinct experts, aliased to all of them")
    parser.add_argument("--tokens", default="1,8")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None, help="Also write the markdown table here.")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: scripts/bench_block.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    if kernel_library() is None:
        raise SystemExit("error: the CUDA kernels could not be built; run `qmoe build-kernels` for the reason")
    device = torch.device("cuda", torch.cuda.current_device())
    arch = architecture_from_config({
        "d_model": args.d_model, "d_ff": args.d_ff, "num_experts": args.experts, "num_layers": 2,
        "num_heads": max(1, args.d_model // 64), "d_kv": 64, "vocab_size": 32128, "encoder_sparse_step": 1,
        "decoder_sparse_step": 1, "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
        "layer_norm_epsilon": 1e-6, "pad_token_id": 0, "eos_token_id": 1})
    print("fitting a dictionary, encoding the experts", file=sys.stderr)
    book = Codebook.from_sequences(fit_dictionary(symbol_probs(0.9), DictionarySpec()), 14)
    device_experts, wi, wo = make_weights(args, book, device)
    blocks = {}
    for name, routed in (("packed", device_experts), ("bf16", None)):
        with torch.device(device):
            block = arch.block("encoder", 1, Bank(arch, wi, wo, routed)).to(torch.bfloat16).eval()
        for param_name, param in block.named_parameters():  # spread tokens over all experts
            if "router" in param_name:
                torch.nn.init.normal_(param, 0, 1.0)
        blocks[name] = block
    blocks["packed"].load_state_dict(blocks["bf16"].state_dict())  # the same router and norms
    lines = [f"# one sparse block ({args.d_model}x{args.d_ff}, {args.experts} experts, {args.distinct} distinct) on "
             f"{torch.cuda.get_device_name()}: median of {args.repeats} calls, CUDA events", "",
             "| tokens | packed us | bf16 us | bf16 matmuls only us | speedup vs bf16 | speedup vs matmuls only "
             "| packed expert GB | bf16 expert GB (all experts) |", "|---|---|---|---|---|---|---|---|"]
    packed_gb = sum(m.words.numel() * 2 * args.experts / args.distinct + (m.offsets.numel() + 2 * m.lo.numel()) * 4
                    for m in (device_experts.first, device_experts.second)) / 1e9
    dense_gb = 2 * args.d_model * args.d_ff * 2 * args.experts / 1e9
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n in (int(t) for t in args.tokens.split(",")):
            xs = [torch.randn(n, args.d_model, generator=gen).to(device, torch.bfloat16) for _ in range(16)]
            times = {name: event_ms(lambda i, b=block: b.feed_forward(xs[i % len(xs)]), args.warmup, args.repeats)
                     for name, block in blocks.items()}
            experts = [torch.randint(0, args.distinct, (n,), generator=gen).tolist() for _ in range(16)]

            def matmuls(i: int) -> None:
                x = xs[i % len(xs)]
                for t, e in enumerate(experts[i % len(experts)]):
                    torch.relu(x[t:t + 1] @ wi[e].T) @ wo[e].T

            floor = event_ms(matmuls, args.warmup, args.repeats)
            lines.append(f"| {n} | {times['packed'] * 1e3:.1f} | {times['bf16'] * 1e3:.1f} | {floor * 1e3:.1f} "
                         f"| {times['bf16'] / times['packed']:.2f} | {floor / times['packed']:.2f} "
                         f"| {packed_gb:.2f} | {dense_gb:.1f} |")
            print(lines[-1], file=sys.stderr)
    lines.append("")
    lines.append(f"Packed path: fused tiles up to {DENSE_TOKENS_THRESHOLD} tokens; packed GB extrapolated from the "
                 f"{args.distinct} distinct experts.")
    emit_table(lines, args.out)


if __name__ == "__main__":
    main()
