"""Model architecture and preset configuration.

`SwitchConfig` is the architecture of a Switch Transformer as our model code needs it, read from
a Hugging Face `config.json` (plus a preset's overrides). `Preset` is one file of `configs/`:
the hub id of a known model and the quirks of its checkpoint, so that no code branches on a
model's name.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import QmoeError
from .fsutil import read_json_object

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


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
                     "num_decoder_layers", "num_experts", "relative_attention_num_buckets"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"SwitchConfig.{name} must be a positive integer, got {value!r}")
        for name in ("encoder_sparse_step", "decoder_sparse_step"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"SwitchConfig.{name} must be an integer >= 0, got {value!r}")

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

    @classmethod
    def from_file(cls, path: Path, overrides: dict[str, Any] | None = None) -> "SwitchConfig":
        raw = read_json_object(path, "a model directory needs a config.json")
        try:
            return cls.from_hf_dict(raw, overrides)
        except (TypeError, ValueError) as exc:
            raise QmoeError(f"{path}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Preset:
    """One `configs/*.toml` file: a known model, where it lives, and its checkpoint's quirks."""

    name: str
    hub_id: str
    description: str = ""
    stored_dtype: str = "float32"  # what the checkpoint holds; GPUs run float32 ones in bfloat16
    window: int = 512  # longest input or label sequence a sample may have, in tokens
    embedding_key: str = "shared.weight"  # the input embedding (shared by encoder and decoder)
    local_dir: str | None = None  # a checkpoint shipped inside the package, relative to it
    default_calib: str = "c4"
    default_data: str = "c4"
    config_overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.stored_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"Preset.stored_dtype must be float32, bfloat16 or float16, got {self.stored_dtype!r}")
        if self.window < 2:
            raise ValueError(f"Preset.window must be >= 2, got {self.window}")


def _preset_files() -> dict[str, Any]:
    root = resources.files("qmoe_cli.configs")
    return {p.name[: -len(".toml")]: p for p in root.iterdir() if p.name.endswith(".toml")}


def preset_names() -> list[str]:
    return sorted(_preset_files())


def load_preset(name: str) -> Preset | None:
    """The preset called `name`, or the one whose hub id is `name`; None when there is none."""
    files = _preset_files()
    if name in files:
        return _parse_preset(files[name])
    for candidate in files.values():
        preset = _parse_preset(candidate)
        if preset.hub_id == name:
            return preset
    return None


def _parse_preset(path: Any) -> Preset:
    try:
        raw = tomllib.loads(path.read_text())
        return Preset(**raw)
    except (tomllib.TOMLDecodeError, TypeError, ValueError) as exc:
        raise QmoeError(f"preset {path.name}: {exc}") from None
