"""Decoder-only MoE building blocks shared by every family: RMSNorm, rotary grouped-query
attention (per block: sliding window or chunk, NoPE with query temperature, sinks), the top-k
routers (`router.py`), SwiGLU experts (routed and shared; GPT-OSS's in `experts.py`) and the block.

Parameter names mirror the Hugging Face layout below `model.layers.{i}.` (`input_layernorm`,
`self_attn.q_proj`, `{moe}.gate`, `{moe}.shared_expert.gate_proj`, ...), so a block's weights
load by stripping that prefix. Routed experts are never parameters of a block: a sparse block
asks its `ExpertBank` for them. Every block runs in parts, as the streamed runner drives it:
`attend` per sample, then `feed_forward` (dense) or `route` + experts + `shared_output` (sparse)
over a flat token buffer.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..base import ExpertBank, bank_stores_shared
from .config import DecoderConfig
from .experts import ClampedSwiGLU, ExpertBiases, clamped_swiglu
from .rope import inverse_frequencies
from .router import Router

SHARED_MATRICES = ("gate_proj", "up_proj", "down_proj")  # the shared expert's, in every family


def at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    """The dtype of norm statistics and attention scores: fp32 for half-precision and fp32 runs (as
    HF), but fp64 stays fp64. HF downcasts fp64 to fp32 there; an fp32 step inside an fp64 run made
    results depend on the CPU's vector width (an fp32 reduction over 13 keys differs from one over
    4 in the last ulp), so fp64 checks could not be tight on every machine."""
    return torch.promote_types(dtype, torch.float32)


class RMSNorm(nn.Module):
    """Scale-only layer norm; statistics in fp32 (fp64 for fp64 inputs), then cast back before the
    scale (as HF does)."""

    def __init__(self, width: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(at_least_fp32(x.dtype))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotary_tables(config: DecoderConfig, length: int, device: torch.device,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [length, rot] (rot: `config.rotary_width`) of positions 0..length-1, scaled as
    `config.rope_scaling` says and times its attention factor (angles in fp32, as HF computes them)."""
    inv_freq, attention_factor = inverse_frequencies(config.rope_theta, config.rotary_width, config.rope_scaling)
    angles = torch.arange(length, device=device).float()[:, None] * inv_freq.to(device)[None, :]
    emb = torch.cat([angles, angles], dim=-1)  # [length, rot] fp32
    return (emb.cos() * attention_factor).to(dtype), (emb.sin() * attention_factor).to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, hd] rotated by position (the half-split convention, not interleaved pairs);
    tables narrower than hd (partial rotary, GLM) rotate the leading dims and pass the rest."""
    if cos.shape[-1] < x.shape[-1]:
        rot = cos.shape[-1]
        return torch.cat([_rotate(x[..., :rot], cos, sin), x[..., rot:]], dim=-1)
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


def _rotate_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, hd] whose rotary dims are (even, odd) pairs -> rotated, written as two halves
    (evens, then odds) as transformers does: a permutation shared by q and k, so scores agree."""
    cos, sin = cos[..., : cos.shape[-1] // 2], sin[..., : sin.shape[-1] // 2]
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.cat([even * cos - odd * sin, odd * cos + even * sin], dim=-1)


def causal_bias(length: int, window: int | None, device: torch.device, first: int = 0,
                chunk: int | None = None) -> torch.Tensor:
    """Additive mask [T - first, T] fp32 of queries first..T-1 over keys 0..T-1: 0 where key <=
    query (and within `window`, and in the query's `chunk` of positions: Llama 4's local
    attention), else -inf-like (finite, so a row with every key masked, a padding query, stays a
    number)."""
    query = torch.arange(first, length, device=device)[:, None]
    key = torch.arange(length, device=device)[None, :]
    allowed = key <= query
    if window is not None:
        allowed &= query - key < window
    if chunk is not None:
        allowed &= query // chunk == key // chunk
    return torch.zeros(length - first, length, device=device).masked_fill(~allowed, torch.finfo(torch.float32).min)


# Keys/values of the new positions [B, KV, t, *] -> those of every position so far (a cache).
# Values None: the keys hold the values in their first columns (MLA's latent), cached once.
ExtendKeys = Callable[[torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor | None]]


def scaled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                     scale: float, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention of grouped queries: q [B, H, t, dk], k [B, KV, S, dk], v [B, KV, S, dv]
    (H a multiple of KV; query head h reads key/value head h // (H / KV), as transformers'
    `repeat_kv`), bias broadcastable to [B, H, t, S] fp32 -> [B, t, H * dv]. Scores and softmax
    in fp32 (fp64 for fp64 inputs). The query heads of one key/value head are stacked into one matrix instead of the
    keys being repeated per query head: a decoding cache is read in place, never copied.
    sinks [H] (GPT-OSS): one more logit per head in every softmax, whose weight is dropped (so a
    query may attend to nothing much)."""
    batch, heads, length, _ = q.shape
    kv_heads = k.shape[1]
    rows = heads // kv_heads * length
    scores = torch.matmul(q.reshape(batch, kv_heads, rows, -1), k.transpose(2, 3))  # [B, KV, g * t, S]
    scores = scores.to(at_least_fp32(scores.dtype)).view(batch, heads, length, -1) * scale + bias
    if sinks is None:
        weights = torch.softmax(scores, dim=-1)
    else:
        sink = sinks.to(scores.dtype).view(1, heads, 1, 1).expand(batch, heads, length, 1)
        weights = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    weights = weights.to(v.dtype).reshape(batch, kv_heads, rows, -1)
    out = torch.matmul(weights, v).view(batch, heads, length, -1)  # [B, H, t, dv]
    return out.transpose(1, 2).reshape(batch, length, -1)


class SelfAttention(nn.Module):
    """What both attentions share: project the new positions to rotated queries, keys and values
    (`project`, per family), let a cache prepend the earlier positions' keys and values
    (`extend`), attend (`scaled_attention`) and project out (`o_proj`). The streamed runner
    (whole samples) and the decoding cache run this one implementation (except MLA's cache,
    which `LatentAttention` attends in the absorbed form)."""

    config: DecoderConfig
    o_proj: nn.Linear

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor,
                extend: ExtendKeys | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, t, d]; cos, sin [t, rot] or [B, 1, t, rot] (per sequence positions); bias [t, S]
        or [B, 1, t, S] fp32 over the S keys (S = t without `extend`); positions [t] or [B, t]
        int64 (only Llama 4's attention temperature reads them) -> [B, t, d]."""
        q, k, v = self.project(x, cos, sin, positions)
        if extend is not None:
            k, v = extend(k, v)
        return self.o_proj(scaled_attention(q, k, v, bias, self.config.softmax_scale, getattr(self, "sinks", None)))


class Attention(SelfAttention):
    """Grouped-query self-attention with rotary positions (none on a NoPE block), optional q/k
    norms, qkv clipping, attention sinks and query temperature."""

    def __init__(self, config: DecoderConfig, index: int = 0):
        super().__init__()
        c = config
        self.config = c
        self.rotary = index not in c.nope_layers
        bias = c.attention_bias
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=bias)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=c.output_bias)
        if c.attention_sinks:
            self.sinks = nn.Parameter(torch.zeros(c.num_heads))
        if c.qk_norm == "head":
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
        elif c.qk_norm == "full":
            self.q_norm = RMSNorm(c.num_heads * c.head_dim, c.rms_norm_eps)
            self.k_norm = RMSNorm(c.num_kv_heads * c.head_dim, c.rms_norm_eps)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, t, d] -> q [B, H, t, hd], k and v [B, KV, t, hd]: q and k normed (`qk_norm`),
        clipped (`clip_qkv`) and rotated to their positions (NoPE blocks: queries tempered)."""
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
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, H|KV, t, hd]
        if self.rotary:
            rotate = _rotate_interleaved if c.rope_interleave else _rotate
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
            if c.qk_norm == "l2":
                q, k = _l2_norm(q, c.rms_norm_eps), _l2_norm(k, c.rms_norm_eps)
        elif c.attn_temperature is not None:
            q = (q * query_temperature(positions, *c.attn_temperature, length, q.device)).to(q.dtype)
        return q, k, v.view(batch, length, c.num_kv_heads, c.head_dim).transpose(1, 2)


def _l2_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama 4's weightless RMSNorm over the last dim, in fp32 (rotated dims permuted alike: no matter)."""
    h = x.to(at_least_fp32(x.dtype))
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def query_temperature(positions: torch.Tensor | None, floor_scale: float, attn_scale: float,
                      length: int, device: torch.device) -> torch.Tensor:
    """Llama 4's per-position query scale on NoPE blocks, fp32, [1, 1, t, 1] or [B, 1, t, 1]
    (positions [t] or [B, t]; None: 0..length-1): long contexts sharpen attention."""
    if positions is None:
        positions = torch.arange(length, device=device)
    scale = torch.log1p(torch.floor((positions.to(device).float() + 1.0) / floor_scale)) * attn_scale + 1.0
    return scale.view(-1, 1, length, 1)


class LatentAttention(SelfAttention):
    """DeepSeek's multi-head latent attention (MLA): queries through an optional low-rank
    bottleneck, keys and values expanded per head from one normalised latent c, and a rotary key
    part shared by all heads.

    Two forms, equal up to rounding. Whole sequences (`qmoe eval`, no `extend`) run the expanded
    form, per head keys [nope + rope] and values, as transformers does. With a decoding cache
    every call, prefill chunk or single step, runs the absorbed form (`_absorbed`): the cache
    holds per position only [c, rotated shared key] (kv_lora_rank + rope values, DeepSeek-V3:
    576 instead of 128 heads x 320 = 40960), kv_b_proj's key half is folded into the query
    (q_nope W_uk: a query in latent space, scores = q_latent . c + q_rope . k_rope) and its
    value half applied after the weights (weights @ c, then W_uv). Prefill runs absorbed too,
    not expanded: a prefill chunk after the first (long prompts, `PREFILL_TOKENS`) would have
    to re-expand every cached latent into per head keys and values, a transient as large as
    the expanded cache that the latent one exists to avoid; absorbed, a chunk's memory is its
    scores plus [B, H, t, kv_lora_rank] queries and outputs whatever the prompt length. The
    price is arithmetic: kv_lora_rank + rope + kv_lora_rank multiply-adds per head and key
    (DeepSeek-V3: 1088) instead of nope + rope + v (320), which a step, reading the cache
    once, does not notice and a long prefill does."""

    _LATENT_EPS = 1e-6  # the latents' RMSNorms use transformers' default, not rms_norm_eps

    def __init__(self, config: DecoderConfig):
        super().__init__()
        c = config
        self.config = c
        qk_head = c.qk_nope_head_dim + c.head_dim
        bias = c.attention_bias
        if c.q_lora_rank is None:
            self.q_proj = nn.Linear(c.hidden_size, c.num_heads * qk_head, bias=False)
        else:
            self.q_a_proj = nn.Linear(c.hidden_size, c.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, self._LATENT_EPS)
            self.q_b_proj = nn.Linear(c.q_lora_rank, c.num_heads * qk_head, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(c.hidden_size, c.kv_lora_rank + c.head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, self._LATENT_EPS)
        self.kv_b_proj = nn.Linear(c.kv_lora_rank, c.num_heads * (c.qk_nope_head_dim + c.v_head_dim), bias=False)
        self.o_proj = nn.Linear(c.num_heads * c.v_head_dim, c.hidden_size, bias=bias)

    def _query(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, t, d] -> the queries' no-rope part [B, H, t, nope] and rotary part [B, H, t, rope]
        (not yet rotated)."""
        c = self.config
        q = self.q_proj(x) if c.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(*x.shape[:2], c.num_heads, -1).transpose(1, 2)  # [B, H, t, nope + rope]
        return q.split([c.qk_nope_head_dim, c.head_dim], dim=-1)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, t, d] -> q and k [B, H, t, nope + rope] (rotary part rotated), v [B, H, t, v]."""
        c = self.config
        batch, length = x.shape[:2]
        rotate = _rotate_interleaved if c.rope_interleave else _rotate
        q_pass, q_rot = self._query(x)
        latent, k_rot = self.kv_a_proj_with_mqa(x).split([c.kv_lora_rank, c.head_dim], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(latent)).view(batch, length, c.num_heads, -1).transpose(1, 2)
        k_pass, v = kv.split([c.qk_nope_head_dim, c.v_head_dim], dim=-1)  # [B, H, t, nope], [B, H, t, v]
        k_rot = rotate(k_rot.view(batch, 1, length, c.head_dim), cos, sin).expand(-1, c.num_heads, -1, -1)
        q = torch.cat([q_pass, rotate(q_rot, cos, sin)], dim=-1)
        return q, torch.cat([k_pass, k_rot], dim=-1), v

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor,
                extend: ExtendKeys | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """As `SelfAttention.forward`: expanded without `extend`, absorbed with one."""
        if extend is None:
            return super().forward(x, cos, sin, bias)
        return self.o_proj(self._absorbed(x, cos, sin, bias, extend))

    def _absorbed(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor,
                  extend: ExtendKeys) -> torch.Tensor:
        """x [B, t, d] -> attention output before o_proj [B, t, H * v] in the absorbed form: one
        key/value head (a key [c, rotated k_rope] per position, its value c, the key's first
        kv_lora_rank columns) read by H queries [q_nope W_uk, rotated q_rope]."""
        c = self.config
        batch, length = x.shape[:2]
        rank = c.kv_lora_rank
        rotate = _rotate_interleaved if c.rope_interleave else _rotate
        q_pass, q_rot = self._query(x)  # [B, H, t, nope], [B, H, t, rope]
        latent, k_rot = self.kv_a_proj_with_mqa(x).split([rank, c.head_dim], dim=-1)
        k_rot = rotate(k_rot.view(batch, 1, length, c.head_dim), cos, sin)  # [B, 1, t, rope]
        key = torch.cat([self.kv_a_layernorm(latent)[:, None], k_rot], dim=-1)  # [B, 1, t, rank + rope]
        w_uk, w_uv = self.kv_b_proj.weight.view(c.num_heads, -1, rank).split(
            [c.qk_nope_head_dim, c.v_head_dim], dim=1)  # [H, nope, rank], [H, v, rank]
        # einsum, not a broadcast matmul: one [B * t, *] product per head instead of one per (b, t, h).
        q_latent = torch.einsum("bhtn,hnr->bhtr", q_pass, w_uk)
        query = torch.cat([q_latent, rotate(q_rot, cos, sin)], dim=-1)  # [B, H, t, rank + rope]
        keys, _ = extend(key, None)  # [B, 1, S, rank + rope]
        out = scaled_attention(query, keys, keys[..., :rank], bias, c.softmax_scale)  # [B, t, H * rank]
        out = torch.einsum("bthr,hvr->bthv", out.view(batch, length, c.num_heads, rank), w_uv)  # [B, t, H, v]
        return out.reshape(batch, length, c.num_heads * c.v_head_dim)


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


class SparseMoE(nn.Module):
    """The router and the shared expert of a sparse block (routed experts live in the bank; the
    shared expert too where the bank stores it compressed: `own_shared` False)."""

    def __init__(self, config: DecoderConfig, own_shared: bool = True):
        super().__init__()
        self.add_module(config.router_module, Router(config))
        if config.expert_bias:
            self.experts = ExpertBiases(config)
        if config.shared_expert_size and own_shared:
            self.add_module(config.shared_expert_module, GatedMLP(config.hidden_size, config.shared_expert_size))
        if config.shared_expert_gate:
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)


class DecoderBlock(nn.Module):
    """One pre-norm decoder block: self-attention, then a dense MLP or top-k experts."""

    def __init__(self, config: DecoderConfig, index: int, experts: ExpertBank | None):
        super().__init__()
        self.config = config
        self.index = index
        self.is_sparse = config.is_sparse(index)
        self.experts = experts if self.is_sparse else None
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LatentAttention(config) if config.attention == "mla" else Attention(config, index)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # Registered in `_modules` directly and read back from there (`_ffn`): Llama 4 names both
        # `feed_forward`, which is also this class's method of that name.
        if self.is_sparse:
            self._modules[config.moe_module] = SparseMoE(config, own_shared=not bank_stores_shared(experts))
        else:
            self._modules[config.dense_module] = GatedMLP(config.hidden_size, config.intermediate_size)
        # Llama 4 scales an expert's input by its routing weight (`run.stream.expert_output`).
        self.routing_on_input = config.routing_on_input

    def _ffn(self) -> nn.Module:
        return self._modules[self.config.moe_module if self.is_sparse else self.config.dense_module]

    @property
    def moe(self) -> SparseMoE:
        return self._ffn()

    def attend(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor,
               extend: ExtendKeys | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, t, d] -> x + attention(norm(x)), [B, t, d] (see `SelfAttention.forward`)."""
        return x + self.self_attn(self.input_layernorm(x), cos, sin, bias, extend, positions)

    def ffn_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.post_attention_layernorm(x)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self.moe, self.config.router_module)(x)

    def bind_expert(self, j: int, expert: nn.Module) -> nn.Module:
        """Expert j as this block runs it: with its biases where the family has them (GPT-OSS)."""
        if not self.config.expert_bias:
            return expert
        assert isinstance(expert, ClampedSwiGLU), type(expert)
        return expert.with_biases(self.moe.experts.of(j))

    def expert_hidden(self, j: int, x: torch.Tensor, first: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Normalised x [n, d] (times the routing weight where it scales the input) and expert j's
        input matrices {name: W [ff, d]} -> the output matrix's input [n, ff], biases included."""
        gate, up = (first[n] for n in self.config.expert_matrices[:2])
        g, u = x @ gate.T, x @ up.T
        if self.config.expert_activation == "silu":
            return F.silu(g) * u
        if self.config.expert_bias:
            bias_g, bias_u, _ = self.moe.experts.of(j)
            g, u = g + bias_g.to(g.dtype), u + bias_u.to(u.dtype)
        return clamped_swiglu(g, u, self.config.swiglu_alpha, self.config.swiglu_limit)

    def shared_output(self, x: torch.Tensor) -> torch.Tensor | None:
        """Normalised x [N, d] -> the shared expert's contribution [N, d], or None without one."""
        moe = self.moe
        if not self.config.shared_expert_size:
            return None
        out = getattr(moe, self.config.shared_expert_module)(x)
        if hasattr(moe, "shared_expert_gate"):
            # A per-row dot product, not a one-output linear: that runs as a matrix-vector product
            # whose rounding depends on how many rows share the call, and the result must not
            # depend on how tokens are chunked or split over ranks (distributed compression).
            gate = (x * moe.shared_expert_gate.weight[0]).sum(-1, keepdim=True)  # [N, 1]
            out = torch.sigmoid(gate) * out
        return out

    def use_shared(self, shared: Mapping[str, torch.Tensor | nn.Module] | nn.Module) -> None:
        """The shared expert from now on: one module computing it whole (x [N, d] -> [N, d]; the
        sigmoid gate, where the family has one, stays outside it in `shared_output`), or its parts
        by `SHARED_MATRICES` names (weights or modules)."""
        expert = shared if isinstance(shared, nn.Module) else GatedMLP.from_parts(SHARED_MATRICES, dict(shared))
        self.moe.add_module(self.config.shared_expert_module, expert)

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Dense block: x [N, d] -> x + mlp(norm(x))."""
        return x + self._ffn()(self.post_attention_layernorm(x))
