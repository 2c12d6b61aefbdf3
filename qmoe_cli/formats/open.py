"""Open whatever `--model` names: a preset, a hub id, or a directory of any checkpoint kind."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..arch import ModelWeights
from ..arch.presets import Preset, load_preset
from ..errors import QmoeError
from ..resources import package_dir
from . import packed, quantized
from .hf import CheckpointWeights, resolve_model
from .quantized_manifest import read_manifest

# The checkpoint formats with a manifest, by its `kind`: how each opens. A manifest of another
# kind goes to the quantized reader, whose check names the kind and version it expects.
READERS: dict[str, Callable[[Path], ModelWeights]] = {quantized.KIND: quantized.QuantizedWeights.open,
                                                      packed.KIND: packed.PackedWeights.open}


def open_compressed(directory: Path) -> tuple[str, ModelWeights]:
    """(kind, weights) of the compressed checkpoint in `directory` (it has a manifest.json)."""
    kind = read_manifest(directory)["kind"]
    return kind, READERS.get(kind, quantized.QuantizedWeights.open)(directory)


DEFAULT_WINDOW = 512  # Switch Transformers were trained on 512-token inputs
DEFAULT_DATA = "c4"
OWN_DATA = ("validation.jsonl", "calibration.jsonl")  # default --data, --calib in a model directory


@dataclass
class OpenModel:
    """A model ready to stream: its weights, where its tokenizer is, its window and default data."""

    label: str  # what the user asked for
    kind: str  # "original" | "quantized" | "packed"
    weights: ModelWeights
    tokenizer_dir: Path
    stored_dtype: torch.dtype
    window: int  # longest input or label sequence, tokens
    default_data: str  # `--data` when none is given: "c4" or a file path
    default_calib: str  # `--calib` when none is given


def _defaults(preset: Preset | None, directory: Path | None = None) -> tuple[int, str, str]:
    """(window, default data, default calibration) of a preset; files of a shipped model resolve
    to absolute paths inside its directory. A model directory without a preset that holds its
    own data, as the shipped tiny-switch does (a copy of it, say), defaults to that data."""
    if preset is None:
        data, calib = (str(directory / name) if directory is not None and (directory / name).is_file()
                       else DEFAULT_DATA for name in OWN_DATA)
        return DEFAULT_WINDOW, data, calib
    if preset.local_dir is None:
        return preset.window, preset.default_data, preset.default_calib
    directory = package_dir() / preset.local_dir
    return preset.window, str(directory / preset.default_data), str(directory / preset.default_calib)


def open_model(name: str) -> OpenModel:
    """Open `--model`; a directory with a qmoe manifest.json is a quantized or packed checkpoint
    (its `kind` says which).

    A compressed checkpoint keeps its source's window and default data (via the manifest).
    """
    path = Path(name).expanduser()
    if path.is_dir() and (path / "manifest.json").is_file():
        manifest = read_manifest(path)
        kind, weights = open_compressed(path)
        window, source = manifest.get("window"), manifest.get("source")
        if not isinstance(window, int) or window < 2 or not isinstance(source, str):
            raise QmoeError(f"{path / 'manifest.json'}: malformed manifest (needs a 'source' name and a 'window' >= 2)")
        embedding = weights.arch.embedding_tensor(weights.arch.stacks[0])
        stored = weights.tensor(embedding, None, torch.device("cpu")).dtype
        source_dir = Path(source).expanduser()
        _, data, calib = _defaults(load_preset(source), source_dir if source_dir.is_dir() else None)
        return OpenModel(name, kind, weights, path, stored, window, data, calib)
    source = resolve_model(name)
    weights = CheckpointWeights(source)
    window, data, calib = _defaults(source.preset, source.directory)
    return OpenModel(name, "original", weights, source.directory, weights.stored_dtype(), window, data, calib)
