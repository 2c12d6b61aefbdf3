"""GLM-4.5 MoE (Zhipu AI, `glm4_moe`): DeepSeek-V3's routing (sigmoid scores, correction bias,
best `topk_group` of `n_group` groups, `norm_topk_prob`, `routed_scaling_factor`) and layout
(`first_k_dense_replace` dense blocks, `n_shared_experts` ungated `shared_experts`) over
grouped-query attention with q/k/v biases (`attention_bias`), per-head q/k RMSNorm
(`use_qk_norm`) and RoPE on the first `partial_rotary_factor` of each head (0.5 when absent, as
transformers defaults it). The multi-token-prediction block after the last is not read."""

from __future__ import annotations

from typing import Any

from ...errors import QmoeError
from .config import DecoderConfig, grouped_query_fields, head_dim
from .rope import rope_fields, rotary_fraction


class Glm4MoeConfig(DecoderConfig):
    @classmethod
    def parse(cls, raw: dict[str, Any]) -> dict[str, Any]:
        if raw.get("hidden_act", "silu") != "silu":
            raise QmoeError(f"config.json: hidden_act {raw['hidden_act']!r} is not supported (glm4_moe runs silu)")
        layers, first_dense = raw["num_hidden_layers"], raw.get("first_k_dense_replace", 1)
        return dict(
            grouped_query_fields(raw), model_type="glm4_moe", num_experts=raw["n_routed_experts"],
            moe_intermediate_size=raw["moe_intermediate_size"], intermediate_size=raw["intermediate_size"],
            sparse_layers=tuple(range(first_dense, layers)),
            shared_expert_size=raw["moe_intermediate_size"] * raw.get("n_shared_experts", 1),
            shared_expert_module="shared_experts", router="sigmoid_group",
            norm_topk_prob=bool(raw.get("norm_topk_prob", True)), n_group=raw.get("n_group") or 1,
            topk_group=raw.get("topk_group") or 1, routed_scaling_factor=float(raw.get("routed_scaling_factor", 1.0)),
            rms_norm_eps=raw.get("rms_norm_eps", 1e-5), **rope_fields(raw, partial=True),
            attention_bias=raw.get("attention_bias", False), qk_norm="head" if raw.get("use_qk_norm") else "none",
            rotary_dim=int(head_dim(raw) * rotary_fraction(raw, 0.5)),
        )
