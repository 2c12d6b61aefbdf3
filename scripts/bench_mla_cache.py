"""Benchmark DeepSeek's latent attention with a decoding cache: the latent cache read in the
absorbed form (what `qmoe generate` runs) vs a cache of expanded per-head keys and values (the
form it replaced, `SelfAttention.forward` over the same attention module).

One attention module at DeepSeek-V3's widths by default (hidden 7168, 128 heads, q_lora 1536,
kv_lora 512, rope 64, nope 128, v 128) with random weights. Per cache length S: a random
normalised latent and rotated key part for S positions of `--batch` sequences fill the latent
cache; the expanded cache holds the same positions expanded through kv_b_proj, so both forms
attend to the same keys and the table's last column (largest |difference| of their outputs) is
rounding only. Timed: one decoding step (one new token per sequence at position S) and, with
--prefill T, a prefill of T tokens into an empty cache. Medians of wall-clock ms (CUDA
synchronised); a markdown table on stdout (and to --out).

    python scripts/bench_mla_cache.py --lengths 256,1024 --batch 2
    python scripts/bench_mla_cache.py --device cuda --dtype bfloat16 --lengths 1024,4096,16384 --batch 8
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import emit_table, median_ms  # noqa: E402

from qmoe_cli.arch import architecture_from_config  # noqa: E402
from qmoe_cli.arch.decoder_only.incremental import DecoderIncrementalStack, DecoderStackCache, cache_bytes  # noqa: E402
from qmoe_cli.arch.decoder_only.layers import LatentAttention, SelfAttention  # noqa: E402


def filled_caches(attention: LatentAttention, stack: DecoderIncrementalStack, batch: int,
                  length: int) -> tuple[DecoderStackCache, DecoderStackCache]:
    """(latent cache, expanded cache) holding the same `length` random positions, room for one more."""
    c = attention.config
    g = torch.Generator(device=stack.device).manual_seed(length)
    latent, expanded = (stack.new_cache(batch, length + 1) for _ in range(2))
    normed = attention.kv_a_layernorm(torch.randn(batch, length, c.kv_lora_rank, generator=g, device=stack.device,
                                                  dtype=stack.dtype))  # [B, S, rank]
    k_rot = torch.randn(batch, 1, length, c.head_dim, generator=g, device=stack.device, dtype=stack.dtype)
    latent.extend(0, torch.cat([normed[:, None], k_rot], dim=-1), None)
    kv = attention.kv_b_proj(normed).view(batch, length, c.num_heads, -1).transpose(1, 2)
    k_pass, v = kv.split([c.qk_nope_head_dim, c.v_head_dim], dim=-1)  # [B, H, S, nope], [B, H, S, v]
    expanded.extend(0, torch.cat([k_pass, k_rot.expand(-1, c.num_heads, -1, -1)], dim=-1), v)
    return latent, expanded


def attend(attention: LatentAttention, cache: DecoderStackCache, x: torch.Tensor, absorbed: bool) -> torch.Tensor:
    """x [B, t, d] at the cache's next positions -> [B, t, d]; the cache is rewound afterwards so
    every repeat does the same work."""
    first = cache.length(0)
    cos, sin, bias = cache.step(first, x.shape[1], x.device)
    extend = lambda k, v: cache.extend(0, k, v)  # noqa: E731
    out = attention(x, cos, sin, bias, extend) if absorbed else SelfAttention.forward(attention, x, cos, sin, bias,
                                                                                      extend)
    cache.blocks[0].length = first
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--heads", type=int, default=128)
    parser.add_argument("--q-lora", type=int, default=1536)
    parser.add_argument("--kv-lora", type=int, default=512)
    parser.add_argument("--rope", type=int, default=64)
    parser.add_argument("--nope", type=int, default=128)
    parser.add_argument("--v", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--lengths", default="256,1024", help="cache lengths S, comma-separated")
    parser.add_argument("--prefill", type=int, default=0, help="also time a prefill of this many tokens")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    arch = architecture_from_config({
        "model_type": "deepseek_v3", "vocab_size": 64, "hidden_size": args.hidden, "intermediate_size": 64,
        "moe_intermediate_size": 64, "num_hidden_layers": 1, "first_k_dense_replace": 1, "n_routed_experts": 8,
        "n_shared_experts": 1, "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1,
        "num_attention_heads": args.heads, "num_key_value_heads": args.heads, "q_lora_rank": args.q_lora,
        "kv_lora_rank": args.kv_lora, "qk_nope_head_dim": args.nope, "qk_rope_head_dim": args.rope,
        "v_head_dim": args.v, "max_position_embeddings": 1 << 20})
    config = arch.config
    torch.manual_seed(0)
    with torch.device(device):
        attention = LatentAttention(config).to(dtype).eval()
    stack = DecoderIncrementalStack(config, device, dtype)
    expanded_width = config.num_heads * (config.qk_nope_head_dim + config.head_dim + config.v_head_dim)
    mib = 1 << 20
    lines = [f"MLA cache, one block: {args.heads} heads, kv_lora {args.kv_lora}, rope {args.rope}, "
             f"batch {args.batch}, {args.dtype} on {device}; medians of {args.repeats} (ms)", "",
             "| call | S | latent cache MiB | expanded cache MiB | latent (absorbed) ms | expanded ms | "
             "expanded / latent time | max abs diff |", "|---|---|---|---|---|---|---|---|"]
    calls = [("step", int(s), 1) for s in args.lengths.split(",")]
    if args.prefill:
        calls.append(("prefill", 0, args.prefill))
    with torch.no_grad():
        for name, length, tokens in calls:
            x = torch.randn(args.batch, tokens, args.hidden, device=device, dtype=dtype)
            if length:
                latent, expanded = filled_caches(attention, stack, args.batch, length)
            else:
                latent, expanded = (stack.new_cache(args.batch, tokens) for _ in range(2))
            diff = (attend(attention, latent, x, True).float() - attend(attention, expanded, x, False).float()).abs()
            t_latent = median_ms(lambda: attend(attention, latent, x, True), device, args.repeats)
            t_expanded = median_ms(lambda: attend(attention, expanded, x, False), device, args.repeats)
            held = length + tokens
            latent_mib = cache_bytes(config, args.batch, held, dtype) / mib
            expanded_mib = args.batch * held * expanded_width * torch.empty((), dtype=dtype).element_size() / mib
            lines.append(f"| {name} {tokens} | {length} | {latent_mib:.1f} | {expanded_mib:.1f} | {t_latent:.2f} | "
                         f"{t_expanded:.2f} | {t_expanded / t_latent:.2f} | {diff.max().item():.2e} |")
    emit_table(lines, args.out)


if __name__ == "__main__":
    main()
