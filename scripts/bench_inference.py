"""Benchmark generation with packed experts against the same model with bf16 (or fp32) experts.

A Switch-shaped random model is made in memory (switch-base-128's shapes by default: d_model
768, d_ff 3072, 128 experts, 12 heads; `--c2048` for switch-c2048's 2080 / 6144 / 2048 / 32):
random dense weights, and i.i.d. ternary expert codes at --p-zero with per-row grids, held once
dictionary-coded (packed, as `qmoe pack` writes them) and once dequantized to the compute dtype
(the "dense" model: the very same function). Both run through `qmoe generate`'s resident model
(`qmoe_cli.run.resident`) and its cached decoder. Reported, medians over --steps decoder steps
after a warm-up: ms per generated token at each batch size, the bytes the experts occupy, the
peak GPU memory while decoding, and the single sparse block (route, experts, scatter) at batch 1.

    python scripts/bench_inference.py                        # GPU, switch-base-128 shapes
    python scripts/bench_inference.py --c2048 --experts 256  # c2048 shapes (fewer experts to fit bf16)
    python scripts/bench_inference.py --device cpu --d-model 64 --d-ff 256 --experts 8 --batches 1,8
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernel import symbol_probs, ternary  # noqa: E402
from benchlib import dtype_bytes, emit_table, sync  # noqa: E402

from qmoe_cli.arch import architecture_from_config  # noqa: E402
from qmoe_cli.codec.dictionary import Codebook, DictionarySpec, fit_dictionary  # noqa: E402
from qmoe_cli.codec.rows import encode_matrix  # noqa: E402
from qmoe_cli.execute.linear import PackedLinear  # noqa: E402
from qmoe_cli.formats.packed import DictionaryMatrix  # noqa: E402
from qmoe_cli.quant.grids import QuantSpec  # noqa: E402
from qmoe_cli.run.resident import ResidentModel, load_resident  # noqa: E402

SHAPES = {"base": dict(d_model=768, d_ff=3072, num_experts=128, num_heads=12, d_kv=64, sparse_step=2),
          "c2048": dict(d_model=2080, d_ff=6144, num_experts=2048, num_heads=32, d_kv=64, sparse_step=1)}


class MemoryBank:
    """An expert bank over modules made in memory (loaded once into the resident model)."""

    def __init__(self, experts: list[Callable[[torch.device, torch.dtype], nn.Module]]):
        self.make, self.num_experts = experts, len(experts)

    def load(self, ids: Sequence[int], device: torch.device, dtype: torch.dtype) -> list[nn.Module]:
        return [self.make[j](device, dtype) for j in ids]


class MemoryWeights:
    """`ModelWeights` over tensors and banks in memory."""

    def __init__(self, arch, dense: dict[str, torch.Tensor], banks: dict[tuple[str, int], MemoryBank]):
        self.arch, self.dense, self.banks = arch, dense, banks

    def tensor(self, name: str, dtype: torch.dtype | None, device: torch.device) -> torch.Tensor:
        return self.dense[name].to(device=device, dtype=dtype)

    def experts(self, stack: str, index: int) -> MemoryBank:
        return self.banks[(stack, index)]


def make_models(args: argparse.Namespace) -> tuple[MemoryWeights, MemoryWeights, int, int]:
    """(packed, dense) weights of one random model, and the expert bytes of each."""
    shape = {**SHAPES["c2048" if args.c2048 else "base"]}
    for key in ("d_model", "d_ff", "num_experts"):
        if getattr(args, key.replace("num_", "")) is not None:
            shape[key] = getattr(args, key.replace("num_", ""))
    step = shape.pop("sparse_step")
    arch = architecture_from_config({**shape, "vocab_size": args.vocab, "num_layers": args.blocks,
                                     "num_decoder_layers": args.blocks, "encoder_sparse_step": step,
                                     "decoder_sparse_step": step})
    c = arch.config
    gen = torch.Generator().manual_seed(0)
    dense: dict[str, torch.Tensor] = {}
    for stack in arch.stacks:
        for i in range(arch.num_blocks(stack)):
            with torch.device("meta"):
                block = arch.block(stack, i, MemoryBank([None] * c.num_experts) if arch.is_sparse(stack, i) else None)
            for name, t in block.state_dict().items():
                full = arch.block_prefix(stack, i) + name
                std = 1.0 if ("router" in name or "relative" in name) else t.shape[-1] ** -0.5
                dense[full] = torch.ones(t.shape) if "layer_norm" in name else torch.randn(t.shape, generator=gen) * std
    for name in arch.head_tensors():
        dense[name] = torch.ones(c.d_model) if "norm" in name else torch.randn(c.vocab_size, c.d_model, generator=gen)
    print(f"fitting a dictionary for P(zero) = {args.p_zero}", file=sys.stderr)
    book = Codebook.from_sequences(fit_dictionary(symbol_probs(args.p_zero), DictionarySpec(args.dictionary_size)), 14)
    spec = QuantSpec("ternary", None)
    packed_banks, dense_banks, packed_bytes, dense_bytes = {}, {}, 0, 0
    for stack, i in arch.sparse_blocks():
        print(f"coding the experts of {stack}.{i}", file=sys.stderr)
        packed_make, dense_make = [], []
        for _ in range(c.num_experts):
            parts = {}
            for m, (rows, cols) in arch.expert.shapes.items():
                codes = ternary(rows, cols, args.p_zero, gen)
                words, offsets = encode_matrix(codes, book)
                lo, hi = (-torch.rand(rows, 1, generator=gen) * 3 * cols ** -0.5,
                          torch.rand(rows, 1, generator=gen) * 3 * cols ** -0.5)
                matrix = DictionaryMatrix({"words": words, "offsets": offsets, "lo": lo, "hi": hi}, book, rows, cols,
                                          spec, f"{stack}.{i}.{m}")
                weight = torch.where(codes == 0, lo, torch.where(codes == 2, hi, torch.zeros(())))
                parts[m] = (matrix, weight.to(args.dtype))
                packed_bytes += words.numel() * 2 + offsets.numel() * 4 + 8 * rows
                dense_bytes += weight.numel() * dtype_bytes(args.dtype)
            packed_make.append(lambda d, t, p=parts: arch.make_expert({m: PackedLinear(v[0]) for m, v in p.items()}))
            dense_make.append(lambda d, t, p=parts: arch.make_expert({m: v[1].to(d, t) for m, v in p.items()}))
        packed_banks[(stack, i)], dense_banks[(stack, i)] = MemoryBank(packed_make), MemoryBank(dense_make)
    return MemoryWeights(arch, dense, packed_banks), MemoryWeights(arch, dense, dense_banks), packed_bytes, dense_bytes


@torch.no_grad()
def step_ms(model: ResidentModel, batch: int, args: argparse.Namespace) -> float:
    """Median ms of one cached decoder step (all decoder blocks, head, argmax) for `batch` sequences."""
    device = model.first_device
    prompt = torch.randint(2, args.vocab, (batch, args.prompt_tokens), generator=torch.Generator().manual_seed(batch))
    spec = model.weights.arch.generation()
    memory = model.run_stack(spec.prompt_stack, model.embed(spec.prompt_stack, prompt),
                             model.stacks[spec.prompt_stack].new_cache(batch, args.prompt_tokens))
    cache = model.stacks[spec.output_stack].new_cache(batch, args.warmup + args.steps, memory=memory)
    last = torch.zeros(batch, 1, dtype=torch.long)
    times = []
    for step in range(args.warmup + args.steps):
        sync(device)
        start = time.perf_counter()
        hidden = model.run_stack(spec.output_stack, model.embed(spec.output_stack, last), cache)
        last = model.logits(hidden[:, -1]).argmax(-1, keepdim=True).cpu()
        sync(device)
        if step >= args.warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


@torch.no_grad()
def block_ms(model: ResidentModel, args: argparse.Namespace) -> float:
    """Median ms of the first sparse decoder block's feed-forward on one token."""
    placed = next(p for p in model.blocks["decoder"] if p.block.is_sparse)
    gen = torch.Generator().manual_seed(1)
    times = []
    for step in range(args.warmup + args.steps):
        x = torch.randn(1, 1, model.weights.arch.d_model, generator=gen).to(model.first_device, model.dtype)
        sync(model.first_device)
        start = time.perf_counter()
        ResidentModel._feed_forward(placed, x)
        sync(model.first_device)
        if step >= args.warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure(weights: MemoryWeights, args: argparse.Namespace,
            batches: list[int]) -> tuple[dict[int, float], float, float]:
    """(ms per token by batch, sparse block ms, peak GPU MB or nan) of one model."""
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = load_resident(weights, None, [device], args.dtype)
    per_token = {b: step_ms(model, b, args) for b in batches}
    block = block_ms(model, args)
    peak = torch.cuda.max_memory_allocated(device) / 1e6 if device.type == "cuda" else float("nan")
    return per_token, block, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--c2048", action="store_true", help="switch-c2048's shapes instead of switch-base-128's")
    parser.add_argument("--d-model", dest="d_model", type=int, default=None)
    parser.add_argument("--d-ff", dest="d_ff", type=int, default=None)
    parser.add_argument("--experts", type=int, default=None)
    parser.add_argument("--blocks", type=int, default=4, help="Blocks per stack (sparse every other; c2048: all)")
    parser.add_argument("--vocab", type=int, default=32128)
    parser.add_argument("--p-zero", type=float, default=0.9)
    parser.add_argument("--dictionary-size", type=int, default=1 << 16, help="Codewords (65536: what qmoe pack writes)")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="Timed decoder steps per batch size")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                        help="Compute dtype (default: bfloat16 on GPU, float32 on CPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None, help="Also write the markdown table here.")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    batches = [int(b) for b in args.batches.split(",")]
    packed, dense, packed_bytes, dense_bytes = make_models(args)
    c = packed.arch.config
    print("timing the packed model", file=sys.stderr)
    p_tok, p_block, p_peak = measure(packed, args, batches)
    print("timing the dense model", file=sys.stderr)
    d_tok, d_block, d_peak = measure(dense, args, batches)
    where = (torch.cuda.get_device_name(args.device) if args.device.startswith("cuda")
             else f"CPU, {torch.get_num_threads()} threads")
    name = str(args.dtype).removeprefix("torch.")
    lines = [f"# generation, packed vs {name} experts on {where}: d_model {c.d_model}, d_ff {c.d_ff}, "
             f"{c.num_experts} experts, {args.blocks}+{args.blocks} blocks, P(zero) {args.p_zero}, "
             f"median of {args.steps} steps", "",
             f"| what | batch | {name} ms | packed ms | packed / {name} | expert MB {name} | expert MB packed "
             f"| peak GPU MB {name} | peak GPU MB packed |", "|---|---|---|---|---|---|---|---|---|"]
    peaks = " | ".join("-" if peak != peak else f"{peak:.0f}" for peak in (d_peak, p_peak))  # nan: no GPU
    memory = f"{dense_bytes / 1e6:.1f} | {packed_bytes / 1e6:.1f} | {peaks}"
    for b in batches:
        lines.append(f"| decoder step (per token) | {b} | {d_tok[b]:.2f} | {p_tok[b]:.2f} | {p_tok[b] / d_tok[b]:.2f} "
                     f"| {memory} |")
    lines.append(f"| one sparse block | 1 | {d_block:.3f} | {p_block:.3f} | {p_block / d_block:.2f} | {memory} |")
    emit_table(lines, args.out)


if __name__ == "__main__":
    main()
