"""The quantized checkpoint: expert weights as integer codes plus per-row grids.

Layout of a quantized directory (all safetensors + JSON, never pickle):

    manifest.json               kind "quantized", format version, source, settings, architecture
                                (the model's config), fingerprint,
                                per-block statistics, finished blocks (for --resume)
    tokenizer.json | spiece.model ...   copied from the source
    head.safetensors            embedding, final layer norms, lm_head: as stored in the source
    blocks/{stack}-{i:03d}.safetensors   one block's non-expert tensors as stored (HF names)
    experts/{stack}-{i:03d}/group-{k:05d}.safetensors  one expert group of a sparse block
                                (experts k*G .. k*G+G-1, G = settings.group_size):
                                `expert_{j}.{wi|wo}.codes` [rows, cols] uint8 plus the grid
                                (`lo`/`hi` for ternary, `scale`/`zero` for integer grids;
                                [rows, groups] fp32). One file per group, so neither writing nor
                                reading ever holds a whole block's codes (52 GB for switch-c2048).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import save_file
from torch import nn

from ..arch import Architecture, architecture_from_config
from ..errors import QmoeError
from ..files import read_json_object, replace_durably
from ..kernels import round_once_linear
from ..quant.grids import IntGrid, QuantSpec, TernaryGrid, dequantize
from .safetensors_io import SafetensorsFile

FORMAT_VERSION = 1
KIND = "quantized"
HEAD_FILE = "head.safetensors"


def block_file(stack: str, index: int) -> str:
    return f"blocks/{stack}-{index:03d}.safetensors"


def expert_file(stack: str, index: int, group: int) -> str:
    return f"experts/{stack}-{index:03d}/group-{group:05d}.safetensors"


def expert_groups(num_experts: int, group_size: int) -> range:
    """Indices of a sparse block's expert group files."""
    return range(math.ceil(num_experts / group_size))


def dense_file(arch: Architecture, name: str) -> str:
    """The file holding non-expert tensor `name` (checkpoint naming): its block's, else the head."""
    for stack in arch.stacks:
        for i in range(arch.num_blocks(stack)):
            if name.startswith(arch.block_prefix(stack, i)):
                return block_file(stack, i)
    return HEAD_FILE


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    replace_durably(tmp, path)


def save_tensors_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors file written under a temporary name, then renamed (a crash leaves no half file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    replace_durably(tmp, path)


def read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / "manifest.json"
    manifest = read_json_object(path, "not a qmoe checkpoint")
    if "kind" not in manifest:
        raise QmoeError(f"{path}: not a qmoe manifest (no 'kind')")
    return manifest


def grid_from_tensors(spec: QuantSpec, tensors: dict[str, torch.Tensor]) -> TernaryGrid | IntGrid:
    """Rebuild a grid of one matrix ([rows, G] tensors, given a leading expert dim of 1)."""
    if spec.ternary:
        return TernaryGrid(lo=tensors["lo"][None], hi=tensors["hi"][None])
    return IntGrid(scale=tensors["scale"][None], zero=tensors["zero"][None], maxq=spec.maxq)


class QuantizedExperts:
    """The experts of one sparse block of a quantized checkpoint, dequantized when loaded.

    Keeps one group file open at a time (groups are visited in order).
    """

    def __init__(self, directory: Path, stack: str, index: int, spec: QuantSpec, arch: Architecture,
                 group_size: int):
        self.directory, self.stack, self.index = directory, stack, index
        self.spec, self.arch, self.group_size = spec, arch, group_size
        self.num_experts = arch.num_experts
        self._file: SafetensorsFile | None = None

    def _group_file(self, j: int) -> SafetensorsFile:
        path = self.directory / expert_file(self.stack, self.index, j // self.group_size)
        if self._file is None or self._file.path != path:
            if self._file is not None:
                self._file.close()
            if not path.is_file():
                raise QmoeError(f"{path}: missing; the quantized checkpoint is incomplete")
            self._file = SafetensorsFile(path)
        return self._file

    def _read(self, file: SafetensorsFile, key: str) -> torch.Tensor:
        if key not in file.entries:
            raise QmoeError(f"{file.path}: tensor '{key}' is missing; the checkpoint is corrupt")
        return file.read(key)

    def encoded(self, j: int, name: str) -> tuple[torch.Tensor, TernaryGrid | IntGrid]:
        """`expert_{j}.{name}` as stored: codes [1, rows, cols] uint8 and grid [1, rows, G] fp32."""
        file = self._group_file(j)
        prefix = f"expert_{j}.{name}."
        fields = ("lo", "hi") if self.spec.ternary else ("scale", "zero")
        grid = grid_from_tensors(self.spec, {f: self._read(file, prefix + f) for f in fields})
        return self._read(file, prefix + "codes")[None], grid

    def matrix(self, j: int, name: str) -> torch.Tensor:
        """Dequantized weight `expert_{j}.{name}` -> [rows, cols] fp32."""
        codes, grid = self.encoded(j, name)
        return dequantize(codes, grid, self.spec)[0]

    def load(self, ids: Sequence[int], device: torch.device, dtype: torch.dtype) -> list[nn.Module]:
        return [self.arch.make_expert({m: GridLinear(self.matrix(j, m).to(device=device, dtype=dtype))
                                       for m in self.arch.expert.matrices}) for j in ids]


class GridLinear(nn.Module):
    """y = x Wᵀ for a dequantized expert matrix W [out, in] (in the run dtype), with the numerics
    of every compressed expert linear (`round_once_linear`), so a quantized checkpoint computes
    what its packed form computes on the same device and dtype."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [n, in] -> [n, out], in x's dtype."""
        return round_once_linear(x, self.weight)


class DenseTensorFiles:
    """Reading non-expert tensors (head, per-block files) of a compressed checkpoint, each file
    opened once; a checkpoint kind says how it opens (and checks) a file in `_open`."""

    _files: dict[str, SafetensorsFile]  # set in the subclass's __post_init__
    arch: Architecture

    def _open(self, name: str) -> SafetensorsFile:
        raise NotImplementedError

    def tensor(self, name: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        file_name = dense_file(self.arch, name)
        if file_name not in self._files:
            self._files[file_name] = self._open(file_name)
        file = self._files[file_name]
        if name not in file.entries:
            raise QmoeError(f"{file.path}: tensor '{name}' is missing")
        return file.read(name).to(dtype=dtype, device=device)

    def close(self) -> None:
        for file in self._files.values():
            file.close()
        self._files.clear()


@dataclass
class QuantizedWeights(DenseTensorFiles):
    """`ModelWeights` over a quantized directory (finished or, for --resume, partial)."""

    directory: Path
    arch: Architecture
    spec: QuantSpec
    group_size: int  # experts per file under experts/

    def __post_init__(self) -> None:
        self._files: dict[str, SafetensorsFile] = {}

    @classmethod
    def open(cls, directory: Path) -> "QuantizedWeights":
        manifest = read_manifest(directory)
        if manifest["kind"] != KIND or manifest.get("format_version") != FORMAT_VERSION:
            raise QmoeError(f"{directory}: manifest is kind {manifest['kind']!r} version "
                            f"{manifest.get('format_version')!r}; expected {KIND!r} version {FORMAT_VERSION}")
        settings = manifest["settings"]
        arch = architecture_from_config(manifest["config"])
        return cls(directory, arch, QuantSpec(settings["bits"], settings.get("grid_group")), settings["group_size"])

    def _open(self, name: str) -> SafetensorsFile:
        path = self.directory / name
        if not path.is_file():
            raise QmoeError(f"{path}: missing; the quantized checkpoint is incomplete")
        return SafetensorsFile(path)

    def experts(self, stack: str, index: int) -> QuantizedExperts:
        return QuantizedExperts(self.directory, stack, index, self.spec, self.arch, self.group_size)
