"""The interface between a model family and everything else.

The streamed runner, the compressor and the checkpoint formats hold an `Architecture` and ask it
for what differs per family: the stacks and their blocks, which blocks are sparse, checkpoint
names, the embedding and head, how a block attends, and the shape of an expert. They never name
a family's classes. A family implements the interface in its own subpackage (`arch/switch/`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol, Sequence

import torch
from torch import nn

# Reads a named tensor of the model (Hugging Face names), cast to `dtype` (None: as stored) on `device`.
TensorReader = Callable[[str, "torch.dtype | None", torch.device], torch.Tensor]


class ExpertBank(Protocol):
    """Where a sparse block gets its experts: resident, read from a checkpoint, or compressed."""

    num_experts: int

    def load(self, ids: Sequence[int], device: torch.device, dtype: torch.dtype) -> list[nn.Module]:
        """Modules computing experts `ids` on `[n, d_model]` inputs; dropped after use."""
        ...


class MoEBlock(Protocol):
    """One block as the runner drives it: attention (through a `StackContext`), then a dense or
    sparse feed-forward over a flat token buffer."""

    is_sparse: bool
    experts: ExpertBank | None  # the sparse block's bank; None in a dense block

    def ffn_norm(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, d] -> the feed-forward's normalised input [N, d]."""
        ...

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised x [N, d] -> expert indices and their weights (fp32 routing): [N] int64 and
        [N] fp32 for top-1, [N, k] each for top-k (k distinct experts per token)."""
        ...

    def shared_output(self, x: torch.Tensor) -> torch.Tensor | None:
        """Normalised x [N, d] -> what the block's shared experts add [N, d]; None without any."""
        ...

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual feed-forward of a dense block: x [N, d] -> [N, d]."""
        ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...


class StackContext(Protocol):
    """What all blocks of one stack share while attending (e.g. a position-bias table)."""

    def attend(self, block: MoEBlock, x: torch.Tensor, memory: torch.Tensor | None) -> torch.Tensor:
        """x [1, T, d] of one sample (memory [1, S, d] from an earlier stack, or None) -> [1, T, d]."""
        ...


@dataclass(frozen=True)
class ExpertShape:
    """An expert feed-forward as the compressor sees it: its matrices in quantization order, each
    [rows, cols]: first the `inputs` (applied to the expert's input, so they share its Hessian),
    then one matrix applied to `hidden`, what the inputs' outputs become."""

    matrices: tuple[str, ...]  # e.g. ("wi", "wo"), ("gate_proj", "up_proj", "down_proj")
    shapes: Mapping[str, tuple[int, int]]  # name -> (rows, cols)
    hidden: Callable[[torch.Tensor, Mapping[str, torch.Tensor]], torch.Tensor]  # (x [n, d], {input: W [r, d]}) -> [n, r]
    inputs: tuple[str, ...] = ()  # default: the first matrix alone

    def __post_init__(self) -> None:
        if not self.inputs:
            object.__setattr__(self, "inputs", self.matrices[:1])
        if self.matrices != (*self.inputs, self.matrices[-1]):
            raise ValueError(f"ExpertShape.matrices {self.matrices} must be the inputs {self.inputs} and then one more")

    @property
    def output(self) -> str:
        """The matrix applied to `hidden`."""
        return self.matrices[-1]


class Architecture(Protocol):
    """What differs per model family (see the module docstring)."""

    family: str
    objective: str  # "span_corruption" (encoder-decoder, T5 data) or "causal_lm" (next-token prediction)
    config: Any  # the family's frozen config dataclass (`to_dict()` is stored in manifests)
    stacks: tuple[str, ...]  # in execution order
    num_experts: int
    d_model: int
    expert: ExpertShape

    def num_blocks(self, stack: str) -> int: ...

    def is_sparse(self, stack: str, index: int) -> bool: ...

    def sparse_blocks(self) -> list[tuple[str, int]]:
        """(stack, index) of every block that holds experts, in execution order."""
        ...

    def block(self, stack: str, index: int, experts: ExpertBank | None) -> MoEBlock:
        """Block `index` of `stack` around `experts` (built on the current default device)."""
        ...

    def block_prefix(self, stack: str, index: int) -> str:
        """Checkpoint-name prefix of the block's non-expert tensors ("encoder.block.3.")."""
        ...

    def expert_tensor(self, stack: str, index: int, expert: int, matrix: str) -> str:
        """Checkpoint name of one expert matrix of a sparse block."""
        ...

    def head_tensors(self) -> list[str]:
        """Checkpoint names of the tensors outside any block (embeddings, final norms, head)."""
        ...

    def stack_tokens(self, input_ids: Sequence[Sequence[int]],
                     labels: Sequence[Sequence[int]]) -> dict[str, list[list[int]]]:
        """Token ids entering each stack, per sample, from a sample's inputs and labels."""
        ...

    def memory_stack(self, stack: str) -> str | None:
        """The earlier stack whose final states `stack` attends to (cross-attention), if any."""
        ...

    def embedding_tensor(self, stack: str) -> str: ...

    def final_norm(self, stack: str, read: TensorReader, device: torch.device,
                   dtype: torch.dtype) -> nn.Module: ...

    def stack_context(self, stack: str, read: TensorReader, device: torch.device,
                      dtype: torch.dtype) -> StackContext: ...

    def head(self, read: TensorReader, device: torch.device,
             dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
        """Final hidden states [n, d] -> logits [n, vocab]."""
        ...

    def make_expert(self, parts: Mapping[str, torch.Tensor | nn.Module]) -> nn.Module:
        """An inference-only expert from its matrices (weights [rows, cols], used without a
        copy) or from modules computing them (e.g. decode-matmuls of packed codes)."""
        ...


class ModelWeights(Protocol):
    """What the runner needs from a checkpoint of any kind: named tensors and expert banks."""

    arch: Architecture

    def tensor(self, name: str, dtype: torch.dtype | None, device: torch.device) -> torch.Tensor: ...

    def experts(self, stack: str, index: int) -> ExpertBank: ...
