"""What the owner of a slice of experts computes (steps 3 and 4 of `block`'s docstring, and the
shared expert's solves and Hessian sums of step 6): functions of the weights, the tokens and the
settings, with no communication.

The input matrices of an expert (Switch's `wi`; gate and up of a SwiGLU expert) share the
Hessian of its input, so they are stacked by rows into one batched GPTQ call (GPTQ treats rows
independently); the output matrix's inputs are computed from the quantized input matrices, as the
compressed model will compute them.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Sequence

import torch

from ..arch import Architecture, ExpertShape, MoEBlock
from ..quant.gptq import GPTQResult, gptq_quantize, hessian_from_sum, hessian_sum, rtn_quantize
from ..quant.grids import QuantSpec
from ..run.stream import ListBuffer, RunConfig, bind_expert, expert_output
from .config import CompressConfig
from .encoded import Encoded, empty_encoded, input_rows, split_inputs
from .exchange import STATS, Arrivals


def solve_shapes(shape: ExpertShape) -> list[tuple[int, int]]:
    """(rows, cols) of the two batched GPTQ calls per expert: the input matrices stacked by rows,
    then the output matrix."""
    return [(sum(shape.shapes[m][0] for m in shape.inputs), shape.shapes[shape.inputs[0]][1]),
            shape.shapes[shape.output]]


def solve_sums(cfg: CompressConfig, w: torch.Tensor, sums: torch.Tensor | None, used: torch.Tensor) -> GPTQResult:
    """w [n, rows, cols] fp32; sums [n, cols, cols] fp64 from `hessian_sum` (None for rtn);
    used [n] int64: tokens in each sum."""
    if cfg.method != "gptq":
        return rtn_quantize(w, cfg.spec)
    return gptq_quantize(w, hessian_from_sum(sums, used), cfg.gptq)


def solve(cfg: CompressConfig, w: torch.Tensor, features: list[torch.Tensor], used: torch.Tensor) -> GPTQResult:
    """w [n, rows, cols] fp32; features: each expert's Hessian inputs [n_j, cols] (unused by
    rtn); used [n] int64: tokens in each Hessian."""
    if cfg.method != "gptq":
        return rtn_quantize(w, cfg.spec)
    sums = w.new_empty((len(features), w.shape[-1], w.shape[-1]), dtype=torch.float64)  # [n, cols, cols]
    for e, x in enumerate(features):
        sums[e] = hessian_sum(x)
    return solve_sums(cfg, w, sums, used)


def solve_slice(cfg: CompressConfig, arch: Architecture, block: MoEBlock, mine: Sequence[int], arrivals: Arrivals,
                used: torch.Tensor, run: RunConfig) -> tuple[list[Encoded], torch.Tensor]:
    """Step 3: quantize experts `mine` from their `arrivals` (used [n] int64: tokens in each
    Hessian) -> (one Encoded per matrix, stats [n, STATS, 2] fp64: per GPTQ call, the input
    matrices' and the output matrix's)."""
    shape, spec = arch.expert, cfg.spec
    if not mine:
        n_stats = torch.zeros(0, STATS, 2, dtype=torch.float64)
        return [empty_encoded(*shape.shapes[m], spec, run.device) for m in shape.matrices], n_stats
    weights = block.experts.load(list(mine), run.device, torch.float32)
    gptq = cfg.method == "gptq"  # rtn needs no Hessians
    inputs = [block.ffn_norm(x[h].to(run.device)).float()  # [n_j, d] fp32, the Hessian's tokens
              for x, h in zip(arrivals.x, arrivals.hessian)] if gptq else []
    if gptq and getattr(block, "routing_on_input", False):  # Llama 4: the experts see weighted inputs
        inputs = [x * p[h].to(x.device, x.dtype)[:, None] for x, p, h in zip(inputs, arrivals.prob, arrivals.hessian)]
    # The input matrices share the input's Hessian: one call, stacked by rows [n, sum rows, d].
    wi = solve(cfg, torch.stack([torch.cat([getattr(e, m).weight for m in shape.inputs]) for e in weights]),
               inputs, used)
    rows = input_rows(shape)
    # The output's inputs, from quantized inputs.
    own = getattr(block, "expert_hidden", None)  # with the block's per-expert biases (GPT-OSS)
    hidden = [(shape.hidden if own is None else partial(own, mine[e]))(x, {m: wi.q[e, r] for m, r in rows.items()})
              for e, x in enumerate(inputs)]
    wo = solve(cfg, torch.stack([getattr(e, shape.output).weight for e in weights]), hidden, used)
    stats = torch.stack([torch.stack([r.error.double(), r.fallback.double(), (r.q == 0).sum((1, 2)).double()], 1)
                         for r in (wi, wo)], 2).cpu()  # [n, STATS, 2]
    return [*split_inputs(shape, wi), Encoded(wo.codes, wo.grid)], stats


def expert_outputs(arch: Architecture, spec: QuantSpec, block: MoEBlock, mine: Sequence[int], arrivals: Arrivals,
                   encoded: list[Encoded], run: RunConfig, device: torch.device) -> list[torch.Tensor]:
    """Step 4's arithmetic: the slice's tokens through its quantized experts; per expert, the
    weighted outputs [n_j, d] in the tokens' dtype, on `device` (the communication device)."""
    values = [enc.values(spec) for enc in encoded]  # each [n, rows, cols] fp32
    outputs = []
    for e, (x, weight) in enumerate(zip(arrivals.x, arrivals.prob)):
        if not x.shape[0]:
            outputs.append(x)
            continue
        expert = bind_expert(block, mine[e], arch.make_expert(
            {m: v[e].to(device=run.device, dtype=run.dtype) for m, v in zip(arch.expert.matrices, values)}))
        # Chunks of the expert's tokens in global order, whatever the rank count: same rows, same bits.
        outputs.append(torch.cat([
            expert_output(block, expert, x[c:c + run.token_chunk].to(run.device), weight[c:c + run.token_chunk])
            .to(device=device, dtype=x.dtype) for c in range(0, x.shape[0], run.token_chunk)]))
    return outputs


def shared_hessian_sum(block: MoEBlock, buffer: ListBuffer, usable: torch.Tensor, run: RunConfig,
                       features: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum [cols, cols] fp64 of `hessian_sum(features(norm(x)))` over this rank's `usable` [N]
    bool tokens, their count). Sample by sample in token chunks, the unit that is the same however
    samples are sharded."""
    total, count = None, 0
    for part in buffer.sample_chunks(run.token_chunk):
        keep = usable[part]
        x = block.ffn_norm(buffer.data[part][keep].to(run.device)).float()  # [n, d] fp32
        h = hessian_sum(features(x))  # [cols, cols] fp64
        total = h if total is None else total + h
        count += int(keep.sum())
    assert total is not None, "every rank holds a sample (`pipeline._shard`)"
    return total, count
