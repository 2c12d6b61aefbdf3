"""Switch Transformers behind the `Architecture` interface: what the runner, the compressor and
the formats need to know about them, and nothing they need to know about the others."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..base import ExpertBank, ExpertShape, TensorReader
from .config import SwitchConfig
from .layers import Block, ExpertFFN, RMSNorm, position_bias
from .model import lm_logits, shift_right

STACKS = ("encoder", "decoder")


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

    def __post_init__(self) -> None:
        c = self.config
        shapes = {"wi": (c.d_ff, c.d_model), "wo": (c.d_model, c.d_ff)}
        object.__setattr__(self, "expert", ExpertShape(("wi", "wo"), shapes, _relu_hidden))

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

    def head_tensors(self) -> list[str]:
        names = ["shared.weight", "encoder.final_layer_norm.weight", "decoder.final_layer_norm.weight"]
        return names if self.config.tie_word_embeddings else [*names, "lm_head.weight"]

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
        return "shared.weight"

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
        c = self.config
        if c.tie_word_embeddings:
            embedding = read("shared.weight", dtype, device)
            return lambda hidden: lm_logits(hidden, embedding, None, c)
        head = nn.Linear(c.d_model, c.vocab_size, bias=False, device="meta")
        head.weight = nn.Parameter(read("lm_head.weight", dtype, device))
        return lambda hidden: lm_logits(hidden, None, head, c)

    def make_expert(self, parts: Mapping[str, torch.Tensor | nn.Module]) -> ExpertFFN:
        wi, wo = parts["wi"], parts["wo"]
        if isinstance(wi, torch.Tensor):
            return ExpertFFN.from_weights(wi, wo)
        return ExpertFFN.from_linears(wi, wo)
