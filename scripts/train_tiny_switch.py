#!/usr/bin/env python3
"""Train the tiny Switch Transformer that ships in the package as the `tiny-switch` preset.

Why: compressing a randomly initialised model costs no loss worth showing; a model that has
learned the synthetic corpus (scripts/corpus.py) does, and it runs on any machine without a
download. This script is how `qmoe_cli/assets/tiny-switch/` was made:

    python scripts/train_tiny_switch.py --out qmoe_cli/assets/tiny-switch --threads 2

Training: T5 span corruption (the objective `qmoe eval` measures) on documents of the corpus'
"train" stream, generated on the fly; AdamW with linear warmup and cosine decay; cross-entropy
plus the Switch load-balancing loss and the router z-loss, read from forward hooks on the
routers. Everything is fp32 on the CPU with a fixed thread count, deterministic algorithms and
seeded randomness, so the same flags give the same loss curve.

Output (one directory, moved into place when complete): `config.json` + `model.safetensors`
(`save_pretrained`), `tokenizer.json`, `validation.jsonl` and `calibration.jsonl` (the preset's
default data), `training.json` (command, settings, final losses, unigram entropy, routing
histograms) and `train_log.jsonl` (the loss curve).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Before torch loads libgomp: OpenMP threads spin while waiting for each other, and on a CPU
# shared with other jobs a spinning thread takes the core its partner needs; measured here,
# two threads ran 3-4x slower than with passive waiting.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# scripts/ is on sys.path when a script runs: its siblings import by name
from corpus import CorpusSpec, generate_documents, save_tokenizer, unigram_entropy_bits, write_jsonl  # noqa: E402
from torch import nn  # noqa: E402

from qmoe_cli.arch.switch.config import SwitchConfig  # noqa: E402
from qmoe_cli.arch.switch.layers import Attention, ExpertFFN, RMSNorm, Router  # noqa: E402
from qmoe_cli.arch.switch.model import SwitchModel, save_pretrained, shift_right  # noqa: E402
from qmoe_cli.data.datasets import DataSpec, Sample, SpanCorruption, corrupted_lengths, load_samples, span_corrupt  # noqa: E402
from qmoe_cli.data.tokenizer import Tokenizer, load_tokenizer  # noqa: E402
from qmoe_cli.formats.open import open_model  # noqa: E402
from qmoe_cli.run.evaluate import evaluate  # noqa: E402
from qmoe_cli.run.stream import RunConfig  # noqa: E402

VOCAB_SIZE = 955  # the corpus tokenizer: 3 specials, the words, 100 sentinels
VALIDATION_DOCS = 256  # validation.jsonl, the preset's default eval data
CALIBRATION_DOCS = 512  # calibration.jsonl, the preset's default calibration data
EVAL_SAMPLES = 128  # what `qmoe eval` reads by default, so both report the same loss
MIN_EXPERT_SHARE = 0.02  # acceptance: every expert gets at least this fraction of tokens
# Acceptance: validation loss below this fraction of the labels' unigram entropy (1.0 is what a
# model that learned nothing beyond word frequencies reaches); tests/test_tiny_switch.py agrees.
MAX_UNIGRAM_FRACTION = 0.6
VAL_SAMPLES_DURING = 64  # validation samples scored every val_every steps (cheap, whole model)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the trained weights (recorded in training.json)."""

    seed: int = 0  # model init and span corruption; the corpus itself is CorpusSpec()
    steps: int = 800  # ~10 min with 2 threads on a shared 2-core machine
    batch_size: int = 32  # documents per step
    lr: float = 3e-3  # peak AdamW learning rate
    warmup: int = 100  # linear warmup steps, then cosine decay to lr * final_lr_ratio
    final_lr_ratio: float = 0.05
    weight_decay: float = 0.01  # on matrices only (not norms, embedding, position bias)
    clip: float = 1.0  # global gradient-norm clip
    aux_coef: float = 0.01  # Switch load-balancing loss (Fedus et al. 2021 use 0.01)
    z_coef: float = 1e-3  # router z-loss (ST-MoE): keeps router logits small
    threads: int = 2  # torch intra-op threads; part of the recipe (sums split differently)
    window: int = 256  # longest input or label sequence; documents stay under ~230 tokens
    pool_batches: int = 16  # batches drawn at once and grouped by length (less padding)
    d_model: int = 128
    d_ff: int = 112  # with d_model 128: 1.96M parameters, 7.5 MiB in fp32 (budget 8)
    num_experts: int = 8
    log_every: int = 25
    val_every: int = 200  # steps between validation losses on VAL_SAMPLES_DURING

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "threads", "window", "pool_batches", "d_model", "d_ff",
                     "num_experts", "log_every", "val_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be an integer >= 1, got {value!r}")
        if self.warmup < 0 or self.seed < 0:
            raise ValueError(f"TrainConfig.warmup and seed must be >= 0, got {self.warmup}, {self.seed}")
        for name in ("lr", "final_lr_ratio", "clip"):
            if not getattr(self, name) > 0:
                raise ValueError(f"TrainConfig.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("weight_decay", "aux_coef", "z_coef"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)!r}")

    def model_config(self) -> SwitchConfig:
        """4 + 4 blocks, 4 heads of 32, experts in every other block (blocks 1 and 3)."""
        return SwitchConfig(vocab_size=VOCAB_SIZE, d_model=self.d_model, d_kv=32, d_ff=self.d_ff,
                            num_heads=4, num_layers=4, num_decoder_layers=4, num_experts=self.num_experts,
                            encoder_sparse_step=2, decoder_sparse_step=2)



# ------------------------------------------------------------------------------ model and init

def init_weights(model: SwitchModel, router_scale: float = 0.1) -> None:
    """T5 / Switch initialisation (Hugging Face `_init_weights`, factor 1), in module order.

    T5 attention does not divide scores by sqrt(d_kv); q's smaller init folds that in. The
    router gets the Switch paper's reduced scale (std sqrt(0.1 / d_model)) instead of HF's 1.0:
    with std 1 its logits start ~sqrt(d_model) apart, routing is hard from step 0 and a few
    experts take everything before the balancing loss can act.
    """
    c = model.config
    nn.init.normal_(model.shared.weight, std=1.0)
    for module in model.modules():
        if isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, Attention):
            nn.init.normal_(module.q.weight, std=(c.d_model * c.d_kv) ** -0.5)
            nn.init.normal_(module.k.weight, std=c.d_model ** -0.5)
            nn.init.normal_(module.v.weight, std=c.d_model ** -0.5)
            nn.init.normal_(module.o.weight, std=(c.num_heads * c.d_kv) ** -0.5)
            if hasattr(module, "relative_attention_bias"):
                nn.init.normal_(module.relative_attention_bias.weight, std=c.d_model ** -0.5)
        elif isinstance(module, ExpertFFN):  # experts and dense feed-forwards alike
            nn.init.normal_(module.wi.weight, std=c.d_model ** -0.5)
            nn.init.normal_(module.wo.weight, std=c.d_ff ** -0.5)
        elif isinstance(module, Router):
            nn.init.normal_(module.classifier.weight, std=(router_scale / c.d_model) ** 0.5)


class RouterTap:
    """Router logits of every sparse block in the last forward pass, via forward hooks.

    `Router.forward` returns (index, prob, logits); the hook keeps the logits [N, E] fp32 of
    the flattened tokens ([B * S] encoder, [B * T] decoder, padding included), keyed by the
    router's module name, e.g. `encoder.block.1.layer.1.mlp.router`.
    """

    def __init__(self, model: nn.Module):
        self.logits: dict[str, torch.Tensor] = {}
        self._handles = [module.register_forward_hook(self._hook(name))
                         for name, module in model.named_modules() if isinstance(module, Router)]

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple, output: tuple) -> None:
            self.logits[name] = output[2]
        return hook

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def router_losses(logits: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(load-balancing loss, z-loss) of one router over real tokens; logits [n, E] fp32.

    Balance (Switch eq. 4): E * sum_e f_e * P_e with f_e the fraction of tokens sent to e and
    P_e the mean router probability of e; 1.0 when uniform. z-loss: mean logsumexp^2.
    """
    probs = torch.softmax(logits, dim=-1)
    fraction = F.one_hot(probs.argmax(dim=-1), num_experts).float().mean(dim=0)
    balance = num_experts * (fraction * probs.mean(dim=0)).sum()
    z = torch.logsumexp(logits, dim=-1).pow(2).mean()
    return balance, z


# ----------------------------------------------------------------------------------- data

@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # [B, S] int64, pad 0
    attention_mask: torch.Tensor  # [B, S] int64, 1 = token
    decoder_input_ids: torch.Tensor  # [B, T] int64: start (0) then labels[:-1]
    labels: torch.Tensor  # [B, T] int64, -100 on padding


def collate(samples: Sequence[Sample]) -> Batch:
    width = max(len(s.input_ids) for s in samples)
    length = max(len(s.labels) for s in samples)
    input_ids = torch.zeros(len(samples), width, dtype=torch.long)
    mask = torch.zeros(len(samples), width, dtype=torch.long)
    labels = torch.full((len(samples), length), -100, dtype=torch.long)
    for i, s in enumerate(samples):
        input_ids[i, :len(s.input_ids)] = torch.tensor(s.input_ids)
        mask[i, :len(s.input_ids)] = 1
        labels[i, :len(s.labels)] = torch.tensor(s.labels)
    return Batch(input_ids, mask, shift_right(labels, 0, 0), labels)


def corrupted_documents(stream: str, tokenizer: Tokenizer, rng: np.random.Generator,
                        window: int, start: int = 0) -> Iterator[Sample]:
    """Span-corrupted documents start, start+1, ... of `stream`, skipping any over the window."""
    corruption = SpanCorruption()
    index = start
    while True:
        for text in generate_documents(stream, 1024, start=index):
            tokens = tokenizer.encode(text)
            if len(tokens) >= 2 and max(corrupted_lengths(len(tokens), corruption)) <= window:
                yield span_corrupt(tokens, tokenizer, corruption, rng)
        index += 1024


def train_batches(tokenizer: Tokenizer, cfg: TrainConfig) -> Iterator[Batch]:
    """Batches of the train stream, endless and deterministic in cfg.seed.

    Draws pool_batches batches of documents at once, sorts them by input length and shuffles
    the resulting batches: padding then costs a few percent of compute instead of a third.
    """
    rng = np.random.default_rng(cfg.seed)
    documents = corrupted_documents("train", tokenizer, rng, cfg.window)
    while True:
        pool = [next(documents) for _ in range(cfg.batch_size * cfg.pool_batches)]
        pool.sort(key=lambda s: len(s.input_ids))
        batches = [pool[i:i + cfg.batch_size] for i in range(0, len(pool), cfg.batch_size)]
        for b in rng.permutation(len(batches)):
            yield collate(batches[b])


# ------------------------------------------------------------------------------- training

def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over cfg.warmup steps, then cosine from lr to lr * final_lr_ratio."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    floor = cfg.lr * cfg.final_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters()
             if p.ndim == 2 and n != "shared.weight" and "relative_attention_bias" not in n]
    return adamw(model, decay, cfg)


def adamw(model: nn.Module, decay: list[nn.Parameter], cfg: Any) -> torch.optim.Optimizer:
    """AdamW with weight decay on `decay` only (the tiny decoder's trainer uses it too)."""
    rest = [p for p in model.parameters() if not any(p is q for q in decay)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8)


def step_losses(model: SwitchModel, tap: RouterTap, batch: Batch) -> dict[str, torch.Tensor]:
    """Cross-entropy (mean over label tokens), balance and z-loss (means over sparse blocks)."""
    logits = model(batch.input_ids, batch.decoder_input_ids, batch.attention_mask)  # [B, T, V]
    ce = F.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(), ignore_index=-100)
    real = {"encoder": batch.attention_mask.flatten().bool(), "decoder": (batch.labels != -100).flatten()}
    balance, z = [], []
    for name, router_logits in tap.logits.items():
        b, zl = router_losses(router_logits[real[name.split(".")[0]]], model.config.num_experts)
        balance.append(b)
        z.append(zl)
    return {"ce": ce, "balance": torch.stack(balance).mean(), "z": torch.stack(z).mean()}


def train(model: SwitchModel, tokenizer: Tokenizer, val: Sequence[Sample], cfg: TrainConfig,
          log: list[dict]) -> None:
    """The optimisation loop (`optimise`) with the router logits tapped for the auxiliary losses."""
    tap = RouterTap(model)
    optimise(model, make_optimizer(model, cfg), train_batches(tokenizer, cfg), lambda b: step_losses(model, tap, b),
             lambda: whole_model_loss(model, val), cfg, log)
    tap.close()


def optimise(model: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterator[Any],
             losses_of: Callable[[Any], dict[str, torch.Tensor]], validate: Callable[[], float], cfg: Any,
             log: list[dict]) -> None:
    """cfg.steps steps of `optimizer` on `losses_of(batch)` ("ce", "balance", "z"; the total weights
    the last two by cfg.aux_coef and cfg.z_coef) with the warmup-cosine schedule (`lr_at`) and
    gradient clipping; appends one record per log_every steps, with `validate()` every val_every
    steps, to log. Both tiny trainers run this loop."""
    sums = {"ce": 0.0, "balance": 0.0, "z": 0.0}
    start = time.perf_counter()
    for step in range(cfg.steps):
        model.train()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        losses = losses_of(next(batches))
        total = losses["ce"] + cfg.aux_coef * losses["balance"] + cfg.z_coef * losses["z"]
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        optimizer.step()
        for key in sums:
            sums[key] += losses[key].item()
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            n = cfg.log_every if done % cfg.log_every == 0 else done % cfg.log_every
            record = {"step": done, "loss": sums["ce"] / n, "balance": sums["balance"] / n,
                      "z": sums["z"] / n, "lr": lr_at(step, cfg), "grad_norm": grad_norm.item(),
                      "elapsed_s": round(time.perf_counter() - start, 1)}
            if done % cfg.val_every == 0 or done == cfg.steps:
                record["val_loss"] = validate()
            log.append(record)
            print(json.dumps(record), file=sys.stderr, flush=True)
            sums = dict.fromkeys(sums, 0.0)


@torch.no_grad()
def whole_model_loss(model: SwitchModel, samples: Sequence[Sample], batch_size: int = 32) -> float:
    """Mean cross-entropy per label token (nats) of the in-memory model over samples."""
    model.eval()
    total, tokens = 0.0, 0
    for first in range(0, len(samples), batch_size):
        batch = collate(samples[first:first + batch_size])
        logits = model(batch.input_ids, batch.decoder_input_ids, batch.attention_mask)
        total += F.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(), ignore_index=-100,
                                 reduction="sum").item()
        tokens += int((batch.labels != -100).sum())
    return total / tokens


@torch.no_grad()
def routing_histograms(model: SwitchModel, samples: Sequence[Sample], batch_size: int = 32) -> dict[str, list[float]]:
    """Per sparse block, the fraction of real (non-padding) tokens routed to each expert."""
    model.eval()
    tap = RouterTap(model)
    counts: dict[str, torch.Tensor] = {}
    for first in range(0, len(samples), batch_size):
        batch = collate(samples[first:first + batch_size])
        model(batch.input_ids, batch.decoder_input_ids, batch.attention_mask)
        real = {"encoder": batch.attention_mask.flatten().bool(), "decoder": (batch.labels != -100).flatten()}
        for name, logits in tap.logits.items():
            chosen = logits[real[name.split(".")[0]]].argmax(dim=-1)
            counts[name] = counts.get(name, 0) + torch.bincount(chosen, minlength=model.config.num_experts)
    tap.close()
    return {name.removesuffix(".mlp.router"): (c / c.sum()).tolist() for name, c in counts.items()}


# ---------------------------------------------------------------------------- finalize

def streamed_validation(directory: Path, window: int) -> tuple[float, int, list[Sample]]:
    """Loss exactly as `qmoe eval --model DIR --device cpu` computes it: (nats, tokens, samples)."""
    opened = open_model(str(directory))
    tokenizer = load_tokenizer(directory)
    spec = DataSpec(source=str(directory / "validation.jsonl"), split="validation",
                    num_samples=EVAL_SAMPLES, seed=0, window=window)
    data = load_samples(spec, tokenizer, opened.weights.arch.config.vocab_size)
    run = RunConfig(device=torch.device("cpu"), dtype=torch.float32, progress=False)
    report = evaluate(opened.weights, [data], run)
    opened.weights.close()
    return report.overall.loss, report.overall.tokens, list(data.samples)


def finalize(model: SwitchModel, cfg: TrainConfig, out: Path, log: list[dict], wall_s: float) -> dict:
    """Write the model directory (staged beside `out`, then moved) and return training.json."""
    staging = out.with_name(f".{out.name}.staging")
    if staging.exists():
        shutil.rmtree(staging)
    save_pretrained(model, staging)
    # safetensors writes 0600; the file ships in the package and every user must read it.
    (staging / "model.safetensors").chmod(0o644)
    save_tokenizer(staging)
    write_jsonl(staging / "validation.jsonl", "validation", VALIDATION_DOCS)
    write_jsonl(staging / "calibration.jsonl", "calibration", CALIBRATION_DOCS)

    loss, tokens, samples = streamed_validation(staging, cfg.window)
    tokenizer = load_tokenizer(staging)
    all_val = list(load_samples(DataSpec(source=str(staging / "validation.jsonl"), seed=0, window=cfg.window),
                                tokenizer, VOCAB_SIZE).samples)
    routing = routing_histograms(model, all_val)
    label_entropy = unigram_entropy_bits(t for s in samples for t in s.labels)
    text_entropy = unigram_entropy_bits(t for text in generate_documents("validation", VALIDATION_DOCS)
                                        for t in tokenizer.encode(text))
    min_share = min(min(h) for h in routing.values())
    report = {
        **report_header(model, cfg, log, wall_s),
        "validation": {
            "data": f"validation.jsonl, first {len(samples)} samples, span corruption seed 0",
            "loss_nats": loss, "loss_bits": loss / math.log(2), "label_tokens": tokens,
            # What a context-free model could reach on the same label tokens; the fair baseline.
            "unigram_entropy_bits": label_entropy,
            "unigram_entropy_text_bits": text_entropy,  # over the plain documents' tokens
        },
        "routing": {"data": f"validation.jsonl, all {len(all_val)} samples", "fraction_per_expert": routing},
        "acceptance": acceptance(loss, label_entropy, min_share),
    }
    return publish(staging, out, report, log)


def acceptance(loss: float, label_entropy: float, min_share: float) -> dict:
    """training.json's verdict: the loss (nats) well under the unigram entropy (bits), every expert used."""
    return {"loss_fraction_of_unigram": loss / math.log(2) / label_entropy,
            "loss_ok": loss / math.log(2) < MAX_UNIGRAM_FRACTION * label_entropy,
            "min_expert_share": min_share, "every_expert_share_ok": min_share >= MIN_EXPERT_SHARE}


def publish(staging: Path, out: Path, report: dict, log: list[dict]) -> dict:
    """Write training.json and train_log.jsonl into `staging`, then move it to `out` (replaced)."""
    (staging / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    with open(staging / "train_log.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in log)
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)
    return report


def report_header(model: nn.Module, cfg: Any, log: list[dict], wall_s: float) -> dict:
    """What training.json starts with, for both tiny trainers: how to rerun it and what it made."""
    return {
        "command": shlex.join(["python", *sys.argv]),
        "train_config": dataclasses.asdict(cfg),
        "model_config": cfg.model_config().to_dict(),
        "corpus": CorpusSpec().to_dict(),
        "torch": torch.__version__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "wall_s": round(wall_s, 1),
        "final_train_loss": log[-1]["loss"],
    }


def print_summary(report: dict) -> None:
    v = report["validation"]
    print(f"validation loss {v['loss_nats']:.4f} nats = {v['loss_bits']:.3f} bits/token "
          f"({v['label_tokens']} label tokens); unigram entropy {v['unigram_entropy_bits']:.3f} bits/token "
          f"(labels), {v['unigram_entropy_text_bits']:.3f} (text)")
    for name, shares in report["routing"]["fraction_per_expert"].items():
        print(f"  {name:<22} " + " ".join(f"{100 * s:5.1f}%" for s in shares))
    print(f"wall {report['wall_s']} s, {report['parameters']} parameters; acceptance {report['acceptance']}")


def parse_args(argv: Sequence[str] | None = None, config: type = TrainConfig,
               doc: str | None = __doc__) -> tuple[Any, Path, bool]:
    """(a `config` from one flag per field, --out, --no-save); the tiny decoder's trainer uses it too."""
    defaults = config()
    parser = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output model directory (replaced)")
    parser.add_argument("--no-save", action="store_true", help="train and log only (smoke runs)")
    for f in dataclasses.fields(config):
        parser.add_argument("--" + f.name.replace("_", "-"), type=type(getattr(defaults, f.name)),
                            default=getattr(defaults, f.name), metavar=f.name.upper())
    args = parser.parse_args(argv)
    cfg = config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config)})
    return cfg, args.out, args.no_save


def main(argv: Sequence[str] | None = None) -> int:
    cfg, out, no_save = parse_args(argv)
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(cfg.seed)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        save_tokenizer(tmp)
        tokenizer = load_tokenizer(Path(tmp))
    if tokenizer.vocab_size != VOCAB_SIZE:
        raise RuntimeError(f"the corpus tokenizer has {tokenizer.vocab_size} ids, this script expects {VOCAB_SIZE}")
    val_docs = corrupted_documents("validation", tokenizer, np.random.default_rng(0), cfg.window)
    val = [next(val_docs) for _ in range(VAL_SAMPLES_DURING)]
    model = SwitchModel(cfg.model_config())
    init_weights(model)
    log: list[dict] = []
    train(model, tokenizer, val, cfg, log)
    if no_save:
        return 0
    report = finalize(model, cfg, out, log, time.perf_counter() - started)
    print_summary(report)
    ok = report["acceptance"]["loss_ok"] and report["acceptance"]["every_expert_share_ok"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
