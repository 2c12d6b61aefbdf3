"""DeepSeek-V2 (and V2-Lite, V2.5; `deepseek_v2`): DeepSeek-V3's layout (dense first blocks,
`n_shared_experts` shared experts, multi-head latent attention with or without a low-rank query,
rotary dims in interleaved pairs, YaRN with its softmax mscale) with softmax routing: `greedy`
top-k over all experts or `group_limited_greedy` top-k within the `topk_group` groups holding the
highest single scores, never renormalised, times `routed_scaling_factor`. What transformers
ignores and DeepSeek's own code reads (`norm_topk_prob`, `moe_layer_freq`, `scoring_func`) is
refused unless it is the value both agree on."""

from __future__ import annotations

from typing import Any

from ...errors import QmoeError
from .config import DecoderConfig
from .deepseek_v3 import DeepseekV3Config

_TOPK_METHODS = {"greedy": "softmax_topk", "group_limited_greedy": "softmax_group"}


def _refuse_what_we_do_not_run(raw: dict[str, Any]) -> None:
    method = raw.get("topk_method") or "greedy"
    if method not in _TOPK_METHODS:
        raise QmoeError(f"config.json: topk_method {method!r} is not supported for deepseek_v2 "
                        f"(supported: {', '.join(_TOPK_METHODS)})")
    for key, agreed in (("norm_topk_prob", False), ("moe_layer_freq", 1), ("scoring_func", "softmax")):
        if raw.get(key) not in (agreed, None):
            raise QmoeError(f"config.json: {key} {raw[key]!r} is not supported for deepseek_v2: transformers ignores "
                            f"it and DeepSeek's own code does not, so only {agreed!r} has one meaning")
    if raw.get("mlp_bias"):
        raise QmoeError("config.json: mlp_bias (biases on the dense and shared MLPs) is not supported for deepseek_v2")
    if raw.get("hidden_act", "silu") != "silu":
        raise QmoeError(f"config.json: hidden_act {raw['hidden_act']!r} is not supported (deepseek_v2 runs silu)")


class DeepseekV2Config(DecoderConfig):
    @classmethod
    def parse(cls, raw: dict[str, Any]) -> dict[str, Any]:
        _refuse_what_we_do_not_run(raw)
        method = raw.get("topk_method") or "greedy"
        grouped = method == "group_limited_greedy"
        return {**DeepseekV3Config.parse(raw), "model_type": "deepseek_v2", "router": _TOPK_METHODS[method],
                "norm_topk_prob": False, "n_group": raw["n_group"] if grouped else 1,
                "topk_group": raw["topk_group"] if grouped else 1, "rope_interleave": True,
                "shared_expert_size": raw["moe_intermediate_size"] * (raw.get("n_shared_experts", 2) or 0)}
