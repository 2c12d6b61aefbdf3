"""Open whatever `--model` names: a preset, a hub id, or a directory of any checkpoint kind."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import ModelSource, resolve_model
from .data import C4
from .runtime import ModelWeights
from .quantized import KIND, QuantizedWeights
from .weights import CheckpointWeights

DEFAULT_WINDOW = 512  # Switch Transformers were trained on 512-token inputs


@dataclass
class OpenModel:
    """A model ready to stream: its weights, where its tokenizer is, and its limits."""

    label: str  # what the user asked for
    kind: str  # "original" (later: "quantized", "packed")
    weights: ModelWeights
    source: ModelSource
    stored_dtype: torch.dtype

    @property
    def tokenizer_dir(self) -> Path:
        return self.source.directory

    @property
    def window(self) -> int:
        return self.source.preset.window if self.source.preset else DEFAULT_WINDOW

    def default_data(self) -> str:
        return self._preset_data(self.source.preset.default_data if self.source.preset else C4)

    def default_calib(self) -> str:
        return self._preset_data(self.source.preset.default_calib if self.source.preset else C4)

    def _preset_data(self, value: str) -> str:
        """A preset's data other than c4 names a file inside the model directory: its path.

        (A shipped model carries its own data; relative to the working directory it would not be
        found.) An absolute path stays as it is.
        """
        return value if value == C4 else str(self.source.directory / value)


def open_model(name: str) -> OpenModel:
    """Open `--model`; a directory with a qmoe manifest.json is a quantized checkpoint."""
    path = Path(name).expanduser()
    if path.is_dir() and (path / "manifest.json").is_file():
        weights = QuantizedWeights.open(path)
        stored = weights.tensor("shared.weight", None, torch.device("cpu")).dtype
        return OpenModel(name, KIND, weights, ModelSource(path, None, name), stored)
    source = resolve_model(name)
    weights = CheckpointWeights(source)
    return OpenModel(name, "original", weights, source, weights.stored_dtype())
