"""A checkpoint of any kind (original, quantized, packed) read for export, one shard at a time.

An export is a list of shards (`plan`): the head, each block's non-expert tensors, and each group
of a sparse block's experts (the quantized checkpoint's own grouping, `settings.group_size`), so
writing one never holds more than one expert group's matrices (52 GB is one switch-c2048 block).
Expert matrices come out as `ExpertMatrix`: the dequantized weight plus, for b-bit checkpoints,
the integer codes and grid they came from, which the compressed-tensors writer re-packs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from ..arch import Architecture, architecture_from_config
from ..codec.bitpack import unpack_bits
from ..errors import QmoeError
from ..files import read_json_object
from ..formats.hf import COMPANION_FILES, resolve_model
from ..formats.open import OpenModel, open_model
from ..formats.original import OriginalManifest
from ..formats.packed import BitpackedMatrix, PackedExperts
from ..formats.quantized import SHARED, QuantizedExperts, member_shape
from ..quant.grids import QuantSpec, dequantize

CPU = torch.device("cpu")


@dataclass(frozen=True)
class ExpertMatrix:
    """One expert matrix as the checkpoint holds it."""

    name: str  # Hugging Face tensor name ("model.layers.1.block_sparse_moe.experts.3.w1.weight")
    values: torch.Tensor  # [rows, cols] fp32, the dequantized weight our runtime multiplies with
    codes: torch.Tensor | None  # [rows, cols] uint8 (quant/grids.py's codes); None for an original checkpoint
    grid: dict[str, torch.Tensor]  # [rows, G] fp32 each: "lo"/"hi" (ternary) or "scale"/"zero" (b-bit)


@dataclass(frozen=True)
class Shard:
    """What one output shard holds: dense tensors by name, or one group of a block's experts."""

    dense: tuple[str, ...] = ()  # Hugging Face names of non-expert tensors (read as stored)
    block: tuple[str, int] | None = None  # (stack, index) of the sparse block of `members`
    members: tuple[int | str, ...] = ()  # routed expert indices, and/or `SHARED`


class ExportSource:
    """An opened checkpoint plus the Hugging Face files an export needs beside its tensors."""

    def __init__(self, directory: Path, config: Path | None = None):
        self.model: OpenModel = open_model(str(directory))
        self.directory = directory
        self.weights = self.model.weights
        self.arch: Architecture = self.weights.arch
        self.kind = self.model.kind
        typed = self.weights.manifest  # the format's typed manifest: Original-, Quantized- or PackedManifest
        self.manifest: dict[str, Any] | None = None if isinstance(typed, OriginalManifest) else typed.to_json()
        self.spec: QuantSpec | None = getattr(self.weights, "spec", None)
        self.hf_config = self._hf_config(config)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the checkpoint stores its dense weights in; exported weights use it too."""
        return self.model.stored_dtype

    @property
    def stores_shared(self) -> bool:
        """Whether the sparse blocks' shared experts are stored compressed (not in block files)."""
        return bool(getattr(self.weights, "shared", False))

    def _hf_config(self, override: Path | None) -> dict[str, Any]:
        """The Hugging Face `config.json` of the model: `override`, else the checkpoint's own
        (original), else its source's (a compressed checkpoint stores our normalised config,
        which transformers cannot read). Checked against the architecture it must describe."""
        if override is not None:
            path = override / "config.json" if override.is_dir() else override
        elif self.manifest is None:  # an original checkpoint: its own
            path = self.directory / "config.json"
        else:
            source = self.manifest["source"] if self.manifest else ""
            try:
                path = resolve_model(source).directory / "config.json"
            except QmoeError:
                raise QmoeError(f"{self.directory}: its source model {source!r} is not on this machine, so its "
                                "Hugging Face config.json is unknown; pass --config SOURCE_DIR/config.json") from None
        raw = read_json_object(path, "the Hugging Face config.json of the model is needed")
        try:
            described = architecture_from_config(raw).config.to_dict()
        except (TypeError, ValueError) as exc:
            raise QmoeError(f"{path}: {exc}") from None
        if described != self.arch.config.to_dict():
            raise QmoeError(f"{path}: describes another model than {self.directory} (its architecture differs); "
                            "pass the source model's config.json with --config")
        return raw

    def companion_files(self) -> list[Path]:
        """Tokenizer files and generation defaults beside the weights."""
        return [self.model.tokenizer_dir / n for n in COMPANION_FILES if (self.model.tokenizer_dir / n).is_file()]

    def plan(self) -> list[Shard]:
        """The shards of an export, in order: head, then per block its dense tensors and expert groups."""
        arch = self.arch
        shards = [Shard(dense=tuple(sorted({self.weights.stored_name(n) for n in arch.head_tensors()})))]
        group = getattr(self.weights, "group_size", None) or 16
        for stack in arch.stacks:
            for i in range(arch.num_blocks(stack)):
                shards.append(Shard(dense=tuple(self._block_names(stack, i))))
                if not arch.is_sparse(stack, i):
                    continue
                for g in range(math.ceil(arch.num_experts / group)):
                    shards.append(Shard(block=(stack, i),
                                        members=tuple(range(g * group, min(arch.num_experts, (g + 1) * group)))))
                if self.stores_shared:
                    shards.append(Shard(block=(stack, i), members=(SHARED,)))
        return shards

    def _block_names(self, stack: str, index: int) -> list[str]:
        """Hugging Face names of the block's non-expert tensors (its shared expert's where the
        checkpoint keeps it as stored)."""
        bank = _NoExperts(self.stores_shared) if self.arch.is_sparse(stack, index) else None
        with torch.device("meta"):
            names = list(self.arch.block(stack, index, bank).state_dict())
        prefix = self.arch.block_prefix(stack, index)
        return [prefix + n for n in names]

    def dense(self, name: str) -> torch.Tensor:
        """Non-expert tensor `name` as stored, on the CPU."""
        return self.weights.tensor(name, None, CPU)

    def experts(self, shard: Shard) -> Iterator[ExpertMatrix]:
        """The expert matrices of `shard`, one member after another."""
        stack, i = shard.block
        bank = self.weights.experts(stack, i)
        try:
            for member in shard.members:
                for m in member_shape(self.arch, member).matrices:
                    name = (self.arch.shared_tensor(stack, i, m) if member == SHARED
                            else self.arch.expert_tensor(stack, i, member, m))
                    yield self._matrix(bank, member, m, name)
        finally:
            getattr(bank, "close", lambda: None)()

    def _matrix(self, bank: Any, member: int | str, m: str, name: str) -> ExpertMatrix:
        if isinstance(bank, QuantizedExperts):
            codes, grid = bank.encoded(member, m)
            values = dequantize(codes, grid, self.spec)[0]  # what `bank.matrix` gives, without a second read
            return ExpertMatrix(name, values, codes[0], {k: v[0] for k, v in grid.tensors().items()})
        if isinstance(bank, PackedExperts):
            matrix = (bank.shared_matrices()[m] if member == SHARED
                      else dict(bank.matrices([member]))[member][m])
            values = matrix.dense(0, matrix.rows)
            if isinstance(matrix, BitpackedMatrix):
                codes = unpack_bits(matrix.packed, int(self.spec.bits), matrix.cols)
                return ExpertMatrix(name, values, codes, dict(matrix.grid_tensors))
            # lo <= 0 <= hi, so a weight is negative exactly when it is lo (code 0), positive when hi (2)
            codes = torch.where(values < 0, 0, torch.where(values > 0, 2, 1)).to(torch.uint8)
            return ExpertMatrix(name, values, codes, {"lo": matrix.lo, "hi": matrix.hi})
        return ExpertMatrix(name, self.weights.reader.get(name, torch.float32), None, {})

    def close(self) -> None:
        getattr(self.weights, "close", lambda: None)()


class _NoExperts:
    """Stands in for a bank when only a block's non-expert parameter names are wanted."""

    num_experts = 0

    def __init__(self, stores_shared: bool):
        self.stores_shared = stores_shared

