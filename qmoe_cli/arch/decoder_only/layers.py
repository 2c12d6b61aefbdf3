"""Decoder-only MoE building blocks shared by every family: RMSNorm, rotary grouped-query
attention, the top-k router, SwiGLU experts (routed and shared) and the block.

Parameter names mirror the Hugging Face layout below `model.layers.{i}.` (`input_layernorm`,
`self_attn.q_proj`, `{moe}.gate`, `{moe}.shared_expert.gate_proj`, ...), so a block's weights
load by stripping that prefix. Routed experts are never parameters of a block: a sparse block
asks its `ExpertBank` for them. Every block runs in parts, as the streamed runner drives it:
`attend` per sample, then `feed_forward` (dense) or `route` + experts + `shared_output` (sparse)
over a flat token buffer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..base import ExpertBank
from .config import DecoderConfig


class RMSNorm(nn.Module):
    """Scale-only layer norm; statistics in fp32, then cast back before the scale (as HF does)."""

    def __init__(self, width: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotary_tables(config: DecoderConfig, length: int, device: torch.device,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [length, head_dim] of positions 0..length-1 (angles in fp32, as HF computes them)."""
    exponent = torch.arange(0, config.head_dim, 2, dtype=torch.int64, device=device).float() / config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** exponent)  # [head_dim / 2]
    angles = torch.arange(length, device=device).float()[:, None] * inv_freq[None, :]
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, hd] rotated by position (the half-split convention, not interleaved pairs)."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


def causal_bias(length: int, window: int | None, device: torch.device) -> torch.Tensor:
    """Additive mask [T, T] fp32: 0 where key <= query (and within `window`), else -inf-like."""
    query = torch.arange(length, device=device)[:, None]
    key = torch.arange(length, device=device)[None, :]
    allowed = key <= query
    if window is not None:
        allowed &= query - key < window
    return torch.zeros(length, length, device=device).masked_fill(~allowed, torch.finfo(torch.float32).min)


class Attention(nn.Module):
    """Grouped-query self-attention with rotary positions, optional q/k norms and qkv clipping."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        c = config
        self.config = c
        bias = c.attention_bias
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=bias)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=False)
        if c.qk_norm == "head":
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
        elif c.qk_norm == "full":
            self.q_norm = RMSNorm(c.num_heads * c.head_dim, c.rms_norm_eps)
            self.k_norm = RMSNorm(c.num_kv_heads * c.head_dim, c.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x [B, T, d]; cos, sin [T, hd]; bias [T, T] fp32 -> [B, T, d]."""
        c = self.config
        batch, length = x.shape[:2]
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if c.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if c.clip_qkv is not None:
            q, k, v = (t.clamp(-c.clip_qkv, c.clip_qkv) for t in (q, k, v))
        q = q.view(batch, length, c.num_heads, c.head_dim)
        k = k.view(batch, length, c.num_kv_heads, c.head_dim)
        if c.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = _rotate(q.transpose(1, 2), cos, sin), _rotate(k.transpose(1, 2), cos, sin)  # [B, H|KV, T, hd]
        v = v.view(batch, length, c.num_kv_heads, c.head_dim).transpose(1, 2)
        groups = c.num_heads // c.num_kv_heads  # each key/value head serves `groups` query heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = torch.matmul(q, k.transpose(2, 3)).float() * c.head_dim ** -0.5 + bias  # [B, H, T, T] fp32
        weights = torch.softmax(scores, dim=-1).to(v.dtype)
        out = torch.matmul(weights, v).transpose(1, 2).reshape(batch, length, -1)
        return self.o_proj(out)


class GatedMLP(nn.Module):
    """SwiGLU feed-forward `down(silu(gate(x)) * up(x))`: a dense block's MLP, a shared expert, and
    (through `from_parts`) a routed expert, whose three linears may be any modules."""

    def __init__(self, d_model: int, d_ff: int, names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")):
        super().__init__()
        self.names = names
        gate, up, down = names
        self.add_module(gate, nn.Linear(d_model, d_ff, bias=False))
        self.add_module(up, nn.Linear(d_model, d_ff, bias=False))
        self.add_module(down, nn.Linear(d_ff, d_model, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [n, d] -> [n, d]."""
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(F.silu(gate(x)) * up(x))

    @classmethod
    def from_parts(cls, names: tuple[str, str, str], parts: dict[str, torch.Tensor | nn.Module]) -> "GatedMLP":
        """An inference-only expert from weights ([rows, cols], used without a copy) or modules."""
        with torch.device("meta"):
            expert = cls(1, 1, names)
        for name in names:
            part = parts[name]
            if isinstance(part, torch.Tensor):
                getattr(expert, name).weight = nn.Parameter(part, requires_grad=False)
            else:
                setattr(expert, name, part)
        return expert


class Router(nn.Module):
    """Top-k router: softmax over all experts in fp32, the k largest, optionally renormalised."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.zeros(config.num_experts, config.hidden_size))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, d] -> expert indices [N, k] int64 and their weights [N, k] fp32.

        fp32 whatever the model dtype, as for Switch: bf16 near-ties flip the chosen experts.
        """
        probs = torch.softmax(F.linear(x.float(), self.weight.float()), dim=-1)
        weight, index = torch.topk(probs, self.config.top_k, dim=-1)
        if self.config.norm_topk_prob:
            weight = weight / weight.sum(dim=-1, keepdim=True)
        return index, weight


class SparseMoE(nn.Module):
    """The router and the shared expert of a sparse block (routed experts live in the bank)."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.gate = Router(config)
        if config.shared_expert_size:
            self.shared_expert = GatedMLP(config.hidden_size, config.shared_expert_size)
        if config.shared_expert_gate:
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)


class DecoderBlock(nn.Module):
    """One pre-norm decoder block: self-attention, then a dense MLP or top-k experts."""

    def __init__(self, config: DecoderConfig, index: int, experts: ExpertBank | None):
        super().__init__()
        self.config = config
        self.is_sparse = config.is_sparse(index)
        self.experts = experts if self.is_sparse else None
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if self.is_sparse:
            self.add_module(config.moe_module, SparseMoE(config))
        else:
            self.mlp = GatedMLP(config.hidden_size, config.intermediate_size)

    @property
    def moe(self) -> SparseMoE:
        return getattr(self, self.config.moe_module)

    def attend(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x [B, T, d] -> x + attention(norm(x)), [B, T, d]."""
        return x + self.self_attn(self.input_layernorm(x), cos, sin, bias)

    def ffn_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.post_attention_layernorm(x)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.moe.gate(x)

    def shared_output(self, x: torch.Tensor) -> torch.Tensor | None:
        """Normalised x [N, d] -> the shared expert's contribution [N, d], or None without one."""
        moe = self.moe
        if not hasattr(moe, "shared_expert"):
            return None
        out = moe.shared_expert(x)
        if hasattr(moe, "shared_expert_gate"):
            out = torch.sigmoid(moe.shared_expert_gate(x)) * out
        return out

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Dense block: x [N, d] -> x + mlp(norm(x))."""
        return x + self.mlp(self.post_attention_layernorm(x))
