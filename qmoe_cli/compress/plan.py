"""Which calibration tokens enter each expert's Hessians, and what a block's compression did:
the planning step of `block.ExpertCompressor` (step 1 of its docstring) and its tally."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .distributed import Comm
from .encoded import GroupWriter


@dataclass(frozen=True)
class BlockStats:
    """What one sparse block's compression did; stored in the manifest (deterministic fields)."""

    block: str  # "encoder.3"
    tokens_min: int
    tokens_median: int
    tokens_max: int
    error: float  # sum over experts (the shared one too) and matrices of the GPTQ objective 1/2 tr(dW H dW^T)
    fallbacks: int  # expert matrices rounded to nearest (no tokens or Hessian not PD)
    zero_fraction: float  # share of expert weights (shared expert's included) quantized to exactly 0


@dataclass(frozen=True)
class TokenPlan:
    """Which calibration tokens enter each expert's Hessians, decided from global counts."""

    routed: torch.Tensor  # [E] int64, tokens routed to each expert, all ranks
    used: torch.Tensor  # [E] int64, tokens in each expert's Hessian, all ranks (usable, capped)
    take: torch.Tensor  # [E] int64, this rank's share of `used`: its first take[j] usable tokens
    by_rank: torch.Tensor  # [W, E] int64, tokens routed to each expert on each rank


def plan_tokens(index: torch.Tensor, usable: torch.Tensor, num_experts: int, token_cap: float,
                comm: Comm) -> TokenPlan:
    """index [A] int64: the expert of each of this rank's routing assignments (A = tokens x k);
    usable [A] bool: the assignment's token is not a sentinel position.

    An expert's Hessian takes its first `cap` usable tokens in global order; rank r's share
    is what remains of the cap after the usable tokens of ranks 0..r-1.
    """
    local = torch.stack([torch.bincount(index, minlength=num_experts),
                         torch.bincount(index[usable], minlength=num_experts)])  # [2, E]
    counts = comm.all_gather(local.to(comm.device), "token counts").cpu()  # [W, 2, E]
    routed, usable_counts = counts[:, 0].sum(0), counts[:, 1]
    cap = max(1, math.ceil(token_cap * int(routed.sum()) / num_experts))
    earlier = usable_counts[:comm.rank].sum(0)  # [E]
    take = (cap - earlier).clamp(min=0).minimum(usable_counts[comm.rank])
    return TokenPlan(routed, usable_counts.sum(0).clamp(max=cap), take, counts[:, 0])


class Tally:
    """Rank 0's running statistics of a block, and its file writer (None on other ranks)."""

    def __init__(self, files: "GroupWriter | None"):
        self.files = files
        self.errors: list[float] = []  # per expert and matrix; summed with fsum, so order-free
        self.fallbacks = self.zeros = self.total = 0

    def record(self, errors: list[float], fallbacks: int, zeros: int, weights: int) -> None:
        """Matrices quantized: their GPTQ errors, how many fell back to rounding, their zero
        weights out of `weights`."""
        self.errors.extend(errors)
        self.fallbacks += fallbacks
        self.zeros += zeros
        self.total += weights
