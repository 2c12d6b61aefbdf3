"""OLMoE (AI2): every block sparse, softmax top-k (renormalised only with `norm_topk_prob`),
q and k RMS-normalised over all heads, optional clipping of q, k, v to `clip_qkv`."""

from __future__ import annotations

from typing import Any

from .config import DecoderConfig, grouped_query_fields
from .rope import rope_fields


class OlmoeConfig(DecoderConfig):
    @classmethod
    def parse(cls, raw: dict[str, Any]) -> dict[str, Any]:
        return dict(
            grouped_query_fields(raw), model_type="olmoe", num_experts=raw["num_experts"],
            moe_intermediate_size=raw["intermediate_size"], sparse_layers=tuple(range(raw["num_hidden_layers"])),
            norm_topk_prob=bool(raw.get("norm_topk_prob", False)), rms_norm_eps=raw.get("rms_norm_eps", 1e-5),
            **rope_fields(raw), attention_bias=raw.get("attention_bias", False), qk_norm="full",
            clip_qkv=raw.get("clip_qkv"),
        )
