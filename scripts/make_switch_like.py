"""Random-weight Switch Transformer checkpoints at the real layer shapes, for benchmarks and tests.

No hub is reachable from the development machines, so the stages that care about scale
(compression time and memory, bits per weight at real row widths, packing throughput) run on
checkpoints with the published shapes and random weights:

    switch-base    d_model 768,  d_ff 3072, 12 heads, every 2nd block sparse (switch-base-8 ... -256)
    switch-large   d_model 1024, d_ff 2816, 16 heads, every 2nd block sparse (switch-large-128)
    switch-c2048   d_model 2080, d_ff 6144, 32 heads, every block sparse, untied lm_head, bfloat16

with a chosen number of experts and of sparse blocks per stack, written in the Hugging Face
layout: sharded safetensors with `model.safetensors.index.json`, or legacy
`pytorch_model-0000k-of-0000n.bin` shards with `pytorch_model.bin.index.json` (what
`qmoe eval/compress --model DIR` reads), plus `calibration.jsonl`, pre-tokenized random samples
(`{"input_ids": [...], "labels": [...]}`) for `--calib` / `--data`.

THE WEIGHTS ARE RANDOM: `config.json` says so (`"qmoe_random_weights": true`) and so does the
README.md written beside it. Losses mean nothing; shapes, sparsity of the ternary codes (~85%
zeros, as the paper reports for switch-base-128) and timings do. Initialisation follows T5's
(normal, std 1/sqrt(fan-in) in the right places), except the routers, drawn at std 1 so tokens
spread over every expert (T5's init routes nearly all tokens alike; see `random_model`).

Memory: shards are planned from shapes alone (a model on the meta device), then generated and
written one at a time: peak memory is about one shard (`--shard-mb`), never the model. Each
tensor comes from its own generator seeded by (--seed, its name), so shards are reproducible
whatever the shard size. The directory appears only when complete (temporary name + rename).

    python scripts/make_switch_like.py sb128-4 --shape switch-base --experts 4 --sparse-blocks 1
    python scripts/make_switch_like.py c2048-2 --shape switch-c2048 --experts 16 --sparse-blocks 1 --format bin
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from qmoe_cli.arch.switch.config import SwitchConfig
from qmoe_cli.arch.switch.model import SwitchModel
from qmoe_cli.files import atomic_directory


@dataclass(frozen=True)
class Shape:
    """A published Switch shape; `sparse_step` 2: blocks 1, 3, ... hold experts; 1: all do."""

    d_model: int
    d_ff: int
    num_heads: int
    sparse_step: int
    tied: bool
    dtype: str  # as stored on the hub
    d_kv: int = 64
    vocab_size: int = 32128


SHAPES = {
    "switch-base": Shape(d_model=768, d_ff=3072, num_heads=12, sparse_step=2, tied=True, dtype="float32"),
    "switch-large": Shape(d_model=1024, d_ff=2816, num_heads=16, sparse_step=2, tied=True, dtype="float32"),
    "switch-c2048": Shape(d_model=2080, d_ff=6144, num_heads=32, sparse_step=1, tied=False, dtype="bfloat16"),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
README = """# RANDOM WEIGHTS — for benchmarks and tests only

Written by `scripts/make_switch_like.py` ({shape}, {experts} experts, {sparse} sparse block(s) per
stack, seed {seed}). The layer shapes are {shape}'s; every weight is random, so losses and
generations mean nothing. `config.json` carries `"qmoe_random_weights": true`.
`calibration.jsonl` holds random pre-tokenized samples for `qmoe compress --calib`.
"""


def switch_config(shape: Shape, experts: int, sparse_blocks: int) -> SwitchConfig:
    """`sparse_blocks` sparse blocks per stack (and, with step 2, as many dense ones before them)."""
    layers = sparse_blocks * shape.sparse_step
    return SwitchConfig(vocab_size=shape.vocab_size, d_model=shape.d_model, d_kv=shape.d_kv, d_ff=shape.d_ff,
                        num_heads=shape.num_heads, num_layers=layers, num_decoder_layers=layers, num_experts=experts,
                        encoder_sparse_step=shape.sparse_step, decoder_sparse_step=shape.sparse_step,
                        tie_word_embeddings=shape.tied)


def init_std(name: str, c: SwitchConfig) -> float | None:
    """T5's initial std for tensor `name` (None: ones, for layer norms); routers at std 1."""
    if "layer_norm" in name:
        return None
    if "router" in name:
        return 1.0
    if name == "shared.weight":
        return 1.0
    if name.endswith(".q.weight"):
        return (c.d_model * c.d_kv) ** -0.5
    if name.endswith(".o.weight"):
        return (c.num_heads * c.d_kv) ** -0.5
    if name.endswith(".wo.weight"):
        return c.d_ff ** -0.5
    return c.d_model ** -0.5  # k, v, wi, relative_attention_bias, an untied lm_head


def random_tensor(name: str, shape: tuple[int, ...], config: SwitchConfig, seed: int,
                  dtype: torch.dtype) -> torch.Tensor:
    """Tensor `name` [shape] in `dtype`, from a generator seeded by (seed, name)."""
    std = init_std(name, config)
    if std is None:
        return torch.ones(shape, dtype=dtype)
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.randn(shape, generator=g).mul_(std).to(dtype)


def plan_shards(config: SwitchConfig, shard_bytes: int, dtype: torch.dtype) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Tensor names and shapes in checkpoint order, cut into shards of at most `shard_bytes`
    (a larger tensor gets a shard of its own). No weights are allocated."""
    with torch.device("meta"):
        model = SwitchModel(config)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    itemsize = torch.empty((), dtype=dtype).element_size()
    for name, tensor in model.state_dict().items():
        nbytes = tensor.numel() * itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, tuple(tensor.shape)))
        size += nbytes
    return shards


def write_checkpoint(out: Path, config: SwitchConfig, shape_name: str, fmt: str, dtype: torch.dtype, seed: int,
                     shard_bytes: int, calib_samples: int, calib_tokens: int) -> dict[str, int]:
    """Write the whole directory (atomically); returns {"shards", "bytes", "parameters"}."""
    shards = plan_shards(config, shard_bytes, dtype)
    stem, suffix, index_name = (("model", "safetensors", "model.safetensors.index.json") if fmt == "safetensors"
                                else ("pytorch_model", "bin", "pytorch_model.bin.index.json"))
    weight_map: dict[str, str] = {}
    total, parameters = 0, 0
    with atomic_directory(out) as tmp:
        for k, names in enumerate(shards):
            file_name = f"{stem}-{k + 1:05d}-of-{len(shards):05d}.{suffix}"
            tensors = {name: random_tensor(name, shape, config, seed, dtype) for name, shape in names}
            if fmt == "safetensors":
                save_file(tensors, str(tmp / file_name), metadata={"format": "pt"})
            else:  # the legacy format is a pickle; readers load it with weights_only=True
                torch.save(tensors, tmp / file_name)
            weight_map.update({name: file_name for name in tensors})
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            parameters += sum(t.numel() for t in tensors.values())
            del tensors
        (tmp / index_name).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=2) + "\n")
        hf_config = {**config.to_dict(), "model_type": "switch_transformers",
                     "architectures": ["SwitchTransformersForConditionalGeneration"], "is_encoder_decoder": True,
                     "dense_act_fn": "relu", "router_dtype": "float32", "expert_capacity": 1 << 20,
                     "dropout_rate": 0.0, "torch_dtype": str(dtype).removeprefix("torch."),
                     "qmoe_random_weights": True, "qmoe_shape": shape_name}
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        (tmp / "README.md").write_text(README.format(shape=shape_name, experts=config.num_experts,
                                                     sparse=len(config.sparse_blocks()) // 2, seed=seed))
        write_calibration(tmp / "calibration.jsonl", config.vocab_size, calib_samples, calib_tokens, seed)
    return {"shards": len(shards), "bytes": total, "parameters": parameters}


def write_calibration(path: Path, vocab_size: int, samples: int, tokens: int, seed: int) -> None:
    """`samples` pre-tokenized samples: `tokens` random input ids and tokens // 4 labels, each
    ending in EOS (id 1); ids from 3 up, clear of pad (0), EOS (1) and unk (2)."""
    g = torch.Generator().manual_seed(seed + 1)
    labels = max(1, tokens // 4)
    with open(path, "w") as handle:
        for _ in range(samples):
            row = {"input_ids": torch.randint(3, vocab_size, (tokens - 1,), generator=g).tolist() + [1],
                   "labels": torch.randint(3, vocab_size, (labels - 1,), generator=g).tolist() + [1]}
            handle.write(json.dumps(row) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="output directory (must not exist)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="switch-base")
    parser.add_argument("--experts", type=int, default=8, help="experts per sparse block")
    parser.add_argument("--sparse-blocks", type=int, default=1, help="sparse blocks per stack (encoder, decoder)")
    parser.add_argument("--format", choices=("safetensors", "bin"), default="safetensors")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: the hub checkpoint's")
    parser.add_argument("--shard-mb", type=float, default=2000.0, help="shard size limit in MB")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--calib-tokens", type=int, default=128, help="input tokens per calibration sample")
    parser.add_argument("--d-model", type=int, default=None, help="override (small test models only)")
    parser.add_argument("--d-ff", type=int, default=None, help="override (small test models only)")
    parser.add_argument("--vocab-size", type=int, default=None, help="override (small test models only)")
    args = parser.parse_args(argv)
    for flag in ("experts", "sparse_blocks", "calib_samples", "calib_tokens", "d_model", "d_ff", "vocab_size"):
        value = getattr(args, flag)
        if value is not None and value < (2 if flag == "calib_tokens" else 1):
            parser.error(f"--{flag.replace('_', '-')} must be a positive integer, got {value}")
    if args.shard_mb <= 0:
        parser.error(f"--shard-mb must be positive, got {args.shard_mb}")
    if args.out.exists():
        parser.error(f"{args.out}: already exists; choose another directory or remove it")
    shape = SHAPES[args.shape]
    overrides = {k: v for k, v in (("d_model", args.d_model), ("d_ff", args.d_ff),
                                   ("vocab_size", args.vocab_size)) if v is not None}
    shape = replace(shape, **overrides)
    if shape.vocab_size <= 3:
        parser.error(f"--vocab-size must exceed 3 (ids 0-2 are special), got {shape.vocab_size}")
    config = switch_config(shape, args.experts, args.sparse_blocks)
    dtype = DTYPES[args.dtype or shape.dtype]
    done = write_checkpoint(args.out, config, args.shape, args.format, dtype, args.seed,
                            math.ceil(args.shard_mb * 1e6), args.calib_samples, args.calib_tokens)
    print(f"wrote {args.out}: RANDOM-weight {args.shape} ({config.d_model}x{config.d_ff}, {config.num_experts} "
          f"experts, {len(config.sparse_blocks())} sparse blocks), {done['parameters'] / 1e6:.1f} M parameters "
          f"in {done['shards']} {args.format} shard(s), {done['bytes'] / 1e6:.1f} MB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
