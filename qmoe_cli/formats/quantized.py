"""The quantized checkpoint: expert weights as integer codes plus per-row grids.

Layout of a quantized directory (all safetensors + JSON, never pickle):

    manifest.json               kind "quantized", format version, source, settings, architecture
                                (the model's config), fingerprint, per-block statistics, finished
                                blocks (for --resume), `files`: size and sha256 of every other file,
                                `manifest_sha256`: of the rest of the manifest (`integrity.py`)
    tokenizer.json | spiece.model ...   copied from the source
    head.safetensors            embeddings, final layer norms, lm_head: as stored in the source
                                (under the names the source holds them, e.g. `shared.weight` alone)
    blocks/{stack}-{i:03d}.safetensors   one block's non-expert tensors as stored (HF names)
    experts/{stack}-{i:03d}/group-{k:05d}.safetensors  one expert group of a sparse block
                                (experts k*G .. k*G+G-1, G = settings.group_size):
                                `expert_{j}.{wi|wo}.codes` [rows, cols] uint8 plus the grid
                                (`lo`/`hi` for ternary, `scale`/`zero` for integer grids;
                                [rows, groups] fp32). One file per group, so neither writing nor
                                reading ever holds a whole block's codes (52 GB for switch-c2048).
    experts/{stack}-{i:03d}/shared.safetensors  the block's shared expert (families with one,
                                `settings.shared_experts` "quantize"): `shared.{matrix}.codes` and
                                its grid, as a routed expert's; its weights are then not in the
                                block file (a gate beside it, Qwen's `shared_expert_gate`, is).
                                Checkpoints whose settings lack `shared_experts` (written before
                                shared experts were quantized) keep them as stored, in the block file.

Safety, as for packed checkpoints: opening checks the manifest's checksum, then every file the
architecture needs is listed with its size, and every tensor header (names, dtypes, shapes)
matches the architecture the manifest's config describes (so an edited `d_ff` or `vocab_size`
is an error before anything runs). Each file is checked against its sha256 before its first
tensor is used, and every matrix's codes against the bit width and its grid for finite values.

A partial run (`.OUT.partial`, for --resume) keeps the same manifest: a file's record is added
when the file is written, and the manifest (with its checksum) is rewritten after every finished
sparse block, so a resumed run reads back only files it can verify.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..arch import Architecture, ExpertBank, ExpertShape, architecture_from_config, resolve_name
from ..errors import QmoeError
from ..execute.linear import GridLinear
from ..quant.grids import Grid, QuantSpec, dequantize
from .integrity import verify_file
from .quantized_manifest import KIND, SHARED_MODES, QuantizedManifest, read_manifest
from .safetensors_io import SafetensorsFile, TensorEntry

HEAD_FILE = "head.safetensors"
SHARED = "shared"  # names a block's shared expert where a routed expert's index would go


def block_file(stack: str, index: int) -> str:
    return f"blocks/{stack}-{index:03d}.safetensors"


def expert_file(stack: str, index: int, group: int) -> str:
    return f"experts/{stack}-{index:03d}/group-{group:05d}.safetensors"


def shared_file(stack: str, index: int) -> str:
    return f"experts/{stack}-{index:03d}/shared.safetensors"


def stores_shared(arch: Architecture, settings: dict[str, Any]) -> bool:
    """Whether a checkpoint of these settings holds its sparse blocks' shared experts quantized
    (`shared_file`). Settings without `shared_experts` predate it: kept as stored."""
    mode = settings.get("shared_experts", "keep")
    if mode not in SHARED_MODES:
        raise ValueError(f"settings.shared_experts must be one of {', '.join(SHARED_MODES)}, got {mode!r}")
    return mode == "quantize" and arch.shared_expert is not None


def member_shape(arch: Architecture, member: int | str) -> ExpertShape:
    """The matrices of routed expert `member`, or of the shared expert (`SHARED`)."""
    if member == SHARED:
        assert arch.shared_expert is not None, f"{arch.family} has no shared expert"
        return arch.shared_expert
    return arch.expert


def member_prefix(member: int | str) -> str:
    """Tensor-name prefix of routed expert `member` ("expert_3.") or of the shared expert ("shared.")."""
    return f"{SHARED}." if member == SHARED else f"expert_{member}."


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


# What a file must hold: tensor name -> (dtype, or None for any floating dtype; shape).
Expected = dict[str, tuple["torch.dtype | None", tuple[int, ...]]]


def matrix_entries(arch: Architecture, spec: QuantSpec, member: int | str, name: str) -> Expected:
    """The tensors of matrix `name` of routed expert `member` (or `SHARED`): codes [rows, cols]
    uint8, grid [rows, G] fp32."""
    rows, cols = member_shape(arch, member).shapes[name]
    prefix, grid = f"{member_prefix(member)}{name}.", (torch.float32, (rows, spec.n_groups(cols)))
    return {prefix + "codes": (torch.uint8, (rows, cols)), **{prefix + field: grid for field in spec.grid_fields}}


def expert_entries(arch: Architecture, spec: QuantSpec, experts: range) -> Expected:
    """Every tensor of the expert group file holding `experts`."""
    return {key: value for j in experts for name in arch.expert.matrices
            for key, value in matrix_entries(arch, spec, j, name).items()}


def shared_entries(arch: Architecture, spec: QuantSpec) -> Expected:
    """Every tensor of a block's shared expert file."""
    return {key: value for name in member_shape(arch, SHARED).matrices
            for key, value in matrix_entries(arch, spec, SHARED, name).items()}


class QuantizedExperts:
    """The experts of one sparse block of a quantized checkpoint, dequantized when loaded; its
    shared expert too where the checkpoint stores it quantized (`stores_shared`).

    Keeps one file open at a time (groups are visited in order). A matrix is named by its member
    (a routed expert's index, or `SHARED`) and its name.
    """

    def __init__(self, checkpoint: "QuantizedWeights", stack: str, index: int):
        self.checkpoint, self.stack, self.index = checkpoint, stack, index
        self.spec, self.arch, self.group_size = checkpoint.spec, checkpoint.arch, checkpoint.group_size
        self.num_experts = self.arch.num_experts
        self.stores_shared = checkpoint.shared
        self._file: SafetensorsFile | None = None

    def _member_file(self, member: int | str) -> SafetensorsFile:
        name = (shared_file(self.stack, self.index) if member == SHARED
                else expert_file(self.stack, self.index, member // self.group_size))
        if self._file is None or self._file.path != self.checkpoint.directory / name:
            self.close()
            self._file = self.checkpoint.open_verified(name)
        return self._file

    def stored(self, j: int | str, name: str) -> dict[str, torch.Tensor]:
        """Matrix `name` of expert `j` (or `SHARED`) as stored, checked: `codes` [rows, cols]
        uint8 (at most the grid's largest code) and the grid tensors [rows, G] fp32 (finite)."""
        file = self._member_file(j)
        prefix = f"{member_prefix(j)}{name}."
        where = f"{file.path} {prefix[:-1]}"
        tensors = {}
        for key, (dtype, shape) in matrix_entries(self.arch, self.spec, j, name).items():
            entry, field = file.entries.get(key), key.removeprefix(prefix)
            if entry is None or entry.dtype != dtype or entry.shape != shape:
                found = "missing" if entry is None else f"{entry.dtype}{list(entry.shape)}"
                raise QmoeError(f"{where}: '{field}' is {found}, expected {dtype}{list(shape)}")
            tensors[field] = file.read(key)
        codes = tensors["codes"]
        if codes.numel() and int(codes.max()) > self.spec.maxq:
            raise QmoeError(f"{where}: code {int(codes.max())} is beyond the {self.spec.label} grid's largest, "
                            f"{self.spec.maxq}; the checkpoint is corrupt")
        if not all(bool(torch.isfinite(tensors[f]).all()) for f in self.spec.grid_fields):
            raise QmoeError(f"{where}: the grid holds a non-finite value; the checkpoint is corrupt")
        return tensors

    def encoded(self, j: int | str, name: str) -> tuple[torch.Tensor, Grid]:
        """Matrix `name` of expert `j` (or `SHARED`) as stored: codes [1, rows, cols] uint8 and
        grid [1, rows, G] fp32."""
        tensors = self.stored(j, name)
        return tensors["codes"][None], self.spec.grid_from_tensors(tensors)

    def matrix(self, j: int | str, name: str) -> torch.Tensor:
        """Dequantized weight `name` of expert `j` (or `SHARED`) -> [rows, cols] fp32."""
        codes, grid = self.encoded(j, name)
        return dequantize(codes, grid, self.spec)[0]

    def load(self, ids: Sequence[int], device: torch.device, dtype: torch.dtype) -> list[nn.Module]:
        return [self.arch.make_expert({m: GridLinear(self.matrix(j, m).to(device=device, dtype=dtype))
                                       for m in self.arch.expert.matrices}) for j in ids]

    def shared(self, device: torch.device, dtype: torch.dtype) -> dict[str, nn.Module]:
        """The shared expert's matrices dequantized, as `GridLinear`s (only if `stores_shared`)."""
        return {m: GridLinear(self.matrix(SHARED, m).to(device=device, dtype=dtype))
                for m in member_shape(self.arch, SHARED).matrices}

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class DenseTensorFiles:
    """Reading non-expert tensors (head, per-block files) of a compressed checkpoint, each file
    opened once; a checkpoint kind says how it opens (and checks) a file in `_open`."""

    _files: dict[str, SafetensorsFile]  # set in the subclass's __post_init__
    arch: Architecture
    directory: Path

    def _open(self, name: str) -> SafetensorsFile:
        raise NotImplementedError

    def experts(self, stack: str, index: int) -> ExpertBank:
        raise NotImplementedError

    def _file_of(self, name: str) -> SafetensorsFile:
        """The open file that holds tensor `name` if the checkpoint has it."""
        file_name = dense_file(self.arch, name)
        if file_name not in self._files:
            self._files[file_name] = self._open(file_name)
        return self._files[file_name]

    def stored_name(self, name: str) -> str:
        return resolve_name(self.arch, name, lambda n: n in self._file_of(n).entries, self.directory)

    def tensor(self, name: str, dtype: torch.dtype | None, device: torch.device) -> torch.Tensor:
        stored = self.stored_name(name)
        return self._file_of(stored).read(stored).to(dtype=dtype, device=device)

    def close(self) -> None:
        for file in self._files.values():
            file.close()
        self._files.clear()

    def dense_files(self) -> list[str]:
        """The files of the non-expert tensors: the head's, then every block's."""
        return [HEAD_FILE] + [block_file(stack, i) for stack in self.arch.stacks
                              for i in range(self.arch.num_blocks(stack))]

    def check_dense_layout(self, files: dict[str, dict[str, Any]]) -> None:
        """Every dense file is listed in `files` (the manifest's records) with its size, and holds
        exactly the tensors (names, shapes, a 16- or 32-bit floating dtype) the architecture needs,
        so a config edited to other shapes is refused before anything runs. Reads file headers only."""
        for name in self.dense_files():
            check_listed(self.directory, files, name)
        head = _header(self.directory / HEAD_FILE)
        _check_entries(self.directory / HEAD_FILE, head, {
            resolve_name(self.arch, name, head.__contains__, self.directory / HEAD_FILE): (None, shape)
            for name, shape in self.arch.head_tensors().items()})
        for stack in self.arch.stacks:
            for i in range(self.arch.num_blocks(stack)):
                path = self.directory / block_file(stack, i)
                _check_entries(path, _header(path), self._block_entries(stack, i))

    def _block_entries(self, stack: str, index: int) -> Expected:
        """A block's non-expert tensors (checkpoint naming), from the architecture (built around
        the checkpoint's bank, so no expert is a parameter)."""
        bank = self.experts(stack, index) if self.arch.is_sparse(stack, index) else None
        with torch.device("meta"):
            block = self.arch.block(stack, index, bank)
        prefix = self.arch.block_prefix(stack, index)
        return {prefix + name: (None, tuple(t.shape)) for name, t in block.state_dict().items()}


@dataclass
class QuantizedWeights(DenseTensorFiles):
    """`ModelWeights` over a quantized directory (finished, or partial for --resume).

    `files` is the manifest's record of every file (shared with a running compression, which adds
    to it); each file is verified against it once, before its first use. `manifest` is the checked
    manifest a finished checkpoint was opened with (None for a running compression's partial), so
    nothing reads the file again after the check.
    """

    directory: Path
    arch: Architecture
    spec: QuantSpec
    group_size: int  # experts per file under experts/
    files: dict[str, dict[str, Any]]
    shared: bool  # the sparse blocks' shared experts are stored quantized (`shared_file`)
    manifest: QuantizedManifest | None = None

    def __post_init__(self) -> None:
        self._files: dict[str, SafetensorsFile] = {}
        self._verified: set[str] = set()

    @classmethod
    def open(cls, directory: Path) -> "QuantizedWeights":
        """Open a finished quantized checkpoint after checking its manifest and the layout of
        every file (`check_layout`); QmoeError naming the file and the rule otherwise."""
        where = directory / "manifest.json"
        manifest = QuantizedManifest.from_json(read_manifest(directory), where)
        try:
            arch = architecture_from_config(manifest.config)
            weights = cls(directory, arch, manifest.spec, manifest.group_size, manifest.files,
                          stores_shared(arch, manifest.settings), manifest)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise QmoeError(f"{where}: malformed manifest ({type(exc).__name__}: {exc})") from None
        for name in weights.files:  # tokenizer files: read by other code, so checked now
            if not name.endswith(".safetensors"):
                weights.verify_file(name)
        weights.check_layout(weights.arch.sparse_blocks())
        return weights

    def verify_file(self, name: str) -> Path:
        """The path of file `name` after checking its size and sha256 (once per file)."""
        path = verify_file(self.directory, self.files, name, KIND)
        self._verified.add(name)
        return path

    def open_verified(self, name: str) -> SafetensorsFile:
        """The safetensors file `name`, opened after checking its checksum (the first time)."""
        path = self.directory / name if name in self._verified else self.verify_file(name)
        return SafetensorsFile(path)

    def check_layout(self, blocks: Sequence[tuple[str, int]]) -> None:
        """Every dense file and the expert files of sparse `blocks` are listed in the manifest with
        their size (and no other tensor file is: a config with fewer blocks or experts is no
        smaller model), and hold exactly the tensors (names, dtypes, shapes) the architecture
        needs. Reads file headers only."""
        expert_files = [expert_file(stack, i, g) for stack, i in blocks
                        for g in expert_groups(self.arch.num_experts, self.group_size)]
        expert_files += [shared_file(stack, i) for stack, i in blocks] if self.shared else []
        unexpected = sorted(set(n for n in self.files if n.endswith(".safetensors"))
                            - set(self.dense_files()) - set(expert_files))
        if unexpected:
            raise QmoeError(f"{self.directory / unexpected[0]}: listed in the manifest but no part of the model its "
                            "config describes; the checkpoint is corrupt")
        self.check_dense_layout(self.files)
        for name in expert_files:
            check_listed(self.directory, self.files, name)
        for stack, i in blocks:
            for g in expert_groups(self.arch.num_experts, self.group_size):
                path = self.directory / expert_file(stack, i, g)
                experts = range(g * self.group_size, min((g + 1) * self.group_size, self.arch.num_experts))
                _check_entries(path, _header(path), expert_entries(self.arch, self.spec, experts))
            if self.shared:
                path = self.directory / shared_file(stack, i)
                _check_entries(path, _header(path), shared_entries(self.arch, self.spec))

    def _open(self, name: str) -> SafetensorsFile:
        return self.open_verified(name)

    def experts(self, stack: str, index: int) -> QuantizedExperts:
        return QuantizedExperts(self, stack, index)

    def verify(self) -> None:
        """Check every file's checksum and every expert matrix's codes and grid (reads everything)."""
        for name in self.files:
            self.verify_file(name)
        for stack, i in self.arch.sparse_blocks():
            bank = self.experts(stack, i)
            for j in range(self.arch.num_experts):
                for name in self.arch.expert.matrices:
                    bank.stored(j, name)
            for name in member_shape(self.arch, SHARED).matrices if self.shared else ():
                bank.stored(SHARED, name)
            bank.close()


def check_listed(directory: Path, files: dict[str, dict[str, Any]], name: str) -> None:
    """File `name` is listed in the manifest's `files`, exists, and has the recorded size."""
    path = directory / name
    if name not in files:
        raise QmoeError(f"{path}: not listed in the manifest; the checkpoint is corrupt or incomplete")
    if not path.is_file():
        raise QmoeError(f"{path}: missing; the checkpoint is incomplete")
    if path.stat().st_size != files[name]["bytes"]:
        raise QmoeError(f"{path}: checksum mismatch ({path.stat().st_size} bytes, the manifest says "
                        f"{files[name]['bytes']}); the file is corrupt or truncated")


def _header(path: Path) -> dict[str, TensorEntry]:
    """The tensor entries of safetensors file `path` (its header only, validated)."""
    file = SafetensorsFile(path)
    file.close()
    return file.entries


def _check_entries(path: Path, entries: dict[str, TensorEntry], expected: Expected) -> None:
    """File `path` holds exactly the `expected` tensors; QmoeError naming the first difference."""
    missing, extra = sorted(expected.keys() - entries.keys()), sorted(entries.keys() - expected.keys())
    if missing or extra:
        what = f"lacks tensor '{missing[0]}'" if missing else f"holds an unexpected tensor '{extra[0]}'"
        raise QmoeError(f"{path}: {what}; the checkpoint does not match its manifest's config")
    for name, (dtype, shape) in expected.items():
        entry = entries[name]
        # fp8 needs block scales a compressed checkpoint does not keep: its dense tensors are 16/32-bit
        dense = entry.dtype.is_floating_point and entry.dtype.itemsize >= 2
        if entry.shape != shape or (entry.dtype != dtype if dtype else not dense):
            raise QmoeError(f"{path}: tensor '{name}' is {entry.dtype}{list(entry.shape)} but the manifest's config "
                            f"needs {dtype or 'a 16- or 32-bit floating dtype'}{list(shape)}")
