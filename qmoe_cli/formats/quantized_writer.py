"""The quantized checkpoint's writer of expert files: what a compression run calls to store
codes and grids in the layout `formats.quantized` reads (tensor names, one file per expert group,
the shared expert's own file), each file recorded in the manifest's `files` once written."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import torch

from ..files import save_tensors_atomic
from .integrity import file_record
from .quantized import SHARED, expert_file, member_prefix, shared_file


class Stored(Protocol):
    """One matrix of n experts: `codes` [n, rows, cols] uint8 and a grid with `tensors()` [n, rows, G]."""

    codes: torch.Tensor
    grid: Any


class GroupFiles:
    """Rank 0's writer: a block's expert tensors, saved one group file at a time once complete,
    each recorded in `records` (the manifest's `files`)."""

    def __init__(self, partial: Path, stack: str, index: int, group_size: int, num_experts: int,
                 records: dict[str, dict]):
        self.partial, self.stack, self.index = partial, stack, index
        self.group_size, self.num_experts, self.records = group_size, num_experts, records
        self.pending: dict[str, torch.Tensor] = {}

    def add(self, ids: Sequence[int], encoded: Mapping[str, Stored]) -> None:
        for e, j in enumerate(ids):
            for name, enc in encoded.items():
                prefix = f"{member_prefix(j)}{name}."
                self.pending[prefix + "codes"] = enc.codes[e].cpu()
                for field, value in enc.grid.tensors().items():
                    self.pending[prefix + field] = value[e].cpu()
            if (j + 1) % self.group_size == 0 or j + 1 == self.num_experts:
                name = expert_file(self.stack, self.index, j // self.group_size)
                save_tensors_atomic(self.pending, self.partial / name)
                self.records[name] = file_record(self.partial / name)
                self.pending = {}


def write_shared(partial: Path, stack: str, index: int, matrices: Mapping[str, Stored],
                 records: dict[str, dict[str, Any]]) -> None:
    """Block (`stack`, `index`)'s shared expert file from its matrices (n = 1 each), recorded."""
    tensors = {}
    for m, enc in matrices.items():
        tensors[f"{member_prefix(SHARED)}{m}.codes"] = enc.codes[0].cpu()
        tensors.update({f"{member_prefix(SHARED)}{m}.{f}": t[0].cpu() for f, t in enc.grid.tensors().items()})
    name = shared_file(stack, index)
    save_tensors_atomic(tensors, partial / name)
    records[name] = file_record(partial / name)
