"""Random packed expert matrices (validated `DictionaryMatrix` / `BitpackedMatrix`) and the plain
reference of what every compressed expert linear computes, for the kernel and numerics tests."""

from __future__ import annotations

import functools

import torch
from test_codec_reference import fixed_probs, ternary

from qmoe_cli.codec.bitpack import pack_bits
from qmoe_cli.codec.dictionary import Codebook, DictionarySpec, build_dictionary
from qmoe_cli.codec.rows import encode_matrix
from qmoe_cli.formats.packed import BitpackedMatrix, DictionaryMatrix
from qmoe_cli.quant.grids import QuantSpec


@functools.cache
def book(p_zero: float, size: int = 1 << 16, max_len: int = 14) -> Codebook:
    return Codebook.from_sequences(build_dictionary(fixed_probs(p_zero), DictionarySpec(size, max_len)), max_len)


def ternary_matrix(rows: int, cols: int, seed: int, p_zero: float = 0.9, size: int = 4096) -> DictionaryMatrix:
    """A dictionary-coded ternary matrix with one random grid per row (lo < 0 < hi)."""
    words, offsets = encode_matrix(ternary(rows, cols, p_zero, seed), book(p_zero, size))
    g = torch.Generator().manual_seed(seed)
    lo, hi = -torch.rand(rows, 1, generator=g) - 0.1, torch.rand(rows, 1, generator=g) + 0.1
    return DictionaryMatrix({"words": words, "offsets": offsets, "lo": lo, "hi": hi}, book(p_zero, size), rows, cols,
                            QuantSpec("ternary"), f"random ternary {rows}x{cols}")


def bitpacked_matrix(rows: int, cols: int, bits: int, group: int | None, seed: int) -> BitpackedMatrix:
    """A bit-packed b-bit matrix with random codes and random grids (per row or per `group` columns)."""
    spec = QuantSpec(str(bits), group)
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (rows, cols), generator=g, dtype=torch.uint8)
    groups = spec.n_groups(cols)
    scale = torch.rand(rows, groups, generator=g) * 0.1 + 1e-3
    zero = torch.randint(0, 1 << bits, (rows, groups), generator=g).float()
    return BitpackedMatrix({"packed": pack_bits(codes, bits), "scale": scale, "zero": zero}, rows, cols, spec,
                           f"random {bits}-bit {rows}x{cols}")


def reference_linear(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The contract, exactly: weights [out, in] fp32 rounded to x's dtype, the sum in fp64,
    rounded once to x's dtype -> [n, out] (on x's device)."""
    w = weights.to(device=x.device, dtype=x.dtype).double()
    return (x.double() @ w.T).to(x.dtype)


def reference_experts(x: torch.Tensor, index: torch.Tensor, first: list[torch.Tensor],
                      second: list[torch.Tensor]) -> torch.Tensor:
    """second_e(relu(first_e(x))) per token, e = index of the token -> [N, d] in x's dtype."""
    out = torch.zeros_like(x)
    for e in index.unique().tolist():
        tokens = torch.nonzero(index == e)[:, 0]
        hidden = torch.relu(reference_linear(x[tokens], first[e]))
        out[tokens] = reference_linear(hidden, second[e])
    return out


def spacing(t: torch.Tensor) -> torch.Tensor:
    """The distance from |t| to the next larger value of t's dtype (subnormals included), fp64."""
    info = torch.finfo(t.dtype)  # eps: the spacing just above 1; below `tiny`, subnormals
    return torch.exp2(torch.floor(torch.log2(t.double().abs().clamp(min=info.tiny)))) * info.eps


def assert_contract(got: torch.Tensor, x: torch.Tensor, weights: torch.Tensor, min_exact: float = 0.99,
                    relu: bool = False) -> None:
    """got [n, out] is x @ weightsᵀ (then relu) under the contract: each output within one unit
    in the last place of the exact result plus what an fp32 sum of K products may lose
    (K 2^-24 sum |x w|), and in 16-bit dtypes most outputs exactly the correctly rounded value."""
    before = reference_linear(x, weights)
    expected = torch.relu(before) if relu else before
    w = weights.to(device=x.device, dtype=x.dtype).double()
    fp32_sum = x.shape[1] * 2.0 ** -24 * (x.double().abs() @ w.abs().T)
    err = (got.double() - expected.double()).abs()
    worst = float((err - spacing(before) - fp32_sum).max())
    assert worst <= 0, f"an output is off by {worst:.3g} beyond one unit in the last place and the fp32 sum's error"
    if x.dtype != torch.float32:  # in fp32 the sum's own rounding is the output's: exactness is not the rule
        exact = float((got == expected).double().mean())
        assert exact >= min_exact, f"only {exact:.4f} of the outputs are the correctly rounded value"
