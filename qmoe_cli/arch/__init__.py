"""Model families behind one interface (`base.Architecture`), their one registry (`families`),
and the presets of known models (`presets`).

Holds what differs per family: config parsing, checkpoint names, the block list, dense
sublayers, the router and the expert FFN: Switch Transformers (`switch/`) and decoder-only MoE
families (`decoder_only/`: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3).
Imports only `errors`, `files`, `resources` and torch; everything above (formats, run, compress)
asks an `Architecture` and never names a family's classes.
"""

from __future__ import annotations

from typing import Any

from ..errors import QmoeError, did_you_mean
from .base import (
    CHAIN_ACTIVATIONS,
    Architecture,
    ExpertBank,
    ExpertShape,
    GenerationSpec,
    IncrementalStack,
    ModelWeights,
    MoEBlock,
    RoutedExperts,
    StackCache,
    StackContext,
    TensorReader,
    bank_shared,
    bank_stores_shared,
    resolve_name,
    routed_experts,
)
from .families import BY_MODEL_TYPE, DEFAULT_MODEL_TYPE, FAMILIES, Family, model_types


def architecture_from_config(raw: dict[str, Any], overrides: dict[str, Any] | None = None) -> Architecture:
    """The architecture a Hugging Face `config.json` dict describes (`overrides`, a preset's, win).

    QmoeError for a family qmoe does not support; ValueError (naming the field) for a bad value.
    """
    model_type = raw.get("model_type", DEFAULT_MODEL_TYPE)
    if model_type not in BY_MODEL_TYPE:
        raise QmoeError(f"model_type {model_type!r} is not supported{did_you_mean(str(model_type), model_types())} "
                        f"(supported: {', '.join(model_types())})")
    family = BY_MODEL_TYPE[model_type]
    return family.architecture(family.config.from_hf_dict(raw, overrides))


__all__ = ["CHAIN_ACTIVATIONS", "FAMILIES", "Architecture", "ExpertBank", "ExpertShape", "Family", "GenerationSpec",
           "IncrementalStack",
           "MoEBlock", "ModelWeights", "RoutedExperts", "StackCache", "StackContext", "TensorReader",
           "architecture_from_config", "bank_shared", "bank_stores_shared",
           "resolve_name", "routed_experts"]
