"""The original (Hugging Face) checkpoint format: what a source model directory is, read once.

An original checkpoint is what the hub or `save_pretrained` writes: `config.json`, the weights
as safetensors shards (one `model.safetensors`, or several named by `model.safetensors.index.json`)
or legacy `pytorch_model*.bin` shards, and tokenizer files. It carries no manifest of ours, so
`OriginalManifest` is its typed description, built from those files and validated in one place
(`read`): the reader (`hf.CheckpointWeights`) and `qmoe info` ask its fields instead of reading
and indexing `config.json` again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..arch import Architecture, architecture_from_config
from ..errors import QmoeError
from ..files import read_json_object
from .fp8 import BlockFp8, block_fp8_scheme
from .mxfp4 import Mxfp4, mxfp4_scheme

KIND = "original"
CONFIG_FILE = "config.json"
LAYOUTS = (  # (index file, single-shard file), in order of preference
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)


@dataclass(frozen=True)
class WeightFiles:
    """Where an original checkpoint's tensors are: the shard files, and the index mapping tensor
    names to them (None when one shard holds every tensor: its header lists them)."""

    shards: tuple[str, ...]  # file names inside the checkpoint directory, sorted
    index: dict[str, str] | None  # tensor name -> shard, from the index file

    def __post_init__(self) -> None:
        if not self.shards or any(not name or "/" in name for name in self.shards):
            raise ValueError(f"WeightFiles.shards must be file names inside the checkpoint, got {self.shards!r}")
        if self.index is None and len(self.shards) != 1:
            raise ValueError(f"WeightFiles without an index must have one shard, got {len(self.shards)}")

    @property
    def layout(self) -> str:
        """"safetensors", or "bin" for legacy PyTorch shards."""
        return "safetensors" if self.shards[0].endswith(".safetensors") else "bin"


def find_weight_files(directory: Path) -> WeightFiles:
    """The weight files of the checkpoint in `directory`: safetensors first, then legacy .bin;
    an index file first, then the single shard. QmoeError naming the file when an index is
    malformed or lists a shard that is not there, or when there are no weights at all."""
    for index_name, single_name in LAYOUTS:
        index = directory / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
                raise QmoeError(f"{index}: not a valid index (needs a 'weight_map' object)") from None
            if not isinstance(weight_map, dict):
                raise QmoeError(f"{index}: 'weight_map' must map tensor names to shard files")
            for shard in sorted(set(weight_map.values())):
                if not isinstance(shard, str) or "/" in shard or not (directory / shard).is_file():
                    raise QmoeError(f"{index}: shard {shard!r} is listed but missing from {directory}")
            if not weight_map:
                raise QmoeError(f"{index}: 'weight_map' lists no tensors")
            return WeightFiles(tuple(sorted(set(weight_map.values()))), weight_map)
        if (directory / single_name).is_file():
            return WeightFiles((single_name,), None)
    raise QmoeError(f"{directory}: no model weights found (expected model.safetensors, "
                    "model.safetensors.index.json or pytorch_model*.bin)")


@dataclass(frozen=True)
class OriginalManifest:
    """What an original checkpoint directory holds, as `read` found and checked it."""

    directory: Path
    config: dict[str, Any]  # config.json as stored (Hugging Face's field names)
    arch: Architecture  # what the config describes, with a preset's overrides
    fp8: BlockFp8 | None  # block-scaled fp8 weights (DeepSeek-V3's hub format); None: not fp8
    mxfp4: Mxfp4 | None  # MXFP4 experts (GPT-OSS); None: not MXFP4
    weights: WeightFiles

    @property
    def family(self) -> str:
        return self.arch.family

    @property
    def quantization(self) -> str | None:
        """How the stored weights are quantized: "fp8", "mxfp4", or None (as trained)."""
        return "fp8" if self.fp8 is not None else "mxfp4" if self.mxfp4 is not None else None

    @classmethod
    def read(cls, directory: Path, overrides: dict[str, Any] | None = None) -> "OriginalManifest":
        """The checkpoint in `directory`: config.json read once and parsed into its architecture
        (`overrides`, a preset's, win), its weight quantization, and its weight files; QmoeError
        naming the file and what is wrong otherwise."""
        path = directory / CONFIG_FILE
        raw = read_json_object(path, "a model directory needs a config.json")
        try:
            arch = architecture_from_config(raw, overrides)
        except (TypeError, ValueError, QmoeError) as exc:  # an unknown model_type included: name the file
            raise QmoeError(f"{path}: {exc}") from None
        return cls(directory, raw, arch, block_fp8_scheme(raw, path), mxfp4_scheme(raw, path),
                   find_weight_files(directory))
