"""Process groups for distributed compression: setup, sample shards, and guarded collectives.

`qmoe compress` launched by `torchrun` runs as one rank of a torch.distributed process group:
NCCL when the ranks compute on GPUs, gloo on CPUs. A run without torchrun is the world-size-1
case of the same code: `Comm()` answers every collective itself without communicating, so the
single-process path has no branches of its own.

Failure model. Every collective runs under the group's timeout (`--dist-timeout`, given to
`init_process_group`). A peer that dies resets its connections and a peer that hangs lets the
timeout expire; either way the collective raises, and `Comm` turns that into a `QmoeError`
naming this rank and the step, so the whole job exits non-zero with a one-line message instead
of waiting forever. (With NCCL, a timed-out collective is aborted by NCCL's watchdog, which ends
the process; torchrun then reports the failed rank.)
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

import torch
import torch.distributed as dist

from ..errors import QmoeError

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
OUTSIDE = "setup"  # bytes communicated outside any named phase (start, calibration loss)
T = TypeVar("T")
TensorSpec = tuple[tuple[int, ...], torch.dtype]  # shape, dtype of one tensor of a bundle


@dataclass(frozen=True)
class DistConfig:
    """How ranks wait for each other."""

    # Longest one rank waits in a collective for the others. It must exceed the slowest step
    # between two collectives (one GPTQ slice, one block's dense part, rank 0 copying the
    # non-expert weights at the start); a dead peer is usually noticed at once, a hung one
    # after this long.
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        t = self.timeout_s
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise ValueError(f"--dist-timeout must be a finite number of seconds > 0, got {t!r}")


def launched_by_torchrun(environ: Mapping[str, str]) -> bool:
    """Whether `environ` holds the rendezvous variables torchrun sets for each worker."""
    return all(name in environ for name in TORCHRUN_VARIABLES)


class Comm:
    """This process's view of the process group; `Comm()` is a group of one.

    Collectives take and return tensors on `device` (NCCL needs GPU tensors, gloo CPU ones).
    `traffic` counts, per phase, the payload bytes this rank hands to or receives from
    collectives: a reduce or broadcast counts its tensor once, an all-gather its whole output, an
    exchange (all-to-all) what it sends to and receives from the other ranks.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, device: torch.device = torch.device("cpu"),
                 timeout_s: float = math.inf):
        self.rank, self.world_size, self.device, self.timeout_s = rank, world_size, device, timeout_s
        self.traffic: dict[str, int] = {}
        self._phase = OUTSIDE

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Count the bytes of the collectives inside under `traffic[name]`."""
        outer, self._phase = self._phase, name
        self.traffic.setdefault(name, 0)
        try:
            yield
        finally:
            self._phase = outer

    def reduce_sum(self, tensor: torch.Tensor, dst: int, what: str) -> torch.Tensor:
        """Sum `tensor` over ranks into rank `dst`'s copy, in place; other ranks' copies are
        left undefined. Returns `tensor`."""
        if self.world_size > 1:
            self._call(what, tensor.nbytes, lambda: dist.reduce(tensor, dst=dst, op=dist.ReduceOp.SUM))
        return tensor

    def all_gather(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
        """Every rank's `tensor` (same shape on all): -> [world_size, *shape], rank order."""
        if self.world_size == 1:
            return tensor[None]
        out = torch.empty((self.world_size, *tensor.shape), dtype=tensor.dtype, device=tensor.device)
        self._call(what, out.nbytes, lambda: dist.all_gather(list(out.unbind(0)), tensor.contiguous()))
        return out

    def gather_rows(self, tensor: torch.Tensor, counts: Sequence[int], what: str) -> torch.Tensor:
        """Concatenate every rank's [counts[r], ...] `tensor` in rank order -> [sum(counts), ...]."""
        if self.world_size == 1:
            return tensor
        padded = tensor.new_zeros((max(counts), *tensor.shape[1:]))
        padded[:tensor.shape[0]] = tensor
        parts = self.all_gather(padded, what)
        return torch.cat([parts[r, :n] for r, n in enumerate(counts)])

    def broadcast_bundle(self, tensors: Sequence[torch.Tensor] | None, specs: Sequence[TensorSpec], src: int,
                         what: str) -> list[torch.Tensor]:
        """Rank `src`'s `tensors` (matching `specs`; None on the other ranks) on every rank.

        The tensors travel as one byte buffer, so a bundle costs one collective whatever it holds.
        """
        if self.world_size == 1:
            assert tensors is not None, "a group of one broadcasts its own tensors"
            return list(tensors)
        sizes = [math.prod(shape) * dtype.itemsize for shape, dtype in specs]
        if self.rank == src:
            flat = torch.cat([t.to(self.device).contiguous().view(-1).view(torch.uint8) for t in tensors])
        else:
            flat = torch.empty(sum(sizes), dtype=torch.uint8, device=self.device)
        self._call(what, flat.nbytes, lambda: dist.broadcast(flat, src=src))
        # clone: a part's byte offset need not be a multiple of its dtype's size, which view(dtype) requires
        return [part.clone().view(dtype).view(shape) for part, (shape, dtype) in zip(flat.split(sizes), specs)]

    def exchange(self, send: Sequence[Sequence[torch.Tensor]], specs: Sequence[Sequence[TensorSpec]],
                 what: str) -> list[list[torch.Tensor]]:
        """All-to-all of tensor bundles: `send[r]` goes to rank r, `specs[r]` says what rank r sends
        here (shapes, dtypes). Returns the bundles received, in rank order.

        This rank's own bundle (`send[rank]`) is handed back as given, without a copy, and its
        `specs` entry is not read. The rest travels as one `all_to_all_single` of bytes (NCCL and
        gloo both have it), so an exchange costs one collective whatever the bundles hold;
        `traffic` counts the bytes sent to and received from other ranks.
        """
        if self.world_size == 1:
            return [list(send[0])]
        sizes_in = [0 if r == self.rank else sum(t.nbytes for t in bundle) for r, bundle in enumerate(send)]
        sizes_out = [0 if r == self.rank else sum(math.prod(shape) * dtype.itemsize for shape, dtype in spec)
                     for r, spec in enumerate(specs)]
        parts = [t.to(self.device).contiguous().view(-1).view(torch.uint8)
                 for r, bundle in enumerate(send) if r != self.rank for t in bundle]
        flat_in = torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8, device=self.device)
        flat_out = torch.empty(sum(sizes_out), dtype=torch.uint8, device=self.device)
        self._call(what, sum(sizes_in) + sum(sizes_out),
                   lambda: dist.all_to_all_single(flat_out, flat_in, sizes_out, sizes_in))
        received = []
        for r, (chunk, spec) in enumerate(zip(flat_out.split(sizes_out), specs)):
            if r == self.rank:
                received.append(list(send[r]))
                continue
            sizes = [math.prod(shape) * dtype.itemsize for shape, dtype in spec]
            # clone: as in broadcast_bundle, a part's byte offset need not suit its dtype
            received.append([part.clone().view(dtype).view(shape)
                             for part, (shape, dtype) in zip(chunk.split(sizes), spec)])
        return received

    def broadcast_json(self, obj: Any, src: int, what: str) -> Any:
        """Rank `src`'s JSON-serializable `obj` on every rank (None elsewhere)."""
        if self.world_size == 1:
            return obj
        data = json.dumps(obj).encode() if self.rank == src else b""
        length = torch.tensor([len(data)], dtype=torch.int64, device=self.device)
        self._call(what, length.nbytes, lambda: dist.broadcast(length, src=src))
        buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        [buffer] = self.broadcast_bundle([buffer], [((int(length),), torch.uint8)], src, what)
        return json.loads(buffer.cpu().numpy().tobytes())

    def on_root(self, fn: Callable[[], T], what: str) -> T:
        """Run `fn` on rank 0 only and hand its JSON-serializable result to every rank.

        A `QmoeError` on rank 0 is raised on every rank, so all exit with rank 0's message
        rather than the others waiting on it until the timeout.
        """
        outcome = None
        if self.rank == 0:
            try:
                outcome = {"value": fn()}
            except QmoeError as exc:
                self.broadcast_json({"error": str(exc)}, 0, what)
                raise
        outcome = self.broadcast_json(outcome, 0, what)
        if "error" in outcome:
            raise QmoeError(outcome["error"])
        return outcome["value"]

    def _call(self, what: str, nbytes: int, collective: Callable[[], Any]) -> None:
        started = time.monotonic()
        try:
            collective()
        except RuntimeError as exc:  # torch's DistBackendError and DistNetworkError included
            waited = time.monotonic() - started
            raise QmoeError(f"rank {self.rank}: {what} failed after {waited:.1f} s (--dist-timeout "
                            f"{self.timeout_s:g} s): a peer rank died or hung ({_first_line(exc)})") from exc
        self.traffic[self._phase] = self.traffic.get(self._phase, 0) + nbytes


def _first_line(exc: BaseException) -> str:
    """The gist of a backend error: its first sentence, without gloo's `[file.cc:123] ` prefix."""
    line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return re.split(r"\.\s", re.sub(r"^\[[^\]]*\]\s*", "", line))[0][:200]


@contextmanager
def process_group(cfg: DistConfig, device: torch.device, required: bool,
                  environ: Mapping[str, str] = os.environ) -> Iterator[Comm]:
    """Join the torchrun process group when launched by torchrun, else yield a group of one.

    `device` is the compute device asked for; under torchrun a GPU becomes this rank's
    `cuda:LOCAL_RANK` and the group uses NCCL, a CPU uses gloo. `required` (`--distributed`)
    makes a missing torchrun environment an error rather than a single-process run.
    """
    if not launched_by_torchrun(environ):
        if required:
            missing = ", ".join(v for v in TORCHRUN_VARIABLES if v not in environ)
            raise QmoeError(f"--distributed: no torchrun environment ({missing} not set); launch with "
                            "`torchrun --nproc-per-node N -m qmoe_cli compress ...`")
        yield Comm(device=device)
        return
    if not dist.is_available():
        raise QmoeError("torchrun environment found, but this torch build has no torch.distributed")
    rank, world, local = int(environ["RANK"]), int(environ["WORLD_SIZE"]), int(environ["LOCAL_RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", local if device.index is None else device.index)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    host, port = environ["MASTER_ADDR"], environ["MASTER_PORT"]
    # tcp:// from `environ` rather than env://, which reads os.environ: the same rendezvous
    # (under torchrun both join the agent's store), but testable without touching os.environ.
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        dist.init_process_group(backend, init_method=f"tcp://{address}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=cfg.timeout_s))
    except (RuntimeError, ValueError) as exc:
        raise QmoeError(f"rank {rank}: could not join the {backend} process group at {address} within "
                        f"--dist-timeout {cfg.timeout_s:g} s ({_first_line(exc)})") from exc
    try:
        yield Comm(rank, world, device, cfg.timeout_s)
    finally:
        dist.destroy_process_group()


def shard_bounds(lengths: Sequence[int], parts: int) -> list[int]:
    """Split samples of `lengths` tokens into `parts` contiguous, non-empty runs of about equal
    tokens -> parts + 1 sample offsets. Contiguous, so rank order is global sample order.
    """
    if parts > len(lengths):
        raise ValueError(f"shard_bounds: {len(lengths)} samples cannot fill {parts} non-empty shards")
    total = sum(lengths)
    cumulative, bounds = 0, [0]
    for i, length in enumerate(lengths):
        cumulative += length
        shard = len(bounds) - 1  # the one being filled; close it once it holds its share of
        # tokens, if enough samples remain for one per later shard
        if (shard < parts - 1 and cumulative * parts >= total * (shard + 1)
                and len(lengths) - (i + 1) >= parts - 1 - shard):
            bounds.append(i + 1)
    while len(bounds) < parts:  # the last samples were needed one per shard
        bounds.append(bounds[-1] + 1)
    return bounds + [len(lengths)]


def split_evenly(items: Sequence[int], parts: int) -> list[Sequence[int]]:
    """`items` in `parts` contiguous runs whose lengths differ by at most one (first ones longer)."""
    size, extra = divmod(len(items), parts)
    runs, start = [], 0
    for r in range(parts):
        stop = start + size + (r < extra)
        runs.append(items[start:stop])
        start = stop
    return runs
