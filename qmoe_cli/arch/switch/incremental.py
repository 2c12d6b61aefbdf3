"""Incremental decoding for Switch: batched attention with a key/value cache.

The decoder's self-attention keys and values are cached per block (preallocated to the longest
sequence, filled a step at a time), the encoder output's cross-attention keys and values are
projected once per block on the first step, and the relative position bias and padding masks are
built once per step and device, not per block. The encoder runs whole over the padded prompt
batch and keeps nothing but its key mask.

Memory: per decoder block, 2 x B x heads x d_kv x (max_length + S) values in the model dtype
(`cache_bytes`), on the block's device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import SwitchConfig
from .layers import Block, padding_bias, position_bias


@dataclass
class _BlockCache:
    keys: torch.Tensor | None = None  # [B, H, max_length, d_kv], filled up to `length`
    values: torch.Tensor | None = None
    length: int = 0
    cross: tuple[torch.Tensor, torch.Tensor] | None = None  # memory's keys/values [B, H, S, d_kv]


@dataclass
class SwitchStackCache:
    """One stack's decoding state for a batch (see the module docstring)."""

    batch: int
    max_length: int
    key_mask: torch.Tensor  # [B, max_length] bool, True = a real token
    memory: torch.Tensor | None  # [B, S, d]
    memory_mask: torch.Tensor | None  # [B, S] bool
    blocks: dict[int, _BlockCache] = field(default_factory=dict)
    _biases: dict[tuple, torch.Tensor] = field(default_factory=dict)  # per (device, kind, positions)

    def length(self, index: int) -> int:
        entry = self.blocks.get(index)
        return 0 if entry is None else entry.length

    def bias(self, key: tuple, device: torch.device, build) -> torch.Tensor:
        """The bias `build()` makes, memoized on (device, key); the previous step's are dropped."""
        full = (device, *key)
        if full not in self._biases:
            if len(self._biases) > 8:  # keeps a handful: one per device and kind of the current step
                self._biases.clear()
            self._biases[full] = build().to(device)
        return self._biases[full]


@dataclass(frozen=True)
class SwitchIncrementalStack:
    """`IncrementalStack` of a Switch encoder (bidirectional, run whole) or decoder (causal,
    cached, with cross-attention)."""

    config: SwitchConfig
    table: torch.Tensor  # [num_buckets, heads], the stack's relative attention bias
    bidirectional: bool

    def new_cache(self, batch: int, max_length: int, key_mask: torch.Tensor | None = None,
                  memory: torch.Tensor | None = None, memory_mask: torch.Tensor | None = None) -> SwitchStackCache:
        if max_length < 1 or batch < 1:
            raise ValueError(f"a decoding cache needs batch >= 1 and max_length >= 1, got {batch}, {max_length}")
        mask = torch.ones(batch, max_length, dtype=torch.bool, device=self.table.device)
        if key_mask is not None:
            mask[:, :key_mask.shape[1]] = key_mask.to(mask.device, torch.bool)
        if memory is not None and memory_mask is None:
            memory_mask = torch.ones(memory.shape[:2], dtype=torch.bool, device=memory.device)
        return SwitchStackCache(batch, max_length, mask, memory, memory_mask)

    def attend(self, block: Block, index: int, x: torch.Tensor, cache: SwitchStackCache) -> torch.Tensor:
        """x [B, t, d] at positions [L, L + t) of block `index` -> [B, t, d] (see IncrementalStack)."""
        entry = cache.blocks.setdefault(index, _BlockCache())
        layer = block.layer[0]
        h = layer.layer_norm(x)
        k, v = layer.SelfAttention.keys_values(h)  # [B, H, t, d_kv]
        first, t = entry.length, x.shape[1]
        if not self.bidirectional:
            k, v = self._append(entry, k, v, cache.max_length)
        keys = first + t if not self.bidirectional else t
        bias = cache.bias(("self", first, t, keys), x.device, lambda: self._self_bias(cache, first, t, keys))
        x = x + layer.SelfAttention.attend_to(h, k, v, bias)
        if block.is_decoder:
            cross = block.layer[1]
            if entry.cross is None:
                entry.cross = cross.EncDecAttention.keys_values(cache.memory.to(x.device))
            cross_bias = cache.bias(("cross",), x.device, lambda: padding_bias(cache.memory_mask, t))
            x = x + cross.EncDecAttention.attend_to(cross.layer_norm(x), *entry.cross, cross_bias)
        return x

    def _append(self, entry: _BlockCache, k: torch.Tensor, v: torch.Tensor,
                max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v [B, H, t, d_kv] after the cached positions -> all keys/values so far."""
        first, t = entry.length, k.shape[2]
        if first + t > max_length:
            raise ValueError(f"decoding past the cache's {max_length} positions (at {first} + {t})")
        if entry.keys is None:
            shape = (k.shape[0], k.shape[1], max_length, k.shape[3])
            entry.keys = k.new_empty(shape)
            entry.values = v.new_empty(shape)
        entry.keys[:, :, first:first + t] = k
        entry.values[:, :, first:first + t] = v
        entry.length = first + t
        return entry.keys[:, :, :first + t], entry.values[:, :, :first + t]

    def _self_bias(self, cache: SwitchStackCache, first: int, t: int, keys: int) -> torch.Tensor:
        """[B|1, H, t, keys] fp32: relative positions (causal in the decoder) plus key padding."""
        bias = position_bias(self.table, self.config, t, keys, self.bidirectional, first_query=first)
        mask = cache.key_mask[:, :keys]
        return bias if bool(mask.all()) else bias + padding_bias(mask, t).to(bias.device)


def cache_bytes(config: SwitchConfig, stack: str, batch: int, length: int, memory_length: int,
                dtype: torch.dtype) -> int:
    """Bytes one block's cache holds (the encoder keeps none)."""
    if stack == "encoder":
        return 0
    width = config.num_heads * config.d_kv
    return 2 * batch * width * (length + memory_length) * torch.empty((), dtype=dtype).element_size()
