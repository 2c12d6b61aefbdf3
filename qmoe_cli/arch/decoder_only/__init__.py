"""Decoder-only MoE families (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3, GPT-OSS, Llama 4)
over shared layers.

`config` (DecoderConfig, what the layers read), `rope` (rotary frequencies, scaled for long
context), `layers` (attention, router, SwiGLU experts, the block), `family` (the
`Architecture`), and one small file per family that turns its Hugging Face `config.json` into a
DecoderConfig: what differs, and nothing else.
"""

from .deepseek_v3 import DeepseekV3Config
from .family import DecoderArchitecture
from .gpt_oss import GptOssConfig
from .llama4 import Llama4Config, Llama4TextConfig
from .mixtral import MixtralConfig
from .olmoe import OlmoeConfig
from .qwen_moe import Qwen2MoeConfig, Qwen3MoeConfig

# Hugging Face `model_type` -> (config class, architecture)
FAMILIES = {
    "mixtral": (MixtralConfig, DecoderArchitecture),
    "qwen2_moe": (Qwen2MoeConfig, DecoderArchitecture),
    "qwen3_moe": (Qwen3MoeConfig, DecoderArchitecture),
    "olmoe": (OlmoeConfig, DecoderArchitecture),
    "deepseek_v3": (DeepseekV3Config, DecoderArchitecture),
    "gpt_oss": (GptOssConfig, DecoderArchitecture),
    "llama4_text": (Llama4TextConfig, DecoderArchitecture),
    "llama4": (Llama4Config, DecoderArchitecture),
}

__all__ = ["DecoderArchitecture", "FAMILIES"]
