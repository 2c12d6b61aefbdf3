"""Grids, batched GPTQ against the plain single-expert reference, fallback, RTN comparison."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qmoe_cli.quant import gptq_triton
from qmoe_cli.quant.gptq import (
    GPTQConfig,
    experts_per_batch,
    gptq_memory_bytes,
    gptq_quantize,
    gptq_reference,
    hessian_from_sum,
    hessian_sum,
    rtn_quantize,
)
from qmoe_cli.quant.grids import IntGrid, QuantSpec, TernaryGrid, dequantize, fit_grid, quantize

ALL_BITS = ["ternary", "2", "3", "4", "8"]


def _correlated_inputs(E: int, n: int, cols: int, seed: int) -> torch.Tensor:
    """X = Z @ A per expert: [E, n, cols] fp32 with strongly correlated columns, as real
    activations have; GPTQ only has an edge over RTN when H is far from diagonal."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(E, cols, cols, generator=g) / cols ** 0.5  # [E, cols, cols]
    return torch.randn(E, n, cols, generator=g) @ mix


def _hessians(x: torch.Tensor) -> torch.Tensor:
    """x [E, n, cols] -> H = 2 X^T X / n, [E, cols, cols] fp32."""
    return 2 * x.transpose(1, 2) @ x / x.shape[1]


def _layer(E: int, rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random weights [E, rows, cols] and Hessians [E, cols, cols] with one dead column each."""
    torch.manual_seed(seed)
    w = torch.randn(E, rows, cols)
    h = _hessians(_correlated_inputs(E, 4 * cols, cols, seed))
    h[:, 5, :] = 0  # an input feature that is always 0: exercises the dead-column path
    h[:, :, 5] = 0
    return w, h


# --- configuration -------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, field", [
    (dict(bits="5"), "bits"), (dict(bits=4), "bits"), (dict(bits="ternary", group_size=0), "group_size"),
    (dict(bits="2", group_size=True), "group_size"), (dict(bits="2", group_size=2.0), "group_size"),
    (dict(bits="4", symmetric=1), "symmetric"), (dict(bits="4", symmetric="yes"), "symmetric"),
])
def test_quant_spec_rejects_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=f"QuantSpec.{field}"):
        QuantSpec(**kwargs)


def test_quant_spec_levels():
    assert [QuantSpec(b).levels for b in ALL_BITS] == [3, 4, 8, 16, 256]
    assert QuantSpec("4", group_size=32).n_groups(97) == 4 and QuantSpec("4").n_groups(97) == 1


@pytest.mark.parametrize("kwargs, field", [
    (dict(damp=-0.1), "damp"), (dict(damp=float("nan")), "damp"), (dict(block_size=0), "block_size"),
    (dict(act_order=1), "act_order"), (dict(spec="ternary"), "spec"), (dict(loop="cuda"), "loop"),
])
def test_gptq_config_rejects_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=f"GPTQConfig.{field}"):
        GPTQConfig(**{"spec": QuantSpec("ternary"), **kwargs})


def test_gptq_rejects_mismatched_hessian():
    with pytest.raises(ValueError, match=r"h must be \[E, cols, cols\]"):
        gptq_quantize(torch.zeros(2, 3, 4), torch.zeros(2, 3, 3), GPTQConfig(QuantSpec("2")))


# --- grids ---------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from(ALL_BITS), group=st.sampled_from([None, 1, 3, 8]),
       rows=st.integers(1, 4), cols=st.integers(1, 11), seed=st.integers(0, 2**16),
       zero_row=st.booleans(), symmetric=st.booleans())
def test_round_to_nearest_on_grid(bits, group, rows, cols, seed, zero_row, symmetric):
    spec = QuantSpec(bits, group, symmetric)
    w = torch.randn(2, rows, cols, generator=torch.Generator().manual_seed(seed))
    if zero_row:
        w[1, 0] = 0  # a row (and its groups) with no range at all
    grid = fit_grid(w, spec)
    assert grid.n_groups == spec.n_groups(cols)
    codes = quantize(w, grid, spec)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= spec.maxq
    q = dequantize(codes, grid, spec)
    assert torch.all(q[w == 0] == 0), "0 is on every grid and must stay exactly 0"
    group_of = torch.arange(cols) // (group or cols)
    if isinstance(grid, TernaryGrid):
        lo, hi = grid.lo[..., group_of], grid.hi[..., group_of]  # [2, rows, cols]
        assert torch.all(lo <= 0) and torch.all(hi >= 0)
        expect = torch.where(w < lo / 2, lo, torch.where(w > hi / 2, hi, torch.zeros_like(w)))
        assert torch.equal(q, expect)
    else:
        assert isinstance(grid, IntGrid)
        scale = grid.scale[..., group_of]
        # Every weight lies inside its (0-widened) range, so rounding is off by <= half a step
        # (symmetric: the top level is a - scale/2, so +a is off by exactly half a step), plus
        # fp32 rounding: of w / scale before rounding (eps |w|), of scale and of the product q
        # (eps |q| each, |q| <= |w| + scale) and of the difference (eps scale).
        eps = torch.finfo(torch.float32).eps
        assert torch.all((w - q).abs() <= scale / 2 + 4 * eps * (w.abs() + scale))
    if symmetric:
        _assert_symmetric_grid(w, grid, spec)


def _assert_symmetric_grid(w: torch.Tensor, grid, spec: QuantSpec) -> None:
    """The symmetric grid of each row-group, from its definition: a = max |w| over the group
    (1 for an all-zero group, GPTQ's [-1, 1]); ternary {-a, 0, a} (a in bf16), b-bit scale
    2a / (2^b - 1) with zero point 2^(b-1)."""
    g = spec.group_size or w.shape[-1]
    for j in range(grid.n_groups):
        a = w[..., j * g:(j + 1) * g].abs().amax(-1)  # [E, rows]
        if isinstance(grid, TernaryGrid):
            a = a.bfloat16().float()
            assert torch.equal(grid.hi[..., j], a) and torch.equal(grid.lo[..., j], -a)
        else:
            a = torch.where(a == 0, 1.0, a)
            assert torch.equal(grid.scale[..., j], 2 * a / spec.maxq)  # a + a is exact: one rounding each
            assert torch.all(grid.zero[..., j] == 2 ** (int(spec.bits) - 1))


def test_quantize_column_slices_use_their_groups():
    spec = QuantSpec("3", group_size=4)
    w = torch.randn(2, 3, 10)
    grid = fit_grid(w, spec)
    full = quantize(w, grid, spec)
    assert torch.equal(quantize(w[:, :, 5:9], grid, spec, cols=slice(5, 9)), full[:, :, 5:9])
    index = torch.tensor([[9, 0, 4], [1, 8, 2]])  # [E, k] original columns, e.g. act-order
    picked = torch.stack([w[e, :, index[e]] for e in range(2)])
    expect = torch.stack([full[e, :, index[e]] for e in range(2)])
    assert torch.equal(quantize(picked, grid, spec, cols=index), expect)


# --- GPTQ against the reference ------------------------------------------------------------


@pytest.mark.parametrize("bits, act_order, group_size",
                         list(itertools.product(ALL_BITS, [False, True], [None, 32, 24])))
def test_batched_gptq_matches_reference(bits, act_order, group_size):
    # 97 columns in blocks of 32: the last block is partial. Groups of 32 start at block
    # starts; groups of 24 start inside blocks and straddle block ends (the lazily fitted
    # grid must see the pending in-block updates), and the last group of each is partial.
    w, h = _layer(E=3, rows=13, cols=97, seed=ALL_BITS.index(bits))
    cfg = GPTQConfig(QuantSpec(bits, group_size), block_size=32, act_order=act_order)
    res = gptq_quantize(w, h, cfg)
    assert not res.fallback.any()
    assert res.codes.dtype == torch.uint8 and int(res.codes.max()) <= cfg.spec.maxq
    assert torch.equal(dequantize(res.codes, res.grid, cfg.spec), res.q)
    assert torch.all(res.q[:, :, 5] == 0), "dead column must be zeroed"
    for e in range(3):
        q, codes, error = gptq_reference(w[e], h[e], cfg)
        assert (res.q[e] - q).abs().max() <= 1e-5
        assert torch.equal(res.codes[e], codes)
        torch.testing.assert_close(res.error[e], error, rtol=1e-4, atol=0)


@pytest.mark.parametrize("bits, act_order, group_size", [("4", False, 24), ("3", True, None), ("ternary", True, 32)])
def test_symmetric_gptq_matches_reference(bits, act_order, group_size):
    """Symmetric grids through the batched GPTQ (lazy groups included) against the reference: the
    grids are the scheme's, so both paths must agree exactly and keep every grid symmetric."""
    w, h = _layer(E=2, rows=7, cols=53, seed=11)
    cfg = GPTQConfig(QuantSpec(bits, group_size, symmetric=True), block_size=16, act_order=act_order)
    res = gptq_quantize(w, h, cfg)
    for e in range(2):
        q, codes, _ = gptq_reference(w[e], h[e], cfg)
        assert (res.q[e] - q).abs().max() <= 1e-5 and torch.equal(res.codes[e], codes)
    if isinstance(res.grid, TernaryGrid):
        assert torch.equal(res.grid.lo, -res.grid.hi)
    else:
        assert torch.all(res.grid.zero == 2 ** (int(bits) - 1))


@pytest.mark.parametrize("bits, group_size", [("ternary", 16), ("4", 24), ("8", None)])
def test_gptq_does_not_depend_on_block_size(bits, group_size):
    # Lazy batching is exact algebra, and groups are fitted on the fully updated weights, so
    # the block size may change rounding only through last-bit float differences.
    w, h = _layer(E=2, rows=16, cols=96, seed=3)
    runs = [gptq_quantize(w, h, GPTQConfig(QuantSpec(bits, group_size), block_size=b)) for b in (7, 128)]
    assert (runs[0].codes != runs[1].codes).float().mean() <= 1e-3
    torch.testing.assert_close(runs[0].error, runs[1].error, rtol=1e-4, atol=0)


def test_gptq_error_is_the_quadratic_form():
    w, h = _layer(E=2, rows=8, cols=40, seed=5)
    damp = 0.1
    res = gptq_quantize(w, h, GPTQConfig(QuantSpec("2"), damp=damp, block_size=16))
    hd = h.clone()
    dead = torch.diagonal(hd, dim1=1, dim2=2) == 0
    torch.diagonal(hd, dim1=1, dim2=2).add_(dead.float())
    torch.diagonal(hd, dim1=1, dim2=2).add_(damp * torch.diagonal(hd, dim1=1, dim2=2).mean(-1, keepdim=True))
    delta = w.masked_fill(dead[:, None, :], 0) - res.q
    quadratic = 0.5 * torch.einsum("erc,ecd,erd->e", delta, hd, delta)
    torch.testing.assert_close(res.error, quadratic, rtol=1e-3, atol=0)
    # RTN reports the same quantity, so the two compare
    rtn = rtn_quantize(w, QuantSpec("2"), h, damp=damp)
    delta = w.masked_fill(dead[:, None, :], 0) - rtn.q
    torch.testing.assert_close(rtn.error, 0.5 * torch.einsum("erc,ecd,erd->e", delta, hd, delta), rtol=1e-4, atol=0)


@pytest.mark.parametrize("bits", ["ternary", "2"])
def test_gptq_beats_rtn_on_layer_output(bits):
    E, rows, cols = 2, 32, 64
    torch.manual_seed(11)
    x = _correlated_inputs(E, 4 * cols, cols, seed=11)  # [E, n, cols]
    w = torch.randn(E, rows, cols)
    h = _hessians(x)
    spec = QuantSpec(bits)
    gptq, rtn = gptq_quantize(w, h, GPTQConfig(spec)), rtn_quantize(w, spec, h)
    out = x @ w.transpose(1, 2)  # [E, n, rows]
    gptq_err = (out - x @ gptq.q.transpose(1, 2)).flatten(1).norm(dim=1)  # [E]
    rtn_err = (out - x @ rtn.q.transpose(1, 2)).flatten(1).norm(dim=1)
    assert torch.all(gptq_err < rtn_err), (gptq_err, rtn_err)
    assert torch.all(gptq.error < rtn.error)


@pytest.mark.parametrize("group_size", [None, 16])
def test_ternary_rows_take_min_zero_max(group_size):
    w, h = _layer(E=2, rows=9, cols=48, seed=7)
    spec = QuantSpec("ternary", group_size)
    res = gptq_quantize(w, h, GPTQConfig(spec, block_size=16))
    width = group_size or 48
    for part in res.q.split(width, dim=-1):  # [E, rows, width]: one grid each
        for row in part.reshape(-1, part.shape[-1]):
            values = set(row.tolist()) | {0.0}
            assert len(values) <= 3 and min(values) <= 0 <= max(values)
    lo, hi = res.grid.lo, res.grid.hi
    assert torch.all(lo <= 0) and torch.all(hi >= 0)
    assert torch.all((res.q == 0) | (res.q == lo.repeat_interleave(width, -1)[..., :48])
                     | (res.q == hi.repeat_interleave(width, -1)[..., :48]))


# --- fallback ------------------------------------------------------------------------------


@pytest.mark.parametrize("bits, act_order, group_size", [("ternary", False, None), ("4", True, 16), ("3", False, 16)])
def test_only_bad_experts_fall_back(bits, act_order, group_size):
    w, h = _layer(E=4, rows=7, cols=40, seed=13)
    h[1] = -h[1]  # negative definite, dampening only makes it worse
    h[2, 3, 4] = float("nan")
    h[3] = 0  # no tokens routed here
    cfg = GPTQConfig(QuantSpec(bits, group_size), block_size=16, act_order=act_order)
    res = gptq_quantize(w, h, cfg)
    assert res.fallback.tolist() == [False, True, True, True]
    q, codes, error = gptq_reference(w[0], h[0], cfg)
    assert (res.q[0] - q).abs().max() <= 1e-5 and torch.equal(res.codes[0], codes)
    # Fallback is RTN with the same preparation: dead column 5 zeroed where the expert saw
    # tokens; an expert with no tokens keeps all its weights, since at inference it may see some.
    rtn = rtn_quantize(w, cfg.spec, h, damp=cfg.damp)
    assert torch.equal(res.q[1:], rtn.q[1:]) and torch.equal(res.codes[1:], rtn.codes[1:])
    assert torch.all(res.q[1:3, :, 5] == 0)
    assert torch.equal(res.q[3], rtn_quantize(w[3:], cfg.spec).q[0])
    torch.testing.assert_close(res.error[1:], rtn.error[1:], rtol=1e-4, atol=0, equal_nan=True)
    assert torch.isnan(res.error[2]) and res.error[3] == 0
    assert torch.equal(dequantize(res.codes, res.grid, cfg.spec), res.q)


# --- Hessian accumulation ------------------------------------------------------------------


def test_hessian_does_not_depend_on_how_tokens_are_split():
    # Ranks (or chunks) each sum their share of X^T X in fp64: the fp32 Hessian must come out
    # the same as from all tokens at once, and equal 2 X^T X / n.
    torch.manual_seed(17)
    x = torch.randn(500, 24) * torch.rand(24) * 10  # [n, cols] fp32, columns of mixed scale
    whole = hessian_from_sum(hessian_sum(x)[None], torch.tensor([500]))
    for split in ([7, 0, 200, 293], [250, 250], [1] * 500):
        parts = sum(hessian_sum(chunk) for chunk in x.split(split))
        assert torch.equal(hessian_from_sum(parts[None], torch.tensor([500])), whole)
    assert whole.dtype == torch.float32 and whole.shape == (1, 24, 24)
    torch.testing.assert_close(whole[0], 2 * x.double().T @ x.double() / 500, rtol=1e-7, atol=0, check_dtype=False)
    empty = hessian_from_sum(hessian_sum(x[:0])[None], torch.tensor([0]))
    assert torch.equal(empty, torch.zeros(1, 24, 24))


# --- the fused column loop (Triton) against the torch loop ------------------------------------

# On a GPU the kernel runs compiled; without one, under Triton's interpreter (TRITON_INTERPRET=1,
# CPU tensors), which checks the same kernel's logic but not the GPU's rounding (FMA contraction).
FUSED_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_triton = pytest.mark.skipif(bool(gptq_triton.unavailable(FUSED_DEVICE)),
                                  reason=gptq_triton.unavailable(FUSED_DEVICE) or "available")


@needs_triton
@pytest.mark.parametrize("bits, act_order, group_size, block_size", [
    ("ternary", False, None, 32), ("ternary", False, 24, 32), ("4", False, None, 128), ("3", False, 16, 40),
    ("2", True, 16, 32), ("8", True, None, 32),
])
def test_fused_column_loop_matches_the_torch_loop(bits, act_order, group_size, block_size):
    seed = len(bits) * 100 + block_size + (group_size or 0)
    w, h = _layer(3, 37, 97, seed)  # awkward shapes: blocks and groups end mid-way, rows < a tile
    h[2] = 0  # an expert without tokens: the identity H^-1, i.e. round-to-nearest
    w, h = w.to(FUSED_DEVICE), h.to(FUSED_DEVICE)
    spec = QuantSpec(bits, group_size)
    unfused = gptq_quantize(w, h, GPTQConfig(spec, block_size=block_size, act_order=act_order, loop="torch"))
    fused = gptq_quantize(w, h, GPTQConfig(spec, block_size=block_size, act_order=act_order, loop="triton"))
    same = fused.codes == unfused.codes
    # A last-bit difference (an FMA on the GPU) may flip a weight sitting on a rounding threshold.
    assert same.float().mean() >= 0.999
    torch.testing.assert_close(fused.q[same], unfused.q[same], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused.error, unfused.error, rtol=1e-4, atol=1e-6)
    assert torch.equal(fused.fallback, unfused.fallback) and fused.fallback.tolist() == [False, False, True]
    for name, value in unfused.grid.tensors().items():
        torch.testing.assert_close(fused.grid.tensors()[name], value, rtol=1e-5, atol=1e-6)


def test_triton_loop_says_why_it_cannot_run():
    reason = gptq_triton.unavailable(torch.device("cpu"))
    if reason:
        with pytest.raises(ValueError, match="GPTQConfig.loop 'triton': "):
            gptq_quantize(*_layer(1, 4, 8, 0), GPTQConfig(QuantSpec("ternary"), loop="triton"))
    # "auto" never picks the interpreter: CPU tensors always take the torch loop.
    w, h = _layer(2, 5, 19, 1)
    auto = gptq_quantize(w, h, GPTQConfig(QuantSpec("ternary"), block_size=8))
    plain = gptq_quantize(w, h, GPTQConfig(QuantSpec("ternary"), block_size=8, loop="torch"))
    assert torch.equal(auto.codes, plain.codes) and torch.equal(auto.error, plain.error)


# --- expert groups sized by memory -------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (measures its allocator)")
@pytest.mark.parametrize("loop", ["torch", "auto"])
def test_gptq_memory_estimate_bounds_what_gptq_allocates_on_the_gpu(loop):
    device = torch.device("cuda")
    for E, rows, cols in [(4, 96, 160), (2, 300, 64), (3, 768, 1024)]:
        w, h = (t.to(device) for t in _layer(E, rows, cols, 3))
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device) - w.nbytes - h.nbytes  # the inputs count in the estimate
        gptq_quantize(w, h, GPTQConfig(QuantSpec("ternary"), loop=loop))
        assert torch.cuda.max_memory_allocated(device) - base <= E * gptq_memory_bytes(rows, cols)


def test_experts_per_batch_fits_the_memory_given():
    shapes = [(6144, 2080), (2080, 6144)]
    per_expert = max(gptq_memory_bytes(r, c) for r, c in shapes)
    assert experts_per_batch(shapes, 10 * per_expert + 1, most=64) == 10
    assert experts_per_batch(shapes, per_expert // 2, most=64) == 1  # at least one, whatever is free
    assert experts_per_batch(shapes, 1000 * per_expert, most=64) == 64
