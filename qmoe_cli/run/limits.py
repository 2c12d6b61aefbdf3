"""Sizes checked against the machine before a run allocates them: a flag value that would ask
for more memory than the host has is a usage error, said at once, not an allocation failure (or
an OOM kill) minutes later.

GPUs are not checked here: `placement.plan_model` weighs every block's cache against each
device's free memory and streams what does not fit.
"""

from __future__ import annotations

import os

import torch

from ..arch import Architecture
from ..errors import UsageError


def host_memory_bytes() -> int | None:
    """Physical memory of this machine (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def generation_cache_bytes(arch: Architecture, batch: int, prompt_tokens: int, max_new_tokens: int,
                           dtype: torch.dtype) -> int:
    """Bytes of the output stack's decoding caches for one batch: every block caches
    `prompt_tokens + max_new_tokens` positions (decoder-only), or `max_new_tokens` positions
    reading a memory of `prompt_tokens` (encoder-decoder)."""
    spec = arch.generation()
    stack = spec.output_stack
    if spec.prompt_stack is None:
        length, memory = prompt_tokens + max_new_tokens, 0
    else:
        length, memory = max_new_tokens, prompt_tokens
    return arch.num_blocks(stack) * arch.cache_bytes(stack, batch, length, memory, dtype)


def check_cache_fits(arch: Architecture, batch: int, prompt_tokens: int, max_new_tokens: int,
                     dtype: torch.dtype, memory: int | None = None) -> None:
    """UsageError naming --max-new-tokens (and the most that fits) when one batch's decoding
    caches alone exceed `memory` (default: the host's physical memory)."""
    memory = host_memory_bytes() if memory is None else memory
    need = generation_cache_bytes(arch, batch, prompt_tokens, max_new_tokens, dtype)
    if memory is None or need <= memory:
        return
    per_token = max(generation_cache_bytes(arch, batch, prompt_tokens, max_new_tokens + 1, dtype) - need, 1)
    fits = max(max_new_tokens - (need - memory + per_token - 1) // per_token, 0)
    raise UsageError(f"--max-new-tokens {max_new_tokens}: the decoding caches of a batch of {batch} would take "
                     f"{need / 2**30:.1f} GiB, more than this machine's {memory / 2**30:.1f} GiB; give at most "
                     f"about {fits}, or a smaller --batch-size")
