"""Batched GPTQ over a group of experts, round-to-nearest, and a plain reference for tests.

GPTQ (Frantar et al. 2022) quantizes W column by column and spreads each column's rounding error
over the columns not yet quantized, weighted by the inverse of the layer-input Hessian
H = 2 X^T X / n. QMoE (Frantar & Alistarh 2023) runs it on the stacked weights of E experts at
once: every matrix op here takes a leading E dim, so the Python column loop, whose small ops are
bound by kernel launches on a GPU at expert-sized matrices, runs once per group of experts rather
than once per expert. (On CPU the ops are bound by memory instead, and batching gains little.)
On CUDA tensors the in-block part of that loop runs as one Triton kernel per block when Triton
is installed (`GPTQConfig.loop`, `gptq_triton.py`); `_columns` is its reference.

Per expert, as in the reference `fasterquant`:
1. dead columns (H_ii == 0: the input there is always 0) get H_ii = 1 and W[:, i] = 0;
2. optional act-order: columns sorted by descending H_ii, undone at the end;
3. dampening `damp * mean(diag H)` on the diagonal;
4. `Hinv` = upper Cholesky factor of H^-1 (cholesky -> cholesky_inverse -> cholesky upper);
5. blocked lazy-batch updates of `block_size` columns.

Grids. One grid per row (`group_size None`) is fitted up front from the whole (dead-zeroed) row.
With groups and no act-order a group's grid is fitted when the loop reaches the group's first
column, from the weights as error feedback has left them (the reference behaviour, except that
we also apply the pending in-block updates; see `_current_columns`). With groups *and* act-order,
columns of one group are visited out of order, so every group's grid is fitted up front on the
original column groups ("static groups") and each permuted column uses its original group's grid.

Fallback. An expert whose damped H is not positive definite (`cholesky_ex` info != 0), holds a
non-finite entry, or is all zeros (no tokens routed to it) is rounded to nearest, alone, and flagged:
its `Hinv` is replaced by the identity, under which the GPTQ loop is exactly round-to-nearest
(no error reaches other columns). Experts with no tokens keep their weights (no dead-column
zeroing), since at inference they may well see tokens.

Error. `error[e]` is GPTQ's loss sum, `sum((w - q)^2 / Hinv_ii^2) / 2` over the loop (the
reference `Losses`), which in exact arithmetic equals `1/2 tr((W - Q) H (W - Q)^T)` with H the
dead-fixed, damped Hessian and W the dead-zeroed weights. Fallback experts and `rtn_quantize`
report that quadratic form directly, so GPTQ and RTN errors compare (NaN for a NaN Hessian,
0 for an expert with no tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from .grids import Grid, QuantSpec, align, concat_groups, fit_grid, quantize_dequantize

LOOPS = ("auto", "torch", "triton")


@dataclass(frozen=True)
class GPTQConfig:
    """How `gptq_quantize` runs; JSON-serializable with `dataclasses.asdict`."""

    spec: QuantSpec  # the grid; required, there is no sensible default bit width
    # Fraction of the mean Hessian diagonal added to it. QMoE's 0.1 (GPTQ used 0.01): rare
    # experts see few tokens, so their H is low rank and needs more regularization.
    damp: float = 0.1
    # Lazy-batch width: wide enough that the deferred update is an efficient GEMM, narrow
    # enough that the in-block rank-1 updates stay in cache. GPTQ's 128 suits GPUs; on CPU,
    # where the in-block updates (work ~ block_size) are memory-bound, 32 ran ~2x faster.
    block_size: int = 128
    act_order: bool = False  # visit columns by descending H_ii (largest input energy first)
    # The in-block column loop: "torch" (a few kernels per column: launch-bound on a GPU),
    # "triton" (one fused kernel per run of columns, `gptq_triton.py`), or "auto": Triton for
    # CUDA tensors when it is installed, torch otherwise. Not part of the result's settings:
    # both compute the same GPTQ, to float rounding (tests/test_gptq.py compares them).
    loop: str = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.spec, QuantSpec):
            raise ValueError(f"GPTQConfig.spec must be a QuantSpec, got {type(self.spec).__name__}")
        d = self.damp
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not math.isfinite(d) or d < 0:
            raise ValueError(f"GPTQConfig.damp must be a finite number >= 0, got {d!r}")
        b = self.block_size
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ValueError(f"GPTQConfig.block_size must be an integer >= 1, got {b!r}")
        if not isinstance(self.act_order, bool):
            raise ValueError(f"GPTQConfig.act_order must be a bool, got {self.act_order!r}")
        if self.loop not in LOOPS:
            raise ValueError(f"GPTQConfig.loop must be one of {', '.join(LOOPS)}, got {self.loop!r}")


@dataclass(frozen=True, eq=False)
class GPTQResult:
    """Quantized experts. `dequantize(codes, grid, spec)` reproduces `q` bit for bit."""

    codes: Tensor  # [E, rows, cols] uint8, original column order
    grid: Grid  # parameters [E, rows, G], G groups in original column order
    q: Tensor  # [E, rows, cols] fp32, dequantized weights
    error: Tensor  # [E] fp32, 1/2 tr((W - Q) H (W - Q)^T); see the module docstring
    fallback: Tensor  # [E] bool, expert was rounded to nearest (no tokens or H not PD)


def hessian_sum(x: Tensor) -> Tensor:
    """X^T X of (some of) one expert's input tokens, in fp64: x [n, cols] -> [cols, cols] fp64.

    x may have any float dtype and leading dims (flattened). Products of fp32 (or bf16) inputs
    are exact in fp64, so partial sums over any split of the tokens -- chunks, or the shards of
    several ranks -- add up to the same total within fp64 rounding, ~2^29 times finer than the
    fp32 Hessian that `hessian_from_sum` casts to: the Hessian does not depend on the split.
    One expert per call: experts receive different numbers of tokens, and one [E, n, cols]
    batch would need padding to the busiest expert.
    """
    x = x.reshape(-1, x.shape[-1]).double()
    return x.T @ x


def gptq_memory_bytes(rows: int, cols: int) -> int:
    """Upper estimate of the peak bytes one expert's rows x cols matrix needs in
    `hessian_from_sum` + `gptq_quantize`, its weights and Hessian included.

    Counted from the code: the weights in ~5 fp32 copies (input, dead-zeroed, working copy, q,
    the lazy update's product) plus codes, 21 x rows x cols; the Hessian in ~7 fp32 copies
    (input, dead-fixed, damped, Cholesky factor, inverse, its factor, a contiguous copy for the
    fused loop), 28 x cols^2, which also covers the fp64 sum and its fp32 cast that precede it.
    Tokens and the caller's other tensors are not included.
    """
    return 21 * rows * cols + 28 * cols * cols


def experts_per_batch(shapes: Sequence[tuple[int, int]], free_bytes: int, most: int) -> int:
    """How many experts of matrices `shapes` ([(rows, cols)], quantized one matrix at a time)
    one batched call can take in `free_bytes`: at least 1, at most `most`."""
    need = max(gptq_memory_bytes(rows, cols) for rows, cols in shapes)
    return max(1, min(most, free_bytes // need))


def hessian_from_sum(s: Tensor, count: Tensor) -> Tensor:
    """GPTQ's H = 2 X^T X / n from summed products.

    s: [E, cols, cols] fp64 sums from `hessian_sum`; count: [E] int64 tokens summed over.
    Returns [E, cols, cols] fp32, all zeros where count is 0 (an expert without tokens).
    """
    scale = 2.0 / count.clamp(min=1).to(device=s.device, dtype=torch.float64)  # [E]
    return (s * scale[:, None, None]).float()


def gptq_quantize(w: Tensor, h: Tensor, cfg: GPTQConfig) -> GPTQResult:
    """GPTQ on E experts at once.

    w: [E, rows, cols] float (expert weights, out x in); h: [E, cols, cols] float (each
    expert's Hessian, e.g. from `hessian_from_sum`). Neither is modified. Runs on w's device.
    """
    w, h = _check_inputs(w, h)
    cols, spec = w.shape[-1], cfg.spec
    w, h, empty = _drop_dead_columns(w, h)
    lazy_groups = spec.group_size is not None and not cfg.act_order
    grid = None if lazy_groups else fit_grid(w, spec)  # [E, rows, G]
    perm = None
    if cfg.act_order:
        # stable: ties keep column order, so batched and single-expert runs agree exactly.
        perm = torch.argsort(torch.diagonal(h, dim1=1, dim2=2), dim=-1, descending=True, stable=True)
        w = _take_columns(w, perm)
        h = _take_columns(h.gather(1, perm[:, :, None].expand(-1, -1, cols)), perm)  # h[e][perm][:, perm]
    h = _dampen(h, cfg.damp)
    hinv, ok = _inverse_cholesky_upper(h)  # [E, cols, cols], [E]
    fallback = empty | ~ok
    # Identity H^-1: each column's error stays in that column, i.e. round-to-nearest.
    hinv[fallback] = torch.eye(cols, dtype=torch.float32, device=w.device)
    codes, q, loss, fitted = _column_loop(w, hinv, spec, cfg.block_size, grid, perm, _fused(cfg.loop, w.device))
    error = loss.clone()
    # Boolean indexing syncs once on GPU; the quadratic runs only on fallback experts.
    error[fallback] = _quadratic_error(w[fallback], q[fallback], h[fallback])
    if perm is not None:
        inverse = torch.argsort(perm, dim=-1)
        codes, q = _take_columns(codes, inverse), _take_columns(q, inverse)
    return GPTQResult(codes=codes, grid=fitted, q=q, error=error, fallback=fallback)


def _fused(loop: str, device: torch.device) -> bool:
    """Whether `loop` runs the Triton kernel on `device` (raises if it asks for it and cannot)."""
    if loop == "torch":
        return False
    from .gptq_triton import unavailable  # imports Triton, which is optional, only when asked

    reason = unavailable(device)
    if loop == "auto":  # the interpreter (CPU tensors) is for tests: never chosen by itself
        return device.type == "cuda" and not reason
    if reason:
        raise ValueError(f"GPTQConfig.loop 'triton': {reason}; use loop 'auto' or 'torch'")
    return True


def rtn_quantize(w: Tensor, spec: QuantSpec, h: Tensor | None = None, damp: float = 0.1) -> GPTQResult:
    """Round-to-nearest on the grid `gptq_quantize` would fit; `fallback` is all False.

    w: [E, rows, cols] float; h: [E, cols, cols] float or None. This is exactly what
    `gptq_quantize` does to a fallback expert. With h, dead columns are zeroed as in GPTQ and
    `error` is 1/2 tr((W - Q) H (W - Q)^T) with H dead-fixed and damped by `damp` as in GPTQ,
    so the two compare. Without h, `error` is 1/2 ||W - Q||_F^2 per expert (H = identity).
    """
    w, h = _check_inputs(w, h)
    if h is not None:
        w, h, _ = _drop_dead_columns(w, h)
    grid = fit_grid(w, spec)
    codes, q = quantize_dequantize(w, align(grid, spec, slice(None), w.shape[-1]))
    if h is None:
        error = 0.5 * (w - q).square().sum((1, 2))
    else:
        error = _quadratic_error(w, q, _dampen(h, damp))
    fallback = torch.zeros(w.shape[0], dtype=torch.bool, device=w.device)
    return GPTQResult(codes=codes, grid=grid, q=q, error=error, fallback=fallback)


def _check_inputs(w: Tensor, h: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Validate shapes and return fp32 views/copies: w [E, rows, cols], h [E, cols, cols]."""
    if w.dim() != 3 or min(w.shape) == 0:
        raise ValueError(f"w must be [E, rows, cols] with every dim >= 1, got {tuple(w.shape)}")
    if not w.is_floating_point():
        raise ValueError(f"w must be a float tensor, got {w.dtype}")
    if h is None:
        return w.float(), None
    E, _, cols = w.shape
    if h.shape != (E, cols, cols):
        raise ValueError(f"h must be [E, cols, cols] = {(E, cols, cols)} for w {tuple(w.shape)}, "
                         f"got {tuple(h.shape)}")
    if h.device != w.device:
        raise ValueError(f"w is on {w.device} but h is on {h.device}; move both to one device")
    return w.float(), h.float()


def _drop_dead_columns(w: Tensor, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """w [E, rows, cols], h [E, cols, cols] -> (w, h, empty [E] bool), new tensors.

    A column whose input is always 0 has no curvature: H_ii = 1 makes H invertible and W[:, i] = 0
    costs nothing (the output never sees it) and is free sparsity. Experts with no tokens at all
    (`empty`) are left alone: they fall back to round-to-nearest of their real weights.
    """
    empty = ~h.flatten(1).any(1)  # [E]; NaN counts as nonzero, so a NaN H is not "empty"
    dead = (torch.diagonal(h, dim1=1, dim2=2) == 0) & ~empty[:, None]  # [E, cols]
    h = h.clone()
    torch.diagonal(h, dim1=1, dim2=2).add_(dead.float())  # 0 + 1: exactly 1
    return w.masked_fill(dead[:, None, :], 0.0), h, empty


def _dampen(h: Tensor, damp: float) -> Tensor:
    """h [..., cols, cols] -> h + damp * mean(diag h) * I (per matrix), a new tensor."""
    diag = torch.diagonal(h, dim1=-2, dim2=-1)  # [..., cols]
    # Mean in fp64: the damping term must not depend on reduction order (batched vs one
    # expert, permuted vs not); a last-bit change here moves rounding decisions downstream.
    mean = diag.double().mean(-1).float()  # [...]
    h = h.clone()
    torch.diagonal(h, dim1=-2, dim2=-1).add_((damp * mean)[..., None])
    return h


def _inverse_cholesky_upper(h: Tensor) -> tuple[Tensor, Tensor]:
    """h [E, cols, cols] fp32 -> (U [E, cols, cols] with U^T U = h^-1, ok [E] bool).

    ok is False where h is not positive definite or holds a non-finite entry, and U is then
    the identity. cholesky_ex reports failure per matrix instead of raising for the whole
    batch, so one bad expert cannot take its group down.
    """
    eye = torch.eye(h.shape[-1], dtype=h.dtype, device=h.device)
    low, info = torch.linalg.cholesky_ex(h)  # [E, cols, cols] lower
    # Cholesky reads only the lower triangle, so a NaN above the diagonal would pass
    # unnoticed; the sum is non-finite iff some entry is, for the cost of one read.
    ok = (info == 0) & h.sum((1, 2)).isfinite()
    low[~ok] = eye  # failed factors hold garbage (NaN); keep it out of the inversion
    upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(low), upper=True)
    # A PD but badly conditioned H can overflow its inverse.
    ok = ok & (info == 0) & upper.sum((1, 2)).isfinite()
    upper[~ok] = eye
    return upper, ok


def _take_columns(x: Tensor, index: Tensor) -> Tensor:
    """x [E, rows, cols], index [E, cols] int64 -> x[e][:, index[e]] for every e."""
    return x.gather(2, index[:, None, :].expand(-1, x.shape[1], -1))


def _quadratic_error(w: Tensor, q: Tensor, h: Tensor) -> Tensor:
    """1/2 sum over rows of (w - q) h (w - q)^T: w, q [E, rows, cols], h [E, cols, cols] -> [E]."""
    d = w - q
    return 0.5 * ((d @ h) * d).sum((1, 2))


def _column_loop(
    w: Tensor, hinv: Tensor, spec: QuantSpec, block_size: int, grid: Grid | None, perm: Tensor | None,
    fused: bool,
) -> tuple[Tensor, Tensor, Tensor, Grid]:
    """The blocked GPTQ loop on prepared weights (dead-zeroed, permuted when `perm` is given).

    w [E, rows, cols] fp32 (not modified); hinv [E, cols, cols] fp32 upper; grid: [E, rows, G]
    fitted up front (per row, or act-order's static groups) or None to fit each group when the
    loop reaches it; perm [E, cols] int64 or None. Returns codes [E, rows, cols] uint8, q
    [E, rows, cols] fp32 (both in w's column order), loss [E] fp32, grid [E, rows, G].

    Each block is cut into runs of columns that share one grid (a lazily fitted group starts a
    new run); a run goes to `gptq_triton.columns` when `fused`, else to `_columns`.
    """
    w = w.clone()
    E, cols = w.shape[0], w.shape[-1]
    g = spec.group_size
    codes = torch.empty(w.shape, dtype=torch.uint8, device=w.device)
    q = torch.empty_like(w)
    loss = torch.zeros(E, dtype=torch.float32, device=w.device)
    aligned = None if (grid is None or g is None) else align(grid, spec, perm, cols)  # [E, rows, cols]
    col_grid, fitted = grid, []
    run_columns = _fused_columns if fused else _columns
    if fused:  # cholesky_ex returns H^-1 column-major; the kernel reads its rows, so make them contiguous
        hinv = hinv.contiguous()
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = w[:, :, i1:i2].clone()  # [E, rows, b]
        err1 = torch.zeros_like(w1)  # [E, rows, b]
        hinv1 = hinv[:, i1:i2, i1:i2]  # [E, b, b]
        for j, stop in _runs(i1, i2, g if grid is None else None):
            if aligned is not None:
                col_grid = aligned.map(lambda t: t[..., j:stop])  # [E, rows, stop - j]
            elif grid is None and j % g == 0:
                col_grid = fit_grid(_current_columns(w, w1, err1, hinv, i1, i2, j, g), spec)  # [E, rows, 1]
                fitted.append(col_grid)
            run_columns(w1, err1, hinv1, codes[:, :, i1:i2], q[:, :, i1:i2], col_grid, j - i1, stop - i1)
        loss += (err1 * err1).sum((1, 2)) / 2
        w[:, :, i2:] -= err1 @ hinv[:, i1:i2, i2:]  # lazy update: [E, rows, b] @ [E, b, cols - i2]
    return codes, q, loss, (grid if grid is not None else concat_groups(fitted))


def _runs(i1: int, i2: int, group: int | None) -> list[tuple[int, int]]:
    """Columns [i1, i2) cut where a lazily fitted group starts (every `group` columns; None:
    no cuts) -> [(start, stop)], absolute column indices."""
    if group is None:
        return [(i1, i2)]
    cuts = sorted({i1, *range(-(-i1 // group) * group, i2, group), i2})
    return list(zip(cuts, cuts[1:]))


def _columns(w1: Tensor, err1: Tensor, hinv1: Tensor, codes1: Tensor, q1: Tensor, grid: Grid, a: int, b: int) -> None:
    """GPTQ's in-block loop over columns [a, b) of a block, one column at a time, in place.

    w1, err1 [E, rows, B] fp32: the block's weights as error feedback has left them, and the
    scaled errors; hinv1 [E, B, B] fp32 upper; codes1 [E, rows, B] uint8, q1 [E, rows, B] fp32:
    outputs (views into the whole matrix's); grid aligned to columns [a, b) ([E, rows, b - a])
    or one per row ([E, rows, 1]). Every column costs a handful of small kernels: on a GPU the
    loop is bound by launches, which `gptq_triton.columns` fuses into one.
    """
    per_column = next(iter(grid.tensors().values())).shape[-1] > 1
    col_grid = grid
    for i in range(a, b):
        if per_column:
            col_grid = grid.map(lambda t: t[..., i - a:i - a + 1])  # [E, rows, 1]
        wc = w1[:, :, i:i + 1]  # [E, rows, 1]
        c, qc = quantize_dequantize(wc, col_grid)  # [E, rows, 1]
        codes1[:, :, i:i + 1], q1[:, :, i:i + 1] = c, qc
        err = (wc - qc) / hinv1[:, i:i + 1, i:i + 1]  # [E, rows, 1]
        # rank-1 [E, rows, 1] x [E, 1, B - i], fused: no temporary, one launch per column
        w1[:, :, i:].addcmul_(err, hinv1[:, i:i + 1, i:], value=-1)
        err1[:, :, i:i + 1] = err


def _fused_columns(w1: Tensor, err1: Tensor, hinv1: Tensor, codes1: Tensor, q1: Tensor, grid: Grid,
                   a: int, b: int) -> None:
    """`_columns` as one Triton kernel (imported here: Triton is optional)."""
    from .gptq_triton import columns

    columns(w1, err1, hinv1, codes1, q1, grid, a, b)


def _current_columns(w: Tensor, w1: Tensor, err1: Tensor, hinv: Tensor,
                     i1: int, i2: int, j: int, g: int) -> Tensor:
    """Columns [j, j + g) as error feedback has left them when the loop reaches column j.

    Inside the block [i1, i2) `w1` is up to date; beyond it `w` still lacks this block's lazy
    update from columns i1..j-1, applied here to just these columns. The reference fits on the
    stale `w`, which makes the grid depend on block_size; this way, as without groups, the result
    is independent of block_size in exact arithmetic. Returns [E, rows, min(g, cols - j)].
    """
    stop = min(j + g, w.shape[-1])
    inside = w1[:, :, j - i1:min(stop, i2) - i1]
    if stop <= i2:
        return inside
    outside = w[:, :, i2:stop]
    if j > i1:
        outside = outside - err1[:, :, :j - i1] @ hinv[:, i1:j, i2:stop]
    return torch.cat([inside, outside], dim=-1)


def gptq_reference(w: Tensor, h: Tensor, cfg: GPTQConfig) -> tuple[Tensor, Tensor, Tensor]:
    """Plain single-expert GPTQ, the reference `fasterquant` loop; used by tests only.

    w [rows, cols], h [cols, cols] -> (q [rows, cols] fp32, codes [rows, cols] uint8, error [] fp32).
    No fallback: raises torch.linalg.LinAlgError where H is not positive definite. Departures
    from the published loop, shared with `gptq_quantize`: the grid is fitted after dead columns
    are zeroed, the damping mean is taken in fp64, ties in act-order keep column order, and a
    lazily fitted group sees the current weights including pending in-block updates.
    """
    spec, g, bs = cfg.spec, cfg.spec.group_size, cfg.block_size
    W, H = w.float().clone(), h.float().clone()
    rows, cols = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    grid = fit_grid(W[None], spec)  # per row, or act-order's static groups
    perm = torch.arange(cols)
    if cfg.act_order:
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        W, H = W[:, perm], H[perm][:, perm]
    H += cfg.damp * torch.diag(H).double().mean().float() * torch.eye(cols)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q, C, Losses = torch.zeros_like(W), torch.zeros(rows, cols, dtype=torch.uint8), torch.zeros_like(W)
    col_grid = grid
    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            j = i1 + i
            if g is not None and cfg.act_order:
                col_grid = grid.take(perm[j:j + 1] // g)
            elif g is not None and j % g == 0:
                stop = min(j + g, cols)
                current = torch.cat([W1[:, i:stop - i1], W[:, i2:stop] - Err1[:, :i] @ Hinv[i1:j, i2:stop]], 1)
                col_grid = fit_grid(current[None], spec)
            c, q = quantize_dequantize(W1[None, :, i:i + 1], col_grid)
            C[:, j], Q[:, j] = c[0, :, 0], q[0, :, 0]
            d = Hinv1[i, i]
            Losses[:, j] = (W1[:, i] - Q[:, j]) ** 2 / d ** 2 / 2
            err = (W1[:, i] - Q[:, j]) / d
            W1[:, i:].addcmul_(err[:, None], Hinv1[i, i:][None, :], value=-1)  # -= outer(err, Hinv1[i, i:])
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    inverse = torch.argsort(perm)
    return Q[:, inverse], C[:, inverse], Losses.sum()
