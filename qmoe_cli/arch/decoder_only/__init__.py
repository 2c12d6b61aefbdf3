"""Decoder-only MoE families (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3) over shared layers.

`config` (DecoderConfig, what the layers read), `rope` (rotary frequencies, scaled for long
context), `layers` (attention, router, SwiGLU experts, the block), `family` (the
`Architecture`), and one small file per family that turns its Hugging Face `config.json` into a
DecoderConfig: what differs, and nothing else.
"""

from .deepseek_v2 import DeepseekV2Config
from .deepseek_v3 import DeepseekV3Config
from .family import DecoderArchitecture
from .glm4_moe import Glm4MoeConfig
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
    "deepseek_v2": (DeepseekV2Config, DecoderArchitecture),
    "glm4_moe": (Glm4MoeConfig, DecoderArchitecture),
}

__all__ = ["DecoderArchitecture", "FAMILIES"]
