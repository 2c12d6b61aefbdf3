"""Quantization codes on the wire between ranks: packed to about log2(levels) bits per code.

Codes are one byte per weight in memory (uint8, < `levels`), but a byte carries log2(256) bits
and a ternary code only log2(3) = 1.585. For sending a slice's codes to rank 0 (or saved codes
from rank 0 to an owner on --resume), k consecutive codes become one base-`levels` number
written in m bytes: ternary 5 codes per byte (3^5 = 243 <= 256: 1.6 bits a code, 1% above
log2 3), b-bit codes 8 per b bytes (exactly b bits; 8-bit codes as they are). Not entropy-coded: the dictionary code of
`qmoe pack` would get ternary to ~0.8 bits, but needs a dictionary fitted on the whole model.

Pure tensor functions on any device (the NCCL path packs on the GPU). Memory: an int64 number
per k codes, 8/k bytes per code while packing or unpacking.
"""

from __future__ import annotations

import math

import torch

from ..quant.grids import QuantSpec


def layout(spec: QuantSpec) -> tuple[int, int]:
    """(codes per word k, bytes per word m) for `spec`'s codes; a word stays below 2^63."""
    return spec.wire_layout


def packed_bytes(count: int, spec: QuantSpec) -> int:
    """Bytes `pack_codes` makes of `count` codes."""
    k, m = layout(spec)
    return math.ceil(count / k) * m


def pack_codes(codes: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """codes [...] uint8, each < spec.levels -> [packed_bytes(codes.numel(), spec)] uint8, same device."""
    k, m = layout(spec)
    flat = codes.reshape(-1).long()
    words = math.ceil(flat.numel() / k)
    digits = torch.nn.functional.pad(flat, (0, words * k - flat.numel())).view(words, k)  # [words, k]
    powers = spec.levels ** torch.arange(k - 1, -1, -1, device=codes.device, dtype=torch.long)  # [k]
    value = (digits * powers).sum(1)  # [words] int64 < levels^k <= 256^m
    shifts = 8 * torch.arange(m, device=codes.device, dtype=torch.long)  # little-endian bytes
    return ((value[:, None] >> shifts) & 255).to(torch.uint8).reshape(-1)


def unpack_codes(packed: torch.Tensor, spec: QuantSpec, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of `pack_codes`: packed [packed_bytes(prod(shape), spec)] uint8 -> codes `shape` uint8."""
    k, m = layout(spec)
    count = math.prod(shape)
    if packed.shape != (packed_bytes(count, spec),):
        raise ValueError(f"unpack_codes: {count} codes of {spec.bits} bits need {packed_bytes(count, spec)} "
                         f"packed bytes, got a tensor of shape {tuple(packed.shape)}")
    shifts = 8 * torch.arange(m, device=packed.device, dtype=torch.long)
    value = (packed.view(-1, m).long() << shifts).sum(1)  # [words] int64
    powers = spec.levels ** torch.arange(k - 1, -1, -1, device=packed.device, dtype=torch.long)
    digits = (value[:, None] // powers) % spec.levels  # [words, k]
    return digits.reshape(-1)[:count].to(torch.uint8).view(shape)
