"""One sparse block of `qmoe compress`, quantized by all ranks of a process group together.

`ExpertCompressor` orchestrates the steps below, each owned elsewhere: the token plan and the
tally in `plan` (step 1), the collectives in `exchange` (steps 2, 4 and 5, over `distributed`'s
process group), what an expert's owner computes in `solve` (steps 3 and 4, and step 6's solves),
the codes in memory and on the wire in `encoded` (packed by `wire`), and the files in the
quantized format's writer (`formats.quantized_writer`).

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
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from tqdm import tqdm

from ..arch import Architecture, MoEBlock, TensorReader
from ..execute.linear import GridLinear
from ..formats.quantized import SHARED, QuantizedWeights
from ..formats.quantized_manifest import write_manifest
from ..formats.quantized_writer import GroupFiles, write_shared
from ..quant.gptq import experts_per_batch
from ..run.stream import ListBuffer, Routing, RunConfig, finish_sparse, route
from .config import CompressConfig
from .distributed import Comm, split_evenly
from .encoded import Encoded, split_inputs
from .exchange import codes_from_root, collect_codes, return_outputs, send_tokens, shared_from_root
from .plan import BlockStats, Tally, plan_tokens
from .solve import expert_outputs, shared_hessian_sum, solve_shapes, solve_slice, solve_sums


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
                    stored = self._stored_shared(stack, index)
                    self._use_shared(block, shared_from_root(self.comm, self.shared, self.cfg.spec, stored,
                                                             self.shared.matrices), run)
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
        size = experts_per_batch(solve_shapes(self.arch.expert), free // 2, most)
        everyone = self.comm.all_gather(torch.tensor([size], device=self.comm.device), "expert batch size")
        return int(everyone.min())

    def _quantize(self, stack: str, index: int, block: MoEBlock, buffer: ListBuffer, routing: Routing,
                  run: RunConfig, out: torch.Tensor) -> BlockStats:
        """Quantize every expert of the block, round by round; returns the block's statistics."""
        num, comm, spec = block.experts.num_experts, self.comm, self.cfg.spec
        plan = plan_tokens(routing.index, routing.per_assignment(~self.skip[stack]), num, self.cfg.token_cap, comm)
        tally = Tally(GroupFiles(self.partial, stack, index, self.cfg.group_size, num, self.manifest["files"])
                      if self.root else None)
        per_expert = sum(rows * cols for rows, cols in self.arch.expert.shapes.values())
        for slices in self._rounds(num, f"{stack}.{index} expert rounds", run):
            mine = slices[comm.rank]
            arrivals = send_tokens(comm, buffer, routing, slices, plan, self.skip[stack])
            encoded, stats = solve_slice(self.cfg, self.arch, block, mine, arrivals, plan.used[list(mine)], run)
            outputs = expert_outputs(self.arch, spec, block, mine, arrivals, encoded, run, comm.device)
            return_outputs(comm, buffer, routing, slices, arrivals, outputs, out)
            for ids, parts, numbers in collect_codes(comm, self.arch, spec, slices, encoded, stats):
                tally.files.add(ids, dict(zip(self.arch.expert.matrices, parts)))
                # numbers [n, STATS, 2] fp64: the input matrices' call, the output's
                tally.record(numbers[:, 0].flatten().tolist(), int(numbers[:, 1].sum()), int(numbers[:, 2].sum()),
                             len(ids) * per_expert)
        if self.shared is not None:
            self._quantize_shared(stack, index, block, buffer, run, tally)
        counts = sorted(plan.routed.tolist())
        return BlockStats(f"{stack}.{index}", counts[0], counts[len(counts) // 2], counts[-1],
                          math.fsum(tally.errors), tally.fallbacks, tally.zeros / max(1, tally.total))

    def _replay(self, stack: str, index: int, block: MoEBlock, buffer: ListBuffer, routing: Routing,
                run: RunConfig, out: torch.Tensor) -> None:
        """A block finished before --resume: rank 0's saved codes to their owners, then the tokens."""
        num, comm, spec = block.experts.num_experts, self.comm, self.cfg.spec
        plan = plan_tokens(routing.index, routing.per_assignment(~self.skip[stack]), num, self.cfg.token_cap, comm)
        bank = self.saved.experts(stack, index) if self.root else None
        for slices in self._rounds(num, f"{stack}.{index} replay", run):
            stored = ([Encoded.stored(bank, [j for ids in slices for j in ids], name)
                       for name in self.arch.expert.matrices] if self.root else None)
            encoded = codes_from_root(comm, self.arch, spec, slices, stored)
            arrivals = send_tokens(comm, buffer, routing, slices, plan, self.skip[stack])
            outputs = expert_outputs(self.arch, spec, block, slices[comm.rank], arrivals, encoded, run, comm.device)
            return_outputs(comm, buffer, routing, slices, arrivals, outputs, out)

    # --- step 6: the shared expert, every token's ------------------------------------------

    def _quantize_shared(self, stack: str, index: int, block: MoEBlock, buffer: ListBuffer, run: RunConfig,
                         tally: Tally) -> None:
        """Quantize the block's shared expert on rank 0 from every rank's tokens, write it, and
        make every rank's block use it."""
        shape, spec, comm = self.shared, self.cfg.spec, self.comm
        usable = ~self.skip[stack]  # [N] bool: this rank's tokens that enter the Hessians
        weights = ({m: self.read(self.arch.shared_tensor(stack, index, m), torch.float32, run.device)
                    for m in shape.matrices} if self.root else None)  # each [rows, cols] fp32
        first = self._shared_hessian(block, buffer, usable, run, lambda x: x)
        wi = (solve_sums(self.cfg, torch.cat([weights[m] for m in shape.inputs])[None], *first)
              if self.root else None)
        inputs = shared_from_root(comm, shape, spec, split_inputs(shape, wi) if self.root else None, shape.inputs)
        q = {m: enc.values(spec)[0].to(run.device) for m, enc in zip(shape.inputs, inputs)}  # [rows, d] fp32
        second = self._shared_hessian(block, buffer, usable, run, lambda x: shape.hidden(x, q))
        wo = solve_sums(self.cfg, weights[shape.output][None], *second) if self.root else None
        [output] = shared_from_root(comm, shape, spec, [Encoded(wo.codes, wo.grid)] if self.root else None,
                                    (shape.output,))
        encoded = [*inputs, output]
        self._use_shared(block, encoded, run)
        if not self.root:
            return
        write_shared(self.partial, stack, index, dict(zip(shape.matrices, encoded)), self.manifest["files"])
        tally.record([float(wi.error[0]), float(wo.error[0])], int(wi.fallback.sum()) + int(wo.fallback.sum()),
                     int((wi.q == 0).sum()) + int((wo.q == 0).sum()),
                     sum(rows * cols for rows, cols in shape.shapes.values()))

    def _shared_hessian(self, block: MoEBlock, buffer: ListBuffer, usable: torch.Tensor, run: RunConfig,
                        features: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(sum [1, cols, cols] fp64 of `hessian_sum(features(norm(x)))` over every rank's usable
        tokens, tokens [1] int64) on rank 0; (None, tokens) elsewhere, and for rtn (no sums)."""
        if self.cfg.method != "gptq":
            return None, torch.zeros(1, dtype=torch.int64)
        total, count = shared_hessian_sum(block, buffer, usable, run, features)
        total = self.comm.reduce_sum(total.to(self.comm.device), 0, "shared expert Hessian")
        tokens = torch.tensor([float(count)], dtype=torch.float64, device=self.comm.device)
        tokens = self.comm.reduce_sum(tokens, 0, "shared expert Hessian tokens")
        return (total[None].to(run.device) if self.root else None), tokens.long().cpu()

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
