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

from ..errors import QmoeError

# Reads a named tensor of the model (Hugging Face names), cast to `dtype` (None: as stored) on `device`.
TensorReader = Callable[[str, "torch.dtype | None", torch.device], torch.Tensor]


class ExpertBank(Protocol):
    """Where a sparse block gets its experts: resident, read from a checkpoint, or compressed.

    A bank may also offer `routed(device, dtype) -> RoutedExperts | None` (see `routed_experts`):
    all of a block's experts on the device at once, run over every routed token together (the
    packed checkpoint's GPU path). Callers prefer it when it returns a value, else `load`.

    A bank of a compressed checkpoint may hold the block's shared expert too: it then says
    `stores_shared = True` (see `bank_stores_shared`) and offers `shared(device, dtype) ->
    {matrix: module}` (names of `Architecture.shared_expert`), and a block built around it has no
    parameters of its own for the shared expert: `load_block` hands it what `bank_shared` gives.
    Such a bank may also offer `shared_on_device(device, dtype) -> nn.Module | None`: the whole
    shared expert (x [N, d] -> [N, d]) on the device (the packed checkpoint's GPU path), preferred
    when it returns a value, as `routed` is.
    """

    num_experts: int

    def load(self, ids: Sequence[int], device: torch.device, dtype: torch.dtype) -> list[nn.Module]:
        """Modules computing experts `ids` on `[n, d_model]` inputs; dropped after use."""
        ...


class RoutedExperts(Protocol):
    """All experts of a sparse block at once: each token through the experts it was routed to."""

    def __call__(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Normalised x [N, d] (on the device, in the run dtype), index [N] or [N, k] int64 in
        [0, E) (top-k: k distinct experts per token, all run in this one call) -> expert outputs
        [N, d] or [N, k, d] in x's dtype (not yet scaled by the router weights)."""
        ...


def routed_experts(bank: ExpertBank, device: torch.device, dtype: torch.dtype) -> RoutedExperts | None:
    """The bank's grouped path on `device` in `dtype`, or None where it has none (then `load`)."""
    routed = getattr(bank, "routed", None)
    return None if routed is None else routed(device, dtype)


def bank_stores_shared(bank: ExpertBank | None) -> bool:
    """Whether `bank` holds its block's shared expert (compressed), not the block's parameters."""
    return bool(getattr(bank, "stores_shared", False))


def bank_shared(bank: ExpertBank, device: torch.device,
                dtype: torch.dtype) -> Mapping[str, torch.Tensor | nn.Module] | nn.Module:
    """The shared expert of a bank that stores it, for `MoEBlock.use_shared`: the bank's whole
    expert on the device where it offers one (`shared_on_device`), else its matrices (`shared`)."""
    on_device = getattr(bank, "shared_on_device", None)
    module = None if on_device is None else on_device(device, dtype)
    return bank.shared(device, dtype) if module is None else module


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

    def use_shared(self, shared: Mapping[str, torch.Tensor | nn.Module] | nn.Module) -> None:
        """Compute the shared expert from now on with `shared`: its parts (by
        `Architecture.shared_expert` names: weights [rows, cols], used without a copy, or modules
        such as decode-matmuls), or one module computing the whole expert, x [N, d] -> [N, d] (a
        packed one on the GPU kernels); a gate outside the expert stays the block's. A compressed
        checkpoint's (`bank_shared`), or the compressor's quantized ones. Only blocks of families
        with a shared expert are asked."""
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


class StackCache(Protocol):
    """What a stack's attention keeps between calls while decoding a batch of sequences
    incrementally: per block, the self-attention keys and values so far and, in a stack that
    reads a memory, the memory's cross-attention keys and values (projected once)."""

    def length(self, index: int) -> int:
        """Positions block `index` has cached so far."""
        ...


class IncrementalStack(Protocol):
    """A stack's attention over a padded batch, with a cache (generation). `attend` of block
    `index` appends the new positions' keys and values to that block's cache, so calling it for
    every block with positions [L, L + t) continues a sequence from L; a fresh cache fed the whole
    sequence at once gives the same result (tested)."""

    def new_cache(self, batch: int, max_length: int, key_mask: torch.Tensor | None = None,
                  memory: torch.Tensor | None = None, memory_mask: torch.Tensor | None = None) -> StackCache:
        """An empty cache for `batch` sequences of up to `max_length` positions. key_mask [B, T0]
        bool (True = real token) masks the keys of the first T0 positions (a padded prompt); a
        stack with positional encodings counts a sequence's positions from its first real token,
        so a left-padded prompt computes as it would alone; memory [B, S, d]
        with memory_mask [B, S] bool is what cross-attention reads (None: no cross-attention)."""
        ...

    def attend(self, block: MoEBlock, index: int, x: torch.Tensor, cache: StackCache) -> torch.Tensor:
        """The attention sublayers of block `index` on new positions x [B, t, d] -> [B, t, d],
        on x's device (the cache's tensors for this block live there too)."""
        ...


@dataclass(frozen=True)
class GenerationSpec:
    """How a family generates: which stack reads the prompt once, which runs token by token.

    Encoder-decoder (T5): the prompt stack encodes the prompt, the output stack starts from
    `start_token`. Decoder-only: no prompt stack and no start token; the output stack reads the
    prompt itself (left-padded with `pad_token` in a batch) and continues it.
    """

    prompt_stack: str | None  # run once over the prompt ("encoder"); None for decoder-only families
    output_stack: str  # run one position at a time with a cache ("decoder")
    start_token: int | None  # the output stack's first input; None for decoder-only families
    eos_tokens: tuple[int, ...]  # a sequence stops at any of them (none: only at the length limit)
    pad_token: int
    prompt_suffix: tuple[int, ...]  # appended to every prompt (T5: EOS, as its tokenizer does)
    max_positions: int | None = None  # longest sequence the model's positions cover (None: the preset's window)

    def __post_init__(self) -> None:
        if self.prompt_stack == self.output_stack:
            raise ValueError("GenerationSpec: the prompt and output stacks must differ, "
                             f"got {self.output_stack!r} twice")
        if (self.prompt_stack is None) != (self.start_token is None):
            raise ValueError("GenerationSpec: a start token goes with a prompt stack (encoder-decoder), and neither "
                             f"with decoder-only; got prompt_stack {self.prompt_stack!r}, "
                             f"start_token {self.start_token!r}")
        ids = {"start_token": () if self.start_token is None else (self.start_token,),
               "eos_tokens": self.eos_tokens, "pad_token": (self.pad_token,)}
        for name, values in ids.items():
            if any(not isinstance(v, int) or v < 0 for v in values):
                raise ValueError(f"GenerationSpec.{name} must be token ids >= 0, got {getattr(self, name)!r}")
        if self.max_positions is not None and self.max_positions < 1:
            raise ValueError(f"GenerationSpec.max_positions must be >= 1 or None, got {self.max_positions!r}")


# Expert structures the grouped GPU kernels run (`ExpertShape.chain_activation`), with their
# number of inputs: "relu" is output(relu(inputs[0](x))) (Switch); "silu_gated" is
# output(silu(inputs[0](x)) * inputs[1](x)) (SwiGLU: gate, up, then down), each input's output
# rounded to the run dtype before the activation and the product (as separate linears give).
CHAIN_ACTIVATIONS = {"relu": 1, "silu_gated": 2}


@dataclass(frozen=True)
class ExpertShape:
    """An expert feed-forward as the compressor sees it: its matrices in quantization order, each
    [rows, cols]: first the `inputs` (applied to the expert's input, so they share its Hessian),
    then one matrix applied to `hidden`, what the inputs' outputs become."""

    matrices: tuple[str, ...]  # e.g. ("wi", "wo"), ("gate_proj", "up_proj", "down_proj")
    shapes: Mapping[str, tuple[int, int]]  # name -> (rows, cols)
    # (x [n, d], {input: W [r, d]}) -> [n, r]
    hidden: Callable[[torch.Tensor, Mapping[str, torch.Tensor]], torch.Tensor]
    inputs: tuple[str, ...] = ()  # default: the first matrix alone
    # How `hidden` combines the inputs' outputs, for the grouped GPU kernels (which compute all
    # inputs of an expert in one launch, stacked by rows) to run it; None for any other
    # structure, which runs expert by expert. See CHAIN_ACTIVATIONS.
    chain_activation: str | None = None

    def __post_init__(self) -> None:
        if not self.inputs:
            object.__setattr__(self, "inputs", self.matrices[:1])
        if self.matrices != (*self.inputs, self.matrices[-1]):
            raise ValueError(f"ExpertShape.matrices {self.matrices} must be the inputs {self.inputs} and then one more")
        act = self.chain_activation
        if act is not None and CHAIN_ACTIVATIONS.get(act) != len(self.inputs):
            wanted = ", ".join(f"{name!r} ({n} input{'s' * (n > 1)})" for name, n in CHAIN_ACTIVATIONS.items())
            raise ValueError(f"ExpertShape.chain_activation {act!r} with {len(self.inputs)} inputs {self.inputs}: "
                             f"must be None or one of {wanted}")

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
    # The sparse blocks' shared expert, which every token passes (Qwen2-MoE, DeepSeek), described
    # as a routed one so it is quantized alike; None for families without one.
    shared_expert: ExpertShape | None

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

    def shared_tensor(self, stack: str, index: int, matrix: str) -> str:
        """Checkpoint name of one shared expert matrix of a sparse block (families with one)."""
        ...

    def head_tensors(self) -> dict[str, tuple[int, ...]]:
        """Checkpoint names and shapes of the tensors outside any block (embeddings, final norms,
        head), as the model uses them; a checkpoint may hold some under another name
        (`storage_names`)."""
        ...

    def storage_names(self, name: str) -> tuple[str, ...]:
        """The names a checkpoint may hold tensor `name` under, first choice first: itself, then
        what stands in for it when absent (a stack's input embedding: the shared one)."""
        ...

    def stack_tokens(self, input_ids: Sequence[Sequence[int]],
                     labels: Sequence[Sequence[int]]) -> dict[str, list[list[int]]]:
        """Token ids entering each stack, per sample, from a sample's inputs and labels."""
        ...

    def memory_stack(self, stack: str) -> str | None:
        """The earlier stack whose final states `stack` attends to (cross-attention), if any."""
        ...

    def embedding_tensor(self, stack: str) -> str:
        """Name of `stack`'s input embedding [vocab, d] (read through `storage_names`)."""
        ...

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

    def generation(self) -> GenerationSpec: ...

    def incremental_stack(self, stack: str, read: TensorReader, device: torch.device,
                          dtype: torch.dtype) -> IncrementalStack:
        """Batched attention with a cache for `stack` (its shared tables read now, on `device`)."""
        ...

    def cache_bytes(self, stack: str, batch: int, length: int, memory_length: int, dtype: torch.dtype) -> int:
        """Bytes one block of `stack` caches for `batch` sequences of `length` positions (reading
        a memory of `memory_length`): what placement reserves beside the block's weights."""
        ...


class ModelWeights(Protocol):
    """What the runner needs from a checkpoint of any kind: named tensors and expert banks."""

    arch: Architecture

    def stored_name(self, name: str) -> str:
        """The name this checkpoint holds tensor `name` under: the first of
        `arch.storage_names(name)` it holds (`resolve_name`)."""
        ...

    def tensor(self, name: str, dtype: torch.dtype | None, device: torch.device) -> torch.Tensor:
        """Tensor `name`, read under its `stored_name`."""
        ...

    def experts(self, stack: str, index: int) -> ExpertBank: ...


def resolve_name(arch: Architecture, name: str, holds: Callable[[str], bool], where: object) -> str:
    """The first of `arch.storage_names(name)` that a checkpoint holds (`holds(name)`); QmoeError
    naming the checkpoint `where` and every name tried when it holds none."""
    candidates = arch.storage_names(name)
    for candidate in candidates:
        if holds(candidate):
            return candidate
    tried = f"'{name}'" + (f" (nor {', '.join(repr(c) for c in candidates[1:])})" if len(candidates) > 1 else "")
    raise QmoeError(f"{where}: tensor {tried} is missing from the checkpoint")
