"""One matrix of several experts as stored (codes and grids), in memory and on the wire.

What `block.ExpertCompressor` moves between GPTQ, the ranks and the quantized checkpoint's
writer: codes [n, rows, cols] uint8 and their grid [n, rows, G] fp32, packed for other ranks
by `wire.py`, read back from a saved block for --resume.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from ..arch import ExpertShape
from ..formats.quantized import QuantizedExperts
from ..quant.gptq import GPTQResult
from ..quant.grids import Grid, QuantSpec, dequantize
from .distributed import TensorSpec
from .wire import pack_codes, packed_bytes, unpack_codes


@dataclass(frozen=True, eq=False)
class Encoded:
    """One matrix of n experts as stored: codes [n, rows, cols] uint8, grid [n, rows, G] fp32."""

    codes: torch.Tensor
    grid: Grid

    @staticmethod
    def wire_specs(n: int, rows: int, cols: int, spec: QuantSpec) -> list[TensorSpec]:
        """Shapes and dtypes of `wire()` for n experts of a rows x cols matrix."""
        grid = ((n, rows, spec.n_groups(cols)), torch.float32)
        return [((packed_bytes(n * rows * cols, spec),), torch.uint8), grid, grid]

    @classmethod
    def from_wire(cls, tensors: Sequence[torch.Tensor], n: int, rows: int, cols: int,
                  spec: QuantSpec) -> "Encoded":
        packed, first, second = tensors
        return cls(unpack_codes(packed, spec, (n, rows, cols)), spec.make_grid(first, second))

    @classmethod
    def stored(cls, bank: QuantizedExperts, ids: Sequence[int], name: str) -> "Encoded":
        """Experts `ids` of a saved block, read from its group files."""
        parts = [bank.encoded(j, name) for j in ids]
        codes = torch.cat([c for c, _ in parts])
        fields = zip(*(grid.tensors().values() for _, grid in parts))
        return cls(codes, bank.spec.make_grid(*(torch.cat(list(f)) for f in fields)))

    def wire(self, spec: QuantSpec) -> list[torch.Tensor]:
        """Codes packed (`wire.pack_codes`) and the grid's tensors, for another rank."""
        return [pack_codes(self.codes, spec), *self.grid.tensors().values()]

    def select(self, first: int, stop: int) -> "Encoded":
        """Experts [first, stop) of this bundle."""
        return Encoded(self.codes[first:stop], self.grid.map(lambda t: t[first:stop]))

    def values(self, spec: QuantSpec) -> torch.Tensor:
        """The dequantized weights [n, rows, cols] fp32 (bit for bit GPTQResult.q)."""
        return dequantize(self.codes, self.grid, spec)


def input_rows(shape: ExpertShape) -> dict[str, slice]:
    """Each input matrix's rows in the inputs stacked by rows (as one GPTQ call takes them)."""
    bounds = [0]
    for m in shape.inputs:
        bounds.append(bounds[-1] + shape.shapes[m][0])
    return {m: slice(a, b) for m, a, b in zip(shape.inputs, bounds, bounds[1:])}


def split_inputs(shape: ExpertShape, stacked: GPTQResult) -> list[Encoded]:
    """The stacked input matrices' codes and grids [n, sum rows, ...] -> one Encoded per input."""
    return [Encoded(stacked.codes[:, r].contiguous(), stacked.grid.map(lambda t, r=r: t[:, r].contiguous()))
            for r in input_rows(shape).values()]


def empty_encoded(rows: int, cols: int, spec: QuantSpec, device: torch.device) -> Encoded:
    """No experts of a rows x cols matrix (a rank whose slice of a round is empty)."""
    codes = torch.empty(0, rows, cols, dtype=torch.uint8, device=device)
    grid = torch.empty(0, rows, spec.n_groups(cols), device=device)
    return Encoded(codes, spec.make_grid(grid, grid))


class GroupWriter(Protocol):
    """Rank 0's writer of a block's expert group files (`formats.quantized_writer.GroupFiles`)."""

    def add(self, ids: Sequence[int], encoded: dict[str, Encoded]) -> None:
        """Experts `ids` (ascending, continuing the previous call's), one Encoded per matrix."""
        ...
