"""The one registry of model families: adding a family is its family file, one line here, and
its parity test.

Everything that lists families derives from `FAMILIES`: picking a checkpoint's architecture by
its `config.json` `model_type` (`arch.architecture_from_config`), the "supported: ..." message,
and the families table of the docs (a test checks the table against this list). Presets
(`configs/*.toml`) name models, not families: the family is read from the checkpoint's config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .decoder_only import DecoderArchitecture
from .decoder_only.deepseek_v2 import DeepseekV2Config
from .decoder_only.deepseek_v3 import DeepseekV3Config
from .decoder_only.glm4_moe import Glm4MoeConfig
from .decoder_only.gpt_oss import GptOssConfig
from .decoder_only.llama4 import Llama4Config, Llama4TextConfig
from .decoder_only.mixtral import MixtralConfig
from .decoder_only.olmoe import OlmoeConfig
from .decoder_only.qwen_moe import Qwen2MoeConfig, Qwen3MoeConfig
from .switch import SwitchArchitecture
from .switch.config import SwitchConfig

DEFAULT_MODEL_TYPE = "switch_transformers"  # a config without one (manifests written by qmoe) is Switch


@dataclass(frozen=True)
class Family:
    """One model family: its Hugging Face `model_type`, its name in docs and messages, the
    config class that parses its `config.json` (`from_hf_dict`) and its `Architecture`."""

    model_type: str
    name: str
    config: Any  # a frozen config dataclass with `from_hf_dict(raw, overrides)`
    architecture: Any  # an `Architecture` subclass taking that config

    def __post_init__(self) -> None:
        if not self.model_type or not self.model_type.replace("_", "").isalnum():
            raise ValueError(f"Family.model_type must be a Hugging Face model_type like 'mixtral', "
                             f"got {self.model_type!r}")
        if not callable(getattr(self.config, "from_hf_dict", None)):
            raise ValueError(f"Family {self.model_type}: config {self.config!r} has no from_hf_dict")


FAMILIES = (
    Family("switch_transformers", "Switch Transformers", SwitchConfig, SwitchArchitecture),
    Family("mixtral", "Mixtral", MixtralConfig, DecoderArchitecture),
    Family("qwen2_moe", "Qwen2-MoE", Qwen2MoeConfig, DecoderArchitecture),
    Family("qwen3_moe", "Qwen3-MoE", Qwen3MoeConfig, DecoderArchitecture),
    Family("olmoe", "OLMoE", OlmoeConfig, DecoderArchitecture),
    Family("deepseek_v3", "DeepSeek-V3", DeepseekV3Config, DecoderArchitecture),
    Family("deepseek_v2", "DeepSeek-V2", DeepseekV2Config, DecoderArchitecture),
    Family("glm4_moe", "GLM-4.5", Glm4MoeConfig, DecoderArchitecture),
    Family("gpt_oss", "GPT-OSS", GptOssConfig, DecoderArchitecture),
    Family("llama4_text", "Llama 4", Llama4TextConfig, DecoderArchitecture),
    Family("llama4", "Llama 4 (multimodal checkpoint, text model)", Llama4Config, DecoderArchitecture),
)
BY_MODEL_TYPE = {family.model_type: family for family in FAMILIES}


def model_types() -> list[str]:
    """Every supported `model_type`, sorted (for messages)."""
    return sorted(BY_MODEL_TYPE)
