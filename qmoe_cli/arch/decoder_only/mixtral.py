"""Mixtral (Mistral AI): every block sparse, softmax top-k renormalised, experts `w1` (gate),
`w3` (up), `w2` (down) under `block_sparse_moe`, optional sliding-window attention."""

from __future__ import annotations

from typing import Any

from .config import DecoderConfig, grouped_query_fields
from .rope import rope_fields


class MixtralConfig(DecoderConfig):
    @classmethod
    def parse(cls, raw: dict[str, Any]) -> dict[str, Any]:
        return dict(
            grouped_query_fields(raw), model_type="mixtral", num_experts=raw["num_local_experts"],
            moe_intermediate_size=raw["intermediate_size"], sparse_layers=tuple(range(raw["num_hidden_layers"])),
            norm_topk_prob=True, rms_norm_eps=raw.get("rms_norm_eps", 1e-5), **rope_fields(raw, 1e6),
            sliding_window=raw.get("sliding_window"), moe_module="block_sparse_moe", expert_matrices=("w1", "w3", "w2"),
        )
