"""Quantization grids per output row (or per row and group of columns), batched over experts.

A *grid* is the set of values one row of a weight matrix (or one group of `group_size`
consecutive columns of that row) may take after quantization:

- ternary: `{lo, 0, hi}` with `lo = min(row.min(), 0) <= 0 <= hi = max(row.max(), 0)`, both
  rounded to bfloat16-representable values (the packed format stores them in bf16). A weight
  maps to `lo` if `w < lo/2`, to `hi` if `w > hi/2`, else to 0 ("threshold at half"). Codes:
  0 -> lo, 1 -> 0, 2 -> hi.
- b-bit integer (b in 2, 3, 4, 8): asymmetric min-max as in the GPTQ reference, with the range
  widened to include 0 (`xmin = min(min, 0)`, `xmax = max(max, 0)`), `scale = (xmax - xmin) /
  (2^b - 1)`, `zero = round(-xmin / scale)`; codes in [0, 2^b - 1], value `scale * (code - zero)`.
  Including 0 means a zero weight (a dead input column) always stays exactly 0.

Symmetric grids (`QuantSpec.symmetric`, GPTQ's and compressed-tensors' `sym`): centred on 0 with
`a = max(|min|, |max|)` per row (or group). b-bit: `scale = 2a / (2^b - 1)`, a fixed `zero =
2^(b-1)`, so codes [0, 2^b - 1] are the signed integers [-2^(b-1), 2^(b-1) - 1] shifted, and the
largest positive level is `a (2^b - 2) / (2^b - 1)`, just below a (the observer GPTQ and
llm-compressor use). Ternary: `{-a, 0, a}`. They are stored exactly like asymmetric ones (the fixed
zero point is a zero point like any other), so the quantized and packed formats and every reader
are unchanged; what they buy is a grid readers without zero points take (compressed-tensors'
`symmetric: true`, which transformers loads for fused MoE experts).

Every tensor has a leading expert dim E; grid parameters are `[E, rows, G]` fp32 with
`G = ceil(cols / group_size)` groups (G = 1 for one grid per row). A grid "aligned" to a block of
k columns has parameters `[E, rows, k]` (or `[E, rows, 1]`, broadcast) and is what `encode`,
`decode` and `quantize_dequantize` take, so the GPTQ column loop never recomputes group indices.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar, Union

import torch
import torch.nn.functional as F
from torch import Tensor

BITS_CHOICES = ("ternary", "2", "3", "4", "8")
_G = TypeVar("_G", bound="_GridBase")


@dataclass(frozen=True)
class QuantSpec:
    """What grid each weight row gets: `bits` levels, one grid per row or per column group."""

    bits: str  # "ternary" | "2" | "3" | "4" | "8"; a string so "ternary" needs no sentinel number
    group_size: int | None = None  # None: one grid per row; N: one per N consecutive columns
    symmetric: bool = False  # centred on 0 with a fixed zero point (see the module docstring)

    def __post_init__(self) -> None:
        if not isinstance(self.bits, str) or self.bits not in BITS_CHOICES:
            raise ValueError(
                f"QuantSpec.bits must be one of {', '.join(repr(b) for b in BITS_CHOICES)} "
                f"(a string), got {self.bits!r}"
            )
        g = self.group_size
        if g is not None and (isinstance(g, bool) or not isinstance(g, int) or g < 1):
            raise ValueError(
                f"QuantSpec.group_size must be None (one grid per row) or an integer >= 1, got {g!r}"
            )
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"QuantSpec.symmetric must be True or False, got {self.symmetric!r}")

    @property
    def ternary(self) -> bool:
        """Only this module branches on it: everything else asks the methods below."""
        return self.bits == "ternary"

    @property
    def label(self) -> str:
        """The scheme in messages: "ternary" or "3-bit"."""
        return ("symmetric " if self.symmetric else "") + ("ternary" if self.ternary else f"{self.bits}-bit")

    @property
    def levels(self) -> int:
        """Number of distinct values one grid holds: 3 for ternary, 2^b otherwise."""
        return 3 if self.ternary else 2 ** int(self.bits)

    @property
    def code_bits(self) -> int | None:
        """Bits of a bit-packed code (b), or None for ternary, whose codes are entropy-coded."""
        return None if self.ternary else int(self.bits)

    @property
    def dictionary_coded(self) -> bool:
        """Whether the packed format codes these codes with the fitted dictionary (pairs of ternary
        codes, `codec.dictionary`); otherwise they are bit-packed at `code_bits` each."""
        return self.ternary

    @property
    def symbol_weights(self) -> int:
        """Weights per symbol the packed statistics count: pairs of ternary codes, or one b-bit code."""
        return 2 if self.ternary else 1

    @property
    def grid_fields(self) -> tuple[str, str]:
        """Names of a matrix's two grid tensors, in `Grid.tensors()` order."""
        return ("lo", "hi") if self.ternary else ("scale", "zero")

    @property
    def packed_fields(self) -> tuple[str, str, str]:
        """A packed matrix's stored tensors: the codes' field, then the grid's."""
        return ("words" if self.ternary else "packed", *self.grid_fields)

    @property
    def wire_layout(self) -> tuple[int, int]:
        """(codes per word k, bytes per word m) of codes sent between ranks (`compress.wire`):
        ternary 5 codes a byte (3^5 = 243 <= 256), b-bit 8 codes per b bytes (8-bit as they are)."""
        if self.ternary:
            return 5, 1
        bits = int(self.bits)
        return (8, bits) if bits < 8 else (1, 1)

    def make_grid(self, first: Tensor, second: Tensor) -> "Grid":
        """The grid of this scheme from its two [E, rows, G] fp32 tensors, in `grid_fields` order."""
        if self.ternary:
            return TernaryGrid(lo=first, hi=second)
        return IntGrid(scale=first, zero=second, maxq=self.maxq)

    def grid_from_tensors(self, tensors: dict[str, Tensor]) -> "Grid":
        """The grid of one stored matrix: `tensors` holds the `grid_fields` [rows, G] (a leading
        expert dim of 1 is added)."""
        first, second = self.grid_fields
        return self.make_grid(tensors[first][None], tensors[second][None])

    @property
    def maxq(self) -> int:
        """Largest code; codes are uint8 in [0, maxq]."""
        return self.levels - 1

    def n_groups(self, cols: int) -> int:
        """Grids per row for a matrix with `cols` columns (the last group may be partial)."""
        return 1 if self.group_size is None else math.ceil(cols / self.group_size)


@dataclass(frozen=True, eq=False)
class _GridBase:
    """Shared plumbing: every tensor field is `[E, rows, G]` fp32 and transforms alike."""

    def map(self: _G, fn: Callable[[Tensor], Tensor]) -> _G:
        """Apply `fn` to every parameter tensor (slicing, gathering, moving device)."""
        changes = {f.name: fn(getattr(self, f.name)) for f in dataclasses.fields(self)
                   if isinstance(getattr(self, f.name), Tensor)}
        return dataclasses.replace(self, **changes)

    @property
    def n_groups(self) -> int:
        first = dataclasses.fields(self)[0].name
        return getattr(self, first).shape[-1]

    def take(self: _G, groups: Tensor) -> _G:
        """Parameters of group `groups[..., k]` for column k: `groups` [k] or [E, k] int64.

        Returns a grid aligned to those k columns: `[E, rows, k]`.
        """
        if groups.dim() == 1:
            return self.map(lambda t: t[..., groups])
        return self.map(lambda t: t.gather(2, groups[:, None, :].expand(-1, t.shape[1], -1)))

    def tensors(self, prefix: str = "") -> dict[str, Tensor]:
        """Parameter tensors by field name, for safetensors."""
        return {prefix + f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if isinstance(getattr(self, f.name), Tensor)}


@dataclass(frozen=True, eq=False)
class TernaryGrid(_GridBase):
    """`{lo, 0, hi}` per row or row-group."""

    lo: Tensor  # [E, rows, G] fp32, <= 0
    hi: Tensor  # [E, rows, G] fp32, >= 0

    def encode(self, w: Tensor) -> Tensor:
        """w [E, rows, k] fp32 -> codes [E, rows, k] uint8 in {0, 1, 2}; grid aligned to w."""
        # `lo < 0` / `hi > 0`: when a side of the grid is 0 (a row with no negative weights,
        # pushed below 0 later by GPTQ error feedback) emit the zero code 1, not code 0 that
        # also decodes to 0; the entropy coder relies on zeros having one symbol.
        codes = torch.ones(w.shape, dtype=torch.uint8, device=w.device)
        codes = torch.where((w < self.lo * 0.5) & (self.lo < 0), 0, codes)
        codes = torch.where((w > self.hi * 0.5) & (self.hi > 0), 2, codes)
        return codes.to(torch.uint8)

    def decode(self, codes: Tensor) -> Tensor:
        """codes [E, rows, k] uint8 -> [E, rows, k] fp32; grid aligned to codes."""
        return torch.where(codes == 0, self.lo, torch.where(codes == 2, self.hi, 0.0))


@dataclass(frozen=True, eq=False)
class IntGrid(_GridBase):
    """Asymmetric uniform grid `scale * (code - zero)`, code in [0, maxq]."""

    scale: Tensor  # [E, rows, G] fp32, > 0
    zero: Tensor  # [E, rows, G] fp32, integer-valued in [0, maxq]
    maxq: int  # 2^bits - 1

    def encode(self, w: Tensor) -> Tensor:
        """w [E, rows, k] fp32 -> codes [E, rows, k] uint8 in [0, maxq]; grid aligned to w."""
        # `w / scale`, not `w * (1 / scale)`: the GPTQ reference rounds this exact expression,
        # and a last-bit difference flips ties.
        q = torch.clamp(torch.round(w / self.scale) + self.zero, 0, self.maxq)
        return q.to(torch.uint8)

    def decode(self, codes: Tensor) -> Tensor:
        """codes [E, rows, k] uint8 -> [E, rows, k] fp32; grid aligned to codes."""
        return self.scale * (codes.to(torch.float32) - self.zero)


Grid = Union[TernaryGrid, IntGrid]


def fit_grid(w: Tensor, spec: QuantSpec) -> Grid:
    """Min-max grid for every row (or row-group) of w.

    w: [E, rows, cols] float (read as fp32). Returns a grid with parameters [E, rows, G],
    G = spec.n_groups(cols); group j covers columns [j*group_size, (j+1)*group_size).
    """
    if w.dim() != 3 or w.shape[-1] == 0:
        raise ValueError(f"fit_grid: w must be [E, rows, cols] with cols >= 1, got {tuple(w.shape)}")
    w = w.float()
    E, rows, cols = w.shape
    g = spec.group_size or cols
    n_groups = math.ceil(cols / g)
    # Pad the last partial group with zeros: harmless, every range is widened to include 0.
    wg = F.pad(w, (0, n_groups * g - cols)).view(E, rows, n_groups, g)
    xmin = wg.amin(-1).clamp(max=0)  # [E, rows, G]
    xmax = wg.amax(-1).clamp(min=0)  # [E, rows, G]
    if spec.symmetric:
        xmax = torch.maximum(-xmin, xmax)
        xmin = -xmax
    if spec.ternary:
        # Rounded to bfloat16 (at most 2^-9 relative, far inside GPTQ's error): the packed format
        # stores ternary grids in bf16, and so stays lossless against the quantized checkpoint.
        return TernaryGrid(lo=xmin.bfloat16().float(), hi=xmax.bfloat16().float())
    # An all-zero row would give scale 0 and 0/0 codes; any positive scale maps it to zero
    # exactly, so use GPTQ's [-1, 1].
    flat = (xmin == 0) & (xmax == 0)
    xmin = torch.where(flat, -1.0, xmin)
    xmax = torch.where(flat, 1.0, xmax)
    scale = (xmax - xmin) / spec.maxq
    # Symmetric: the fixed zero 2^(b-1) (where round(-xmin / scale) = round(2^b / 2 - 1/2) could tie
    # either way), so every grid of the matrix shares it and a reader may drop it.
    zero = torch.full_like(scale, (spec.maxq + 1) // 2) if spec.symmetric else torch.round(-xmin / scale)
    return IntGrid(scale=scale, zero=zero, maxq=spec.maxq)


def concat_groups(grids: Sequence[Grid]) -> Grid:
    """Join grids along the group dim: [E, rows, G1] + [E, rows, G2] -> [E, rows, G1 + G2]."""
    first = grids[0]
    names = [k for k in first.tensors()]
    return dataclasses.replace(first, **{k: torch.cat([getattr(g, k) for g in grids], dim=-1)
                                         for k in names})


def align(grid: Grid, spec: QuantSpec, cols: slice | Tensor, width: int) -> Grid:
    """The grid of each of `width` columns of the full matrix, ready for `encode`/`decode`.

    cols: a contiguous slice of the full matrix's columns, or their indices ([k] or [E, k]
    int64, e.g. act-order's permutation). Returns parameters [E, rows, width], or the grid
    itself ([E, rows, 1], broadcast) when there is one grid per row.
    """
    if spec.group_size is None:
        if grid.n_groups != 1:
            raise ValueError(f"align: spec has one grid per row but the grid has {grid.n_groups} groups")
        return grid
    if isinstance(cols, slice):
        if cols.step not in (None, 1):
            raise ValueError(f"align: column slices must be contiguous, got step {cols.step}")
        start = cols.start or 0
        if cols.stop is not None and cols.stop - start != width:
            raise ValueError(f"align: slice {cols} holds {cols.stop - start} columns, w has {width}")
        device = next(iter(grid.tensors().values())).device
        cols = torch.arange(start, start + width, device=device)
    if cols.shape[-1] != width:
        raise ValueError(f"align: {cols.shape[-1]} column indices for {width} columns")
    return grid.take(cols // spec.group_size)


def quantize_dequantize(w: Tensor, grid: Grid) -> tuple[Tensor, Tensor]:
    """Round w onto an aligned grid: w [E, rows, k] fp32 -> (codes uint8, values fp32), both
    [E, rows, k]. Values are `decode(codes)` exactly, so stored codes reproduce them bit for bit.
    """
    codes = grid.encode(w)
    return codes, grid.decode(codes)


def quantize(w: Tensor, grid: Grid, spec: QuantSpec, cols: slice | Tensor = slice(None)) -> Tensor:
    """w [E, rows, k] (columns `cols` of the full matrix) -> codes [E, rows, k] uint8."""
    return align(grid, spec, cols, w.shape[-1]).encode(w.float())


def dequantize(codes: Tensor, grid: Grid, spec: QuantSpec,
               cols: slice | Tensor = slice(None)) -> Tensor:
    """codes [E, rows, k] uint8 (columns `cols` of the full matrix) -> [E, rows, k] fp32."""
    return align(grid, spec, cols, codes.shape[-1]).decode(codes)
