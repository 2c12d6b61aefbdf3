"""Switch Transformer building blocks (T5 v1.0 style encoder-decoder with top-1 experts).

Parameter names mirror the Hugging Face checkpoint layout (`layer.0.SelfAttention.q.weight`,
`layer.1.mlp.router.classifier.weight`, ...), so a block's weights load by stripping the
`encoder.block.{i}.` prefix. Every block runs in two ways: whole (`forward` on a padded batch)
and in parts (`attend` per sample, `feed_forward` over a flat token buffer), which is how the
streamed runner uses it. Expert weights are not parameters of a block unless it was built
whole: a sparse block asks its `ExpertBank` for the experts that received tokens.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..base import ExpertBank, routed_experts
from .config import SwitchConfig


class RMSNorm(nn.Module):
    """T5 layer norm: scale only, no mean subtraction, no bias; statistics in fp32."""

    def __init__(self, width: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.eps)).to(self.weight.dtype)


def relative_position_bucket(relative: torch.Tensor, bidirectional: bool,
                             num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5's bucketing of (key - query) distances: exact for small, log-spaced up to max."""
    buckets = torch.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative > 0).long() * num_buckets
        distance = relative.abs()
    else:
        distance = (-relative).clamp(min=0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # float() of 0 gives log(0) = -inf here, but those positions take the is_small branch.
    large = max_exact + (torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).long()
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(is_small, distance, large)


class Attention(nn.Module):
    """Multi-head attention without score scaling (T5 folds it into the initialisation)."""

    def __init__(self, config: SwitchConfig, relative_bias: bool):
        super().__init__()
        inner = config.num_heads * config.d_kv
        self.num_heads, self.d_kv = config.num_heads, config.d_kv
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)
        if relative_bias:
            self.relative_attention_bias = nn.Embedding(config.relative_attention_num_buckets, config.num_heads)

    def forward(self, x: torch.Tensor, kv: torch.Tensor | None, bias: torch.Tensor) -> torch.Tensor:
        """x [B, T, d]; kv [B, S, d] (None: self-attention); bias [B|1, H, T, S] fp32 -> [B, T, d]."""
        k, v = self.keys_values(x if kv is None else kv)
        return self.attend_to(x, k, v, bias)

    def keys_values(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """kv [B, S, d] -> keys and values [B, H, S, d_kv] (what a decoding cache keeps)."""
        batch, length = kv.shape[:2]
        k = self.k(kv).view(batch, length, self.num_heads, self.d_kv).transpose(1, 2)
        v = self.v(kv).view(batch, length, self.num_heads, self.d_kv).transpose(1, 2)
        return k, v

    def attend_to(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Queries from x [B, T, d] over keys/values [B, H, S, d_kv]; bias [B|1, H|1, T, S] fp32 -> [B, T, d]."""
        batch, length = x.shape[:2]
        q = self.q(x).view(batch, length, self.num_heads, self.d_kv).transpose(1, 2)
        # Softmax in fp32: T5 scores are unscaled and overflow bf16 precision on long inputs.
        scores = torch.matmul(q, k.transpose(2, 3)).float() + bias
        weights = torch.softmax(scores, dim=-1).to(v.dtype)
        out = torch.matmul(weights, v).transpose(1, 2).reshape(batch, length, -1)
        return self.o(out)


def position_bias(table: torch.Tensor, config: SwitchConfig, query_len: int, key_len: int,
                  bidirectional: bool, first_query: int = 0) -> torch.Tensor:
    """Relative position bias, shared by all blocks of a stack -> [1, H, T, S] fp32.

    `table` [num_buckets, H] is the first block's `relative_attention_bias.weight`; queries sit at
    positions first_query .. first_query + T - 1 (a decoding step continues a cached sequence).
    """
    device = table.device
    relative = (torch.arange(key_len, device=device)[None, :]
                - torch.arange(first_query, first_query + query_len, device=device)[:, None])
    buckets = relative_position_bucket(relative, bidirectional, config.relative_attention_num_buckets,
                                       config.relative_attention_max_distance)
    bias = F.embedding(buckets, table).permute(2, 0, 1).unsqueeze(0).float()
    if not bidirectional:  # decoder self-attention is causal
        bias = bias.masked_fill(relative[None, None] > 0, torch.finfo(torch.float32).min)
    return bias


def padding_bias(mask: torch.Tensor | None, query_len: int) -> torch.Tensor:
    """Key padding mask [B, S] (1 = real token) -> additive bias [B, 1, 1, S] fp32 (or 0)."""
    if mask is None:
        return torch.zeros(())
    return (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min


class ExpertFFN(nn.Module):
    """One expert: ReLU feed-forward `wo(relu(wi(x)))`."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.wi = nn.Linear(d_model, d_ff, bias=False)
        self.wo = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(F.relu(self.wi(x)))

    @classmethod
    def from_weights(cls, wi: torch.Tensor, wo: torch.Tensor) -> "ExpertFFN":
        """An inference-only expert around given weights wi [d_ff, d], wo [d, d_ff] (no copy)."""
        with torch.device("meta"):
            expert = cls(1, 1)
        expert.wi.weight = nn.Parameter(wi, requires_grad=False)
        expert.wo.weight = nn.Parameter(wo, requires_grad=False)
        return expert

    @classmethod
    def from_linears(cls, wi: nn.Module, wo: nn.Module) -> "ExpertFFN":
        """An expert around any modules computing wi: [n, d] -> [n, d_ff] and wo: back to d."""
        with torch.device("meta"):
            expert = cls(1, 1)
        expert.wi, expert.wo = wi, wo
        return expert


class ResidentExperts(nn.ModuleDict):
    """All experts of a block as parameters (`experts.expert_{j}.wi.weight`): whole models."""

    def __init__(self, config: SwitchConfig):
        super().__init__({f"expert_{j}": ExpertFFN(config.d_model, config.d_ff) for j in range(config.num_experts)})
        self.num_experts = config.num_experts

    def load(self, ids: Sequence[int], device: torch.device, dtype: torch.dtype) -> list[nn.Module]:
        return [self[f"expert_{j}"] for j in ids]


class Router(nn.Module):
    def __init__(self, config: SwitchConfig):
        super().__init__()
        self.classifier = nn.Linear(config.d_model, config.num_experts, bias=config.router_bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, d] -> expert index [N] int64, its probability [N] fp32, logits [N, E] fp32.

        Routing runs in fp32 whatever the model dtype ("selective precision", Switch paper):
        in bf16, near-ties between experts flip and tokens go to the wrong expert.
        """
        weight = self.classifier.weight.float()
        bias = None if self.classifier.bias is None else self.classifier.bias.float()
        logits = F.linear(x.float(), weight, bias)
        probs = torch.softmax(logits, dim=-1)
        top_prob, top_index = probs.max(dim=-1)
        return top_index, top_prob, logits


class SparseMLP(nn.Module):
    """Top-1 mixture of experts. No capacity limit: at inference no token is dropped."""

    def __init__(self, config: SwitchConfig, experts: ExpertBank | None = None, group_size: int = 16):
        super().__init__()
        self.router = Router(config)
        self.experts = ResidentExperts(config) if experts is None else experts
        self.group_size = group_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, d] -> [N, d]: each token through its expert, scaled by the router probability."""
        index, prob, _ = self.router(x)
        return self.apply_experts(x, index, prob)

    def apply_experts(self, x: torch.Tensor, index: torch.Tensor, prob: torch.Tensor) -> torch.Tensor:
        routed = routed_experts(self.experts, x.device, x.dtype)
        if routed is not None:  # all experts in one grouped pass (packed experts on a GPU)
            return routed(x, index) * prob[:, None].to(x.dtype)
        order = torch.argsort(index, stable=True)  # tokens grouped by expert, in token order
        counts = torch.bincount(index, minlength=self.experts.num_experts).tolist()
        starts = [0]
        for count in counts:
            starts.append(starts[-1] + count)
        active = [j for j, count in enumerate(counts) if count]
        out = torch.zeros_like(x)
        for first in range(0, len(active), self.group_size):
            ids = active[first:first + self.group_size]
            for j, expert in zip(ids, self.experts.load(ids, x.device, x.dtype)):
                tokens = order[starts[j]:starts[j + 1]]
                y = expert(x[tokens]) * prob[tokens, None].to(x.dtype)
                out = out.index_copy(0, tokens, y) if torch.is_grad_enabled() else out.index_copy_(0, tokens, y)
        return out


class DenseMLP(ExpertFFN):
    """The feed-forward of a dense block: the same ReLU FFN as an expert."""


class FeedForward(nn.Module):
    """Pre-norm residual feed-forward sublayer (`layer.{1|2}` in the checkpoint)."""

    def __init__(self, config: SwitchConfig, sparse: bool, experts: ExpertBank | None = None):
        super().__init__()
        self.mlp = SparseMLP(config, experts) if sparse else DenseMLP(config.d_model, config.d_ff)
        self.layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d] (any leading shape; tokens are independent) -> same."""
        flat = x.reshape(-1, x.shape[-1])
        return x + self.mlp(self.layer_norm(flat)).view_as(x)


class SelfAttentionLayer(nn.Module):
    def __init__(self, config: SwitchConfig, relative_bias: bool):
        super().__init__()
        self.SelfAttention = Attention(config, relative_bias)
        self.layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return x + self.SelfAttention(self.layer_norm(x), None, bias)


class CrossAttentionLayer(nn.Module):
    def __init__(self, config: SwitchConfig):
        super().__init__()
        self.EncDecAttention = Attention(config, relative_bias=False)
        self.layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return x + self.EncDecAttention(self.layer_norm(x), memory, bias)


class Block(nn.Module):
    """One encoder or decoder block: self-attention, [cross-attention], feed-forward."""

    def __init__(self, config: SwitchConfig, stack: str, index: int, experts: ExpertBank | None = None):
        super().__init__()
        self.is_decoder = stack == "decoder"
        self.is_sparse = config.is_sparse(stack, index)
        layers: list[nn.Module] = [SelfAttentionLayer(config, relative_bias=index == 0)]
        if self.is_decoder:
            layers.append(CrossAttentionLayer(config))
        layers.append(FeedForward(config, self.is_sparse, experts))
        self.layer = nn.ModuleList(layers)

    @property
    def ffn(self) -> FeedForward:
        return self.layer[-1]

    @property
    def experts(self) -> ExpertBank | None:
        return self.ffn.mlp.experts if self.is_sparse else None

    def ffn_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn.layer_norm(x)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        index, prob, _ = self.ffn.mlp.router(x)
        return index, prob

    def shared_output(self, x: torch.Tensor) -> None:
        return None  # Switch has no shared experts

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn(x)

    def attend(self, x: torch.Tensor, self_bias: torch.Tensor, memory: torch.Tensor | None = None,
               cross_bias: torch.Tensor | None = None) -> torch.Tensor:
        """The attention sublayers: x [B, T, d], memory [B, S, d] (decoder only) -> [B, T, d]."""
        x = self.layer[0](x, self_bias)
        if self.is_decoder:
            x = self.layer[1](x, memory, cross_bias)
        return x

    def forward(self, x: torch.Tensor, self_bias: torch.Tensor, memory: torch.Tensor | None = None,
                cross_bias: torch.Tensor | None = None) -> torch.Tensor:
        return self.ffn(self.attend(x, self_bias, memory, cross_bias))
