"""Packed experts resident on a GPU, still compressed, run by the grouped kernels (`qmoe_cli.kernels`).

The packed reader (`formats.packed`) uploads its validated matrices here; this module never reads files.

One `DeviceExperts` holds all experts of one sparse block on one CUDA device as two device
matrices per expert: `first`, the matrices applied to the expert's input stacked by rows (Switch:
`wi`; SwiGLU: gate then up, 2 d_ff rows, so one launch computes both), and `second`, the one
applied to the activation (`wo`, `down`). Per device matrix: the codewords of every expert back to
back, each expert's row offsets and grids (ternary), or the bit-packed codes padded to whole
32-column chunks and the grids (b-bit); the dictionary's mask table is the checkpoint's one copy
per device. Rows are coded independently, so stacking is concatenation (`stack_ternary`,
`stack_bitpacked`). A call runs every routed assignment of the block (top-k: all k experts of
every token in one call; tokens are gathered per assignment, never copied k times):

    few tokens (<= DENSE_TOKENS_THRESHOLD, so no expert can have more, since a token's k experts
        are distinct): route_plan sorts the assignments by expert on the device, gather_transpose
        lays their tokens out one column each, one launch of the tile kernel for `first` (relu
        fused, output kept sorted and transposed), the activation (silu(gate) * up for SwiGLU, in
        the run dtype as the CPU path rounds it), one launch for `second` (scattering back to
        assignment order): no host sync, and experts without tokens are never touched;
    many tokens: one sync for the assignments per expert; experts up to the threshold still go
        through the tile launches, heavier ones are decoded one device matrix at a time to a
        scratch matrix in the run dtype and multiplied with tensor cores (`round_once_linear`),
        the scratch dropped right after.

A block's shared expert (Qwen2-MoE, DeepSeek), which every token passes, runs the same way as
a one-expert `DeviceExperts` with every token routed to expert 0 (`DeviceSharedExpert`, a module
computing the whole expert, the block's gate outside it).

Memory: the block's compressed experts (the same bytes as on disk, plus up to 4 bytes of padding
per b-bit row), the activations of one call ([rows of first, N * k] in the run dtype), and at
most one decoded device matrix (for SwiGLU gate and up together: 2 d_ff x d_model, the shared
expert's d_ff where it is wider). Uploading
concatenates on the device, so a block briefly needs twice its codewords there; the host holds
one expert group file at a time, plus one expert's stacked copy while it uploads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..arch import CHAIN_ACTIVATIONS, ExpertShape
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


def stack_ternary(matrices: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`DictionaryMatrix`es of one width (one grid per row) as one coded matrix of all their rows,
    in order: words [total] int16, offsets [rows + 1] int32, lo and hi [rows] fp32. Rows are coded
    independently, so the codewords concatenate and each matrix's row offsets shift by the
    codewords of the matrices before it."""
    widths = {m.cols for m in matrices}
    if len(widths) != 1:
        raise ValueError(f"stacked matrices must have one width, got {sorted(widths)}")
    starts = [0]
    for m in matrices:
        starts.append(starts[-1] + m.words.numel())
    offsets = [m.offsets[:-1] + start for m, start in zip(matrices, starts)]
    offsets.append(torch.tensor([starts[-1]], dtype=torch.int32))
    return (torch.cat([m.words for m in matrices]), torch.cat(offsets).to(torch.int32),
            torch.cat([m.lo[:, 0] for m in matrices]), torch.cat([m.hi[:, 0] for m in matrices]))


def stack_bitpacked(matrices: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`BitpackedMatrix`es of one width and spec as one matrix of all their rows, in order: packed
    [rows, row bytes] uint8, scale and zero [rows, groups] fp32 (rows are packed independently)."""
    widths = {m.cols for m in matrices}
    if len(widths) != 1:
        raise ValueError(f"stacked matrices must have one width, got {sorted(widths)}")
    return (torch.cat([m.packed for m in matrices]), torch.cat([m.grid_tensors["scale"] for m in matrices]),
            torch.cat([m.grid_tensors["zero"] for m in matrices]))


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
    def upload(cls, experts: Sequence[Sequence[Any]], masks: torch.Tensor, device: torch.device) -> "DeviceTernary":
        """From each expert's `DictionaryMatrix`es (one grid per row), stacked by rows
        (`stack_ternary`), in expert order."""
        words, offsets, lo, hi = [], [], [], []
        for matrices in experts:  # one expert's stacked copy on the host at a time
            for dst, t in zip((words, offsets, lo, hi), stack_ternary(matrices)):
                dst.append(t.to(device))
        sizes = torch.tensor([w.numel() for w in words], dtype=torch.int64)
        bases = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)[:-1]])
        return cls(torch.cat(words), bases.to(device), torch.stack(offsets), masks, torch.stack(lo), torch.stack(hi),
                   experts[0][0].cols)

    @property
    def rows(self) -> int:
        return self.offsets.shape[1] - 1

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
    def upload(cls, experts: Sequence[Sequence[Any]], spec: QuantSpec, device: torch.device) -> "DeviceBitpacked":
        """From each expert's `BitpackedMatrix`es, stacked by rows (`stack_bitpacked`), in expert order."""
        bits, cols = int(spec.bits), experts[0][0].cols
        packed, scale, zero = [], [], []
        for matrices in experts:
            rows, s, z = stack_bitpacked(matrices)
            packed.append(device_bitpacked(rows.to(device), bits, cols))
            scale.append(s.to(device))
            zero.append(z.to(device))
        return cls(torch.stack(packed), torch.stack(scale), torch.stack(zero), bits, spec.group_size or cols, cols)

    @property
    def rows(self) -> int:
        return self.packed.shape[1]

    def tiles(self, xt: torch.Tensor, tiles: torch.Tensor, order: torch.Tensor | None, relu: bool,
              out_transposed: bool) -> torch.Tensor:
        return bitpacked_tiles(self.packed, self.scale, self.zero, self.bits, self.group_cols, xt, tiles, order, relu,
                               out_transposed)

    def dense(self, expert: int, dtype: torch.dtype) -> torch.Tensor:
        return bitpacked_dense(self.packed, self.scale, self.zero, self.bits, self.group_cols, self.cols, expert,
                               dtype)


DeviceMatrix = DeviceTernary | DeviceBitpacked


class DeviceExperts:
    """A sparse block's experts `second(act(first(x)))`, compressed on one device (`RoutedExperts`).

    `activation` (`ExpertShape.chain_activation`): "relu" (first = wi, fused into its launch) or
    "silu_gated" (first = gate and up stacked by rows, act(h) = silu(h[:d_ff]) * h[d_ff:]).
    """

    def __init__(self, first: DeviceMatrix, second: DeviceMatrix, num_experts: int, device: torch.device,
                 threshold: int = DENSE_TOKENS_THRESHOLD, activation: str = "relu"):
        if not 1 <= threshold <= MAX_PLAN_TOKENS:
            raise ValueError(f"DeviceExperts threshold must be in 1..{MAX_PLAN_TOKENS}, got {threshold}")
        if activation not in CHAIN_ACTIVATIONS:
            raise ValueError(f"DeviceExperts activation must be one of {sorted(CHAIN_ACTIVATIONS)}, got {activation!r}")
        hidden = CHAIN_ACTIVATIONS[activation] * second.cols
        if first.rows != hidden or second.rows != first.cols:
            raise ValueError(f"DeviceExperts: first [{first.rows}, {first.cols}] and second [{second.rows}, "
                             f"{second.cols}] do not chain with {activation!r} (first must have {hidden} rows)")
        self.first, self.second, self.num_experts, self.device = first, second, num_experts, device
        self.threshold, self.activation = threshold, activation

    @classmethod
    def upload(cls, shape: ExpertShape, spec: QuantSpec, matrices: Iterable[tuple[Any, dict[str, Any]]],
               masks: torch.Tensor, device: torch.device) -> "DeviceExperts":
        """From (expert, {name: DictionaryMatrix | BitpackedMatrix}) of every expert in order (the
        experts of a block, or its shared expert alone), each with `shape`'s matrices;
        `shape.chain_activation` must be set (see `CHAIN_ACTIVATIONS`)."""
        inputs: list[list[Any]] = []
        outputs: list[list[Any]] = []
        for _, parts in matrices:
            inputs.append([parts[name] for name in shape.inputs])
            outputs.append([parts[shape.output]])
        if spec.dictionary_coded:
            first, second = (DeviceTernary.upload(m, masks, device) for m in (inputs, outputs))
        else:
            first, second = (DeviceBitpacked.upload(m, spec, device) for m in (inputs, outputs))
        return cls(first, second, len(inputs), device, activation=shape.chain_activation)

    def __call__(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """x [N, d] (fp32/bf16/fp16, on the device), index [N] or [N, k] int64 in [0, E) (k
        distinct experts per token) -> [N, d] or [N, k, d] in x's dtype."""
        if index.dim() == 1:
            return self._assignments(x, index, 1)
        n, k = index.shape
        return self._assignments(x, index.reshape(-1), k).view(n, k, x.shape[1])

    def _assignments(self, x: torch.Tensor, index: torch.Tensor, k: int) -> torch.Tensor:
        """index [N * k]: assignment a is token a // k's -> outputs [N * k, d] by assignment."""
        m = index.shape[0]
        if m == 0:
            return x.new_empty(0, x.shape[1])
        x, index = x.contiguous(), index.contiguous()
        # No expert gets more assignments than there are tokens (a token's k experts are distinct),
        # so with at most `threshold` tokens every expert runs in the tiles and needs no count.
        if x.shape[0] <= self.threshold and m <= MAX_PLAN_TOKENS:
            order, tiles = route_plan(index, self.num_experts)
            heavy: list[tuple[int, int, int]] = []
        else:
            counts = torch.bincount(index, minlength=self.num_experts).tolist()  # the one host sync
            order = torch.argsort(index, stable=True).to(torch.int32)
            host_tiles, heavy = host_plan(counts, self.threshold)
            tiles = host_tiles.to(self.device, non_blocking=True)
        tokens = order if k == 1 else torch.div(order, k, rounding_mode="floor")  # [N * k] int32, by position
        xt = gather_transpose(x, tokens)  # [d, N * k]: assignments sorted by expert, one column each
        relu = self.activation == "relu"
        if tiles.shape[0]:
            hidden = self.first.tiles(xt, tiles, None, relu=relu, out_transposed=True)  # [rows of first, N k], sorted
            if not relu:
                hidden = self._activate(hidden, dim=0)  # [d_ff, N k]
            y = self.second.tiles(hidden, tiles, order, relu=False, out_transposed=False)  # [N k, d], by assignment
        else:
            y = x.new_empty(m, x.shape[1])
        for expert, begin, count in heavy:
            assignments = order[begin:begin + count].long()
            y.index_copy_(0, assignments, self.dense_expert(x.index_select(0, assignments // k), expert))
        return y

    def dense_expert(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        """x [n, d] through expert `expert` on the dense path -> [n, d] in x's dtype: each device
        matrix decoded to a scratch copy in x's dtype and multiplied (`round_once_linear`)."""
        h = self._activate(round_once_linear(x, self.first.dense(expert, x.dtype)), dim=1)  # [n, d_ff]
        return round_once_linear(h, self.second.dense(expert, x.dtype))

    def _activate(self, h: torch.Tensor, dim: int) -> torch.Tensor:
        """The activation on first's outputs (rounded to the run dtype), along `dim` (its rows)."""
        if self.activation == "relu":
            return F.relu(h)
        gate, up = h.chunk(2, dim=dim)
        return F.silu(gate) * up  # each rounded to the run dtype, as GatedMLP over separate linears


class DeviceSharedExpert(nn.Module):
    """A block's shared expert (every token passes it), compressed on one device: a one-expert
    `DeviceExperts` with every token routed to expert 0, so the same launches, numerics (weights
    rounded to the run dtype, fp32 sums, one rounding) and memory bound as a routed expert's: up
    to `threshold` tokens the tiles (no host sync), more decoded to one scratch matrix at a time
    and multiplied with tensor cores (no sync either: every token is the expert's). Computes the
    whole expert; a gate outside it (Qwen2-MoE's sigmoid `shared_expert_gate`) stays the
    block's. Holds no parameters: nothing of it is a checkpoint tensor, and a block holding it
    is resident on its device (never host-streamed)."""

    def __init__(self, experts: DeviceExperts):
        super().__init__()
        if experts.num_experts != 1:
            raise ValueError(f"DeviceSharedExpert is one expert, got {experts.num_experts}")
        self.experts = experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, d] (in the run dtype, on the device) -> [N, d] in x's dtype."""
        if x.shape[0] > self.experts.threshold:  # the routed plan's choice, without counting (a host sync)
            return self.experts.dense_expert(x, 0)
        return self.experts(x, torch.zeros(x.shape[0], dtype=torch.int64, device=x.device))
