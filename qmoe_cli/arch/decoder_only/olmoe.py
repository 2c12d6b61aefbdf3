"""OLMoE (AI2): every block sparse, softmax top-k (renormalised only with `norm_topk_prob`),
q and k RMS-normalised over all heads, optional clipping of q, k, v to `clip_qkv`."""

from __future__ import annotations

from typing import Any

from .config import DecoderConfig, head_dim, rope_theta


class OlmoeConfig(DecoderConfig):
    @classmethod
    def parse(cls, raw: dict[str, Any]) -> dict[str, Any]:
        return dict(
            model_type="olmoe", vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"],
            num_layers=raw["num_hidden_layers"], num_heads=raw["num_attention_heads"],
            num_kv_heads=raw.get("num_key_value_heads") or raw["num_attention_heads"], head_dim=head_dim(raw),
            num_experts=raw["num_experts"], top_k=raw["num_experts_per_tok"],
            moe_intermediate_size=raw["intermediate_size"], sparse_layers=tuple(range(raw["num_hidden_layers"])),
            norm_topk_prob=bool(raw.get("norm_topk_prob", False)), rms_norm_eps=raw.get("rms_norm_eps", 1e-5),
            rope_theta=rope_theta(raw), attention_bias=raw.get("attention_bias", False), qk_norm="full",
            clip_qkv=raw.get("clip_qkv"), tie_word_embeddings=raw.get("tie_word_embeddings", False),
        )
