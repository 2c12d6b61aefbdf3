"""Decoder-only MoE families (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2/V3, GLM-4.5, GPT-OSS,
Llama 4) over shared layers.

`config` (DecoderConfig, what the layers read), `rope` (rotary frequencies, scaled for long
context), `layers` (attention, router, SwiGLU experts, the block), `family` (the
`Architecture`), and one small file per family that turns its Hugging Face `config.json` into a
DecoderConfig: what differs, and nothing else. Each family is one line of the registry,
`arch.families.FAMILIES`.
"""

from .family import DecoderArchitecture

__all__ = ["DecoderArchitecture"]
