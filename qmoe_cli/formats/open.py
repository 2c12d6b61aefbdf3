"""Open whatever `--model` names: a preset, a hub id, or a directory of any checkpoint kind."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..arch import ModelWeights
from ..arch.presets import Preset
from ..resources import package_dir
from .registry import detect

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
    """Open `--model`: its format (`registry.detect`) reads and checks it and says where its
    window and default data come from (a compressed checkpoint keeps its source's)."""
    fmt = detect(name)
    weights = fmt.open(name)
    origin = fmt.origin(weights)
    window, data, calib = _defaults(origin.preset, origin.data_dir)
    return OpenModel(name, fmt.kind, weights, origin.tokenizer_dir, origin.stored_dtype, origin.window or window,
                     data, calib)
