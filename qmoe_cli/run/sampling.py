"""Each generation step's logits processing, as transformers' processors compute it and in
their order (tested against them on random logits, tests/test_sampling.py): the repetition
penalty (greedy too), then, when sampling, temperature, top-k and top-p; then the argmax or a
seeded draw. Pure functions of tensors and the settings (`run.generate.GenerateConfig`)."""

from __future__ import annotations

from typing import Protocol, Sequence

import torch


class Sampling(Protocol):
    """The settings a step's processing reads (`GenerateConfig` has them)."""

    temperature: float | None  # None: greedy
    top_k: int | None
    top_p: float
    repetition_penalty: float

    @property
    def greedy(self) -> bool: ...


def seen_mask(ids: Sequence[Sequence[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[B, vocab] bool: True where row b's tokens so far include the id (ids outside the vocab,
    which a head narrower than the tokenizer cannot score, are left out)."""
    mask = torch.zeros(len(ids), vocab, dtype=torch.bool)
    for b, row in enumerate(ids):
        mask[b, [i for i in row if 0 <= i < vocab]] = True
    return mask.to(device)


def penalize(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' repetition penalty: logits [B, V] fp32 of tokens seen (`seen` [B, V] bool)
    divided by `penalty` where positive, multiplied where negative (either way less likely for
    penalty > 1); a token counts once however often it was seen."""
    scaled = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, scaled, logits)


def warp(logits: torch.Tensor, config: Sampling) -> torch.Tensor:
    """Sampling's logits [B, V] fp32 as transformers' warpers leave them, in their order:
    temperature, then top-k, then top-p (the smallest set of most likely tokens holding
    `top_p` of the probability, at least one); tokens cut off are -inf."""
    logits = logits / config.temperature
    if config.top_k is not None and config.top_k < logits.shape[-1]:
        kth = logits.topk(config.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p < 1.0:
        # transformers' arithmetic, so boundary cases round alike: ascending order, a token goes
        # when it and every less likely one hold at most 1 - top_p; the most likely always stays.
        sorted_logits, order = logits.sort(dim=-1)
        cut = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= 1 - config.top_p
        cut[:, -1] = False
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(cut, float("-inf")))
    return logits


def choose(logits: torch.Tensor, config: Sampling, generator: torch.Generator | None,
           seen: torch.Tensor | None = None) -> torch.Tensor:
    """logits [B, vocab] fp32 (seen [B, vocab] bool: tokens the repetition penalty applies to)
    -> next token [B] int64 (CPU): argmax, or a sample of the warped distribution."""
    if seen is not None:
        logits = penalize(logits, seen, config.repetition_penalty)
    if config.greedy:
        return logits.argmax(dim=-1).cpu()
    probs = warp(logits.cpu(), config).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
