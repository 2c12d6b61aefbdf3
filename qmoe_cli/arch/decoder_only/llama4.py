"""Llama 4 text (Meta): experts on the `moe_layers` (every `interleave_moe_layer_step`-th block),
a dense SwiGLU of its own width (`intermediate_size_mlp`) elsewhere, both under `feed_forward`;
sigmoid top-k routing whose weight scales the expert's input; a shared expert; experts stored
fused (gate, then up); rotary positions in interleaved pairs on most blocks with an L2 q/k norm
after them and attention local to chunks of `attention_chunk_size`; NoPE blocks (`no_rope_layers`
0) attend globally with queries tempered by position (`attn_temperature_tuning`)."""

from __future__ import annotations

from typing import Any

from ...errors import QmoeError
from .config import DecoderConfig, grouped_query_fields
from .rope import rope_fields

_KINDS = {"chunked_attention": "chunked", "full_attention": "full"}


class Llama4TextConfig(DecoderConfig):
    @classmethod
    def parse(cls, raw: dict[str, Any]) -> dict[str, Any]:
        layers = raw["num_hidden_layers"]
        if raw.get("hidden_act", "silu") != "silu":
            raise QmoeError(f"config.json: hidden_act {raw['hidden_act']!r} is not supported (only 'silu')")
        interval = raw.get("no_rope_layer_interval", 4)
        rope = raw.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(layers)]
        step = raw.get("interleave_moe_layer_step", 1)
        moe = raw.get("moe_layers")
        moe = list(range(step - 1, layers, step)) if moe is None else moe
        chunk = raw.get("attention_chunk_size")
        types = raw.get("layer_types") or ["chunked_attention" if r and chunk is not None else "full_attention"
                                           for r in rope]
        unknown = sorted(set(types) - set(_KINDS))
        if unknown:
            raise QmoeError(f"config.json: layer_types {unknown[0]!r} is not supported "
                            f"(supported: {', '.join(_KINDS)})")
        temperature = ((float(raw.get("floor_scale", 8192)), float(raw.get("attn_scale", 0.1)))
                       if raw.get("attn_temperature_tuning", True) else None)
        bias = raw.get("attention_bias", False)
        return dict(
            grouped_query_fields(raw), model_type="llama4_text", num_experts=raw["num_local_experts"],
            moe_intermediate_size=raw["intermediate_size"], intermediate_size=raw.get("intermediate_size_mlp", 16384),
            sparse_layers=tuple(moe), shared_expert_size=raw["intermediate_size"], router="sigmoid_topk",
            router_module="router", routing_on_input=True, moe_module="feed_forward", dense_module="feed_forward",
            expert_layout="fused_halves", rope_interleave=True, attention_bias=bias, output_bias=bias,
            qk_norm="l2" if raw.get("use_qk_norm", True) else "none", attn_temperature=temperature,
            nope_layers=tuple(i for i in range(layers) if not rope[i]), attention_chunk_size=chunk,
            layer_types=tuple(_KINDS[t] for t in types), rms_norm_eps=raw.get("rms_norm_eps", 1e-5),
            **rope_fields(raw, 500000.0),
        )


class Llama4Config(Llama4TextConfig):
    """The multimodal checkpoints Meta publishes (model_type llama4): the text model's config is
    `text_config`, its tensors under `language_model.`; the vision tower is not read."""

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> dict[str, Any]:
        text = raw["text_config"]
        return {**super().parse(text), "model_type": "llama4", "tensor_prefix": "language_model."}
