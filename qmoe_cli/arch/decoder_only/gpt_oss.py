"""GPT-OSS (OpenAI): every block sparse; a router with a bias whose top-k logits are softmaxed;
clamped-SwiGLU experts with biases, stored fused (gate and up columns alternating); attention
with biases (o_proj too) and a learned sink logit per head, alternating sliding-window and full
blocks (`layer_types`); YaRN rotary positions (transformers' default when the config names none)."""

from __future__ import annotations

from typing import Any

from ...errors import QmoeError
from .config import DecoderConfig, grouped_query_fields
from .rope import rope_fields

_KINDS = {"sliding_attention": "sliding", "full_attention": "full"}
# transformers' GptOssConfig default: the published checkpoints' own rope_scaling
_DEFAULT_ROPE = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                 "original_max_position_embeddings": 4096}


class GptOssConfig(DecoderConfig):
    @classmethod
    def parse(cls, raw: dict[str, Any]) -> dict[str, Any]:
        layers = raw["num_hidden_layers"]
        types = raw.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention"
                                           for i in range(layers)]
        unknown = sorted(set(types) - set(_KINDS))
        if unknown:
            raise QmoeError(f"config.json: layer_types {unknown[0]!r} is not supported "
                            f"(supported: {', '.join(_KINDS)})")
        if not (raw.get("rope_scaling") or raw.get("rope_parameters")):
            raw = {**raw, "rope_parameters": _DEFAULT_ROPE}
        bias = raw.get("attention_bias", True)
        return dict(
            grouped_query_fields(raw), model_type="gpt_oss", num_experts=raw["num_local_experts"],
            moe_intermediate_size=raw["intermediate_size"], sparse_layers=tuple(range(layers)),
            router="softmax_selected", router_bias=True, router_module="router",
            expert_activation="clamped_swiglu", swiglu_alpha=float(raw.get("swiglu_alpha", 1.702)),
            swiglu_limit=float(raw.get("swiglu_limit", 7.0)), expert_bias=True, expert_layout="fused_interleaved",
            attention_bias=bias, output_bias=bias, attention_sinks=True, sliding_window=raw.get("sliding_window"),
            layer_types=tuple(_KINDS[t] for t in types), rms_norm_eps=raw.get("rms_norm_eps", 1e-5),
            **rope_fields(raw, 150000.0),
        )
