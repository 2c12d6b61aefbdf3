"""`qmoe generate`: span filling (T5) or continuation (decoder-only) with a resident model and
a decoding cache; the architecture's `generation()` says which.

Span filling: a prompt marks the spans to fill with sentinels in order (`The <extra_id_0> walks
in <extra_id_1> park`); the model answers `<extra_id_0> dog <extra_id_1> the <extra_id_2>`. The
prompt stack (encoder) runs once over the padded batch, then the output stack (decoder) one token
per step with its cache (self-attention keys/values per block, the prompt's cross-attention
keys/values computed once). A sequence stops at EOS, at the sentinel after its prompt's last
one (every span closed), or after `max_new_tokens`.

Continuation (causal LM): a prompt is plain text, tokenized as the model's tokenizer does it
(special tokens such as BOS included). The batch is left-padded; the decoder runs over the whole
padded batch once (prefill, filling the cache, in chunks of at most `PREFILL_TOKENS` tokens),
then one token per step. A sequence stops at any of the model's EOS ids or after
`max_new_tokens`.

A sequence also stops when the text of its generated tokens holds one of `stop` strings (its
text is cut before it). Either way the batch stops when every sequence has. Each step's logits
go through transformers' processors in transformers' order: the repetition penalty (every token
seen so far: a decoder-only prompt and what was generated, or, as transformers does for
encoder-decoders, the output stack's start token and what was generated; greedy too), then, when
sampling, temperature, top-k and top-p (`warp`); greedy decoding takes the most likely token,
sampling draws with a seeded CPU generator (same tokens on any device given the same logits).
The family-specific parts come from the `Architecture` (`generation()`, `incremental_stack`).

Memory: the model as `ResidentModel` holds it, plus per batch the decoding caches
(`Architecture.cache_bytes`) and one step's activations; a prefill chunk's attention scores
are at most PREFILL_TOKENS x heads x prompt length fp32 values, as much as `qmoe eval` spends
on one sample of that many tokens.
"""

from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch

from ..arch import Architecture, StackCache
from ..data.chat import ChatTemplate
from ..data.tokenizer import CausalTokenizer, Tokenizer, sentinel_token
from ..errors import QmoeError
from .resident import ResidentModel
from .sampling import choose, seen_mask
from .timing import GenerationStats, devices_of

_SENTINEL_RE = re.compile(r"<extra_id_(\d+)>")
PREFILL_TOKENS = 2048  # prompt tokens (over the batch) per prefill call: bounds its attention scores


@dataclass(frozen=True)
class GenerateConfig:
    """How to decode."""

    max_new_tokens: int = 32
    temperature: float | None = None  # None: greedy
    top_p: float = 1.0
    top_k: int | None = None  # sampling from the k most likely tokens; None: all
    repetition_penalty: float = 1.0  # transformers' (CTRL's): seen tokens' positive logits / it, negative x it
    stop: tuple[str, ...] = ()  # a sequence ends once its text holds one; the text is cut before it
    seed: int = 0
    batch_size: int = 16
    # More ids that end a sequence, besides the architecture's EOS: a causal model's
    # generation_config.json may list several (Qwen's chat models end turns with another id).
    eos_tokens: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature is not None and not 0 < self.temperature < float("inf"):
            raise ValueError(f"--temperature must be a finite number > 0, got {self.temperature} "
                             "(use --greedy for argmax)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.seed < 0:
            raise ValueError(f"--seed must be >= 0, got {self.seed}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or self.top_k < 1):
            raise ValueError(f"--top-k must be an integer >= 1, got {self.top_k!r}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"--repetition-penalty must be > 0 (1.0: none), got {self.repetition_penalty}")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"--stop must be non-empty strings, got {list(self.stop)!r}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if not all(isinstance(t, int) and t >= 0 for t in self.eos_tokens):
            raise ValueError(f"GenerateConfig.eos_tokens must be token ids >= 0, got {self.eos_tokens!r}")

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
    text: str  # the generated tokens decoded (span filling: sentinels visible, EOS and padding left out)
    spans: list[str | None] | None  # span filling: per sentinel, its span (None: never opened); else None
    tokens: list[int]  # generated ids, the stopping token included

    def filled(self) -> str:
        """The prompt with each sentinel replaced by its span (kept where the span is missing)."""
        return _SENTINEL_RE.sub(lambda m: _fill(self.spans, int(m.group(1)), m.group(0)), self.prompt)

    def to_json(self) -> dict:
        """{"prompt", "text", "spans", "tokens"}; no "spans" for a continuation."""
        spans = {} if self.spans is None else {"spans": self.spans}
        return {"prompt": self.prompt, "text": self.text, **spans, "tokens": self.tokens}


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


def parse_continuation_prompt(text: str, tokenizer: CausalTokenizer, where: str, window: int,
                              vocab_size: int, chat: ChatTemplate | None = None) -> Prompt:
    """Tokenize a causal LM's prompt as its tokenizer does (special tokens included); with a
    `chat` template, the prompt is the user's turn of a conversation, rendered and tokenized as
    transformers' `apply_chat_template` does (the template writes the special tokens).

    QmoeError naming `where` for: no text, more tokens than the model's window, or an id outside
    the model's vocabulary.
    """
    if not text.strip():
        raise QmoeError(f"{where}: the prompt is empty")
    if chat is None:
        ids = tokenizer.encode(text)
    else:
        ids = tokenizer.encode(chat.render([{"role": "user", "content": text}]), add_special_tokens=False)
    if not ids:
        raise QmoeError(f"{where}: the prompt has no tokens")
    if len(ids) > window:
        raise QmoeError(f"{where}: {len(ids)} tokens, longer than the model's window of {window}")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise QmoeError(f"{where}: token id {bad[0]} is outside the model's vocabulary of {vocab_size}")
    return Prompt(text, tuple(ids), 0)


def stop_tokens(arch: Architecture, sentinel_ids: Sequence[int], prompt: Prompt) -> set[int]:
    """EOS, and the sentinel that closes the prompt's last span (when the tokenizer has one)."""
    spec = arch.generation()
    stops = set(spec.eos_tokens)
    if spec.prompt_stack is not None and prompt.sentinels < len(sentinel_ids):
        stops.add(sentinel_ids[prompt.sentinels])
    return stops


@torch.no_grad()
def encode_prompts(model: ResidentModel, prompts: Sequence[Sequence[int]],
                   add_suffix: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt stack over the padded batch (the family's suffix appended, unless the ids
    already end as the model wants them: `add_suffix=False`) -> memory [B, S, d] and its mask
    [B, S] bool (True = a real token), on the model's first device."""
    spec = model.weights.arch.generation()
    if spec.prompt_stack is None:
        raise ValueError(f"{model.weights.arch.family} has no prompt stack: its prompts are prefilled (`prefill`)")
    rows = [list(p) + (list(spec.prompt_suffix) if add_suffix else []) for p in prompts]
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
def prefill(model: ResidentModel, prompts: Sequence[Sequence[int]],
            max_new_tokens: int) -> tuple[StackCache, torch.Tensor]:
    """Decoder-only: the output stack over the left-padded batch, in chunks of positions (all
    sequences together) -> its cache (room for `max_new_tokens` more positions) and the final
    states of every prompt's last token [B, d] on the first device."""
    spec = model.weights.arch.generation()
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), spec.pad_token, dtype=torch.long)
    mask = torch.zeros(len(prompts), length, dtype=torch.bool)
    for b, prompt in enumerate(prompts):
        ids[b, length - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
        mask[b, length - len(prompt):] = True
    output = spec.output_stack
    cache = model.stacks[output].new_cache(len(prompts), length + max_new_tokens, key_mask=mask)
    chunk = max(1, PREFILL_TOKENS // len(prompts))
    for first in range(0, length, chunk):
        hidden = model.run_stack(output, model.embed(output, ids[:, first:first + chunk]), cache)
    return cache, hidden[:, -1]


# Per step: each sequence's new token, None for those already done.
StepCallback = Callable[[list[int | None]], None]
# (sequence in the batch, its generated tokens so far) -> whether it has ended (a stop string).
EndCheck = Callable[[int, list[int]], bool]


@torch.no_grad()
def generate_ids(model: ResidentModel, prompts: Sequence[Sequence[int]], stops: Sequence[set[int]],
                 config: GenerateConfig, generator: torch.Generator | None = None, *, ended: EndCheck | None = None,
                 on_step: StepCallback | None = None, stats: GenerationStats | None = None,
                 add_suffix: bool = True) -> list[list[int]]:
    """Generated ids per prompt (one batch; the stopping token included). Step logits come from
    the cached output stack; `generator` (CPU) draws the samples when not greedy. A sequence
    ends at a token of its `stops` or where `ended` says so. `add_suffix`: see `encode_prompts`."""
    spec = model.weights.arch.generation()
    batch = len(prompts)
    output = spec.output_stack
    started = time.perf_counter()

    def step(tokens: torch.Tensor) -> torch.Tensor:  # [B, 1] int64 -> last final states [B, d]
        return model.run_stack(output, model.embed(output, tokens), cache)[:, -1]

    if spec.prompt_stack is None:
        cache, hidden = prefill(model, prompts, config.max_new_tokens)
        seen_ids = [list(p) for p in prompts]
    else:
        memory, mask = encode_prompts(model, prompts, add_suffix)
        cache = model.stacks[output].new_cache(batch, config.max_new_tokens, memory=memory, memory_mask=mask)
        hidden = step(torch.full((batch, 1), spec.start_token, dtype=torch.long))
        seen_ids = [[spec.start_token] for _ in prompts]
    seen = None
    generated: list[list[int]] = [[] for _ in range(batch)]
    done = [False] * batch
    for count in range(1, config.max_new_tokens + 1):
        logits = model.logits(hidden)  # [B, vocab] fp32
        if config.repetition_penalty != 1.0 and seen is None:
            seen = seen_mask(seen_ids, logits.shape[-1], logits.device)
        chosen = choose(logits, config, generator, seen).tolist()
        now = time.perf_counter()
        if count == 1 and stats is not None:
            stats.prefill_s += now - started
            stats.prompt_tokens += sum(len(p) for p in prompts) + batch * len(spec.prompt_suffix) * add_suffix
            stats.first_tokens += batch
            if stats.time_to_first_token_s is None:
                stats.time_to_first_token_s = now - started
            first_chosen = now
        elif stats is not None:
            stats.decode_tokens += done.count(False)
        new: list[int | None] = [None] * batch
        for b, token in enumerate(chosen):
            if not done[b]:
                generated[b].append(token)
                new[b] = token
                done[b] = token in stops[b] or (ended is not None and ended(b, generated[b]))
        if seen is not None:
            seen[torch.arange(batch, device=seen.device), torch.tensor(chosen, device=seen.device)] = True
        if on_step is not None:
            on_step(new)
        if all(done) or count == config.max_new_tokens:
            break
        hidden = step(torch.tensor([[spec.pad_token if done[b] else chosen[b]] for b in range(batch)],
                                   dtype=torch.long))
    if stats is not None:
        stats.decode_s += time.perf_counter() - first_chosen
    model.finish()
    return generated


def describe(tokens: Sequence[int], prompt: Prompt, tokenizer: Tokenizer, arch: Architecture) -> Output:
    """Decoded text and the spans of one prompt's generated tokens (span filling)."""
    spec = arch.generation()
    sentinel_index = {s: i for i, s in enumerate(tokenizer.sentinel_ids)}
    spans: list[list[int] | None] = [None] * prompt.sentinels
    current = None
    for token in tokens:
        if token in sentinel_index:
            current = sentinel_index[token]
            if current < prompt.sentinels:
                spans[current] = []
        elif token in spec.eos_tokens:
            break
        elif current is not None and current < prompt.sentinels:
            spans[current].append(token)
    visible = [t for t in tokens if t not in (*spec.eos_tokens, spec.pad_token)]
    return Output(prompt=prompt.text, text=tokenizer.decode(visible).strip(),
                  spans=[None if s is None else tokenizer.decode(s).strip() for s in spans], tokens=list(tokens))


def describe_continuation(tokens: Sequence[int], prompt: Prompt, tokenizer: CausalTokenizer,
                          stops: set[int]) -> Output:
    """The continuation's text: every generated token but a final stopping one, decoded as the
    tokenizer does (special tokens kept)."""
    ended = bool(tokens) and tokens[-1] in stops
    return Output(prompt=prompt.text, text=tokenizer.decode(tokens[:-1] if ended else tokens), spans=None,
                  tokens=list(tokens))


class TokenStreamer(Protocol):
    """Hears a `generate` call's text as its tokens are produced (the CLI prints it)."""

    def on_text(self, index: int, text: str) -> None:
        """Prompt `index` (in the call's order) has generated one more token: its text so far, as
        `Output.text` would be (cut before a stop string); it grows, it may change at its end."""
        ...

    def on_output(self, index: int, output: Output) -> None:
        """Prompt `index` is done; `output` is what `generate` returns for it."""
        ...


def output_text(tokens: Sequence[int], prompt: Prompt, tokenizer: Tokenizer | CausalTokenizer,
                arch: Architecture, stops: set[int]) -> str:
    """The text `generate` reports for a prompt's generated tokens (before any stop string is cut):
    what the streamer prints grows into it."""
    if arch.generation().prompt_stack is None:
        return describe_continuation(tokens, prompt, tokenizer, stops).text
    return describe(tokens, prompt, tokenizer, arch).text


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """`text` up to the earliest stop string in it, and whether one was found."""
    found = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[:min(found)], True) if found else (text, False)


def generate(model: ResidentModel, prompts: Sequence[Prompt], tokenizer: Tokenizer | CausalTokenizer,
             config: GenerateConfig, streamer: TokenStreamer | None = None,
             stats: GenerationStats | None = None) -> list[Output]:
    """Fill the spans of (or continue) every prompt, `config.batch_size` prompts at a time;
    `streamer` hears every token as it comes and every output as it is complete, `stats` adds up
    the time taken."""
    arch = model.weights.arch
    continuation = arch.generation().prompt_stack is None
    generator = None if config.greedy else torch.Generator().manual_seed(config.seed)
    outputs: list[Output] = []
    if stats is not None:
        stats.devices = devices_of(model)
    for first in range(0, len(prompts), config.batch_size):
        batch = prompts[first:first + config.batch_size]
        stops = [stop_tokens(arch, tokenizer.sentinel_ids, p) | set(config.eos_tokens) for p in batch]
        tokens: list[list[int]] = [[] for _ in batch]

        def ended(b: int, so_far: list[int]) -> bool:
            return cut_at_stop(output_text(so_far, batch[b], tokenizer, arch, stops[b]), config.stop)[1]

        def on_step(new: list[int | None]) -> None:
            for b, token in enumerate(new):
                if token is not None:
                    tokens[b].append(token)
                    text = output_text(tokens[b], batch[b], tokenizer, arch, stops[b])
                    streamer.on_text(first + b, cut_at_stop(text, config.stop)[0])

        ids = generate_ids(model, [p.ids for p in batch], stops, config, generator,
                           ended=ended if config.stop else None, on_step=on_step if streamer else None, stats=stats)
        for b, (t, p, s) in enumerate(zip(ids, batch, stops)):
            out = describe_continuation(t, p, tokenizer, s) if continuation else describe(t, p, tokenizer, arch)
            out = dataclasses.replace(out, text=cut_at_stop(out.text, config.stop)[0])
            outputs.append(out)
            if streamer is not None:
                streamer.on_output(first + b, out)
    return outputs
