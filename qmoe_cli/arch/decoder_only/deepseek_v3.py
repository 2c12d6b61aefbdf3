"""DeepSeek-V3 (and the same layout at other sizes): the first `first_k_dense_replace` blocks
dense, then sigmoid-scored experts chosen with a correction bias among the best `topk_group` of
`n_group` groups, weights renormalised (`norm_topk_prob`) and scaled by
`routed_scaling_factor`; `n_shared_experts` ungated shared experts (`shared_experts`);
multi-head latent attention with interleaved rotary dims (`rope_interleave`)."""

from __future__ import annotations

from typing import Any

from .config import DecoderConfig, generation_fields
from .rope import rope_fields


class DeepseekV3Config(DecoderConfig):
    @classmethod
    def parse(cls, raw: dict[str, Any]) -> dict[str, Any]:
        layers, first_dense = raw["num_hidden_layers"], raw.get("first_k_dense_replace", 0)
        return dict(
            model_type="deepseek_v3", vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"],
            num_layers=layers, num_heads=raw["num_attention_heads"], num_kv_heads=raw["num_attention_heads"],
            head_dim=raw["qk_rope_head_dim"], num_experts=raw["n_routed_experts"], top_k=raw["num_experts_per_tok"],
            moe_intermediate_size=raw["moe_intermediate_size"], intermediate_size=raw["intermediate_size"],
            sparse_layers=tuple(range(first_dense, layers)),
            shared_expert_size=raw["moe_intermediate_size"] * (raw.get("n_shared_experts") or 0),
            shared_expert_module="shared_experts", router="sigmoid_group",
            norm_topk_prob=bool(raw.get("norm_topk_prob", True)), n_group=raw.get("n_group") or 1,
            topk_group=raw.get("topk_group") or 1, routed_scaling_factor=float(raw.get("routed_scaling_factor", 1.0)),
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6), **rope_fields(raw),
            attention_bias=raw.get("attention_bias", False), attention="mla", q_lora_rank=raw.get("q_lora_rank"),
            kv_lora_rank=raw["kv_lora_rank"], qk_nope_head_dim=raw["qk_nope_head_dim"], v_head_dim=raw["v_head_dim"],
            rope_interleave=bool(raw.get("rope_interleave", True)),
            tie_word_embeddings=raw.get("tie_word_embeddings", False), **generation_fields(raw),
        )
