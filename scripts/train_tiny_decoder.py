#!/usr/bin/env python3
"""Train the tiny Mixtral that ships in the package as the `tiny-mixtral` preset.

Why: on a randomly initialised decoder-only checkpoint the loss says nothing, so compression
could only be judged by logits distances; a Mixtral that has learned the synthetic corpus
(scripts/corpus.py) makes "GPTQ loses less than RTN" a statement about loss, as the trained
`tiny-switch` does for Switch. This script is how `qmoe_cli/assets/tiny-mixtral/` was made:

    nice python scripts/train_tiny_decoder.py --out qmoe_cli/assets/tiny-mixtral --threads 2

Model: `transformers`' `MixtralForCausalLM` (the family's reference code, which qmoe's own
Mixtral equals), 4 blocks, hidden 128, 4 query / 2 key-value heads, 8 SwiGLU experts of 128
in every block, top-2. Tokenizer: the corpus' word-level vocabulary with `<s>` appended
(id 955), which the post-processor puts in front of every text as Mixtral's does.

Training: next-token cross-entropy on whole documents of the corpus' "train" stream (one
document per sample, `<s>` first), plus a load-balancing loss per block and a router z-loss;
AdamW with warmup and cosine decay (`train_tiny_switch.lr_at`). fp32 on the CPU with a fixed
thread count, deterministic algorithms and seeded randomness: the same flags give the same curve.

Output (staged beside `--out`, moved into place when complete): `config.json` +
`model.safetensors` (`save_pretrained`), `tokenizer.json`, `validation.jsonl` and
`calibration.jsonl` (the preset's default data), `training.json` (command, settings, final
losses, unigram entropy, routing shares) and `train_log.jsonl` (the loss curve).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

# Before torch loads libgomp (see train_tiny_switch.py): passive OpenMP waits on a shared CPU.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# scripts/ is on sys.path when a script runs: its siblings import by name
from corpus import build_tokenizer, generate_documents, unigram_entropy_bits, write_jsonl  # noqa: E402
from tokenizers import processors  # noqa: E402
from train_tiny_switch import (  # noqa: E402
    CALIBRATION_DOCS,
    EVAL_SAMPLES,
    VALIDATION_DOCS,
    acceptance,
    adamw,
    optimise,
    parse_args,
    publish,
    report_header,
)

BOS_TOKEN = "<s>"
VOCAB_SIZE = 956  # the corpus tokenizer's 955 ids, then <s>
VAL_SAMPLES_DURING = 64  # validation documents scored every val_every steps


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the trained weights (recorded in training.json)."""

    seed: int = 0  # model init and batch order; the corpus itself is CorpusSpec()
    steps: int = 1000  # ~7 min with 2 threads on a shared 2-core machine
    batch_size: int = 32  # documents per step
    lr: float = 3e-3  # peak AdamW learning rate
    warmup: int = 100  # linear warmup steps, then cosine decay to lr * final_lr_ratio
    final_lr_ratio: float = 0.05
    weight_decay: float = 0.01  # on matrices only (not norms, not the embedding)
    clip: float = 1.0  # global gradient-norm clip
    aux_coef: float = 0.05  # load-balancing loss per block; 0.02 with transformers' loss starved an expert
    z_coef: float = 1e-3  # router z-loss (ST-MoE): keeps router logits small
    threads: int = 2  # torch intra-op threads; part of the recipe (sums split differently)
    window: int = 256  # longest sample in tokens; documents stay under ~230
    pool_batches: int = 16  # batches drawn at once and grouped by length (less padding)
    hidden: int = 128
    intermediate: int = 128  # each expert's SwiGLU width
    num_experts: int = 8
    top_k: int = 2
    layers: int = 4
    log_every: int = 25
    val_every: int = 200

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "threads", "window", "pool_batches", "hidden", "intermediate",
                     "num_experts", "top_k", "layers", "log_every", "val_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be an integer >= 1, got {value!r}")
        if self.top_k > self.num_experts:
            raise ValueError(f"TrainConfig.top_k must be <= num_experts ({self.num_experts}), got {self.top_k}")
        if self.warmup < 0 or self.seed < 0:
            raise ValueError(f"TrainConfig.warmup and seed must be >= 0, got {self.warmup}, {self.seed}")
        for name in ("lr", "final_lr_ratio", "clip"):
            if not getattr(self, name) > 0:
                raise ValueError(f"TrainConfig.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("weight_decay", "aux_coef", "z_coef"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)!r}")

    def model_config(self):  # -> transformers.MixtralConfig
        import transformers

        return transformers.MixtralConfig(
            vocab_size=VOCAB_SIZE, hidden_size=self.hidden, intermediate_size=self.intermediate,
            num_hidden_layers=self.layers, num_attention_heads=4, num_key_value_heads=2, head_dim=self.hidden // 4,
            num_local_experts=self.num_experts, num_experts_per_tok=self.top_k, max_position_embeddings=self.window,
            sliding_window=None, bos_token_id=VOCAB_SIZE - 1, eos_token_id=1, pad_token_id=0,
            tie_word_embeddings=False, dtype="float32")


def build_causal_tokenizer() -> tokenizers.Tokenizer:
    """The corpus' word-level tokenizer with `<s>` appended and put before every text (no `</s>`)."""
    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens([BOS_TOKEN])
    bos = tokenizer.token_to_id(BOS_TOKEN)
    if bos != VOCAB_SIZE - 1:
        raise RuntimeError(f"<s> got id {bos}, this script expects {VOCAB_SIZE - 1}")
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B", special_tokens=[(BOS_TOKEN, bos)])
    return tokenizer


# ----------------------------------------------------------------------------------- data

def documents(stream: str, tokenizer: tokenizers.Tokenizer, window: int, start: int = 0) -> Iterator[list[int]]:
    """Token ids (`<s>` first) of documents start, start+1, ... of `stream` that fit the window."""
    index = start
    while True:
        for text in generate_documents(stream, 1024, start=index):
            ids = tokenizer.encode(text).ids
            if 2 <= len(ids) <= window:
                yield ids
        index += 1024


def collate(samples: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [B, S] int64 right-padded with 0, attention_mask [B, S] int64, 1 = token)."""
    width = max(len(s) for s in samples)
    ids = torch.zeros(len(samples), width, dtype=torch.long)
    mask = torch.zeros(len(samples), width, dtype=torch.long)
    for i, s in enumerate(samples):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return ids, mask


def train_batches(tokenizer: tokenizers.Tokenizer, cfg: TrainConfig) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of the train stream, endless and deterministic in cfg.seed, grouped by length."""
    rng = np.random.default_rng(cfg.seed)
    docs = documents("train", tokenizer, cfg.window)
    while True:
        pool = sorted((next(docs) for _ in range(cfg.batch_size * cfg.pool_batches)), key=len)
        batches = [pool[i:i + cfg.batch_size] for i in range(0, len(pool), cfg.batch_size)]
        for b in rng.permutation(len(batches)):
            yield collate(batches[b])


# ------------------------------------------------------------------------------- training

def router_losses(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(load-balancing loss, z-loss) of one block's router over real tokens; logits [n, E] fp32.

    Balance: E * sum_e f_e * P_e with f_e the share of the n * top_k routings that go to e and
    P_e the mean router probability of e; 1.0 when uniform. Per block, not transformers'
    `load_balancing_loss_func`, which sums the counts of all blocks before multiplying: one
    block's starved expert hides behind another block's busy one (a first run with it left an
    expert of block 3 with 0.0% of the routings). z-loss: mean logsumexp^2.
    """
    probs = torch.softmax(logits, dim=-1)
    chosen = probs.topk(top_k, dim=-1).indices  # [n, top_k]
    share = F.one_hot(chosen, logits.shape[-1]).float().mean(dim=(0, 1))  # [E]
    balance = logits.shape[-1] * (share * probs.mean(dim=0)).sum()
    return balance, torch.logsumexp(logits, dim=-1).pow(2).mean()


def step_losses(model, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Next-token cross-entropy (mean over predicted real tokens), balance and z-loss (means over blocks)."""
    out = model(input_ids=ids, attention_mask=mask, output_router_logits=True, use_cache=False)
    labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)  # [B, S-1]
    ce = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100)
    real = mask.flatten().bool()
    balance, z = zip(*(router_losses(r[real], model.config.num_experts_per_tok) for r in out.router_logits))
    return {"ce": ce, "balance": torch.stack(balance).mean(), "z": torch.stack(z).mean()}


def make_optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    return adamw(model, [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed_tokens" not in n], cfg)


def train(model, tokenizer: tokenizers.Tokenizer, val: Sequence[list[int]], cfg: TrainConfig, log: list[dict]) -> None:
    """The optimisation loop (`optimise`) on this script's batches and losses."""
    optimise(model, make_optimizer(model, cfg), train_batches(tokenizer, cfg), lambda b: step_losses(model, *b),
             lambda: whole_model_loss(model, val), cfg, log)


@torch.no_grad()
def whole_model_loss(model, samples: Sequence[list[int]], batch_size: int = 32) -> float:
    """Mean next-token cross-entropy (nats) of the in-memory model over samples."""
    model.eval()
    total, tokens = 0.0, 0
    for first in range(0, len(samples), batch_size):
        ids, mask = collate(samples[first:first + batch_size])
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        total += F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100,
                                 reduction="sum").item()
        tokens += int((labels != -100).sum())
    return total / tokens


@torch.no_grad()
def routing_shares(model, samples: Sequence[list[int]], batch_size: int = 32) -> dict[str, list[float]]:
    """Per block, the fraction of (token, slot) routings of real tokens that go to each expert."""
    model.eval()
    counts: dict[int, torch.Tensor] = {}
    k, experts = model.config.num_experts_per_tok, model.config.num_local_experts
    for first in range(0, len(samples), batch_size):
        ids, mask = collate(samples[first:first + batch_size])
        out = model(input_ids=ids, attention_mask=mask, output_router_logits=True, use_cache=False)
        real = mask.flatten().bool()
        for layer, logits in enumerate(out.router_logits):
            chosen = logits[real].topk(k, dim=-1).indices.flatten()
            counts[layer] = counts.get(layer, 0) + torch.bincount(chosen, minlength=experts)
    return {f"model.layers.{i}": (c / c.sum()).tolist() for i, c in counts.items()}


# ---------------------------------------------------------------------------- finalize

def qmoe_eval(directory: Path) -> dict:
    """`qmoe eval --model DIR --device cpu --json` on the directory's validation.jsonl (its default)."""
    done = subprocess.run([sys.executable, "-m", "qmoe_cli", "eval", "--model", str(directory), "--device", "cpu",
                           "--samples", str(EVAL_SAMPLES), "--json", "--threads", "2"],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"qmoe eval failed on {directory}: {done.stderr.strip()}")
    return json.loads(done.stdout)


def finalize(model, tokenizer: tokenizers.Tokenizer, cfg: TrainConfig, out: Path, log: list[dict],
             wall_s: float) -> dict:
    """Write the model directory (staged beside `out`, then moved) and return training.json."""
    staging = out.with_name(f".{out.name}.staging")
    if staging.exists():
        shutil.rmtree(staging)
    model.save_pretrained(staging)
    for path in staging.iterdir():  # safetensors writes 0600; the files ship and every user reads them
        path.chmod(0o644)
    tokenizer.save(str(staging / "tokenizer.json"), pretty=True)
    write_jsonl(staging / "validation.jsonl", "validation", VALIDATION_DOCS)
    write_jsonl(staging / "calibration.jsonl", "calibration", CALIBRATION_DOCS)

    report_eval = qmoe_eval(staging)
    loss, tokens = report_eval["loss"], report_eval["tokens"]
    val_docs = [tokenizer.encode(t).ids for t in generate_documents("validation", VALIDATION_DOCS)]
    evaluated = [d for d in val_docs if len(d) <= cfg.window][:EVAL_SAMPLES]
    label_entropy = unigram_entropy_bits(t for d in evaluated for t in d[1:])
    routing = routing_shares(model, val_docs)
    min_share = min(min(h) for h in routing.values())
    report = {
        **report_header(model, cfg, log, wall_s),
        "validation": {
            "data": f"validation.jsonl, first {report_eval['samples']} samples (qmoe eval)",
            "loss_nats": loss, "loss_bits": loss / math.log(2), "predicted_tokens": tokens,
            # What a context-free model could reach on the same predicted tokens; the fair baseline.
            "unigram_entropy_bits": label_entropy,
        },
        "routing": {"data": f"validation.jsonl, all {len(val_docs)} documents, top-{cfg.top_k} slots",
                    "fraction_per_expert": routing},
        "acceptance": acceptance(loss, label_entropy, min_share),
    }
    return publish(staging, out, report, log)


def main(argv: Sequence[str] | None = None) -> int:
    import transformers

    cfg, out, no_save = parse_args(argv, TrainConfig, __doc__)
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(cfg.seed)
    started = time.perf_counter()
    tokenizer = build_causal_tokenizer()
    val_docs = documents("validation", tokenizer, cfg.window)
    val = [next(val_docs) for _ in range(VAL_SAMPLES_DURING)]
    model = transformers.MixtralForCausalLM(cfg.model_config())
    log: list[dict] = []
    train(model, tokenizer, val, cfg, log)
    if no_save:
        return 0
    report = finalize(model, tokenizer, cfg, out, log, time.perf_counter() - started)
    v = report["validation"]
    print(f"validation loss {v['loss_nats']:.4f} nats = {v['loss_bits']:.3f} bits/token "
          f"({v['predicted_tokens']} tokens); unigram entropy {v['unigram_entropy_bits']:.3f} bits/token")
    for name, shares in report["routing"]["fraction_per_expert"].items():
        print(f"  {name:<16} " + " ".join(f"{100 * s:5.1f}%" for s in shares))
    print(f"wall {report['wall_s']} s, {report['parameters']} parameters; acceptance {report['acceptance']}")
    ok = report["acceptance"]["loss_ok"] and report["acceptance"]["every_expert_share_ok"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
