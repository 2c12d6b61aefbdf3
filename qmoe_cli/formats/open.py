"""Open whatever `--model` names: a preset, a hub id, or a directory of any checkpoint kind."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..arch import ModelWeights
from ..arch.presets import Preset, load_preset
from ..resources import package_dir
from . import packed, quantized
from .hf import CheckpointWeights, resolve_model
from .quantized import read_manifest

DEFAULT_WINDOW = 512  # Switch Transformers were trained on 512-token inputs
DEFAULT_DATA = "c4"


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


def _defaults(preset: Preset | None) -> tuple[int, str, str]:
    """(window, default data, default calibration) of a preset; files of a shipped model resolve
    to absolute paths inside its directory."""
    if preset is None:
        return DEFAULT_WINDOW, DEFAULT_DATA, DEFAULT_DATA
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
        kind = manifest["kind"]
        weights = packed.PackedWeights.open(path) if kind == packed.KIND else quantized.QuantizedWeights.open(path)
        stored = weights.tensor(weights.arch.embedding_tensor(weights.arch.stacks[0]), None, torch.device("cpu")).dtype
        _, data, calib = _defaults(load_preset(manifest["source"]))
        return OpenModel(name, kind, weights, path, stored, manifest["window"], data, calib)
    source = resolve_model(name)
    weights = CheckpointWeights(source)
    window, data, calib = _defaults(source.preset)
    return OpenModel(name, "original", weights, source.directory, weights.stored_dtype(), window, data, calib)
