"""Where each block of a model lives while it generates: a GPU, or host memory (streamed).

`plan_placement` is a pure function of block sizes and per-device budgets, so it is tested on a
machine without GPUs. Blocks are placed by how often they run: the output stack's blocks run
once per generated token, the prompt stack's once per batch, so the former take the GPUs first
and the latter are the first to stay in host memory. A block in host memory is copied to its
streaming GPU one block ahead of use (two staging slots: the block running and the next), so
that GPU reserves twice the largest streamed block plus the streamed blocks' decoding caches.

Sizes (`block_bytes`) are estimates from shapes and file sizes, never from reading a block: its
non-expert tensors and its experts as they are held while generating (dense in the compute dtype for
original and quantized checkpoints; the compressed files' bytes for packed ones).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from ..arch import ModelWeights
from ..errors import QmoeError
from ..formats.packed import PackedWeights
from ..formats.quantized import expert_file

HOST = "host"
WORKSPACE_BYTES = 2 << 30  # per GPU, for activations, attention scores, logits, decode scratch
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_bytes(text: str) -> int:
    """'70GiB', '80GB', '512MiB', '1.5TiB' or a plain byte count -> bytes (ValueError otherwise)."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not found or found.group(2).lower() not in _UNITS:
        raise ValueError(f"--max-memory {text!r}: expected a size like 70GiB, 80GB or 512MiB")
    return int(float(found.group(1)) * _UNITS[found.group(2).lower()])


def format_bytes(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.1f} MiB"


@dataclass(frozen=True)
class BlockNeed:
    """What one block needs on the device that runs it."""

    name: str  # "decoder.3"
    weight_bytes: int  # non-expert tensors + experts as held while generating
    cache_bytes: int  # its decoding cache (stays on the device even when the block streams)
    runs: int  # times it runs per batch of prompts: more runs, first to get a GPU

    def __post_init__(self) -> None:
        if self.weight_bytes < 0 or self.cache_bytes < 0 or self.runs < 1:
            raise ValueError(f"BlockNeed {self.name}: bytes must be >= 0 and runs >= 1, got "
                             f"{self.weight_bytes}, {self.cache_bytes}, {self.runs}")


@dataclass(frozen=True)
class Placement:
    """Each block's home: a device name or HOST (streamed through `stream_device`)."""

    home: Mapping[str, str]  # block name -> device or HOST
    used: Mapping[str, int]  # device -> bytes planned (weights, caches, staging)
    budgets: Mapping[str, int]
    stream_device: str | None  # where host blocks run; None when nothing streams
    staging_bytes: int = 0
    order: tuple[str, ...] = field(default=())  # block names in execution order

    @property
    def streamed(self) -> list[str]:
        return [name for name in self.order if self.home[name] == HOST]

    def describe(self) -> list[str]:
        """Lines for stderr: which blocks each device holds and what streams."""
        lines = []
        for device, budget in self.budgets.items():
            names = [n for n in self.order if self.home[n] == device]
            lines.append(f"placement: {device} holds {len(names)} blocks ({_ranges(names) or 'none'}), "
                         f"{format_bytes(self.used[device])} of {format_bytes(budget)}")
        if self.streamed:
            lines.append(f"placement: host memory streams {len(self.streamed)} blocks ({_ranges(self.streamed)}) "
                         f"through {self.stream_device}, one block ahead ({format_bytes(self.staging_bytes)} staging)")
        return lines


def _ranges(names: Sequence[str]) -> str:
    """['decoder.0', 'decoder.1', 'decoder.2', 'encoder.5'] -> 'decoder.0-2, encoder.5'."""
    parts: list[str] = []
    run: list[tuple[str, int]] = []
    for name in names:
        stack, _, index = name.rpartition(".")
        if run and run[-1][0] == stack and run[-1][1] + 1 == int(index):
            run.append((stack, int(index)))
            continue
        if run:
            parts.append(_span(run))
        run = [(stack, int(index))]
    if run:
        parts.append(_span(run))
    return ", ".join(parts)


def _span(run: list[tuple[str, int]]) -> str:
    stack = run[0][0]
    return f"{stack}.{run[0][1]}" if len(run) == 1 else f"{stack}.{run[0][1]}-{run[-1][1]}"


def plan_placement(needs: Sequence[BlockNeed], budgets: Mapping[str, int]) -> Placement:
    """Place blocks (given in execution order) on devices with `budgets` bytes each (in order of
    preference; the first also streams): most-run blocks first, each on the first device with
    room; what does not fit stays in host memory. While blocks stream, the first device must also
    hold two staging slots of the largest streamed block and the streamed blocks' caches; blocks
    leave it for host memory, least-run first, until that fits.

    QmoeError when no plan fits (a device cannot stage even one block).
    """
    if not budgets:
        raise ValueError("plan_placement needs at least one device")
    devices = list(budgets)
    order = tuple(n.name for n in needs)
    by_priority = sorted(needs, key=lambda n: -n.runs)  # stable: execution order within a priority
    evicted: set[str] = set()
    while True:
        home: dict[str, str] = {}
        used = {d: 0 for d in devices}
        for need in by_priority:
            size = need.weight_bytes + need.cache_bytes
            target = None if need.name in evicted else next(
                (d for d in devices if used[d] + size <= budgets[d]), None)
            home[need.name] = target or HOST
            if target:
                used[target] += size
        streamed = [n for n in needs if home[n.name] == HOST]
        if not streamed:
            return Placement(home, used, dict(budgets), None, 0, order)
        stream_device = devices[0]
        staging = 2 * max(n.weight_bytes for n in streamed)
        extra = staging + sum(n.cache_bytes for n in streamed)
        if used[stream_device] + extra <= budgets[stream_device]:
            used[stream_device] += extra
            return Placement(home, used, dict(budgets), stream_device, staging, order)
        resident = [n for n in reversed(by_priority) if home[n.name] == stream_device]
        if not resident:
            largest = max(streamed, key=lambda n: n.weight_bytes)
            raise QmoeError(f"{stream_device} has {format_bytes(budgets[stream_device])} to use, but streaming "
                            f"needs {format_bytes(extra)} (two copies of {largest.name}, "
                            f"{format_bytes(largest.weight_bytes)}, plus decoding caches); raise --max-memory, "
                            "lower --batch-size or use --device cpu")
        evicted.add(resident[0].name)


def block_bytes(weights: ModelWeights, stack: str, index: int, dtype: torch.dtype) -> int:
    """Estimated bytes of block `index` of `stack` while generating (see the module docstring)."""
    arch = weights.arch
    size = torch.empty((), dtype=dtype).element_size()
    with torch.device("meta"):
        block = arch.block(stack, index, _NoExperts(arch.num_experts) if arch.is_sparse(stack, index) else None)
    total = sum(t.numel() for t in block.state_dict().values()) * size
    if not arch.is_sparse(stack, index):
        return total
    if isinstance(weights, PackedWeights):
        prefix = expert_file(stack, index, 0).rpartition("/")[0] + "/"
        return total + sum(r["bytes"] for name, r in weights.manifest.files.items() if name.startswith(prefix))
    per_expert = sum(rows * cols for rows, cols in arch.expert.shapes.values())
    return total + arch.num_experts * per_expert * size


class _NoExperts:
    """A bank that is never asked for experts: sizing a block's non-expert tensors on `meta`."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts

    def load(self, ids: Sequence[int], device: torch.device, dtype: torch.dtype) -> list:
        raise AssertionError("sizing a block never loads experts")


def plan_model(weights: ModelWeights, budgets: Mapping[str, int], dtype: torch.dtype, batch: int,
               max_new_tokens: int, prompt_length: int) -> Placement:
    """The placement of a whole model for generating `max_new_tokens` for batches of `batch`
    prompts of up to `prompt_length` tokens (embeddings and head go to the first device first).
    A decoder-only model caches prompt and output in one cache; an encoder-decoder caches the
    output and, for cross-attention, the prompt."""
    arch = weights.arch
    spec = arch.generation()
    cached, memory = ((max_new_tokens, prompt_length) if spec.prompt_stack is not None
                      else (prompt_length + max_new_tokens, 0))
    size = torch.empty((), dtype=dtype).element_size()
    head = sum(_numel(weights, name) for name in arch.head_tensors()) * size
    first = next(iter(budgets))
    budgets = {**budgets, first: max(0, budgets[first] - head)}
    needs = [BlockNeed(f"{stack}.{i}", block_bytes(weights, stack, i, dtype),
                       arch.cache_bytes(stack, batch, cached, memory, dtype),
                       max_new_tokens if stack == spec.output_stack else 1)
             for stack in arch.stacks for i in range(arch.num_blocks(stack))]
    placement = plan_placement(needs, budgets)
    return Placement(placement.home, {**placement.used, first: placement.used[first] + head},
                     {**placement.budgets, first: placement.budgets[first] + head}, placement.stream_device,
                     placement.staging_bytes, placement.order)


def _numel(weights: ModelWeights, name: str) -> int:
    """Elements of a non-block tensor (read once: embeddings and heads are small next to blocks)."""
    return weights.tensor(name, None, torch.device("cpu")).numel()


def device_budgets(devices: Sequence[torch.device], caps: Sequence[int]) -> dict[str, int]:
    """Bytes each GPU may hold: its free memory less a workspace, capped by --max-memory (one cap
    for all, or one per device)."""
    if caps and len(caps) not in (1, len(devices)):
        raise ValueError(f"--max-memory: give one size for all GPUs or one per GPU ({len(devices)}), "
                         f"got {len(caps)}")
    budgets = {}
    for i, device in enumerate(devices):
        free, _ = torch.cuda.mem_get_info(device)
        budget = max(0, free - WORKSPACE_BYTES)
        if caps:
            budget = min(budget, caps[0] if len(caps) == 1 else caps[i])
        budgets[str(device)] = budget
    return budgets
