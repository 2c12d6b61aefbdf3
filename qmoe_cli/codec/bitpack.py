"""Dense bit-packing of b-bit integer codes (2 <= b <= 8), row by row.

Each row of `cols` codes becomes ceil(cols * b / 8) bytes, most significant bit first, so any
row can be unpacked alone. This is how `qmoe pack` stores non-ternary checkpoints: exactly b
bits per weight plus at most 7 bits of padding per row.
"""

from __future__ import annotations

import torch

_BITS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def row_bytes(cols: int, bits: int) -> int:
    return (cols * bits + 7) // 8


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes [rows, cols] uint8, each < 2^bits -> packed [rows, row_bytes(cols, bits)] uint8."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in [1, 8], got {bits}")
    rows, cols = codes.shape
    if codes.numel() and int(codes.max()) >= 1 << bits:
        raise ValueError(f"a code of {int(codes.max())} does not fit {bits} bits")
    shifts = torch.arange(bits - 1, -1, -1, dtype=torch.uint8)
    planes = (codes[..., None] >> shifts) & 1  # [rows, cols, bits], MSB first
    stream = planes.reshape(rows, cols * bits)
    padded = torch.zeros(rows, row_bytes(cols, bits) * 8, dtype=torch.uint8)
    padded[:, :cols * bits] = stream
    return (padded.view(rows, -1, 8) * _BITS).sum(dim=2, dtype=torch.int32).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of `pack_bits`: packed [rows, row_bytes(cols, bits)] uint8 -> codes [rows, cols] uint8."""
    rows, nbytes = packed.shape
    if nbytes != row_bytes(cols, bits):
        raise ValueError(f"{cols} codes of {bits} bits need {row_bytes(cols, bits)} bytes per row, got {nbytes}")
    stream = ((packed[..., None] & _BITS) != 0).to(torch.uint8).reshape(rows, nbytes * 8)[:, :cols * bits]
    weights = (1 << torch.arange(bits - 1, -1, -1, dtype=torch.int32))
    return (stream.reshape(rows, cols, bits).int() * weights).sum(dim=2).to(torch.uint8)
