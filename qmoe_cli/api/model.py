"""`qmoe_cli.load`: any checkpoint (original, quantized or packed; a preset, hub id or directory)
as a `torch.nn.Module` that computes logits like transformers' models and generates.

The module wraps the runtime `qmoe generate` uses (`run.resident.ResidentModel`): every block
read once and placed on the GPUs by free memory (what does not fit streams from host memory one
block ahead), packed experts kept compressed and multiplied by the decode-matmul. Placement is
fixed when loading, so the module refuses `.to()`, `.half()` and the like: load again instead.

A forward pass runs the batch through the same cached stacks as generation, with a fresh cache,
so `model(ids).logits[:, -1]` is the first step `model.generate(ids)` takes. Padding follows
`attention_mask` (1 = token): each sequence computes as it would alone, its positions counted
from its first real token (left or right padding alike; transformers counts left padding as
positions unless given `position_ids`); the logits of padding positions are meaningless.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..arch import GenerationSpec
from ..formats.hf import generation_eos_ids
from ..formats.open import OpenModel
from ..run.generate import (
    PREFILL_TOKENS,
    GenerateConfig,
    Output,
    Prompt,
    TokenStreamer,
    cut_at_stop,
    generate,
    generate_ids,
    output_text,
    stop_tokens,
)
from ..run.placement import Placement
from ..run.resident import ResidentModel
from ..run.timing import GenerationStats, devices_of
from .tokenizer import QmoeTokenizer


@dataclass
class ModelOutput:
    """What `QmoeModel.forward` returns, named as transformers names it."""

    logits: torch.Tensor  # [B, T, vocab] fp32 (decoder-only: per input position; Switch: per decoder position)
    loss: torch.Tensor | None = None  # mean cross-entropy over labels != -100, given `labels`

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)


class BaseStreamer(Protocol):
    """transformers' streamer interface (`TextStreamer`, `TextIteratorStreamer` fit it)."""

    def put(self, value: torch.Tensor) -> None: ...

    def end(self) -> None: ...


def check_room(spec: GenerationSpec, longest: int, max_new_tokens: int, flag: str = "max_new_tokens") -> None:
    """ValueError where a decoder-only model's prompt and continuation (they share its positions)
    exceed the positions it has."""
    limit = spec.max_positions
    if spec.prompt_stack is None and limit and longest + max_new_tokens > limit:
        raise ValueError(f"{flag} {max_new_tokens}: with the longest prompt's {longest} tokens that is "
                         f"past the model's {limit} positions; give at most {max(limit - longest, 0)}, "
                         "or a shorter prompt")


class QmoeModel(nn.Module):
    """A loaded model (see the module docstring). `config` is the family's config, `kind` the
    checkpoint's ("original", "quantized", "packed"), `tokenizer` its tokenizer (None without one)."""

    def __init__(self, checkpoint: OpenModel, resident: ResidentModel, tokenizer: QmoeTokenizer | None):
        super().__init__()
        self.checkpoint, self.resident, self.tokenizer = checkpoint, resident, tokenizer
        self.arch = checkpoint.weights.arch
        self.config = self.arch.config
        self.kind = checkpoint.kind
        self.spec = self.arch.generation()
        # The blocks as submodules, so parameters() and named_modules() show the model.
        self.stacks = nn.ModuleDict({s: nn.ModuleList(p.block for p in b) for s, b in resident.blocks.items()})
        self.eval()
        self.requires_grad_(False)

    @property
    def device(self) -> torch.device:
        """Where inputs go and logits come back (the embeddings' and head's device)."""
        return self.resident.first_device

    @property
    def dtype(self) -> torch.dtype:
        return self.resident.dtype

    @property
    def placement(self) -> Placement | None:
        """Which device holds each block (None: all on one device)."""
        return self.resident.placement

    def _apply(self, fn, recurse=True):  # .to(), .cuda(), .half(), ...: nn.Module's one entry point
        raise RuntimeError("a qmoe model stays where load() placed it; load it again with device= or dtype=")

    @property
    def encoder_decoder(self) -> bool:
        return self.spec.prompt_stack is not None

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                decoder_input_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> ModelOutput:
        """input_ids [B, T] int64, attention_mask [B, T] (1 = token, 0 = padding) -> logits.

        Decoder-only: logits [B, T, vocab] of the next token at every position; `labels` [B, T]
        (usually input_ids, -100 where ignored) give `loss`, shifted inside as transformers does.
        Encoder-decoder (Switch): input_ids feed the encoder as given (the tokenizer's `encode`
        appends the </s> Switch was trained with); `decoder_input_ids` [B, T'] (starting with
        the start token, 0) or `labels` [B, T'] (shifted right into them) the decoder; logits
        [B, T', vocab] and, with labels, `loss`, as `SwitchTransformersForConditionalGeneration`.
        """
        ids = self._ids(input_ids)
        mask = None if attention_mask is None else attention_mask.to(torch.bool)
        if self.encoder_decoder:
            if decoder_input_ids is None:
                if labels is None:
                    raise ValueError("an encoder-decoder model needs decoder_input_ids or labels (as transformers')")
                decoder_input_ids = self._shift_right(labels)
            memory = self._encode(ids, mask)
            decoder = self._ids(decoder_input_ids)
            cache = self.resident.stacks[self.spec.output_stack].new_cache(
                decoder.shape[0], decoder.shape[1], memory=memory,
                memory_mask=mask.to(memory.device) if mask is not None else None)
            logits = self._logits(decoder, cache)
            loss = None if labels is None else F.cross_entropy(logits.flatten(0, 1), labels.flatten().to(logits.device),
                                                               ignore_index=-100)
            return ModelOutput(logits, loss)
        if decoder_input_ids is not None:
            raise ValueError(f"decoder_input_ids: {self.arch.family} is decoder-only; give input_ids alone")
        cache = self.resident.stacks[self.spec.output_stack].new_cache(ids.shape[0], ids.shape[1], key_mask=mask)
        logits = self._logits(ids, cache)
        loss = None
        if labels is not None:
            target = labels[:, 1:].to(logits.device)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), target.flatten(), ignore_index=-100)
        return ModelOutput(logits, loss)

    def _ids(self, ids: torch.Tensor) -> torch.Tensor:
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"token ids must be an integer tensor [batch, length], got "
                             f"{getattr(ids, 'dtype', type(ids).__name__)} {tuple(getattr(ids, 'shape', ()))}")
        return ids.long().cpu()

    def _shift_right(self, labels: torch.Tensor) -> torch.Tensor:
        """Decoder inputs from labels [B, T]: the start token, then labels[:, :-1] (-100 -> pad)."""
        shifted = labels.new_full(labels.shape, self.spec.start_token)
        shifted[:, 1:] = labels[:, :-1]
        return shifted.masked_fill(shifted == -100, self.spec.pad_token)

    def _encode(self, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The prompt stack over ids [B, S] -> memory [B, S, d] on the first device."""
        stack = self.spec.prompt_stack
        cache = self.resident.stacks[stack].new_cache(ids.shape[0], ids.shape[1], key_mask=mask)
        return self.resident.run_stack(stack, self.resident.embed(stack, ids), cache)

    def _logits(self, ids: torch.Tensor, cache: Any) -> torch.Tensor:
        """The output stack over ids [B, T] in chunks of positions (a bound on attention scores, as
        generation's prefill) -> logits [B, T, vocab] fp32 on the first device."""
        stack, parts = self.spec.output_stack, []
        chunk = max(1, PREFILL_TOKENS // ids.shape[0])
        for first in range(0, ids.shape[1], chunk):
            hidden = self.resident.run_stack(stack, self.resident.embed(stack, ids[:, first:first + chunk]), cache)
            parts.append(self.resident.logits(hidden.flatten(0, 1)).view(*hidden.shape[:2], -1))
        self.resident.finish()
        return torch.cat(parts, dim=1)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float = 1.0, repetition_penalty: float = 1.0,
                 stop: Sequence[str] = (), seed: int = 0, streamer: BaseStreamer | None = None,
                 stats: GenerationStats | None = None) -> torch.Tensor:
        """Token ids as transformers' `generate` returns them: decoder-only, the input ids with
        the new tokens after them [B, T + n]; encoder-decoder, the decoder's [B, 1 + n] from its
        start token. Sequences that end early are padded with the pad id.

        A sequence ends at the model's EOS ids (config and generation_config.json), at a `stop`
        string in its decoded text, after `max_new_tokens`, and (Switch, as `qmoe generate`) at
        the sentinel after the prompt's last one. Greedy unless `do_sample`; sampling applies
        temperature, top_k (None: off) and top_p in transformers' order, seeded by `seed`;
        `repetition_penalty` as transformers'. `streamer` gets the prompt (or the start token),
        then every step's tokens [B], then `end()`, as transformers' streamers do. `stats`
        (a `GenerationStats`) adds up the time taken.
        """
        ids = self._ids(input_ids)
        mask = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.cpu().bool()
        rows = [row[m].tolist() for row, m in zip(ids, mask)]
        config = GenerateConfig(max_new_tokens=max_new_tokens, temperature=temperature if do_sample else None,
                                top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty, stop=tuple(stop),
                                seed=seed, batch_size=len(rows), eos_tokens=self.checkpoint_eos())
        self._check_room(max(len(r) for r in rows), max_new_tokens)
        sentinels = self.tokenizer.sentinel_ids if self.tokenizer is not None else ()
        prompts = [Prompt("", tuple(r), sum(t in sentinels for t in r)) for r in rows]
        stops = [stop_tokens(self.arch, sentinels, p) | set(config.eos_tokens) for p in prompts]
        if config.stop and self.tokenizer is None:
            raise ValueError("stop strings need the model's tokenizer, and this checkpoint has none")

        def stopped(b: int, so_far: list[int]) -> bool:
            text = output_text(so_far, prompts[b], self.tokenizer.inner, self.arch, stops[b])
            return cut_at_stop(text, config.stop)[1]

        if streamer is not None:
            start = torch.full((len(rows), 1), self.spec.start_token) if self.encoder_decoder else ids
            streamer.put(start)
        on_step = None if streamer is None else (
            lambda new: streamer.put(torch.tensor([self.spec.pad_token if t is None else t for t in new])))
        generator = None if config.greedy else torch.Generator().manual_seed(seed)
        if stats is not None:
            stats.devices = devices_of(self.resident)
        new = generate_ids(self.resident, rows, stops, config, generator, ended=stopped if config.stop else None,
                           on_step=on_step, stats=stats, add_suffix=False)
        if streamer is not None:
            streamer.end()
        width = max(len(t) for t in new)
        tail = torch.full((len(new), width), self.spec.pad_token, dtype=torch.long)
        for b, tokens in enumerate(new):
            tail[b, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        head = torch.full((len(new), 1), self.spec.start_token) if self.encoder_decoder else input_ids.cpu().long()
        return torch.cat([head, tail], dim=1)

    def checkpoint_eos(self) -> tuple[int, ...]:
        """EOS ids beyond the architecture's: generation_config.json's (as `qmoe generate`)."""
        return generation_eos_ids(self.checkpoint.tokenizer_dir, self.config.vocab_size)

    def _check_room(self, longest: int, max_new_tokens: int) -> None:
        check_room(self.spec, longest, max_new_tokens)

    def generate_text(self, prompts: Sequence[str | Prompt], config: GenerateConfig | None = None, *,
                      chat: bool = False, streamer: TokenStreamer | None = None,
                      stats: GenerationStats | None = None) -> list[Output]:
        """Text in, `Output`s (text, spans, tokens) out: `qmoe generate`'s library call. Strings are
        parsed as the CLI parses `--prompt` (Switch: spans marked <extra_id_0>, ...; `chat`: the
        user's turn under the tokenizer's chat template); `Prompt`s (`parse_prompts`) are used as
        they are. `config.eos_tokens` gains generation_config.json's."""
        config = config or GenerateConfig()
        if self.tokenizer is None:
            raise ValueError("text prompts need the model's tokenizer, and this checkpoint has none")
        parsed = self.tokenizer.parse_prompts([(f"prompt {i + 1}", p) for i, p in enumerate(prompts)
                                               if isinstance(p, str)], chat=chat)
        given = iter(parsed)
        prompts = [next(given) if isinstance(p, str) else p for p in prompts]
        self._check_room(max(len(p.ids) for p in prompts), config.max_new_tokens)
        eos = tuple(dict.fromkeys((*config.eos_tokens, *self.checkpoint_eos())))
        config = GenerateConfig(**{**config.__dict__, "eos_tokens": eos})
        return generate(self.resident, prompts, self.tokenizer.inner, config, streamer, stats)

    def extra_repr(self) -> str:
        return f"family={self.arch.family}, kind={self.kind}, device={self.device}, dtype={self.dtype}"
