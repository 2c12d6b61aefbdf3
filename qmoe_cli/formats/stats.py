"""Storage statistics of a checkpoint's experts: bytes, bits per weight and the entropy bound.

Shared by `qmoe pack` (written to the packed manifest) and `qmoe info` (read back, or counted
from a quantized checkpoint's file headers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class LayerSize:
    """Running totals of one sparse block's expert storage (or of all of them)."""

    weights: int = 0
    code_bytes: int = 0  # codewords (or bit-packed codes) only
    all_in_bytes: int = 0  # plus row offsets and grids
    histogram: torch.Tensor | None = None  # symbol counts: [9] pairs (ternary) or [2^b] codes; None: unknown

    def summary(self, name: str, per_symbol_weights: int = 1) -> dict[str, Any]:
        """The manifest's / `qmoe info`'s row; entropy per weight from `histogram` if counted."""
        entropy = None if self.histogram is None else _entropy_bits(self.histogram) / per_symbol_weights
        return {"name": name, "weights": self.weights, "code_bytes": self.code_bytes,
                "all_in_bytes": self.all_in_bytes,
                "bits_per_weight_codes": 8 * self.code_bytes / self.weights,
                "bits_per_weight_all_in": 8 * self.all_in_bytes / self.weights,
                "entropy_bits_per_weight": entropy}


def _entropy_bits(counts: torch.Tensor) -> float:
    p = counts.double() / counts.sum()
    p = p[p > 0]
    return float(-(p * p.log2()).sum())
