"""`DecoderConfig`: one decoder-only MoE model as the shared layers need it, whatever its family.

Each family file (`mixtral.py`, `qwen_moe.py`, `olmoe.py`, `gpt_oss.py`, `llama4.py`, ...) turns
its Hugging Face `config.json` into these fields and says nothing else; the layers read only this dataclass. Manifests store
`to_dict()` (marked `qmoe_normalized`), which reads back without the family's parser.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ...errors import QmoeError
from .rope import RopeScaling

# softmax_topk: softmax over all experts, then the top k (optionally renormalised);
# sigmoid_group: DeepSeek-V3's sigmoid scores, top k among the best `topk_group` expert groups
# chosen with a correction bias that the weights themselves leave out;
# softmax_group: DeepSeek-V2's group_limited_greedy, softmax top k among the `topk_group` groups
# holding the highest single scores. Every router's weights end times `routed_scaling_factor`.
# softmax_selected: the top k logits (router bias included), then a softmax over those k (GPT-OSS);
# sigmoid_topk: the top k logits, each through a sigmoid, no renormalisation (Llama 4).
ROUTERS = ("softmax_topk", "sigmoid_group", "softmax_group", "softmax_selected", "sigmoid_topk")
ATTENTIONS = ("gqa", "mla")  # grouped-query attention, or DeepSeek's multi-head latent attention
# RMSNorm of q and k: none, per head (Qwen3), over all heads (OLMoE), or weightless per head after
# the rotation and on rotary blocks only (Llama 4's L2 norm)
QK_NORMS = ("none", "head", "full", "l2")
LAYER_KINDS = ("full", "sliding", "chunked")  # a block's attention span: all keys, a window, its chunk
EXPERT_ACTIVATIONS = ("silu", "clamped_swiglu")  # SwiGLU, or GPT-OSS's clamped one (alpha, limit, up + 1)
# How a checkpoint stores a sparse block's experts: one tensor per expert and matrix ("separate"),
# or all experts in two tensors gate_up [E, d, 2 * ff] and down [E, ff, d], gate and up columns
# alternating ("fused_interleaved", GPT-OSS) or in two halves ("fused_halves", Llama 4).
EXPERT_LAYOUTS = ("separate", "fused_interleaved", "fused_halves")


@dataclass(frozen=True)
class DecoderConfig:
    """A decoder-only transformer with top-k SwiGLU experts, RoPE attention and RMSNorm."""

    model_type: str  # the Hugging Face family ("mixtral", "qwen2_moe", ...): picks the parser
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int  # grouped-query attention: num_heads is a multiple of it
    head_dim: int  # gqa: each head's width; mla: its rotary part (qk_rope_head_dim)
    num_experts: int
    top_k: int
    moe_intermediate_size: int  # width of one routed expert
    sparse_layers: tuple[int, ...]  # indices of the blocks holding experts; the rest are dense
    intermediate_size: int = 0  # width of a dense block's MLP (0: the model has none)
    shared_expert_size: int = 0  # width of the shared expert (0: none)
    shared_expert_gate: bool = False  # Qwen2-MoE: shared output scaled by sigmoid(x . w)
    shared_expert_module: str = "shared_expert"  # its checkpoint name (DeepSeek: shared_experts)
    router: str = "softmax_topk"
    norm_topk_prob: bool = False  # renormalise the top-k probabilities to sum to 1
    n_group: int = 1  # sigmoid_group: experts in n_group groups, the best topk_group of them eligible
    topk_group: int = 1
    routed_scaling_factor: float = 1.0  # routed weights scaled by this (DeepSeek, GLM)
    attention: str = "gqa"
    q_lora_rank: int | None = None  # mla: low-rank query (None: one q_proj)
    kv_lora_rank: int = 0  # mla: width of the compressed key-value latent
    qk_nope_head_dim: int = 0  # mla: per-head query/key width without rotary positions
    v_head_dim: int = 0  # mla: per-head value width
    rope_interleave: bool = False  # rotary dims in (even, odd) pairs instead of two halves
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()  # long-context scaling of the rotary frequencies
    attention_bias: bool = False  # biases on q, k, v (Qwen2-MoE)
    qk_norm: str = "none"
    clip_qkv: float | None = None  # OLMoE: q, k, v clamped to [-clip, clip]
    sliding_window: int | None = None  # keys more than this many positions back are masked
    tie_word_embeddings: bool = False
    moe_module: str = "mlp"  # the block's MoE submodule name in checkpoints
    expert_matrices: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # gate, up, down
    eos_token_ids: tuple[int, ...] = ()  # generation stops at any of them (none: only at the length limit)
    pad_token_id: int | None = None  # fills a padded prompt batch (None: the first EOS, else 0)
    max_position_embeddings: int | None = None  # longest sequence the model was built for (None: unknown)
    rotary_dim: int | None = None  # gqa: rotated leading dims of each head (GLM: half of them); None: all
    # Per-block attention (GPT-OSS, Llama 4): each block's span (LAYER_KINDS; (): every block
    # "sliding" under `sliding_window`, or "full" without one), Llama 4's chunk for "chunked"
    # and its blocks without rotary positions (NoPE), whose queries are scaled by
    # 1 + attn_scale * log(1 + floor((position + 1) / floor_scale)) when `attn_temperature`
    # (floor_scale, attn_scale) is set.
    layer_types: tuple[str, ...] = ()
    attention_chunk_size: int | None = None
    nope_layers: tuple[int, ...] = ()
    attn_temperature: tuple[float, float] | None = None
    attention_sinks: bool = False  # GPT-OSS: a learned per-head logit joins every softmax, then is dropped
    output_bias: bool = False  # a bias on o_proj (GPT-OSS, Llama 4 with attention_bias)
    router_bias: bool = False  # GPT-OSS: the router's logits have a bias
    router_module: str = "gate"  # the router's checkpoint name under the MoE module
    dense_module: str = "mlp"  # a dense block's MLP checkpoint name (Llama 4: feed_forward)
    routing_on_input: bool = False  # Llama 4: the routing weight scales the expert's input, not its output
    expert_activation: str = "silu"
    swiglu_alpha: float = 1.702  # clamped_swiglu: gate * sigmoid(alpha * gate) * (up + 1)
    swiglu_limit: float = 7.0  # clamped_swiglu: gate <= limit, |up| <= limit
    expert_bias: bool = False  # GPT-OSS: routed experts' gate/up and down have biases (kept unquantized)
    expert_layout: str = "separate"
    # Before every tensor name in the checkpoint: Llama 4's multimodal checkpoints (model_type
    # llama4) hold the text model under "language_model." beside a vision tower qmoe leaves unread.
    tensor_prefix: str = ""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "num_experts", "top_k", "moe_intermediate_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"DecoderConfig.{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"DecoderConfig.num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads})")
        if self.top_k > self.num_experts:
            raise ValueError(f"DecoderConfig.top_k ({self.top_k}) must be <= num_experts ({self.num_experts})")
        if self.head_dim % 2:
            raise ValueError(f"DecoderConfig.head_dim must be even for rotary embeddings, got {self.head_dim}")
        bad = [i for i in self.sparse_layers if not 0 <= i < self.num_layers]
        if bad or len(set(self.sparse_layers)) != len(self.sparse_layers):
            raise ValueError(f"DecoderConfig.sparse_layers must be distinct block indices in [0, {self.num_layers}), "
                             f"got {list(self.sparse_layers)}")
        if len(self.sparse_layers) < self.num_layers and self.intermediate_size < 1:
            raise ValueError("DecoderConfig.intermediate_size must be >= 1 when some blocks are dense")
        if self.router not in ROUTERS:
            raise ValueError(f"DecoderConfig.router must be one of {', '.join(ROUTERS)}, got {self.router!r}")
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"DecoderConfig.qk_norm must be one of {', '.join(QK_NORMS)}, got {self.qk_norm!r}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"DecoderConfig.sliding_window must be >= 1 or None, got {self.sliding_window!r}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"DecoderConfig.attention must be one of {', '.join(ATTENTIONS)}, got {self.attention!r}")
        if self.attention == "mla":
            for name in ("kv_lora_rank", "qk_nope_head_dim", "v_head_dim"):
                if getattr(self, name) < 1:
                    raise ValueError(f"DecoderConfig.{name} must be >= 1 for mla attention, "
                                     f"got {getattr(self, name)!r}")
        if self.num_experts % self.n_group or not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"DecoderConfig: {self.num_experts} experts in n_group {self.n_group} groups with "
                             f"topk_group {self.topk_group}: groups must divide the experts "
                             "and 1 <= topk_group <= n_group")
        pad = () if self.pad_token_id is None else (self.pad_token_id,)
        for name, ids in (("eos_token_ids", self.eos_token_ids), ("pad_token_id", pad)):
            if any(not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < self.vocab_size for i in ids):
                raise ValueError(f"DecoderConfig.{name} must hold token ids in [0, {self.vocab_size}), "
                                 f"got {getattr(self, name)!r}")
        if self.max_position_embeddings is not None and self.max_position_embeddings < 1:
            raise ValueError(f"DecoderConfig.max_position_embeddings must be >= 1 or None, "
                             f"got {self.max_position_embeddings!r}")
        if self.rotary_dim is not None and (self.attention != "gqa" or self.rotary_dim % 2
                                            or not 2 <= self.rotary_dim <= self.head_dim):
            raise ValueError(f"DecoderConfig.rotary_dim must be an even width in [2, head_dim {self.head_dim}] of "
                             f"grouped-query heads, got {self.rotary_dim!r} ({self.attention} attention)")
        self._check_layer_features()
        if self.shared_expert_gate and not self.shared_expert_size:
            raise ValueError("DecoderConfig.shared_expert_gate needs a shared expert (shared_expert_size > 0)")

    def _check_layer_features(self) -> None:
        if self.layer_types and len(self.layer_types) != self.num_layers:
            raise ValueError(f"DecoderConfig.layer_types must name one kind per block ({self.num_layers}), "
                             f"got {len(self.layer_types)}")
        for name, value, allowed in (("layer_types", self.layer_types, LAYER_KINDS),
                                     ("expert_activation", (self.expert_activation,), EXPERT_ACTIVATIONS),
                                     ("expert_layout", (self.expert_layout,), EXPERT_LAYOUTS)):
            bad = [v for v in value if v not in allowed]
            if bad:
                raise ValueError(f"DecoderConfig.{name}: {bad[0]!r} is not one of {', '.join(allowed)}")
        if "chunked" in self.layer_types and not (self.attention_chunk_size or 0) >= 1:
            raise ValueError(f"DecoderConfig.attention_chunk_size must be >= 1 for chunked blocks, "
                             f"got {self.attention_chunk_size!r}")
        if "sliding" in self.layer_types and self.sliding_window is None:
            raise ValueError("DecoderConfig.sliding_window must be set for sliding blocks")
        if any(not 0 <= i < self.num_layers for i in self.nope_layers):
            raise ValueError(f"DecoderConfig.nope_layers must be block indices in [0, {self.num_layers}), "
                             f"got {list(self.nope_layers)}")
        if self.attn_temperature is not None and not (len(self.attn_temperature) == 2 and self.attn_temperature[0] > 0):
            raise ValueError(f"DecoderConfig.attn_temperature must be (floor_scale > 0, attn_scale), "
                             f"got {self.attn_temperature!r}")

    def layer_span(self, index: int) -> tuple[int | None, int | None]:
        """Block `index`'s (sliding window, chunk size): keys more than window - 1 positions back
        are masked, and keys outside the query's chunk of positions; None: no such limit."""
        if not self.layer_types:
            return self.sliding_window, None
        kind = self.layer_types[index]
        return (self.sliding_window if kind == "sliding" else None,
                self.attention_chunk_size if kind == "chunked" else None)

    @property
    def softmax_scale(self) -> float:
        """The attention scores' scale: 1/sqrt(query-key width); MLA's also times mscale^2 under a
        scaled RoPE with mscale_all_dim (DeepSeek's YaRN; grouped-query families have no such term)."""
        if self.attention == "mla":
            mscale = self.rope_scaling.softmax_mscale
            return (self.qk_nope_head_dim + self.head_dim) ** -0.5 * mscale * mscale
        return self.head_dim ** -0.5

    @property
    def rotary_width(self) -> int:
        """Dims of each query/key head that rotate (the rotary tables' width)."""
        return self.head_dim if self.rotary_dim is None else self.rotary_dim

    def is_sparse(self, index: int) -> bool:
        return index in self.sparse_layers

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "qmoe_normalized": True}

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> dict[str, Any]:
        """This family's fields from a Hugging Face config dict; each family overrides it."""
        raise NotImplementedError

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], overrides: dict[str, Any] | None = None) -> "DecoderConfig":
        """From a Hugging Face `config.json` dict (or our own `to_dict()`); `overrides` win."""
        merged = {**raw, **(overrides or {})}
        names = {f.name for f in dataclasses.fields(cls)}
        if merged.get("qmoe_normalized"):
            fields = {k: v for k, v in merged.items() if k in names}
        else:
            try:
                fields = cls.parse(merged)
            except KeyError as exc:
                raise QmoeError(f"config.json lacks {exc.args[0]}: not a {merged.get('model_type')} config") from None
        for name in ("sparse_layers", "expert_matrices", "eos_token_ids", "layer_types", "nope_layers",
                     "attn_temperature"):
            if fields.get(name) is not None:
                fields[name] = tuple(fields[name])
        if isinstance(fields.get("rope_scaling"), dict):  # as to_dict() wrote it
            fields["rope_scaling"] = RopeScaling(**fields["rope_scaling"])
        return cls(**fields)


def generation_fields(raw: dict[str, Any]) -> dict[str, Any]:
    """The fields every family spells alike that only generation reads: EOS (`eos_token_id`, an
    id, a list of ids or absent), padding and the position limit."""
    eos = raw.get("eos_token_id")
    eos = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
    return dict(eos_token_ids=eos, pad_token_id=raw.get("pad_token_id"),
                max_position_embeddings=raw.get("max_position_embeddings"))


def head_dim(raw: dict[str, Any]) -> int:
    return raw.get("head_dim") or raw["hidden_size"] // raw["num_attention_heads"]


def grouped_query_fields(raw: dict[str, Any]) -> dict[str, Any]:
    """The fields Mixtral, Qwen-MoE and OLMoE configs spell alike: sizes, grouped-query heads, top-k,
    and the generation fields."""
    return dict(vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"], num_layers=raw["num_hidden_layers"],
                num_heads=raw["num_attention_heads"],
                num_kv_heads=raw.get("num_key_value_heads") or raw["num_attention_heads"], head_dim=head_dim(raw),
                top_k=raw["num_experts_per_tok"], tie_word_embeddings=raw.get("tie_word_embeddings", False),
                **generation_fields(raw))
