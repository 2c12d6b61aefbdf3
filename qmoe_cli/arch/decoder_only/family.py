"""Decoder-only MoE models behind the `Architecture` interface: one stack ("decoder") of blocks
named `model.layers.{i}.`, `model.embed_tokens` in, `model.norm` and `lm_head` out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..base import ExpertBank, ExpertShape, GenerationSpec, TensorReader
from .config import DecoderConfig
from .experts import ClampedSwiGLU, clamped_swiglu, fused_source
from .incremental import DecoderIncrementalStack, cache_bytes
from .layers import SHARED_MATRICES, DecoderBlock, GatedMLP, RMSNorm, causal_bias, rotary_tables

STACK = "decoder"
EMBEDDING = "model.embed_tokens.weight"


def _swiglu_hidden(x: torch.Tensor, first: Mapping[str, torch.Tensor]) -> torch.Tensor:
    gate, up = first.values()  # in ExpertShape.inputs order: gate, then up
    return F.silu(x @ gate.T) * (x @ up.T)


def _swiglu_shape(names: tuple[str, str, str], d: int, ff: int, config: DecoderConfig | None = None) -> ExpertShape:
    """A SwiGLU expert of width ff: gate and up [ff, d] share the input's Hessian, then down [d, ff].
    With `config` of a clamped SwiGLU (GPT-OSS): that activation, which no grouped kernel runs
    (a block's `expert_hidden` adds its biases where the compressor needs them)."""
    gate, up, down = names
    shapes = {gate: (ff, d), up: (ff, d), down: (d, ff)}
    if config is not None and config.expert_activation == "clamped_swiglu":
        alpha, limit = config.swiglu_alpha, config.swiglu_limit

        def hidden(x: torch.Tensor, first: Mapping[str, torch.Tensor]) -> torch.Tensor:
            return clamped_swiglu(x @ first[gate].T, x @ first[up].T, alpha, limit)
        return ExpertShape(names, shapes, hidden, inputs=(gate, up))
    return ExpertShape(names, shapes, _swiglu_hidden, inputs=(gate, up), chain_activation="silu_gated")


@dataclass(frozen=True)
class DecoderStackContext:
    """Rotary tables and the causal mask, built per sample length."""

    config: DecoderConfig
    device: torch.device
    dtype: torch.dtype

    def attend(self, block: DecoderBlock, x: torch.Tensor, memory: torch.Tensor | None) -> torch.Tensor:
        length = x.shape[1]
        cos, sin = rotary_tables(self.config, length, self.device, self.dtype)
        window, chunk = self.config.layer_span(block.index)
        return block.attend(x, cos, sin, causal_bias(length, window, self.device, chunk=chunk))


@dataclass(frozen=True)
class DecoderArchitecture:
    """A causal LM of pre-norm blocks with top-k SwiGLU experts (gate and up, then down)."""

    config: DecoderConfig
    stacks: tuple[str, ...] = (STACK,)
    objective: str = "causal_lm"
    expert: ExpertShape = field(init=False)
    shared_expert: ExpertShape | None = field(init=False)

    def __post_init__(self) -> None:
        c = self.config
        object.__setattr__(self, "expert", _swiglu_shape(c.expert_matrices, c.hidden_size, c.moe_intermediate_size, c))
        shared = _swiglu_shape(SHARED_MATRICES, c.hidden_size, c.shared_expert_size) if c.shared_expert_size else None
        object.__setattr__(self, "shared_expert", shared)

    @property
    def family(self) -> str:
        return self.config.model_type

    @property
    def num_experts(self) -> int:
        return self.config.num_experts

    @property
    def d_model(self) -> int:
        return self.config.hidden_size

    def num_blocks(self, stack: str) -> int:
        return self.config.num_layers

    def is_sparse(self, stack: str, index: int) -> bool:
        return self.config.is_sparse(index)

    def sparse_blocks(self) -> list[tuple[str, int]]:
        return [(STACK, i) for i in range(self.config.num_layers) if self.config.is_sparse(i)]

    def block(self, stack: str, index: int, experts: ExpertBank | None) -> DecoderBlock:
        return DecoderBlock(self.config, index, experts)

    def block_prefix(self, stack: str, index: int) -> str:
        return f"model.layers.{index}."

    def expert_tensor(self, stack: str, index: int, expert: int, matrix: str) -> str:
        return f"model.layers.{index}.{self.config.moe_module}.experts.{expert}.{matrix}.weight"

    def fused_expert(self, stack: str, index: int,
                     matrix: str) -> tuple[str, Callable[[torch.Tensor], torch.Tensor]] | None:
        """Where a fused layout keeps `matrix` of every expert of block `index`: the tensor [E, ...]
        and the view of its row j that is expert j's matrix [rows, cols]; None: one tensor per
        expert (`expert_tensor`)."""
        c = self.config
        return None if c.expert_layout == "separate" else fused_source(c, f"model.layers.{index}.{c.moe_module}.",
                                                                          matrix)

    def shared_tensor(self, stack: str, index: int, matrix: str) -> str:
        return f"model.layers.{index}.{self.config.moe_module}.{self.config.shared_expert_module}.{matrix}.weight"

    def head_tensors(self) -> dict[str, tuple[int, ...]]:
        c = self.config
        names = {EMBEDDING: (c.vocab_size, c.hidden_size), "model.norm.weight": (c.hidden_size,)}
        return names if c.tie_word_embeddings else {**names, "lm_head.weight": (c.vocab_size, c.hidden_size)}

    def storage_names(self, name: str) -> tuple[str, ...]:
        """Every tensor under its own name (a tied head is read as the embedding by `head`);
        with a `tensor_prefix`, first after it (an original checkpoint), then without it (a
        compressed checkpoint's block files hold the model's names)."""
        prefix = self.config.tensor_prefix
        return (prefix + name, name) if prefix else (name,)

    def stack_tokens(self, input_ids: Sequence[Sequence[int]],
                     labels: Sequence[Sequence[int]]) -> dict[str, list[list[int]]]:
        """The decoder reads the inputs; labels (the next tokens) only enter the loss."""
        return {STACK: [list(s) for s in input_ids]}

    def memory_stack(self, stack: str) -> str | None:
        return None

    def embedding_tensor(self, stack: str) -> str:
        return EMBEDDING

    def final_norm(self, stack: str, read: TensorReader, device: torch.device, dtype: torch.dtype) -> nn.Module:
        norm = RMSNorm(self.config.hidden_size, self.config.rms_norm_eps)
        norm.weight = nn.Parameter(read("model.norm.weight", dtype, device))
        return norm

    def stack_context(self, stack: str, read: TensorReader, device: torch.device,
                      dtype: torch.dtype) -> DecoderStackContext:
        return DecoderStackContext(self.config, device, dtype)

    def head(self, read: TensorReader, device: torch.device,
             dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
        weight = read(EMBEDDING if self.config.tie_word_embeddings else "lm_head.weight", dtype, device)
        return lambda hidden: F.linear(hidden, weight)

    def make_expert(self, parts: Mapping[str, torch.Tensor | nn.Module]) -> GatedMLP | ClampedSwiGLU:
        if self.config.expert_activation == "clamped_swiglu":
            return ClampedSwiGLU.from_parts(self.config, parts)
        return GatedMLP.from_parts(self.config.expert_matrices, dict(parts))

    def generation(self) -> GenerationSpec:
        """A causal LM continues its prompt: no prompt stack, no start token, no suffix; stops at
        any of the config's `eos_token_id`s; pads with `pad_token_id`, else the first EOS, else 0
        (padding is masked, so any id does)."""
        c = self.config
        pad = c.pad_token_id if c.pad_token_id is not None else (c.eos_token_ids or (0,))[0]
        return GenerationSpec(prompt_stack=None, output_stack=STACK, start_token=None, eos_tokens=c.eos_token_ids,
                              pad_token=pad, prompt_suffix=(), max_positions=c.max_position_embeddings)

    def incremental_stack(self, stack: str, read: TensorReader, device: torch.device,
                          dtype: torch.dtype) -> DecoderIncrementalStack:
        return DecoderIncrementalStack(self.config, device, dtype)

    def cache_bytes(self, stack: str, batch: int, length: int, memory_length: int, dtype: torch.dtype) -> int:
        """The prompt and the generated tokens share one cache of `length` positions (no memory)."""
        return cache_bytes(self.config, batch, length, dtype)
