"""`ModelWeights` for an original (uncompressed) Hugging Face checkpoint."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .checkpoint import CheckpointReader, ModelSource
from .config import SwitchConfig
from .switch import ExpertFFN

# Where the input embedding may be stored, after the preset's own `embedding_key`.
_EMBEDDING_ALIASES = ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


class CheckpointExperts:
    """The experts of one sparse block, read from the checkpoint when asked for (lazily)."""

    def __init__(self, reader: CheckpointReader, prefix: str, num_experts: int):
        self.reader, self.prefix, self.num_experts = reader, prefix, num_experts

    def load(self, ids: Sequence[int], device: torch.device, dtype: torch.dtype) -> list[nn.Module]:
        keys = [f"{self.prefix}expert_{j}." for j in ids]
        return [ExpertFFN.from_weights(self.reader.get(key + "wi.weight", dtype, device),
                                       self.reader.get(key + "wo.weight", dtype, device)) for key in keys]


class CheckpointWeights:
    """Tensors of an original checkpoint by Hugging Face name, read on demand."""

    def __init__(self, source: ModelSource, max_open_shards: int = 2):
        self.source = source
        self.config: SwitchConfig = source.config()
        self.reader = CheckpointReader(source.directory, max_open_shards)
        preferred = source.preset.embedding_key if source.preset else "shared.weight"
        self._embedding_key = next((k for k in (preferred, *_EMBEDDING_ALIASES) if k in self.reader), preferred)

    def tensor(self, name: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if name == "shared.weight":
            name = self._embedding_key
        return self.reader.get(name, dtype, device)

    def experts(self, stack: str, index: int) -> CheckpointExperts:
        ffn = 1 if stack == "encoder" else 2
        prefix = f"{stack}.block.{index}.layer.{ffn}.mlp.experts."
        return CheckpointExperts(self.reader, prefix, self.config.num_experts)

    def stored_dtype(self) -> torch.dtype:
        """The dtype the checkpoint stores its floating weights in (from the embedding)."""
        return self.reader.dtype(self._embedding_key)

    def close(self) -> None:
        self.reader.close()
