"""Qwen2-MoE and Qwen3-MoE (Alibaba): sparse blocks every `decoder_sparse_step` except
`mlp_only_layers` (dense MLP of `intermediate_size`), softmax top-k renormalised only with
`norm_topk_prob`. Qwen2-MoE adds q/k/v biases and a shared expert scaled by a sigmoid gate;
Qwen3-MoE drops both and RMS-normalises q and k per head."""

from __future__ import annotations

from typing import Any

from ...errors import QmoeError
from .config import DecoderConfig, grouped_query_fields
from .rope import rope_fields


def _common(raw: dict[str, Any]) -> dict[str, Any]:
    if raw.get("use_sliding_window"):
        raise QmoeError("config.json: use_sliding_window (per-layer sliding attention) is not supported")
    layers = raw["num_hidden_layers"]
    step, dense = raw.get("decoder_sparse_step", 1), set(raw.get("mlp_only_layers") or [])
    return dict(
        grouped_query_fields(raw), model_type=raw["model_type"],
        num_experts=raw.get("num_experts") or raw["num_local_experts"],
        moe_intermediate_size=raw["moe_intermediate_size"], intermediate_size=raw.get("intermediate_size", 0),
        sparse_layers=tuple(i for i in range(layers) if i not in dense and (i + 1) % step == 0),
        norm_topk_prob=bool(raw.get("norm_topk_prob", False)), rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        **rope_fields(raw),
    )


class Qwen2MoeConfig(DecoderConfig):
    @classmethod
    def parse(cls, raw: dict[str, Any]) -> dict[str, Any]:
        shared = raw.get("shared_expert_intermediate_size") or 0
        return {**_common(raw), "attention_bias": raw.get("qkv_bias", True), "shared_expert_size": shared,
                "shared_expert_gate": bool(shared)}


class Qwen3MoeConfig(DecoderConfig):
    @classmethod
    def parse(cls, raw: dict[str, Any]) -> dict[str, Any]:
        return {**_common(raw), "attention_bias": raw.get("attention_bias", False), "qk_norm": "head"}
