"""Packed experts resident on a GPU, still compressed, run by the grouped kernels (`qmoe_cli.kernels`).

One `DeviceExperts` holds all experts of one sparse block on one CUDA device: per expert matrix
the codewords of every expert back to back, each expert's row offsets and grids (ternary), or the
bit-packed codes padded to whole 32-column chunks and the grids (b-bit); the dictionary's mask
table is the checkpoint's one copy per device. A call runs every routed token of the block:

    few tokens (<= DENSE_TOKENS_THRESHOLD, so no expert can have more): route_plan sorts them by
        expert on the device, gather_transpose lays them out one column per token, one launch of
        the tile kernel for the first matrix (relu fused, output kept sorted and transposed) and
        one for the second (scattering back to token order): four launches, no host sync, and
        experts without tokens are never touched;
    many tokens: one sync for the tokens per expert; experts up to the threshold still go through
        the two tile launches, heavier ones are decoded one matrix at a time to a scratch matrix
        in the run dtype and multiplied with tensor cores (`round_once_linear`), the scratch
        dropped right after.

Memory: the block's compressed experts (the same bytes as on disk, plus up to 4 bytes of padding
per b-bit row), the activations of one call ([d_ff, tokens] in the run dtype), and at most one
decoded matrix. Uploading concatenates on the device, so a block briefly needs twice its
codewords there; the host holds one expert group file at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from ..arch import Architecture
from ..kernels import (
                       DENSE_TOKENS_THRESHOLD,
                       MAX_PLAN_TOKENS,
                       bitpacked_dense,
                       bitpacked_tiles,
                       device_bitpacked,
                       gather_transpose,
                       host_plan,
                       round_once_linear,
                       route_plan,
                       ternary_dense,
                       ternary_tiles,
)
from ..quant.grids import QuantSpec


@dataclass(frozen=True)
class DeviceTernary:
    """All experts' copies of one dictionary-coded matrix [rows, cols], on one device."""

    words: torch.Tensor  # [total] int16, expert e's codewords start at bases[e]
    bases: torch.Tensor  # [E] int64
    offsets: torch.Tensor  # [E, rows + 1] int32, each expert's own row offsets
    masks: torch.Tensor  # [size, 2] int32, the checkpoint's dictionary on this device
    lo: torch.Tensor  # [E, rows] fp32
    hi: torch.Tensor  # [E, rows] fp32
    cols: int

    @classmethod
    def upload(cls, matrices: list[Any], masks: torch.Tensor, device: torch.device) -> "DeviceTernary":
        """From `DictionaryMatrix`es (one grid per row), in expert order."""
        sizes = torch.tensor([m.words.numel() for m in matrices], dtype=torch.int64)
        bases = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)[:-1]])
        return cls(torch.cat([m.words.to(device) for m in matrices]), bases.to(device),
                   torch.stack([m.offsets.to(device) for m in matrices]), masks,
                   torch.stack([m.lo[:, 0].to(device) for m in matrices]),
                   torch.stack([m.hi[:, 0].to(device) for m in matrices]), matrices[0].cols)

    def tiles(self, xt: torch.Tensor, tiles: torch.Tensor, order: torch.Tensor | None, relu: bool,
              out_transposed: bool) -> torch.Tensor:
        return ternary_tiles(self.words, self.bases, self.offsets, self.masks, self.lo, self.hi, xt, tiles, order,
                             relu, out_transposed)

    def dense(self, expert: int, dtype: torch.dtype) -> torch.Tensor:
        """Expert `expert`'s weights [rows, cols] in `dtype` (a scratch copy)."""
        return ternary_dense(self.words, self.bases, self.offsets, self.masks, self.lo, self.hi, expert, self.cols,
                             dtype)


@dataclass(frozen=True)
class DeviceBitpacked:
    """All experts' copies of one bit-packed b-bit matrix [rows, cols], on one device."""

    packed: torch.Tensor  # [E, rows, ceil(cols / 32) * bits] int32 (`device_bitpacked`)
    scale: torch.Tensor  # [E, rows, groups] fp32
    zero: torch.Tensor  # [E, rows, groups] fp32
    bits: int
    group_cols: int
    cols: int

    @classmethod
    def upload(cls, matrices: list[Any], spec: QuantSpec, device: torch.device) -> "DeviceBitpacked":
        """From `BitpackedMatrix`es, in expert order."""
        bits, cols = int(spec.bits), matrices[0].cols
        return cls(torch.stack([device_bitpacked(m.packed.to(device), bits, cols) for m in matrices]),
                   torch.stack([m.grid_tensors["scale"].to(device) for m in matrices]),
                   torch.stack([m.grid_tensors["zero"].to(device) for m in matrices]),
                   bits, spec.group_size or cols, cols)

    def tiles(self, xt: torch.Tensor, tiles: torch.Tensor, order: torch.Tensor | None, relu: bool,
              out_transposed: bool) -> torch.Tensor:
        return bitpacked_tiles(self.packed, self.scale, self.zero, self.bits, self.group_cols, xt, tiles, order, relu,
                               out_transposed)

    def dense(self, expert: int, dtype: torch.dtype) -> torch.Tensor:
        return bitpacked_dense(self.packed, self.scale, self.zero, self.bits, self.group_cols, self.cols, expert,
                               dtype)


DeviceMatrix = DeviceTernary | DeviceBitpacked


class DeviceExperts:
    """A sparse block's experts `second(relu(first(x)))`, compressed on one device (`RoutedExperts`)."""

    def __init__(self, first: DeviceMatrix, second: DeviceMatrix, num_experts: int, device: torch.device,
                 threshold: int = DENSE_TOKENS_THRESHOLD):
        if not 1 <= threshold <= MAX_PLAN_TOKENS:
            raise ValueError(f"DeviceExperts threshold must be in 1..{MAX_PLAN_TOKENS}, got {threshold}")
        self.first, self.second, self.num_experts, self.device = first, second, num_experts, device
        self.threshold = threshold

    @classmethod
    def upload(cls, arch: Architecture, spec: QuantSpec, matrices: Iterator[tuple[int, dict[str, Any]]],
               masks: torch.Tensor, device: torch.device) -> "DeviceExperts":
        """From (expert, {name: DictionaryMatrix | BitpackedMatrix}) of every expert in order."""
        names = arch.expert.matrices
        by_name: dict[str, list[Any]] = {name: [] for name in names}
        for _, parts in matrices:
            for name in names:
                by_name[name].append(parts[name])
        if spec.ternary:
            first, second = (DeviceTernary.upload(by_name[n], masks, device) for n in names)
        else:
            first, second = (DeviceBitpacked.upload(by_name[n], spec, device) for n in names)
        return cls(first, second, arch.num_experts, device)

    def __call__(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """x [N, d] (fp32/bf16/fp16, on the device), index [N] int64 in [0, E) -> [N, d] in x's dtype."""
        n = x.shape[0]
        if n == 0:
            return x.new_empty(0, x.shape[1])
        x = x.contiguous()
        if n <= self.threshold:
            order, tiles = route_plan(index, self.num_experts)
            heavy: list[tuple[int, int, int]] = []
        else:
            counts = torch.bincount(index, minlength=self.num_experts).tolist()  # the one host sync
            order = torch.argsort(index, stable=True).to(torch.int32)
            host_tiles, heavy = host_plan(counts, self.threshold)
            tiles = host_tiles.to(self.device, non_blocking=True)
        xt = gather_transpose(x, order)  # [d, N]: tokens sorted by expert, one column each
        if tiles.shape[0]:
            hidden = self.first.tiles(xt, tiles, None, relu=True, out_transposed=True)  # [d_ff, N], sorted
            y = self.second.tiles(hidden, tiles, order, relu=False, out_transposed=False)  # [N, d], token order
        else:
            y = x.new_empty(n, x.shape[1])
        for expert, begin, count in heavy:
            tokens = order[begin:begin + count].long()
            h = F.relu(round_once_linear(x.index_select(0, tokens), self.first.dense(expert, x.dtype)))
            y.index_copy_(0, tokens, round_once_linear(h, self.second.dense(expert, x.dtype)))
        return y
