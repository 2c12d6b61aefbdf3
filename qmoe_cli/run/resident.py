"""A model held for generation: every block loaded once, on the GPU the placement chose, or in
host memory and streamed to its GPU one block ahead of use.

Unlike the streamed runner (`stream.py`), which reads each block once per pass and holds one at
a time, generation runs the output stack once per token, so everything is read once and kept:
the embedding and head, every block's non-expert weights, and every expert as its checkpoint
kind holds it (`ResidentBank`: dense for original and quantized checkpoints, compressed for
packed ones). Memory: the whole model in its held form, spread over the devices and host memory
as `Placement` says, plus two staging slots on the streaming GPU and the decoding caches.

A block's feed-forward goes through the runner's per-block expert dispatch (`stream.route` and
`stream.apply_experts` on a `ListBuffer` around the step's hidden states, on their device), so
whatever decode-matmul path a checkpoint kind's experts have is the one generation uses: the
CPU `PackedLinear`, or a bank's grouped GPU path (`ResidentBank.routed`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..arch import ExpertBank, IncrementalStack, ModelWeights, MoEBlock, StackCache, bank_stores_shared
from .placement import HOST, Placement
from .stream import ListBuffer, RunConfig, load_block, sparse_feed_forward


class ResidentBank:
    """All experts of one sparse block, loaded once and kept.

    Where the wrapped bank runs all its experts grouped on the device (`routed(device, dtype)`,
    the packed checkpoint's GPU kernels: the bank keeps its compressed experts there), that path
    is used and no per-expert modules are made; otherwise every expert is loaded (`group_size`
    at a time) as a module and kept. A block streamed from host memory never takes the grouped
    path (`grouped=False`): its experts must stay swappable (`Streamer`).
    """

    def __init__(self, bank: ExpertBank, device: torch.device, dtype: torch.dtype, group_size: int,
                 grouped: bool = True):
        self.bank, self.num_experts, self.grouped = bank, bank.num_experts, grouped
        self.stores_shared = bank_stores_shared(bank)  # then `shared` is the wrapped bank's
        self.grouped = self.routed(device, dtype) is not None
        self.modules: list[nn.Module] = []
        if self.grouped:
            return
        for first in range(0, bank.num_experts, group_size):
            ids = list(range(first, min(first + group_size, bank.num_experts)))
            self.modules.extend(bank.load(ids, device, dtype))

    def routed(self, device: torch.device, dtype: torch.dtype):
        """The wrapped bank's grouped path on `device` (kept by that bank), or None (none, or
        this block streams)."""
        grouped = getattr(self.bank, "routed", None) if self.grouped else None
        return None if grouped is None else grouped(device, dtype)

    def shared(self, device: torch.device, dtype: torch.dtype) -> dict[str, nn.Module]:
        return self.bank.shared(device, dtype)

    def shared_on_device(self, device: torch.device, dtype: torch.dtype) -> nn.Module | None:
        """The wrapped bank's shared expert on `device` (kept by that bank), or None (none, or
        this block streams: its shared expert is then `shared`'s, whose tensors the host keeps)."""
        on_device = getattr(self.bank, "shared_on_device", None) if self.grouped else None
        return None if on_device is None else on_device(device, dtype)

    def load(self, ids: Sequence[int], device: torch.device, dtype: torch.dtype) -> list[nn.Module]:
        """The kept modules (where they were loaded, or swapped in by a `Streamer`)."""
        return [self.modules[j] for j in ids]


@dataclass(eq=False)
class PlacedBlock:
    """One block and its experts, where it runs (`run.device`) and whether it lives in host memory."""

    name: str
    block: MoEBlock
    bank: ResidentBank | None
    run: RunConfig
    streamed: bool

    def modules(self) -> list[nn.Module]:
        return [self.block, *(self.bank.modules if self.bank else [])]

    def tensors(self) -> Iterator[tuple[nn.Module, str, str, torch.Tensor]]:
        """(module, '_parameters' | '_buffers', name, tensor) of every tensor it holds."""
        for top in self.modules():
            for module in top.modules():
                for kind in ("_parameters", "_buffers"):
                    for name, tensor in getattr(module, kind).items():
                        if tensor is not None:
                            yield module, kind, name, tensor


class Streamer:
    """Copies host-held blocks to their GPU on a side stream, one block ahead of use.

    `use(block)` swaps the block's staged GPU tensors in for the duration of the call and back
    out after; at most two blocks are staged at once (the running one and the next).
    """

    def __init__(self, device: torch.device, order: Sequence[PlacedBlock]):
        self.device, self.order = device, list(order)
        self.stream = torch.cuda.Stream(device)
        self.staged: dict[str, tuple[list[torch.Tensor], torch.cuda.Event]] = {}

    def prefetch(self, placed: PlacedBlock) -> None:
        if placed.name in self.staged:
            return
        with torch.cuda.stream(self.stream):
            copies = [t.to(self.device, non_blocking=True) for *_, t in placed.tensors()]
            done = torch.cuda.Event()
            done.record(self.stream)
        self.staged[placed.name] = (copies, done)

    def next_after(self, placed: PlacedBlock) -> PlacedBlock | None:
        """The streamed block after `placed`; after the last one, the first of its own stack
        (the output stack runs again at the next step)."""
        i = self.order.index(placed)
        if i + 1 < len(self.order):
            return self.order[i + 1]
        stack = placed.name.rpartition(".")[0]
        return next((p for p in self.order if p.name.rpartition(".")[0] == stack), None)

    def drop(self) -> None:
        """Forget what was staged ahead for a step that will not come (the batch is done)."""
        self.staged.clear()

    @contextlib.contextmanager
    def use(self, placed: PlacedBlock) -> Iterator[None]:
        self.prefetch(placed)
        copies, done = self.staged.pop(placed.name)
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(done)
        following = self.next_after(placed)
        if following is not None and following is not placed:
            self.prefetch(following)  # overlaps this block's compute
        for copy in copies:
            copy.record_stream(compute)  # allocated on the side stream, used on this one
        saved = swap_in(placed, copies)
        try:
            yield
        finally:
            swap_out(saved)


Saved = list[tuple[nn.Module, str, str, torch.Tensor]]


def swap_in(placed: PlacedBlock, copies: Sequence[torch.Tensor]) -> Saved:
    """Make the block compute with `copies` (in `tensors()` order); returns what `swap_out`
    needs to put the host tensors back (a parameter keeps its identity, only its data moves)."""
    saved = []
    for (module, kind, name, tensor), copy in zip(placed.tensors(), copies):
        saved.append((module, kind, name, tensor.data if kind == "_parameters" else tensor))
        _swap(module, kind, name, copy)
    return saved


def swap_out(saved: Saved) -> None:
    for module, kind, name, tensor in saved:
        _swap(module, kind, name, tensor)


def _swap(module: nn.Module, kind: str, name: str, tensor: torch.Tensor) -> None:
    if kind == "_parameters":
        module._parameters[name].data = tensor
    else:
        module._buffers[name] = tensor


@dataclass
class ResidentModel:
    """The loaded model: embeddings, head, final norms, incremental stacks and placed blocks."""

    weights: ModelWeights
    dtype: torch.dtype
    first_device: torch.device  # embeddings, head, norms, position tables
    blocks: dict[str, list[PlacedBlock]]  # stack -> blocks in order
    stacks: dict[str, IncrementalStack]
    embeddings: dict[str, torch.Tensor]  # stack -> [vocab, d]
    norms: dict[str, nn.Module]
    head: object  # hidden [n, d] -> logits [n, vocab]
    streamer: Streamer | None = None
    placement: Placement | None = field(default=None)

    def embed(self, stack: str, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, T] int64 -> [B, T, d] on the first device."""
        return F.embedding(ids.to(self.first_device), self.embeddings[stack])

    def run_stack(self, stack: str, x: torch.Tensor, cache: StackCache) -> torch.Tensor:
        """Every block of `stack` on new positions x [B, t, d] -> final normalised states [B, t, d]
        on the first device."""
        attention = self.stacks[stack]
        for index, placed in enumerate(self.blocks[stack]):
            x = x.to(placed.run.device)
            with self._active(placed):
                x = attention.attend(placed.block, index, x, cache)
                x = self._feed_forward(placed, x)
        return self.norms[stack](x.to(self.first_device))

    def finish(self) -> None:
        """A batch is done: release the staging slot prefetched for the next step."""
        if self.streamer is not None:
            self.streamer.drop()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [n, d] -> logits [n, vocab] fp32."""
        return self.head(hidden).float()

    def _active(self, placed: PlacedBlock):
        if placed.streamed and self.streamer is not None:
            return self.streamer.use(placed)
        return contextlib.nullcontext()

    @staticmethod
    def _feed_forward(placed: PlacedBlock, x: torch.Tensor) -> torch.Tensor:
        block = placed.block
        if not block.is_sparse:
            return block.feed_forward(x)
        flat = x.reshape(-1, x.shape[-1]).contiguous()  # [B * t, d], updated in place
        sparse_feed_forward(block, ListBuffer.of(flat), placed.run)
        return flat.view_as(x)


def load_resident(weights: ModelWeights, placement: Placement | None, devices: Sequence[torch.device],
                  dtype: torch.dtype, group_size: int = 16) -> ResidentModel:
    """Read the whole model once, each block to where `placement` puts it (None: all on
    devices[0], e.g. the CPU). Host-placed blocks are pinned for fast copies."""
    arch, first = weights.arch, devices[0]
    blocks: dict[str, list[PlacedBlock]] = {}
    for stack in arch.stacks:
        blocks[stack] = []
        for i in range(arch.num_blocks(stack)):
            name = f"{stack}.{i}"
            home = placement.home[name] if placement else str(first)
            where = torch.device("cpu") if home == HOST else torch.device(home)
            run = RunConfig(device=torch.device(placement.stream_device) if home == HOST else where,
                            dtype=dtype, group_size=group_size, progress=False)
            bank = (ResidentBank(weights.experts(stack, i), where, dtype, group_size, grouped=home != HOST)
                    if arch.is_sparse(stack, i) else None)
            block = load_block(weights, stack, i, RunConfig(device=where, dtype=dtype, progress=False), bank)
            placed = PlacedBlock(name, block, bank, run, streamed=home == HOST)
            if placed.streamed:
                for module, kind, tensor_name, tensor in placed.tensors():
                    _swap(module, kind, tensor_name, tensor.pin_memory())
            blocks[stack].append(placed)
    streamed = [p for stack in arch.stacks for p in blocks[stack] if p.streamed]
    streamer = Streamer(torch.device(placement.stream_device), streamed) if streamed else None
    return ResidentModel(
        weights=weights, dtype=dtype, first_device=first, blocks=blocks,
        stacks={s: arch.incremental_stack(s, weights.tensor, first, dtype) for s in arch.stacks},
        embeddings={s: weights.tensor(arch.embedding_tensor(s), dtype, first) for s in arch.stacks},
        norms={s: arch.final_norm(s, weights.tensor, first, dtype) for s in arch.stacks},
        head=arch.head(weights.tensor, first, dtype), streamer=streamer, placement=placement)
