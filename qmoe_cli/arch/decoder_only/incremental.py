"""Incremental decoding for decoder-only families: batched self-attention with a key/value cache.

A batch of prompts of different lengths is left-padded to one length; `new_cache` takes the
padding as a key mask. Each sequence counts its rotary positions from its first real token
(position = real tokens before it, as transformers derives `position_ids` from the attention
mask), so a padded prompt computes what it computes alone: its padding keys are masked and its
positions are its own. The sliding window (Mixtral) is a window over cache slots, which is the
same as over positions because padding comes first.

What is cached per block is what the block's attention hands the `extend` that appends to the
cache (`DecoderBlock.attend`) and reads back:
- grouped-query attention: keys and values per key/value head, after q/k norms, clipping and
  rotation (`SelfAttention.project`): 2 x KV heads x head_dim values per position; the cached
  path runs the streamed runner's own attention code over them;
- multi-head latent attention (DeepSeek): the latent, one tensor [B, 1, max_length, kv_lora_rank
  + rope] holding per position the normalised compressed KV latent and the rotated shared key
  part, the values being its first kv_lora_rank columns (no second tensor):
  kv_lora_rank + rope values per position (DeepSeek-V3 at full size: 576, against 128 x 320 =
  40960 for the expanded per-head keys and values). Cached calls attend in the absorbed form
  (`LatentAttention._absorbed`, whose docstring says why prefill does too); the streamed runner
  keeps the expanded form.

Cache tensors are preallocated to `max_length` positions on the device of the block that fills
them (its first `attend`), and filled a call at a time. The step's rotary rows and mask are
built once per step and device, not per block.

Memory: per block, batch x max_length x `cache_width(config)` values in the model dtype
(`cache_bytes`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import DecoderConfig
from .layers import DecoderBlock, causal_bias, rotary_tables


def cache_width(config: DecoderConfig) -> int:
    """Values one block caches per position (keys and values together; see the module docstring)."""
    c = config
    if c.attention == "mla":
        return c.kv_lora_rank + c.head_dim
    return 2 * c.num_kv_heads * c.head_dim


def cache_bytes(config: DecoderConfig, batch: int, length: int, dtype: torch.dtype) -> int:
    """Bytes one block's cache holds for `batch` sequences of `length` positions."""
    return batch * length * cache_width(config) * torch.empty((), dtype=dtype).element_size()


@dataclass
class _BlockCache:
    keys: torch.Tensor  # [B, KV, max_length, dk], filled up to `length` (MLA: [B, 1, max_length, rank + rope])
    values: torch.Tensor | None  # [B, KV, max_length, dv]; MLA: None (the keys' first columns)
    length: int = 0


@dataclass
class DecoderStackCache:
    """The decoder's state for a batch of sequences (see the module docstring)."""

    max_length: int
    key_mask: torch.Tensor  # [B, max_length] bool, True = a real token (padding is False)
    positions: torch.Tensor  # [B, max_length] int64: a slot's rotary position in its sequence
    cos: torch.Tensor  # [max_length, rot], rows by position
    sin: torch.Tensor
    window: int | None  # sliding window (keys this many slots back and more are masked)
    blocks: dict[int, _BlockCache] = field(default_factory=dict)
    _steps: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def length(self, index: int) -> int:
        entry = self.blocks.get(index)
        return 0 if entry is None else entry.length

    def step(self, first: int, t: int, device: torch.device,
             span: tuple[int | None, int | None] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """cos, sin [B, 1, t, rot] of slots [first, first + t)'s positions and the bias
        [B, 1, t, first + t] fp32 (causal, windowed, padding masked) on `device`, built once per
        step, device and span (every block of the step with that span shares them). `span`: the
        block's (window, chunk) (`DecoderConfig.layer_span`; None: the cache's window, no chunk);
        a chunk counts positions, so a left-padded sequence's chunks start at its first token."""
        window, chunk = (self.window, None) if span is None else span
        key = (device, first, t, window, chunk)
        if key not in self._steps:
            if len(self._steps) > 8:  # keeps a handful: one per device and span of the current step
                self._steps.clear()
            slots = self.positions[:, first:first + t]  # [B, t]
            cos, sin = self.cos[slots][:, None], self.sin[slots][:, None]
            bias = causal_bias(first + t, window, self.key_mask.device, first)[None, None]
            masked = ~self.key_mask[:, None, None, :first + t]
            if chunk is not None:
                keys = self.positions[:, None, None, :first + t]  # [B, 1, 1, S]
                masked = masked | (slots[:, None, :, None] // chunk != keys // chunk)
            bias = bias.masked_fill(masked, torch.finfo(torch.float32).min)
            self._steps[key] = (cos.to(device), sin.to(device), bias.to(device))
        return self._steps[key]

    def extend(self, index: int, k: torch.Tensor,
               v: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Write block `index`'s keys k [B, KV, t, dk] and values v [B, KV, t, dv] (None: the keys
        hold them, see `ExtendKeys`) after its cached positions -> all its keys and values so far
        ([B, KV, L + t, *], views of the cache; values None for None)."""
        entry = self.blocks.get(index)
        if entry is None:
            shape = (k.shape[0], k.shape[1], self.max_length)
            entry = self.blocks[index] = _BlockCache(k.new_empty(*shape, k.shape[3]),
                                                     None if v is None else v.new_empty(*shape, v.shape[3]))
        first, t = entry.length, k.shape[2]
        if first + t > self.max_length:
            raise ValueError(f"decoding past the cache's {self.max_length} positions (at {first} + {t})")
        entry.keys[:, :, first:first + t] = k
        if entry.values is not None:
            entry.values[:, :, first:first + t] = v
        entry.length = first + t
        return entry.keys[:, :, :first + t], None if entry.values is None else entry.values[:, :, :first + t]


@dataclass(frozen=True)
class DecoderIncrementalStack:
    """`IncrementalStack` of a decoder-only model: causal, cached, positions per sequence."""

    config: DecoderConfig
    device: torch.device  # where the cache's masks and rotary tables live (the model's first device)
    dtype: torch.dtype

    def new_cache(self, batch: int, max_length: int, key_mask: torch.Tensor | None = None,
                  memory: torch.Tensor | None = None, memory_mask: torch.Tensor | None = None) -> DecoderStackCache:
        if max_length < 1 or batch < 1:
            raise ValueError(f"a decoding cache needs batch >= 1 and max_length >= 1, got {batch}, {max_length}")
        if memory is not None:
            raise ValueError("a decoder-only stack reads no memory (it has no cross-attention)")
        mask = torch.ones(batch, max_length, dtype=torch.bool, device=self.device)
        if key_mask is not None:
            mask[:, :key_mask.shape[1]] = key_mask.to(self.device, torch.bool)
        # Real tokens before a slot; padding slots get 0 (any position would do: they are masked).
        positions = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
        cos, sin = rotary_tables(self.config, max_length, self.device, self.dtype)
        return DecoderStackCache(max_length, mask, positions, cos, sin, self.config.sliding_window)

    def attend(self, block: DecoderBlock, index: int, x: torch.Tensor, cache: DecoderStackCache) -> torch.Tensor:
        """x [B, t, d] at slots [L, L + t) of block `index` -> [B, t, d] (see IncrementalStack)."""
        first = cache.length(index)
        cos, sin, bias = cache.step(first, x.shape[1], x.device, self.config.layer_span(index))
        positions = cache.positions[:, first:first + x.shape[1]]  # [B, t]: Llama 4's query temperature
        return block.attend(x, cos, sin, bias, lambda k, v: cache.extend(index, k, v), positions)
