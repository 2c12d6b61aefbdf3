"""`SwitchConfig`: the architecture of a Switch Transformer as our model code needs it, read
from a Hugging Face `config.json` dict (plus a preset's overrides)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ...errors import QmoeError


@dataclass(frozen=True)
class SwitchConfig:
    """Architecture of a Switch Transformer encoder-decoder (T5 v1.0 style blocks)."""

    vocab_size: int
    d_model: int
    d_kv: int  # per-head width; num_heads * d_kv need not equal d_model
    d_ff: int
    num_heads: int
    num_layers: int  # encoder blocks
    num_decoder_layers: int
    num_experts: int
    encoder_sparse_step: int  # 1: every block sparse; N > 1: blocks with i % N == 1; 0: none
    decoder_sparse_step: int
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    tie_word_embeddings: bool = True  # tied: final hidden states scaled by d_model^-0.5
    router_bias: bool = False
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "num_layers",
                     "num_decoder_layers", "num_experts", "relative_attention_num_buckets",
                     "relative_attention_max_distance"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"SwitchConfig.{name} must be a positive integer, got {value!r}")
        for name in ("encoder_sparse_step", "decoder_sparse_step"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"SwitchConfig.{name} must be an integer >= 0, got {value!r}")
        for name in ("pad_token_id", "decoder_start_token_id"):  # ids the decoder's inputs are made of
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value < self.vocab_size:
                raise ValueError(f"SwitchConfig.{name} must be a token id in [0, {self.vocab_size}), got {value!r}")
        eps = self.layer_norm_epsilon
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
            raise ValueError(f"SwitchConfig.layer_norm_epsilon must be a number in (0, 1), got {eps!r}")
        for name in ("tie_word_embeddings", "router_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"SwitchConfig.{name} must be true or false, got {getattr(self, name)!r}")

    def sparse_blocks(self) -> list[tuple[str, int]]:
        """(stack, index) of every block that holds experts, encoder first."""
        return [(stack, i) for stack in ("encoder", "decoder") for i in range(self.num_blocks(stack))
                if self.is_sparse(stack, i)]

    def is_sparse(self, stack: str, index: int) -> bool:
        """Whether block `index` of `stack` ("encoder" | "decoder") holds experts.

        Hugging Face's rule, which every hub checkpoint follows: with step N > 1 the sparse
        blocks are those with index % N == 1 (1, 3, 5, ... for N = 2); step 1 makes every block
        sparse; step 0 none.
        """
        step = self.encoder_sparse_step if stack == "encoder" else self.decoder_sparse_step
        if step == 0:
            return False
        return step == 1 or index % step == 1

    def num_blocks(self, stack: str) -> int:
        return self.num_layers if stack == "encoder" else self.num_decoder_layers

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], overrides: dict[str, Any] | None = None) -> "SwitchConfig":
        """Build from a Hugging Face `config.json` dict; `overrides` (a preset's) win."""
        merged = {**raw, **(overrides or {})}
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        if "num_decoder_layers" not in merged and "num_layers" in merged:
            merged["num_decoder_layers"] = merged["num_layers"]
        if "decoder_start_token_id" not in merged or merged["decoder_start_token_id"] is None:
            merged["decoder_start_token_id"] = merged.get("pad_token_id", 0)
        missing = sorted(required - merged.keys())
        if missing:
            raise QmoeError(f"config.json lacks {', '.join(missing)}: not a Switch Transformer config")
        return cls(**{k: v for k, v in merged.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
