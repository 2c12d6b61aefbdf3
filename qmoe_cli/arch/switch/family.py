"""Switch Transformers behind the `Architecture` interface: what the runner, the compressor and
the formats need to know about them, and nothing they need to know about the others."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..base import ExpertBank, ExpertShape, GenerationSpec, TensorReader
from .config import SwitchConfig
from .incremental import SwitchIncrementalStack, cache_bytes
from .layers import Block, ExpertFFN, RMSNorm, position_bias
from .model import lm_logits, shift_right

STACKS = ("encoder", "decoder")
SHARED = "shared.weight"  # the input embedding of both stacks, unless a stack has its own
HEAD = "lm_head.weight"


@dataclass(frozen=True)
class SwitchStackContext:
    """A stack's relative position bias table, turned into a bias per sample length."""

    config: SwitchConfig
    table: torch.Tensor  # [num_buckets, heads], the stack's first block's bias table
    bidirectional: bool

    def attend(self, block: Block, x: torch.Tensor, memory: torch.Tensor | None) -> torch.Tensor:
        bias = position_bias(self.table, self.config, x.shape[1], x.shape[1], self.bidirectional)
        return block.attend(x, bias, memory, _NO_MASK)


_NO_MASK = torch.zeros(())  # cross-attention of one unpadded sample: nothing to mask


def _relu_hidden(x: torch.Tensor, first: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return F.relu(x @ first["wi"].T)


@dataclass(frozen=True)
class SwitchArchitecture:
    """Encoder-decoder Switch Transformer with top-1 ReLU experts (`wi`, then `wo`)."""

    config: SwitchConfig
    family: str = "switch"
    objective: str = "span_corruption"
    stacks: tuple[str, ...] = STACKS
    expert: ExpertShape = field(init=False)
    shared_expert: ExpertShape | None = None  # Switch has none

    def __post_init__(self) -> None:
        c = self.config
        shapes = {"wi": (c.d_ff, c.d_model), "wo": (c.d_model, c.d_ff)}
        object.__setattr__(self, "expert", ExpertShape(("wi", "wo"), shapes, _relu_hidden, chain_activation="relu"))

    @property
    def num_experts(self) -> int:
        return self.config.num_experts

    @property
    def d_model(self) -> int:
        return self.config.d_model

    def num_blocks(self, stack: str) -> int:
        return self.config.num_blocks(stack)

    def is_sparse(self, stack: str, index: int) -> bool:
        return self.config.is_sparse(stack, index)

    def sparse_blocks(self) -> list[tuple[str, int]]:
        return self.config.sparse_blocks()

    def block(self, stack: str, index: int, experts: ExpertBank | None) -> Block:
        return Block(self.config, stack, index, experts=experts)

    def block_prefix(self, stack: str, index: int) -> str:
        return f"{stack}.block.{index}."

    def expert_tensor(self, stack: str, index: int, expert: int, matrix: str) -> str:
        ffn = 1 if stack == "encoder" else 2  # the decoder's layer.1 is cross-attention
        return f"{stack}.block.{index}.layer.{ffn}.mlp.experts.expert_{expert}.{matrix}.weight"

    def head_tensors(self) -> dict[str, tuple[int, ...]]:
        c = self.config
        return {**{self.embedding_tensor(stack): (c.vocab_size, c.d_model) for stack in self.stacks},
                **{f"{stack}.final_layer_norm.weight": (c.d_model,) for stack in self.stacks},
                HEAD: (c.vocab_size, c.d_model)}

    def storage_names(self, name: str) -> tuple[str, ...]:
        """A stack's input embedding is its own `embed_tokens` where the checkpoint holds one
        (transformers 5 writes untied models so: `shared` is then unused), else `shared`, as
        transformers 4 wrote them (switch-c-2048). The head is `lm_head` where held; tied, it
        may be `shared` instead. So each matrix is the one `transformers` 5 computes with."""
        if name in (self.embedding_tensor(stack) for stack in self.stacks):
            return name, SHARED
        if name == HEAD and self.config.tie_word_embeddings:
            return name, SHARED
        return (name,)

    def stack_tokens(self, input_ids: Sequence[Sequence[int]],
                     labels: Sequence[Sequence[int]]) -> dict[str, list[list[int]]]:
        """Encoder: the inputs; decoder: the start token, then labels[:-1] (teacher forcing)."""
        c = self.config
        decoder = [shift_right(torch.tensor(l, dtype=torch.long), c.decoder_start_token_id, c.pad_token_id).tolist()
                   for l in labels]
        return {"encoder": [list(s) for s in input_ids], "decoder": decoder}

    def memory_stack(self, stack: str) -> str | None:
        return "encoder" if stack == "decoder" else None

    def embedding_tensor(self, stack: str) -> str:
        return f"{stack}.embed_tokens.weight"

    def final_norm(self, stack: str, read: TensorReader, device: torch.device, dtype: torch.dtype) -> nn.Module:
        norm = RMSNorm(self.config.d_model, self.config.layer_norm_epsilon)
        norm.weight = nn.Parameter(read(f"{stack}.final_layer_norm.weight", dtype, device))
        return norm

    def stack_context(self, stack: str, read: TensorReader, device: torch.device,
                      dtype: torch.dtype) -> SwitchStackContext:
        table = read(f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", dtype, device)
        return SwitchStackContext(self.config, table, bidirectional=stack == "encoder")

    def head(self, read: TensorReader, device: torch.device,
             dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
        weight = read(HEAD, dtype, device)  # [vocab, d]
        return lambda hidden: lm_logits(hidden, weight, self.config)

    def make_expert(self, parts: Mapping[str, torch.Tensor | nn.Module]) -> ExpertFFN:
        wi, wo = parts["wi"], parts["wo"]
        if isinstance(wi, torch.Tensor):
            return ExpertFFN.from_weights(wi, wo)
        return ExpertFFN.from_linears(wi, wo)

    def generation(self) -> GenerationSpec:
        c = self.config
        return GenerationSpec(prompt_stack="encoder", output_stack="decoder", start_token=c.decoder_start_token_id,
                              eos_tokens=(c.eos_token_id,), pad_token=c.pad_token_id, prompt_suffix=(c.eos_token_id,))

    def incremental_stack(self, stack: str, read: TensorReader, device: torch.device,
                          dtype: torch.dtype) -> SwitchIncrementalStack:
        table = read(f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", dtype, device)
        return SwitchIncrementalStack(self.config, table, bidirectional=stack == "encoder")

    def cache_bytes(self, stack: str, batch: int, length: int, memory_length: int, dtype: torch.dtype) -> int:
        return cache_bytes(self.config, stack, batch, length, memory_length, dtype)
