"""The collectives of one sparse block's compression: steps 2, 4 and 5 of `block`'s docstring and
the shared expert's broadcast, as plain functions over a `Comm`.

Tokens go to the rank that owns their expert (`send_tokens`), that expert's outputs come back
(`return_outputs`), codes go to rank 0 (`collect_codes`) or, replaying a block finished before
`--resume`, from it (`codes_from_root`, `shared_from_root`). Codes cross ranks packed
(`Encoded.wire`); rank 0's own stay as they are. With one process every exchange is the identity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from ..arch import Architecture, ExpertShape
from ..quant.grids import QuantSpec
from ..run.stream import ListBuffer, Routing
from .distributed import Comm
from .encoded import Encoded
from .plan import TokenPlan

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


def send_tokens(comm: Comm, buffer: ListBuffer, routing: Routing, slices: list[Sequence[int]], plan: TokenPlan,
                skip: torch.Tensor) -> Arrivals:
    """Step 2: every token this rank routed to a round's experts, to the expert's owner; returns
    what this rank received for its own slice. skip [N] bool: sentinel positions."""
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
    mine = list(slices[comm.rank])
    counts = plan.by_rank[:, mine]  # [W, n]
    specs = [[((n, d), dtype), ((n,), torch.float32), ((n,), torch.bool)] for n in counts.sum(1).tolist()]
    received = comm.exchange(send, specs, "calibration tokens to expert owners")
    # Per expert, its rows from every rank in rank order: global sample order.
    per_rank = [[part.split(counts[r].tolist()) for part in bundle] for r, bundle in enumerate(received)]
    joined = [[torch.cat([per_rank[r][f][e].to(comm.device) for r in range(len(per_rank))])
               for e in range(len(mine))] for f in range(3)]  # (own rows are still on the CPU)
    return Arrivals(*joined, counts)


def return_outputs(comm: Comm, buffer: ListBuffer, routing: Routing, slices: list[Sequence[int]],
                   arrivals: Arrivals, outputs: list[torch.Tensor], out: torch.Tensor) -> None:
    """Step 4's way back: `outputs` (per expert of this rank's slice, the weighted outputs of its
    `arrivals` [n_j, d]) to the tokens' ranks, each adding its tokens' into `out` [N, d], expert
    by expert in ascending id."""
    back = [[torch.cat([y.split(arrivals.counts[:, e].tolist())[r] for e, y in enumerate(outputs)])
             if outputs else buffer.data.new_empty(0, buffer.data.shape[1])] for r in range(comm.world_size)]
    specs = [[((sum(routing.count(j) for j in ids), buffer.data.shape[1]), buffer.data.dtype)] for ids in slices]
    received = comm.exchange(back, specs, "expert outputs to token ranks")
    for ids, [rows] in zip(slices, received):
        # One expert at a time: a top-k token's outputs add up in ascending expert order.
        for j, part in zip(ids, rows.split([routing.count(j) for j in ids])):
            if part.shape[0]:
                out.index_add_(0, routing.tokens(j), part.to(device=out.device, dtype=out.dtype))


def _specs(shape: ExpertShape, names: Sequence[str], n: int, spec: QuantSpec) -> list:
    """The wire tensors of `n` experts' matrices `names`, in order."""
    return [s for m in names for s in Encoded.wire_specs(n, *shape.shapes[m], spec)]


def _from_wire(bundle: list[torch.Tensor], shape: ExpertShape, names: Sequence[str], n: int,
               spec: QuantSpec) -> list[Encoded]:
    """`n` experts' matrices `names`, unpacked from their wire tensors (three per matrix)."""
    return [Encoded.from_wire(bundle[3 * i:3 * i + 3], n, *shape.shapes[m], spec) for i, m in enumerate(names)]


def collect_codes(comm: Comm, arch: Architecture, spec: QuantSpec, slices: list[Sequence[int]],
                  encoded: list[Encoded], stats: torch.Tensor) -> list[tuple[Sequence[int], list[Encoded], Tensor]]:
    """Step 5: every owner's codes, grids and statistics (`stats` [n, STATS, 2] fp64) onto rank 0.
    Returns on rank 0, per non-empty slice: (its experts, one Encoded per matrix, its stats);
    [] on the other ranks."""
    shape = arch.expert
    root = comm.rank == 0
    own = [t for enc in encoded for t in enc.wire(spec)] + [stats] if not root else [*encoded, stats]
    send = [own if r == 0 else [] for r in range(comm.world_size)]
    specs = [[] if not root else _specs(shape, shape.matrices, len(ids), spec) + [((len(ids), STATS, 2), torch.float64)]
             for ids in slices]
    received = comm.exchange(send, specs, "codes to rank 0")
    if not root:
        return []
    return [(ids, bundle[:-1] if r == 0 else _from_wire(bundle, shape, shape.matrices, len(ids), spec), bundle[-1])
            for r, (ids, bundle) in enumerate(zip(slices, received)) if ids]


def codes_from_root(comm: Comm, arch: Architecture, spec: QuantSpec, slices: list[Sequence[int]],
                    stored: list[Encoded] | None) -> list[Encoded]:
    """Rank 0's saved codes of a round (`stored`, all slices' experts in order), each slice to its
    owner; returns this rank's slice, one Encoded per matrix."""
    shape = arch.expert
    send: list[list] = [[] for _ in slices]
    if comm.rank == 0:
        offset = 0
        for r, ids in enumerate(slices):
            part = [enc.select(offset, offset + len(ids)) for enc in stored]
            send[r] = part if r == 0 else [t for enc in part for t in enc.wire(spec)]
            offset += len(ids)
    ids = slices[comm.rank]
    specs = [_specs(shape, shape.matrices, len(ids), spec) if r == 0 else [] for r in range(comm.world_size)]
    bundle = comm.exchange(send, specs, "saved codes to expert owners")[0]
    if comm.rank == 0:
        return bundle
    return _from_wire(bundle, shape, shape.matrices, len(ids), spec)


def shared_from_root(comm: Comm, shape: ExpertShape, spec: QuantSpec, encoded: list[Encoded] | None,
                     names: Sequence[str]) -> list[Encoded]:
    """Rank 0's `encoded` shared expert matrices `names`, on every rank."""
    if comm.world_size == 1:
        return encoded
    tensors = [t for enc in encoded for t in enc.wire(spec)] if comm.rank == 0 else None
    bundle = comm.broadcast_bundle(tensors, _specs(shape, names, 1, spec), 0, "shared expert codes")
    if comm.rank == 0:
        return encoded
    return _from_wire(bundle, shape, names, 1, spec)
