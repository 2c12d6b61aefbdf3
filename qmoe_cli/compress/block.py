"""One sparse block of `qmoe compress`, quantized by all ranks of a process group together.

`ExpertCompressor` orchestrates the steps below; the token plan and statistics are in `plan`, the
codes in memory and on the wire in `encoded` (packed by `wire`), the collectives in
`distributed`, and the files are written by the quantized format's writer
(`formats.quantized_writer`).

Every rank holds the hidden states of its own shard of the calibration samples (contiguous, so
rank order is global sample order). For a sparse block:

1. every rank routes its own tokens; per expert, the counts of routed and of usable (non-sentinel)
   tokens are all-gathered, so every rank knows the global counts, the token cap (`token_cap` x
   the mean per expert), which of its tokens enter each Hessian (an expert's first `cap` usable
   tokens in global sample order, exactly the tokens one process would take) and how many
   tokens every rank will send every expert's owner;
2. experts are visited in rounds of `group_size x world_size`, each round split into one
   contiguous slice per rank of at most `group_size` experts. One all-to-all sends every routed
   token of a round's experts (hidden state in its working dtype, router weight, whether it
   enters the Hessian) to the rank owning its expert, which concatenates them in rank order:
   each expert's tokens in global sample order, as one process has them (a top-k token goes to
   each of its k experts);
3. the owner builds its slice's Hessians from the tokens it received and runs one batched GPTQ
   call on the matrices applied to the expert's input (Switch's `wi`; gate and up of a SwiGLU
   expert, stacked by rows: they share the Hessian and GPTQ treats rows independently), computes
   the last matrix's inputs (`ExpertShape.hidden`, e.g. relu(x Wi_q^T)) from the same tokens and
   quantizes it: no Hessian and no weight leaves the rank;
4. the owner runs every token it received through the quantized experts (chunk by chunk, as one
   process would) and a second all-to-all returns the weighted expert outputs to the tokens'
   ranks, which add them up per token in ascending expert order (the top-k sum) in an output
   buffer; once every expert has run, `finish_sparse` adds that buffer (and any shared experts'
   output) to the hidden states;
5. owners send their slices' codes (packed to ~log2(levels) bits, `wire.py`), grids and GPTQ
   statistics to rank 0, which writes the group files and the block's statistics;
6. the block's shared expert (families with one, `--shared-experts quantize`), which every token
   passes: each rank sums `hessian_sum` over its own usable tokens (sentinels left out, no token
   cap: the cap bounds what a routed expert gathers, and a running fp64 sum gathers nothing), the
   sums are reduced onto rank 0, which quantizes gate and up in one GPTQ call and broadcasts
   their codes; every rank then sums the Hessian of the quantized activation for down the same
   way; rank 0 quantizes down, broadcasts it and writes `shared.safetensors`, and every rank's
   block computes its shared output with the quantized matrices (`MoEBlock.use_shared`).

A block finished before a `--resume` is replayed through the same steps 2 and 4: rank 0 reads its
codes and sends each owner its slice (packed), instead of steps 3 and 5, and broadcasts the
shared expert's codes instead of step 6. With one process every collective is the identity and
nothing is packed.

Why the result does not depend on the number of ranks: every expert's arithmetic happens on one
rank, on the tokens one process would give it, in the same order and the same chunks; token
selection follows global order; and each expert's GPTQ is independent of which experts share
its batch. Only the rank doing the arithmetic changes. The shared expert's Hessians are the
exception: they are sums over every token, added up across ranks, which `hessian_sum` makes equal
to one process's within fp64 rounding, far below the fp32 Hessian GPTQ receives (the 2-rank test
holds its bytes equal); its GPTQ runs on rank 0 alone.

Communication per block and rank (README, "Distributed compression"): the rank's tokens routed
to other ranks' experts, there and back (tokens x d_model x dtype size, shrinking as 1/ranks),
plus codes (rank 0 receives all of them at ~1.6 bits a ternary weight, others send theirs);
nothing grows with d_ff^2.

Memory per rank: as one process (the runtime's block + one slice's weights and Hessians, one
matrix's fp64 sums while they are built, the output buffer: this rank's tokens x d_model), plus
the tokens of one round's slice (top-k: each token once per expert of the slice): its experts'
routed tokens with their outputs, and this rank's own tokens of the round while they are sent;
rank 0 also holds one round's packed codes (group_size x world_size experts) while it writes them.
The shared expert adds its quantized matrices on every rank, and on rank 0 its original weights
and two fp64 Hessian sums (d_model^2 and width^2) while it is quantized.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from tqdm import tqdm

from ..arch import Architecture, MoEBlock, TensorReader
from ..execute.linear import GridLinear
from ..formats.quantized import SHARED, QuantizedWeights
from ..formats.quantized_manifest import write_manifest
from ..formats.quantized_writer import GroupFiles, write_shared
from ..quant.gptq import GPTQResult, experts_per_batch, gptq_quantize, hessian_from_sum, hessian_sum, rtn_quantize
from ..run.stream import ListBuffer, Routing, RunConfig, bind_expert, expert_output, finish_sparse, route
from .config import CompressConfig
from .distributed import Comm, split_evenly
from .encoded import Encoded, empty_encoded, input_rows, split_inputs
from .plan import BlockStats, Tally, TokenPlan, plan_tokens

STATS = 3  # per expert and matrix, sent to rank 0: GPTQ error, fallback (0/1), zero weights


@dataclass(frozen=True, eq=False)
class Arrivals:
    """An owner's slice of a round: every token routed to its experts, from every rank.

    Per expert of the slice, in global sample order (rank order, then each rank's own order).
    """

    x: list[torch.Tensor]  # [n_j, d_model] hidden states, working dtype, on comm.device
    prob: list[torch.Tensor]  # [n_j] fp32 router weights
    hessian: list[torch.Tensor]  # [n_j] bool, the token enters the expert's Hessians
    counts: torch.Tensor  # [W, len(slice)] int64, tokens that came from each rank


class ExpertCompressor:
    """The runtime's sparse-block hook: quantize a block's experts across the ranks of `comm`
    and propagate every rank's tokens through them; rank 0 writes files and manifest."""

    def __init__(self, cfg: CompressConfig, arch: Architecture, read: TensorReader, partial: Path,
                 skip: dict[str, torch.Tensor], manifest: dict, log: Callable[[str], None], comm: Comm):
        self.cfg, self.arch, self.read, self.partial, self.skip, self.log, self.comm = \
            cfg, arch, read, partial, skip, log, comm  # read: the source checkpoint's tensors
        self.manifest = manifest  # written by rank 0 only; the others read `finished`
        self.root = comm.rank == 0
        self.shared = arch.shared_expert if cfg.shared_experts == "quantize" else None  # None: kept as stored
        self.saved = None
        if self.root:  # files written so far, checked against the manifest before a resumed run reads them
            self.saved = QuantizedWeights(partial, arch, cfg.spec, cfg.group_size, manifest["files"],
                                          self.shared is not None)
            self.saved.check_layout([(s, i) for s, i in arch.sparse_blocks() if f"{s}.{i}" in manifest["finished"]])

    def close(self) -> None:
        if self.saved is not None:
            self.saved.close()

    def __call__(self, stack: str, index: int, block: MoEBlock, buffer: ListBuffer, run: RunConfig) -> None:
        name = f"{stack}.{index}"
        routing = route(block, buffer, run)
        out = torch.zeros_like(buffer.data)  # the quantized experts' weighted outputs, added once all have run
        if name in self.manifest["finished"]:
            with self.comm.phase(name):
                self._replay(stack, index, block, buffer, routing, run, out)
                if self.shared is not None:
                    self._use_shared(block, self._shared_from_root(self._stored_shared(stack, index)), run)
            finish_sparse(block, buffer, out, run)
            return
        started = time.perf_counter()
        with self.comm.phase(name):
            stats = self._quantize(stack, index, block, buffer, routing, run, out)
        finish_sparse(block, buffer, out, run)
        if self.root:
            self.manifest["blocks"][name] = asdict(stats)
            self.manifest["finished"].append(name)
            write_manifest(self.partial, self.manifest)
            traffic = (f", {self.comm.traffic[name] / 1e6:.1f} MB communicated by rank 0"
                       if self.comm.world_size > 1 else "")
            self.log(f"{name}: tokens/expert {stats.tokens_min}/{stats.tokens_median}/{stats.tokens_max} "
                     f"(min/median/max), error {stats.error:.4g}, fallbacks {stats.fallbacks}, "
                     f"zeros {stats.zero_fraction:.1%}, {time.perf_counter() - started:.1f}s{traffic}")

    def _rounds(self, num: int, desc: str, run: RunConfig) -> Iterator[list[Sequence[int]]]:
        """Experts in rounds of `_slice_size` x world_size, each split into one slice per rank."""
        step = self._slice_size(num, run) * self.comm.world_size
        for first in tqdm(range(0, num, step), desc=desc, unit="round", disable=not run.progress, leave=False):
            yield split_evenly(range(first, min(num, first + step)), self.comm.world_size)

    def _slice_size(self, num: int, run: RunConfig) -> int:
        """Experts one rank quantizes in one batched GPTQ call.

        On CPU, `--group-size`: batching gains nothing there (memory-bound), and host memory is
        the user's to bound. On a GPU, as many as half the free device memory holds by
        `gptq_memory_bytes` (the other half: tokens, the block, cuBLAS/cuSOLVER workspaces,
        rank 0's packed codes), since bigger batches fill the GPU and amortize launches. Ranks
        take the smallest choice among them, so they agree on the rounds. (`--group-size` still
        sets the experts per output file; the result does not depend on the batch.)
        """
        if run.device.type != "cuda":
            return self.cfg.group_size
        free, _ = torch.cuda.mem_get_info(run.device)
        most = math.ceil(num / self.comm.world_size)
        size = experts_per_batch(self._solve_shapes(), free // 2, most)
        everyone = self.comm.all_gather(torch.tensor([size], device=self.comm.device), "expert batch size")
        return int(everyone.min())

    def _solve_shapes(self) -> list[tuple[int, int]]:
        """(rows, cols) of the two batched GPTQ calls per expert: the input matrices stacked by
        rows, then the output matrix."""
        shape = self.arch.expert
        return [(sum(shape.shapes[m][0] for m in shape.inputs), shape.shapes[shape.inputs[0]][1]),
                shape.shapes[shape.output]]

    def _quantize(self, stack: str, index: int, block: MoEBlock, buffer: ListBuffer, routing: Routing,
                  run: RunConfig, out: torch.Tensor) -> BlockStats:
        """Quantize every expert of the block, round by round; returns the block's statistics."""
        num = block.experts.num_experts
        plan = plan_tokens(routing.index, routing.per_assignment(~self.skip[stack]), num, self.cfg.token_cap, self.comm)
        tally = Tally(GroupFiles(self.partial, stack, index, self.cfg.group_size, num, self.manifest["files"])
                       if self.root else None)
        for slices in self._rounds(num, f"{stack}.{index} expert rounds", run):
            arrivals = self._send_tokens(buffer, routing, slices, plan, self.skip[stack])
            encoded, stats = self._solve_slice(block, slices[self.comm.rank], arrivals, plan, run)
            self._return_outputs(block, buffer, routing, slices, arrivals, encoded, run, out)
            self._collect(slices, encoded, stats, tally)
        if self.shared is not None:
            self._quantize_shared(stack, index, block, buffer, run, tally)
        counts = sorted(plan.routed.tolist())
        return BlockStats(f"{stack}.{index}", counts[0], counts[len(counts) // 2], counts[-1],
                          math.fsum(tally.errors), tally.fallbacks, tally.zeros / max(1, tally.total))

    def _replay(self, stack: str, index: int, block: MoEBlock, buffer: ListBuffer, routing: Routing,
                run: RunConfig, out: torch.Tensor) -> None:
        """A block finished before --resume: rank 0's saved codes to their owners, then the tokens."""
        num = block.experts.num_experts
        plan = plan_tokens(routing.index, routing.per_assignment(~self.skip[stack]), num, self.cfg.token_cap, self.comm)
        bank = self.saved.experts(stack, index) if self.root else None
        for slices in self._rounds(num, f"{stack}.{index} replay", run):
            stored = ([Encoded.stored(bank, [j for ids in slices for j in ids], name)
                       for name in self.arch.expert.matrices] if self.root else None)
            encoded = self._codes_from_root(slices, stored)
            arrivals = self._send_tokens(buffer, routing, slices, plan, self.skip[stack])
            self._return_outputs(block, buffer, routing, slices, arrivals, encoded, run, out)

    # --- step 2: tokens to the owners -------------------------------------------------------

    def _send_tokens(self, buffer: ListBuffer, routing: Routing, slices: list[Sequence[int]], plan: TokenPlan,
                     skip: torch.Tensor) -> Arrivals:
        """Every token this rank routed to a round's experts, to the expert's owner; returns what
        this rank received for its own slice. skip [N] bool: sentinel positions."""
        d, dtype = buffer.data.shape[1], buffer.data.dtype
        send = []
        for ids in slices:
            tokens = [routing.tokens(j) for j in ids]
            usable = [~skip[t] for t in tokens]  # the first take[j] usable tokens enter the Hessian
            hessian = [u & (u.cumsum(0) <= plan.take[j]) for u, j in zip(usable, ids)]
            flat = torch.cat(tokens) if tokens else torch.empty(0, dtype=torch.long)
            weights = torch.cat([routing.weights(j) for j in ids]) if ids else torch.empty(0)
            send.append([buffer.data.index_select(0, flat), weights,
                         torch.cat(hessian) if hessian else torch.empty(0, dtype=torch.bool)])
        mine = list(slices[self.comm.rank])
        counts = plan.by_rank[:, mine]  # [W, n]
        specs = [[((n, d), dtype), ((n,), torch.float32), ((n,), torch.bool)] for n in counts.sum(1).tolist()]
        received = self.comm.exchange(send, specs, "calibration tokens to expert owners")
        # Per expert, its rows from every rank in rank order: global sample order.
        per_rank = [[part.split(counts[r].tolist()) for part in bundle] for r, bundle in enumerate(received)]
        joined = [[torch.cat([per_rank[r][f][e].to(self.comm.device) for r in range(len(per_rank))])
                   for e in range(len(mine))] for f in range(3)]  # (own rows are still on the CPU)
        return Arrivals(*joined, counts)

    # --- step 3: GPTQ on the owner ----------------------------------------------------------

    def _solve_slice(self, block: MoEBlock, mine: Sequence[int], arrivals: Arrivals, plan: TokenPlan,
                     run: RunConfig) -> tuple[list[Encoded], torch.Tensor]:
        """Quantize this rank's slice -> (one Encoded per matrix, stats [n, STATS, 2] fp64: per
        GPTQ call, the input matrices' and the output matrix's)."""
        shape, spec = self.arch.expert, self.cfg.spec
        if not mine:
            n_stats = torch.zeros(0, STATS, 2, dtype=torch.float64)
            return [empty_encoded(*shape.shapes[m], spec, run.device) for m in shape.matrices], n_stats
        weights = block.experts.load(list(mine), run.device, torch.float32)
        used = plan.used[list(mine)]
        gptq = self.cfg.method == "gptq"  # rtn needs no Hessians
        inputs = [block.ffn_norm(x[h].to(run.device)).float()  # [n_j, d] fp32, the Hessian's tokens
                  for x, h in zip(arrivals.x, arrivals.hessian)] if gptq else []
        if gptq and getattr(block, "routing_on_input", False):  # Llama 4: the experts see weighted inputs
            inputs = [x * p[h].to(x.device, x.dtype)[:, None]
                      for x, p, h in zip(inputs, arrivals.prob, arrivals.hessian)]
        # The input matrices share the input's Hessian: one call, stacked by rows [n, sum rows, d].
        wi = self._solve(torch.stack([torch.cat([getattr(e, m).weight for m in shape.inputs]) for e in weights]),
                         inputs, used)
        rows = input_rows(shape)
        # The output's inputs, from quantized inputs.
        own = getattr(block, "expert_hidden", None)  # with the block's per-expert biases (GPT-OSS)
        hidden = [(shape.hidden if own is None else partial(own, mine[e]))(x, {m: wi.q[e, r] for m, r in rows.items()})
                  for e, x in enumerate(inputs)]
        wo = self._solve(torch.stack([getattr(e, shape.output).weight for e in weights]), hidden, used)
        stats = torch.stack([torch.stack([r.error.double(), r.fallback.double(), (r.q == 0).sum((1, 2)).double()], 1)
                             for r in (wi, wo)], 2).cpu()  # [n, STATS, 2]
        return [*split_inputs(shape, wi), Encoded(wo.codes, wo.grid)], stats

    def _solve(self, w: torch.Tensor, features: list[torch.Tensor], used: torch.Tensor) -> GPTQResult:
        """w [n, rows, cols] fp32; features: each expert's Hessian inputs [n_j, cols] (unused by
        rtn); used [n] int64: tokens in each Hessian."""
        if self.cfg.method != "gptq":
            return rtn_quantize(w, self.cfg.spec)
        sums = w.new_empty((len(features), w.shape[-1], w.shape[-1]), dtype=torch.float64)  # [n, cols, cols]
        for e, x in enumerate(features):
            sums[e] = hessian_sum(x)
        return self._solve_sums(w, sums, used)

    def _solve_sums(self, w: torch.Tensor, sums: torch.Tensor | None, used: torch.Tensor) -> GPTQResult:
        """w [n, rows, cols] fp32; sums [n, cols, cols] fp64 from `hessian_sum` (None for rtn);
        used [n] int64: tokens in each sum."""
        if self.cfg.method != "gptq":
            return rtn_quantize(w, self.cfg.spec)
        return gptq_quantize(w, hessian_from_sum(sums, used), self.cfg.gptq)

    # --- step 6: the shared expert, every token's ------------------------------------------

    def _quantize_shared(self, stack: str, index: int, block: MoEBlock, buffer: ListBuffer, run: RunConfig,
                         tally: "Tally") -> None:
        """Quantize the block's shared expert on rank 0 from every rank's tokens, write it, and
        make every rank's block use it."""
        shape, spec = self.shared, self.cfg.spec
        usable = ~self.skip[stack]  # [N] bool: this rank's tokens that enter the Hessians
        weights = ({m: self.read(self.arch.shared_tensor(stack, index, m), torch.float32, run.device)
                    for m in shape.matrices} if self.root else None)  # each [rows, cols] fp32
        first = self._shared_hessian(block, buffer, usable, run, lambda x: x)
        wi = (self._solve_sums(torch.cat([weights[m] for m in shape.inputs])[None], *first)
              if self.root else None)
        inputs = self._shared_from_root(split_inputs(shape, wi) if self.root else None, shape.inputs)
        q = {m: enc.values(spec)[0].to(run.device) for m, enc in zip(shape.inputs, inputs)}  # [rows, d] fp32
        second = self._shared_hessian(block, buffer, usable, run, lambda x: shape.hidden(x, q))
        wo = self._solve_sums(weights[shape.output][None], *second) if self.root else None
        [output] = self._shared_from_root([Encoded(wo.codes, wo.grid)] if self.root else None, (shape.output,))
        encoded = [*inputs, output]
        self._use_shared(block, encoded, run)
        if not self.root:
            return
        write_shared(self.partial, stack, index, dict(zip(shape.matrices, encoded)), self.manifest["files"])
        tally.errors.extend([float(wi.error[0]), float(wo.error[0])])
        tally.fallbacks += int(wi.fallback.sum()) + int(wo.fallback.sum())
        tally.zeros += int((wi.q == 0).sum()) + int((wo.q == 0).sum())
        tally.total += sum(rows * cols for rows, cols in shape.shapes.values())

    def _shared_hessian(self, block: MoEBlock, buffer: ListBuffer, usable: torch.Tensor, run: RunConfig,
                        features: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(sum [1, cols, cols] fp64 of `hessian_sum(features(norm(x)))` over every rank's usable
        tokens, tokens [1] int64) on rank 0; (None, tokens) elsewhere, and for rtn (no sums).
        Sample by sample in token chunks, the unit that is the same however samples are sharded."""
        if self.cfg.method != "gptq":
            return None, torch.zeros(1, dtype=torch.int64)
        total, count = None, torch.zeros(1, dtype=torch.float64, device=self.comm.device)
        for part in buffer.sample_chunks(run.token_chunk):
            keep = usable[part]
            x = block.ffn_norm(buffer.data[part][keep].to(run.device)).float()  # [n, d] fp32
            h = hessian_sum(features(x))  # [cols, cols] fp64
            total = h if total is None else total + h
            count += int(keep.sum())
        assert total is not None, "every rank holds a sample (`pipeline._shard`)"
        total = self.comm.reduce_sum(total.to(self.comm.device), 0, "shared expert Hessian")
        count = self.comm.reduce_sum(count, 0, "shared expert Hessian tokens")
        return (total[None].to(run.device) if self.root else None), count.long().cpu()

    def _shared_from_root(self, encoded: list[Encoded] | None,
                          names: Sequence[str] | None = None) -> list[Encoded]:
        """Rank 0's `encoded` shared expert matrices `names` (default: all), on every rank."""
        names = self.shared.matrices if names is None else names
        if self.comm.world_size == 1:
            return encoded
        spec, shapes = self.cfg.spec, self.shared.shapes
        specs = [s for m in names for s in Encoded.wire_specs(1, *shapes[m], spec)]
        tensors = [t for enc in encoded for t in enc.wire(spec)] if self.root else None
        bundle = self.comm.broadcast_bundle(tensors, specs, 0, "shared expert codes")
        if self.root:
            return encoded
        return [Encoded.from_wire(bundle[3 * i:3 * i + 3], 1, *shapes[m], spec) for i, m in enumerate(names)]

    def _stored_shared(self, stack: str, index: int) -> list[Encoded] | None:
        """Rank 0: a finished block's shared expert matrices, read back (None elsewhere)."""
        if not self.root:
            return None
        bank = self.saved.experts(stack, index)
        try:
            return [Encoded.stored(bank, [SHARED], m) for m in self.shared.matrices]
        finally:
            bank.close()

    def _use_shared(self, block: MoEBlock, encoded: list[Encoded], run: RunConfig) -> None:
        """The block computes its shared expert with these quantized matrices (all of them, in
        order), as loading the quantized checkpoint will (`GridLinear`)."""
        block.use_shared({m: GridLinear(enc.values(self.cfg.spec)[0].to(device=run.device, dtype=run.dtype))
                          for m, enc in zip(self.shared.matrices, encoded)})

    # --- step 4: tokens through the quantized experts, and back -----------------------------

    def _return_outputs(self, block: MoEBlock, buffer: ListBuffer, routing: Routing, slices: list[Sequence[int]],
                        arrivals: Arrivals, encoded: list[Encoded], run: RunConfig, out: torch.Tensor) -> None:
        """Run the slice's tokens through its quantized experts (owner) and add every rank's
        tokens' weighted expert outputs into its `out` [N, d], expert by expert in ascending id."""
        matrices = self.arch.expert.matrices
        values = [enc.values(self.cfg.spec) for enc in encoded]  # each [n, rows, cols] fp32
        outputs = []
        for e, (x, weight) in enumerate(zip(arrivals.x, arrivals.prob)):
            if not x.shape[0]:
                outputs.append(x)
                continue
            expert = bind_expert(block, slices[self.comm.rank][e], self.arch.make_expert(
                {m: v[e].to(device=run.device, dtype=run.dtype) for m, v in zip(matrices, values)}))
            # Chunks of the expert's tokens in global order, whatever the rank count: same rows, same bits.
            outputs.append(torch.cat([
                expert_output(block, expert, x[c:c + run.token_chunk].to(run.device), weight[c:c + run.token_chunk])
                .to(device=self.comm.device, dtype=x.dtype) for c in range(0, x.shape[0], run.token_chunk)]))
        back = [[torch.cat([y.split(arrivals.counts[:, e].tolist())[r] for e, y in enumerate(outputs)])
                 if outputs else buffer.data.new_empty(0, buffer.data.shape[1])] for r in range(self.comm.world_size)]
        specs = [[((sum(routing.count(j) for j in ids), buffer.data.shape[1]), buffer.data.dtype)] for ids in slices]
        received = self.comm.exchange(back, specs, "expert outputs to token ranks")
        for ids, [rows] in zip(slices, received):
            # One expert at a time: a top-k token's outputs add up in ascending expert order.
            for j, part in zip(ids, rows.split([routing.count(j) for j in ids])):
                if part.shape[0]:
                    out.index_add_(0, routing.tokens(j), part.to(device=out.device, dtype=out.dtype))

    # --- step 5 (and replay): codes between rank 0 and the owners ---------------------------

    def _collect(self, slices: list[Sequence[int]], encoded: list[Encoded], stats: torch.Tensor,
                 tally: "Tally") -> None:
        """Every owner's codes, grids and statistics onto rank 0, which writes them."""
        shapes, spec, matrices = self.arch.expert.shapes, self.cfg.spec, self.arch.expert.matrices
        own = [t for enc in encoded for t in enc.wire(spec)] + [stats] if not self.root else [*encoded, stats]
        send = [own if r == 0 else [] for r in range(self.comm.world_size)]
        specs = [[] if not self.root else
                 [s for m in matrices for s in Encoded.wire_specs(len(ids), *shapes[m], spec)]
                 + [((len(ids), STATS, 2), torch.float64)] for ids in slices]
        received = self.comm.exchange(send, specs, "codes to rank 0")
        if not self.root:
            return
        for r, (ids, bundle) in enumerate(zip(slices, received)):
            if not ids:
                continue
            parts = (bundle[:-1] if r == 0 else
                     [Encoded.from_wire(bundle[3 * i:3 * i + 3], len(ids), *shapes[m], spec)
                      for i, m in enumerate(matrices)])
            numbers = bundle[-1]  # [n, STATS, 2] fp64: the input matrices' call, the output's
            tally.files.add(ids, dict(zip(matrices, parts)))
            tally.errors.extend(numbers[:, 0].flatten().tolist())
            tally.fallbacks += int(numbers[:, 1].sum())
            tally.zeros += int(numbers[:, 2].sum())
            tally.total += len(ids) * sum(rows * cols for rows, cols in shapes.values())

    def _codes_from_root(self, slices: list[Sequence[int]], stored: list[Encoded] | None) -> list[Encoded]:
        """Rank 0's saved codes of a round (`stored`, all slices' experts in order), each slice to
        its owner; returns this rank's slice, one Encoded per matrix."""
        shapes, spec, matrices = self.arch.expert.shapes, self.cfg.spec, self.arch.expert.matrices
        send = [[] for _ in slices]
        if self.root:
            offset = 0
            for r, ids in enumerate(slices):
                part = [enc.select(offset, offset + len(ids)) for enc in stored]
                send[r] = part if r == 0 else [t for enc in part for t in enc.wire(spec)]
                offset += len(ids)
        ids = slices[self.comm.rank]
        specs = [[s for m in matrices for s in Encoded.wire_specs(len(ids), *shapes[m], spec)] if r == 0 else []
                 for r in range(self.comm.world_size)]
        bundle = self.comm.exchange(send, specs, "saved codes to expert owners")[0]
        if self.root:
            return bundle
        return [Encoded.from_wire(bundle[3 * i:3 * i + 3], len(ids), *shapes[m], spec) for i, m in enumerate(matrices)]
