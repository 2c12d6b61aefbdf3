"""Expert matrices in compressed-tensors' `pack-quantized` layout (what transformers and vLLM read).

Per quantized Linear `X` the checkpoint holds `X.weight_packed` [rows, ceil(cols * b / 32)] int32,
`X.weight_scale` [rows, G], `X.weight_zero_point` [ceil(rows * b / 32), G] int32 and
`X.weight_shape` [2] int64, where G is 1 ("channel" strategy: our one grid per row) or cols / g
("group" strategy, g = `--grid-group`). Values are `(q - zp) * scale` with q and zp signed b-bit
integers; compressed-tensors stores `q + 2^(b-1)`, which is exactly our unsigned code, packed
densely, least significant bit first: element i of a row occupies bits [i*b, (i+1)*b) of the
row's little-endian int32 words (`compressed_tensors...pack_quantized.helpers.pack_to_int32`;
the zero points are packed the same way down each column).

Symmetric grids (`qmoe compress --symmetric`) export as `symmetric: true` with no
`weight_zero_point`: values are `q * scale`, q signed, stored as `q + 2^(b-1)`; our fixed zero
point is 2^(b-1), so the stored value is again our code (`centred`). This is the layout
transformers 5.25 loads into its fused MoE experts (it decompresses them without zero points);
asymmetric (min-max) grids keep their zero points and load with compressed-tensors itself, not
with transformers' fused experts.

Ternary `{lo, 0, hi}` is a 2-bit affine grid `s * (q - z)`, q in 0..3, only when its three levels
fit four equally spaced ones: hi = -lo (s = hi, z = 1), lo = -2 hi (s = hi, z = 2), hi = -2 lo
(s = -lo, z = 1), or one side 0 (s = the other's magnitude). A GPTQ ternary grid is min-max per
row, so in general it is none of these; such a checkpoint is refused, naming the first matrix.
A symmetric ternary grid `{-a, 0, a}` is always the first (and exports with `symmetric: true`).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..quant.grids import QuantSpec
from .source import ExpertMatrix

FORMAT = "pack-quantized"


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [rows, cols] (integers in [0, 2^bits)) -> [rows, ceil(cols * bits / 32)] int32,
    dense, least significant bit first (compressed-tensors' `pack_to_int32` layout)."""
    rows, cols = codes.shape
    shifts = torch.arange(bits, dtype=torch.int64)
    stream = ((codes.to(torch.int64)[..., None] >> shifts) & 1).reshape(rows, cols * bits)  # [rows, cols*b]
    words = math.ceil(cols * bits / 32)
    stream = torch.nn.functional.pad(stream, (0, words * 32 - cols * bits)).view(rows, words, 32)
    unsigned = (stream << torch.arange(32, dtype=torch.int64)).sum(-1)  # [rows, words] in [0, 2^32)
    return torch.where(unsigned >= 1 << 31, unsigned - (1 << 32), unsigned).to(torch.int32)


def ternary_as_affine(codes: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, group: int | None,
                      where: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A ternary matrix as a 2-bit affine one: codes [rows, cols] uint8 in {0, 1, 2} with grids lo,
    hi [rows, G] fp32 -> (codes [rows, cols] uint8 in 0..3, scale [rows, G] fp32, zero [rows, G]
    fp32) decoding to exactly the same values; ValueError naming `where` and the first grid whose
    levels are not equally spaced (see the module docstring)."""
    neg, pos = -lo, hi  # both >= 0
    scale = torch.where((neg > 0) & (pos > 0), torch.minimum(neg, pos),
                        torch.where(neg > 0, neg, torch.where(pos > 0, pos, torch.ones_like(pos))))
    below, above = neg / scale, pos / scale  # steps from 0 down to lo and up to hi
    exact = (below == below.round()) & (above == above.round()) & (scale * below.round() == neg) \
        & (scale * above.round() == pos) & (below + above <= 3)
    if not bool(exact.all()):
        r, g = (int(i) for i in torch.nonzero(~exact)[0])
        raise ValueError(f"{where}: row {r}'s ternary grid {{{float(lo[r, g]):g}, 0, {float(hi[r, g]):g}}} is not "
                         "an affine 2-bit grid (its levels are not equally spaced: hi must be -lo, -2 lo or -lo/2, "
                         "or one side 0); export it with --format hf, or compress with --symmetric")
    index = _group_of_columns(codes.shape[1], group)
    zero = below.round()
    z, up = zero[:, index], above.round()[:, index]  # [rows, cols]
    q = torch.where(codes == 0, 0, torch.where(codes == 2, z + up, z))
    return q.to(torch.uint8), scale, zero


def centred(codes: torch.Tensor, zero: torch.Tensor, bits: int, group: int | None, where: str) -> torch.Tensor:
    """Codes of an affine grid `scale * (code - zero)` as a symmetric one's `scale * (stored - 2^(b-1))`:
    codes [rows, cols] uint8, zero [rows, G] fp32 -> stored [rows, cols] uint8 in [0, 2^b - 1]
    (`code + 2^(b-1) - zero`: the same values). ValueError naming `where` and the first row that
    does not fit, which a grid fitted with `symmetric` never has."""
    shift = (1 << (bits - 1)) - zero.to(torch.int64)  # [rows, G]
    stored = codes.to(torch.int64) + shift[:, _group_of_columns(codes.shape[1], group)]  # [rows, cols]
    fits = (stored >= 0) & (stored < 1 << bits)
    if not bool(fits.all()):
        r = int(torch.nonzero(~fits)[0, 0])
        raise ValueError(f"{where}: row {r}'s grid is not symmetric (its codes do not fit {bits}-bit signed values "
                         "around its zero point), though the checkpoint's settings say symmetric; compress it again")
    return stored.to(torch.uint8)


def _group_of_columns(cols: int, group: int | None) -> torch.Tensor:
    """[cols] int64: the grid (group) index of each column."""
    return torch.arange(cols) // (group or cols)


def matrix_tensors(matrix: ExpertMatrix, spec: QuantSpec, where: str) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors of one expert matrix, named `{module}.weight_*`."""
    assert matrix.codes is not None and matrix.name.endswith(".weight"), matrix.name
    rows, cols = matrix.codes.shape
    if spec.group_size is not None and cols % spec.group_size:
        raise ValueError(f"{where}: {cols} columns are no whole number of --grid-group {spec.group_size} groups, "
                         "which compressed-tensors' group strategy needs; export with --format hf")
    if spec.code_bits is None:  # ternary codes: {lo, 0, hi} as a 2-bit affine grid, where it is one
        codes, scale, zero = ternary_as_affine(matrix.codes, matrix.grid["lo"], matrix.grid["hi"], spec.group_size,
                                               where)
    else:
        codes, scale, zero = matrix.codes, matrix.grid["scale"], matrix.grid["zero"]
    bits = bits_of(spec)
    module = matrix.name.removesuffix(".weight")
    if spec.symmetric:
        codes = centred(codes, zero, bits, spec.group_size, where)
    # Scales stay fp32: compressed-tensors dequantizes in the scale's dtype, so fp32 scales give
    # exactly our fp32 values before the one rounding to the model dtype, as our runtime does.
    tensors = {f"{module}.weight_packed": pack_int32(codes, bits),
               f"{module}.weight_scale": scale.float().contiguous(),
               f"{module}.weight_shape": torch.tensor([rows, cols], dtype=torch.int64)}
    if not spec.symmetric:
        tensors[f"{module}.weight_zero_point"] = pack_int32(zero.to(torch.int64).T.contiguous(), bits).T.contiguous()
    return tensors


def bits_of(spec: QuantSpec) -> int:
    """Bits per exported code: b, or 2 for ternary (its three levels in a 2-bit grid)."""
    return spec.code_bits or 2


def quantization_config(spec: QuantSpec, targets: list[str]) -> dict[str, Any]:
    """`config.json`'s `quantization_config` for experts quantized per `spec` (int, symmetric as `spec`)."""
    weights = {"num_bits": bits_of(spec), "type": "int", "symmetric": spec.symmetric, "dynamic": False,
               "strategy": "channel" if spec.group_size is None else "group", "group_size": spec.group_size,
               "observer": "minmax", "actorder": None, "block_structure": None, "observer_kwargs": {}}
    return {"quant_method": "compressed-tensors", "format": FORMAT, "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": targets, "weights": weights, "input_activations": None,
                                          "output_activations": None, "format": FORMAT}},
            "ignore": ["lm_head"], "kv_cache_scheme": None}
