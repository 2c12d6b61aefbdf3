"""One sparse block of `qmoe compress`, quantized by all ranks of a process group together.

Every rank holds the hidden states of its own shard of the calibration samples (contiguous, so
rank order is global sample order). For a sparse block:

1. every rank routes its own tokens; per expert, the counts of routed and of usable (non-sentinel)
   tokens are all-gathered, so every rank knows the global counts, the token cap (`token_cap` x
   the mean per expert) and which of its tokens enter each Hessian: an expert's first `cap`
   usable tokens in global sample order, exactly the tokens one process would take;
2. experts are visited in rounds of `group_size x world_size`, each round split into one
   contiguous slice per rank of at most `group_size` experts (one batched GPTQ call). For every
   slice, every rank sums X^T X over its own tokens in fp64 and the sums are reduced onto the
   slice's owner, which runs GPTQ on the slice's `wi`. Each owner then broadcasts wi's codes and
   grids, all ranks sum the Hessians of wo's inputs relu(x Wi_q^T) the same way, and the owner
   quantizes `wo`;
3. each owner broadcasts its slice's finished codes and grids (codes, not weights: one byte per
   weight); every rank runs its own tokens through the dequantized experts, and rank 0 writes
   them to the group files and the block's statistics to the manifest.

A block finished before a `--resume` is replayed: rank 0 reads its codes and broadcasts them,
and every rank runs step 3's propagation. With one process every collective is the identity.

Why the result does not depend on the number of ranks: token selection follows global order,
the Hessian sums are fp64 (exact products, rounding ~2^-29 of fp32's resolution) cast to fp32
once, and each expert's GPTQ is independent of which experts share its batch. What remains are
last-bit differences where a matmul's kernel depends on how many rows it is given (row counts
below ~12 on MKL), which move a handful of codes at most.

Memory per rank: as one process (the runtime's block + one slice's weights and Hessians), plus
one slice's fp64 partial sums while they are reduced: group_size x d_ff^2 x 8 bytes at most.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm import tqdm

from ..arch import Architecture, MoEBlock
from ..formats.quantized import QuantizedExperts, QuantizedWeights, expert_file, save_tensors_atomic, write_json_atomic
from ..quant.gptq import GPTQResult, gptq_quantize, hessian_from_sum, hessian_sum, rtn_quantize
from ..quant.grids import Grid, IntGrid, QuantSpec, TernaryGrid, dequantize
from ..run.stream import ListBuffer, Routing, RunConfig, apply_expert, finish_sparse, route
from .config import CompressConfig
from .distributed import Comm, TensorSpec, split_evenly


@dataclass(frozen=True)
class BlockStats:
    """What one sparse block's compression did; stored in the manifest (deterministic fields)."""

    block: str  # "encoder.3"
    tokens_min: int
    tokens_median: int
    tokens_max: int
    error: float  # sum over experts and matrices of the GPTQ objective 1/2 tr(dW H dW^T)
    fallbacks: int  # expert matrices rounded to nearest (no tokens or Hessian not PD)
    zero_fraction: float  # share of expert weights quantized to exactly 0


@dataclass(frozen=True)
class TokenPlan:
    """Which calibration tokens enter each expert's Hessians, decided from global counts."""

    routed: torch.Tensor  # [E] int64, tokens routed to each expert, all ranks
    used: torch.Tensor  # [E] int64, tokens in each expert's Hessian, all ranks (usable, capped)
    take: torch.Tensor  # [E] int64, this rank's share of `used`: its first take[j] usable tokens


def plan_tokens(index: torch.Tensor, usable: torch.Tensor, num_experts: int, token_cap: float,
                comm: Comm) -> TokenPlan:
    """index [A] int64: the expert of each of this rank's routing assignments (A = tokens x k);
    usable [A] bool: the assignment's token is not a sentinel position.

    An expert's Hessian takes its first `cap` usable tokens in global order; rank r's share
    is what remains of the cap after the usable tokens of ranks 0..r-1.
    """
    local = torch.stack([torch.bincount(index, minlength=num_experts),
                         torch.bincount(index[usable], minlength=num_experts)])  # [2, E]
    counts = comm.all_gather(local.to(comm.device), "token counts").cpu()  # [W, 2, E]
    routed, usable_counts = counts[:, 0].sum(0), counts[:, 1]
    cap = max(1, math.ceil(token_cap * int(routed.sum()) / num_experts))
    earlier = usable_counts[:comm.rank].sum(0)  # [E]
    take = (cap - earlier).clamp(min=0).minimum(usable_counts[comm.rank])
    return TokenPlan(routed, usable_counts.sum(0).clamp(max=cap), take)


@dataclass(frozen=True, eq=False)
class Encoded:
    """One matrix of n experts as stored: codes [n, rows, cols] uint8, grid [n, rows, G] fp32."""

    codes: torch.Tensor
    grid: Grid

    @staticmethod
    def specs(n: int, rows: int, cols: int, spec: QuantSpec) -> list[TensorSpec]:
        """Shapes and dtypes of `tensors()` for n experts of a rows x cols matrix."""
        grid = ((n, rows, spec.n_groups(cols)), torch.float32)
        return [((n, rows, cols), torch.uint8), grid, grid]

    @classmethod
    def from_tensors(cls, tensors: Sequence[torch.Tensor], spec: QuantSpec) -> "Encoded":
        codes, first, second = tensors
        grid = (TernaryGrid(lo=first, hi=second) if spec.ternary
                else IntGrid(scale=first, zero=second, maxq=spec.maxq))
        return cls(codes, grid)

    @classmethod
    def stored(cls, bank: QuantizedExperts, ids: Sequence[int], name: str) -> "Encoded":
        """Experts `ids` of a saved block, read from its group files."""
        parts = [bank.encoded(j, name) for j in ids]
        fields = zip(*([codes, *grid.tensors().values()] for codes, grid in parts))
        return cls.from_tensors([torch.cat(list(f)) for f in fields], bank.spec)

    def tensors(self) -> list[torch.Tensor]:
        return [self.codes, *self.grid.tensors().values()]

    def values(self, spec: QuantSpec) -> torch.Tensor:
        """The dequantized weights [n, rows, cols] fp32 (bit for bit GPTQResult.q)."""
        return dequantize(self.codes, self.grid, spec)


class ExpertCompressor:
    """The runtime's sparse-block hook: quantize a block's experts across the ranks of `comm`
    and propagate every rank's tokens through them; rank 0 writes files and manifest."""

    def __init__(self, cfg: CompressConfig, arch: Architecture, partial: Path, skip: dict[str, torch.Tensor],
                 manifest: dict, log: Callable[[str], None], comm: Comm):
        self.cfg, self.arch, self.partial, self.skip, self.log, self.comm = cfg, arch, partial, skip, log, comm
        self.manifest = manifest  # written by rank 0 only; the others read `finished`
        self.root = comm.rank == 0
        self.saved = QuantizedWeights(partial, arch, cfg.spec, cfg.group_size) if self.root else None

    def close(self) -> None:
        if self.saved is not None:
            self.saved.close()

    def __call__(self, stack: str, index: int, block: MoEBlock, buffer: ListBuffer, run: RunConfig) -> None:
        name = f"{stack}.{index}"
        routing = route(block, buffer, run)
        out = torch.zeros_like(buffer.data)  # the quantized experts' outputs, added once all have run
        if name in self.manifest["finished"]:
            with self.comm.phase(name):
                self._replay(stack, index, block, buffer, routing, run, out)
            finish_sparse(block, buffer, out, run)
            return
        started = time.perf_counter()
        with self.comm.phase(name):
            stats = self._quantize(stack, index, block, buffer, routing, run, out)
        finish_sparse(block, buffer, out, run)
        if self.root:
            self.manifest["blocks"][name] = asdict(stats)
            self.manifest["finished"].append(name)
            write_json_atomic(self.partial / "manifest.json", self.manifest)
            traffic = (f", {self.comm.traffic[name] / 1e6:.1f} MB communicated by rank 0"
                       if self.comm.world_size > 1 else "")
            self.log(f"{name}: tokens/expert {stats.tokens_min}/{stats.tokens_median}/{stats.tokens_max} "
                     f"(min/median/max), error {stats.error:.4g}, fallbacks {stats.fallbacks}, "
                     f"zeros {stats.zero_fraction:.1%}, {time.perf_counter() - started:.1f}s{traffic}")

    def _quantize(self, stack: str, index: int, block: MoEBlock, buffer: ListBuffer, routing: Routing,
                  run: RunConfig, out: torch.Tensor) -> BlockStats:
        """Quantize every expert of the block, round by round; returns the block's statistics."""
        num = block.experts.num_experts
        plan = plan_tokens(routing.index, routing.per_assignment(~self.skip[stack]), num, self.cfg.token_cap, self.comm)
        tally = _Tally(_GroupFiles(self.partial, stack, index, self.cfg.group_size, num) if self.root else None)
        step = self.cfg.group_size * self.comm.world_size
        for first in tqdm(range(0, num, step), desc=f"{stack}.{index} expert rounds", unit="round",
                          disable=not run.progress, leave=False):
            ids = range(first, min(num, first + step))
            inputs = {j: self._calibration_inputs(block, buffer, routing.tokens(j), stack, int(plan.take[j]), run)
                      for j in ids}
            self._round(block, buffer, routing, split_evenly(ids, self.comm.world_size), inputs, plan, run, tally, out)
        counts = sorted(plan.routed.tolist())
        return BlockStats(f"{stack}.{index}", counts[0], counts[len(counts) // 2], counts[-1],
                          math.fsum(tally.errors), tally.fallbacks, tally.zeros / max(1, tally.total))

    def _round(self, block: MoEBlock, buffer: ListBuffer, routing: Routing, slices: list[Sequence[int]],
               inputs: dict[int, torch.Tensor], plan: TokenPlan, run: RunConfig, tally: "_Tally",
               out: torch.Tensor) -> None:
        """Quantize one round of experts, `slices[r]` by rank r, and propagate through them.

        The matrices applied to the expert's input (Switch's wi; gate and up of a SwiGLU expert)
        share one Hessian and go through one batched GPTQ call, stacked by rows (GPTQ treats rows
        independently); the last matrix gets the Hessian of the quantized inputs' activation.
        """
        mine = list(slices[self.comm.rank])
        shape = self.arch.expert
        weights = block.experts.load(mine, run.device, torch.float32) if mine else []
        wi = self._solve([torch.cat([getattr(e, m).weight for m in shape.inputs]) for e in weights],
                         lambda r, ids: [inputs[j] for j in ids], slices, plan, "+".join(shape.inputs))
        first = None if wi is None else self._split(wi, shape.inputs)

        def hidden(r: int, ids: Sequence[int]) -> list[torch.Tensor]:  # the last matrix's inputs, from slice r's quantized first ones
            received = self._broadcast(r, ids, first if r == self.comm.rank else None, shape.inputs,
                                       f"{'+'.join(shape.inputs)} codes")
            values = [enc.values(self.cfg.spec) for enc in received]
            return [shape.hidden(inputs[j], {m: v[e] for m, v in zip(shape.inputs, values)}) for e, j in enumerate(ids)]

        wo = self._solve([getattr(e, shape.output).weight for e in weights], hidden, slices, plan, shape.output)
        self._gather_stats(mine, wi, wo, max(len(s) for s in slices), tally)
        for r, ids in enumerate(slices):
            if ids:
                own = [*first, Encoded(wo.codes, wo.grid)] if r == self.comm.rank else None
                self._propagate(block, buffer, routing, ids, self._broadcast(r, ids, own, shape.matrices, "codes"),
                                run, out, tally)

    def _split(self, result: GPTQResult, names: Sequence[str]) -> list[Encoded]:
        """The row-stacked result of one batched call, back into its matrices `names`."""
        shapes, parts, start = self.arch.expert.shapes, [], 0
        for name in names:
            rows = slice(start, start + shapes[name][0])
            parts.append(Encoded.from_tensors([t[:, rows].contiguous() for t in Encoded(result.codes, result.grid).tensors()],
                                              self.cfg.spec))
            start = rows.stop
        return parts

    def _solve(self, weights: list[torch.Tensor], features: Callable[[int, Sequence[int]], list[torch.Tensor]],
               slices: list[Sequence[int]], plan: TokenPlan, name: str) -> GPTQResult | None:
        """Quantize this rank's slice of one matrix (None if the slice is empty).

        weights: this rank's experts' [rows, cols] fp32; features(r, ids): this rank's inputs
        [n_j, cols] to each expert of slice r, for the Hessians (not called by rtn).
        """
        hessians = self._reduce_hessians(features, slices, plan, name) if self.cfg.method == "gptq" else None
        if not weights:
            return None
        w = torch.stack(weights)  # [n, rows, cols] fp32
        return gptq_quantize(w, hessians, self.cfg.gptq) if hessians is not None else rtn_quantize(w, self.cfg.spec)

    def _reduce_hessians(self, features: Callable[[int, Sequence[int]], list[torch.Tensor]],
                         slices: list[Sequence[int]], plan: TokenPlan, name: str) -> torch.Tensor | None:
        """Per slice, every rank's fp64 sums of X^T X, reduced onto the slice's owner.

        Returns this rank's Hessians [n, cols, cols] fp32 (None if its slice is empty).
        """
        mine = None
        for r, ids in enumerate(slices):
            if not ids:
                continue
            sums = torch.stack([hessian_sum(x) for x in features(r, ids)])  # [n, cols, cols] fp64
            self.comm.reduce_sum(sums, r, f"{name} Hessian reduction")
            if r == self.comm.rank:
                mine = hessian_from_sum(sums, plan.used[list(ids)])
        return mine

    def _broadcast(self, src: int, ids: Sequence[int], encoded: list[Encoded] | None, names: Sequence[str],
                   what: str) -> list[Encoded]:
        """Matrices `names` of experts `ids`, from rank `src` to all; `encoded` is read on `src` only."""
        shapes = self.arch.expert.shapes
        specs = [s for name in names for s in Encoded.specs(len(ids), *shapes[name], self.cfg.spec)]
        tensors = None if encoded is None else [t for enc in encoded for t in enc.tensors()]
        received = self.comm.broadcast_bundle(tensors, specs, src, what)
        return [Encoded.from_tensors(received[3 * i:3 * i + 3], self.cfg.spec) for i in range(len(names))]

    def _gather_stats(self, mine: list[int], wi: GPTQResult | None, wo: GPTQResult | None, width: int,
                      tally: "_Tally") -> None:
        """GPTQ errors and fallbacks of every rank's slice, onto rank 0's tally, in expert order."""
        local = torch.zeros(width, 2, 2, dtype=torch.float64)  # [expert, (error, fallback), matrix]
        if mine:
            for m, result in enumerate((wi, wo)):
                local[:len(mine), 0, m] = result.error.double().cpu()
                local[:len(mine), 1, m] = result.fallback.double().cpu()
        everyone = self.comm.all_gather(local.to(self.comm.device), "GPTQ statistics").cpu()  # [W, width, 2, 2]
        if self.root:
            tally.errors.extend(everyone[:, :, 0].flatten().tolist())  # padding rows add 0.0
            tally.fallbacks += int(everyone[:, :, 1].sum())

    def _propagate(self, block: MoEBlock, buffer: ListBuffer, routing: Routing, ids: Sequence[int],
                   encoded: list[Encoded], run: RunConfig, out: torch.Tensor, tally: "_Tally | None" = None) -> None:
        """Run this rank's tokens of experts `ids` through their quantized weights into `out`;
        rank 0 also writes them (and counts zeros) when quantizing."""
        matrices = self.arch.expert.matrices
        values = [enc.values(self.cfg.spec) for enc in encoded]  # each [n, rows, cols] fp32
        if tally is not None and tally.files is not None:
            tally.files.add(ids, dict(zip(matrices, encoded)))
            tally.zeros += sum(int((v == 0).sum()) for v in values)
            tally.total += sum(v.numel() for v in values)
        for e, j in enumerate(ids):
            if routing.count(j):
                expert = self.arch.make_expert({m: v[e].to(device=run.device, dtype=run.dtype)
                                                for m, v in zip(matrices, values)})
                apply_expert(block, expert, buffer, routing.tokens(j), routing.weights(j), run, out)

    def _replay(self, stack: str, index: int, block: MoEBlock, buffer: ListBuffer, routing: Routing,
                run: RunConfig, out: torch.Tensor) -> None:
        """A block finished before --resume: rank 0's saved codes, group by group, to every rank."""
        num, size = block.experts.num_experts, self.cfg.group_size
        bank = self.saved.experts(stack, index) if self.root else None
        for first in range(0, num, size):
            ids = range(first, min(num, first + size))
            matrices = self.arch.expert.matrices
            stored = [Encoded.stored(bank, ids, name) for name in matrices] if self.root else None
            self._propagate(block, buffer, routing, ids, self._broadcast(0, ids, stored, matrices, "saved codes"), run,
                            out)

    def _calibration_inputs(self, block: MoEBlock, buffer: ListBuffer, tokens: torch.Tensor, stack: str,
                            take: int, run: RunConfig) -> torch.Tensor:
        """Normalised inputs [n, d] fp32 of this rank's share of an expert's Hessian tokens."""
        tokens = tokens[~self.skip[stack][tokens]][:take]
        x = buffer.data.index_select(0, tokens).to(run.device)
        return block.ffn_norm(x).float()


class _Tally:
    """Rank 0's running statistics of a block, and its file writer (None on other ranks)."""

    def __init__(self, files: "_GroupFiles | None"):
        self.files = files
        self.errors: list[float] = []  # per expert and matrix; summed with fsum, so order-free
        self.fallbacks = self.zeros = self.total = 0


class _GroupFiles:
    """Rank 0's writer: a block's expert tensors, saved one group file at a time once complete."""

    def __init__(self, partial: Path, stack: str, index: int, group_size: int, num_experts: int):
        self.partial, self.stack, self.index = partial, stack, index
        self.group_size, self.num_experts = group_size, num_experts
        self.pending: dict[str, torch.Tensor] = {}

    def add(self, ids: Sequence[int], encoded: dict[str, Encoded]) -> None:
        for e, j in enumerate(ids):
            for name, enc in encoded.items():
                prefix = f"expert_{j}.{name}."
                self.pending[prefix + "codes"] = enc.codes[e]
                for field, value in enc.grid.tensors().items():
                    self.pending[prefix + field] = value[e]
            if (j + 1) % self.group_size == 0 or j + 1 == self.num_experts:
                path = self.partial / expert_file(self.stack, self.index, j // self.group_size)
                save_tensors_atomic(self.pending, path)
                self.pending = {}
