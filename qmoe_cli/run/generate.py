"""`qmoe generate`: T5-style span filling with a resident model and a decoding cache.

A prompt marks the spans to fill with sentinels in order (`The <extra_id_0> walks in
<extra_id_1> park`); the model answers `<extra_id_0> dog <extra_id_1> the <extra_id_2>`. Prompts
run in batches: the prompt stack (encoder) once over the padded batch, then the output stack
(decoder) one token per step with its cache (self-attention keys/values per block, the prompt's
cross-attention keys/values computed once). A sequence stops at EOS, at the sentinel after its
prompt's last one (every span closed), or after `max_new_tokens`; the batch stops when all have.
Greedy decoding takes the most likely token; sampling draws from the temperature-scaled
distribution cut to its top-p nucleus with a seeded CPU generator (same tokens on any device
given the same logits). The family-specific parts come from the `Architecture`
(`generation()`, `incremental_stack`).

Memory: the model as `ResidentModel` holds it, plus per batch the decoding caches
(`Architecture.cache_bytes`) and one step's activations.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import torch

from ..arch import Architecture
from ..data.tokenizer import Tokenizer, sentinel_token
from ..errors import QmoeError
from .resident import ResidentModel

_SENTINEL_RE = re.compile(r"<extra_id_(\d+)>")


@dataclass(frozen=True)
class GenerateConfig:
    """How to decode."""

    max_new_tokens: int = 32
    temperature: float | None = None  # None: greedy
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 16

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature is not None and not self.temperature > 0:
            raise ValueError(f"--temperature must be > 0, got {self.temperature} (use --greedy for argmax)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")

    @property
    def greedy(self) -> bool:
        return self.temperature is None


@dataclass(frozen=True)
class Prompt:
    """A prompt's text, its token ids (without the family's suffix) and how many spans it marks."""

    text: str
    ids: tuple[int, ...]
    sentinels: int


@dataclass(frozen=True)
class Output:
    prompt: str
    text: str  # the generated tokens decoded, sentinels visible (EOS and padding left out)
    spans: list[str | None]  # per prompt sentinel, the filled span (None: the model never opened it)
    tokens: list[int]  # generated ids, the stopping token included

    def filled(self) -> str:
        """The prompt with each sentinel replaced by its span (kept where the span is missing)."""
        return _SENTINEL_RE.sub(lambda m: _fill(self.spans, int(m.group(1)), m.group(0)), self.prompt)


def _fill(spans: list[str | None], index: int, sentinel: str) -> str:
    span = spans[index] if index < len(spans) else None
    return sentinel if span is None else span


def parse_prompt(text: str, tokenizer: Tokenizer, where: str, window: int, vocab_size: int,
                 suffix: int) -> Prompt:
    """Tokenize a span-filling prompt; sentinels are split out first, so both tokenizer kinds
    (SentencePiece does not know `<extra_id_N>` as text) give the sentinel ids.

    QmoeError naming `where` for: no text, no sentinel, sentinels not numbered 0, 1, 2, ... in
    order, more sentinels than the tokenizer has, or more tokens than the model's window.
    """
    if not text.strip():
        raise QmoeError(f"{where}: the prompt is empty")
    ids: list[int] = []
    numbers: list[int] = []
    position = 0
    for found in _SENTINEL_RE.finditer(text):
        ids.extend(tokenizer.encode(text[position:found.start()]))
        number = int(found.group(1))
        if number != len(numbers):
            raise QmoeError(f"{where}: sentinel {found.group(0)} where {sentinel_token(len(numbers))} was expected; "
                            "number the spans <extra_id_0>, <extra_id_1>, ... in order")
        if number >= len(tokenizer.sentinel_ids):
            raise QmoeError(f"{where}: {found.group(0)} is beyond the tokenizer's {len(tokenizer.sentinel_ids)} "
                            "sentinels")
        numbers.append(number)
        ids.append(tokenizer.sentinel_ids[number])
        position = found.end()
    ids.extend(tokenizer.encode(text[position:]))
    if not numbers:
        raise QmoeError(f"{where}: no sentinel; mark the spans to fill with <extra_id_0>, <extra_id_1>, ... "
                        f"(e.g. 'The <extra_id_0> walks in <extra_id_1> park')")
    if len(ids) + suffix > window:
        raise QmoeError(f"{where}: {len(ids) + suffix} tokens, longer than the model's window of {window}")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise QmoeError(f"{where}: token id {bad[0]} is outside the model's vocabulary of {vocab_size}")
    return Prompt(text, tuple(ids), len(numbers))


def stop_tokens(arch: Architecture, sentinel_ids: Sequence[int], prompt: Prompt) -> set[int]:
    """EOS, and the sentinel that closes the prompt's last span (when the tokenizer has one)."""
    stops = {arch.generation().eos_token}
    if prompt.sentinels < len(sentinel_ids):
        stops.add(sentinel_ids[prompt.sentinels])
    return stops


@torch.no_grad()
def encode_prompts(model: ResidentModel, prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt stack over the padded batch (the family's suffix appended) -> memory [B, S, d]
    and its mask [B, S] bool (True = a real token), on the model's first device."""
    spec = model.weights.arch.generation()
    if spec.prompt_stack is None:
        raise QmoeError(f"{model.weights.arch.family}: generation without a prompt stack is not supported yet")
    rows = [list(p) + list(spec.prompt_suffix) for p in prompts]
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), spec.pad_token, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.bool)
    for b, row in enumerate(rows):
        ids[b, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[b, :len(row)] = True
    mask = mask.to(model.first_device)
    stack = model.stacks[spec.prompt_stack]
    cache = stack.new_cache(len(rows), length, key_mask=mask)
    return model.run_stack(spec.prompt_stack, model.embed(spec.prompt_stack, ids), cache), mask


@torch.no_grad()
def generate_ids(model: ResidentModel, prompts: Sequence[Sequence[int]], stops: Sequence[set[int]],
                 config: GenerateConfig, generator: torch.Generator | None = None) -> list[list[int]]:
    """Generated ids per prompt (one batch; the stopping token included). Step logits come from
    the cached decoder; `generator` (CPU) draws the samples when not greedy."""
    spec = model.weights.arch.generation()
    memory, mask = encode_prompts(model, prompts)
    batch = len(prompts)
    output = spec.output_stack
    cache = model.stacks[output].new_cache(batch, config.max_new_tokens, memory=memory, memory_mask=mask)
    last = torch.full((batch, 1), spec.start_token, dtype=torch.long)
    generated: list[list[int]] = [[] for _ in range(batch)]
    done = [False] * batch
    for _ in range(config.max_new_tokens):
        hidden = model.run_stack(output, model.embed(output, last), cache)  # [B, 1, d]
        logits = model.logits(hidden[:, -1])  # [B, vocab] fp32
        chosen = choose(logits, config, generator).tolist()
        for b, token in enumerate(chosen):
            if not done[b]:
                generated[b].append(token)
                done[b] = token in stops[b]
        if all(done):
            break
        last = torch.tensor([[spec.pad_token if done[b] else chosen[b]] for b in range(batch)], dtype=torch.long)
    model.finish()
    return generated


def choose(logits: torch.Tensor, config: GenerateConfig, generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, vocab] fp32 -> next token [B] int64 (CPU): argmax, or a top-p sample."""
    if config.greedy:
        return logits.argmax(dim=-1).cpu()
    probs = torch.softmax(logits.cpu() / config.temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is short.
    keep = (sorted_probs.cumsum(dim=-1) - sorted_probs) < config.top_p
    keep[:, 0] = True
    sorted_probs = sorted_probs * keep
    picked = torch.multinomial(sorted_probs / sorted_probs.sum(dim=-1, keepdim=True), 1, generator=generator)
    return order.gather(-1, picked)[:, 0]


def describe(tokens: Sequence[int], prompt: Prompt, tokenizer: Tokenizer, arch: Architecture) -> Output:
    """Decoded text and the spans of one prompt's generated tokens."""
    spec = arch.generation()
    sentinel_index = {s: i for i, s in enumerate(tokenizer.sentinel_ids)}
    spans: list[list[int] | None] = [None] * prompt.sentinels
    current = None
    for token in tokens:
        if token in sentinel_index:
            current = sentinel_index[token]
            if current < prompt.sentinels:
                spans[current] = []
        elif token == spec.eos_token:
            break
        elif current is not None and current < prompt.sentinels:
            spans[current].append(token)
    visible = [t for t in tokens if t not in (spec.eos_token, spec.pad_token)]
    return Output(prompt=prompt.text, text=tokenizer.decode(visible).strip(),
                  spans=[None if s is None else tokenizer.decode(s).strip() for s in spans], tokens=list(tokens))


def generate(model: ResidentModel, prompts: Sequence[Prompt], tokenizer: Tokenizer,
             config: GenerateConfig) -> list[Output]:
    """Fill the spans of every prompt, `config.batch_size` prompts at a time."""
    arch = model.weights.arch
    generator = None if config.greedy else torch.Generator().manual_seed(config.seed)
    outputs = []
    for first in range(0, len(prompts), config.batch_size):
        batch = prompts[first:first + config.batch_size]
        stops = [stop_tokens(arch, tokenizer.sentinel_ids, p) for p in batch]
        ids = generate_ids(model, [p.ids for p in batch], stops, config, generator)
        outputs.extend(describe(t, p, tokenizer, arch) for t, p in zip(ids, batch))
    return outputs
