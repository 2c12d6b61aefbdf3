"""The packed checkpoint: entropy-coded ternary experts (or bit-packed b-bit ones), read safely.

Layout of a packed directory (safetensors + JSON, never pickle):

    manifest.json               kind "packed", format version, source, settings of the
                                quantization, codec, per-layer statistics, `files`: size and
                                sha256 of every other file, `manifest_sha256`: of the rest of
                                the manifest itself (canonical JSON)
    tokenizer.json ...          copied from the quantized checkpoint
    head.safetensors, blocks/   copied byte for byte from the quantized checkpoint
    dictionary.safetensors      ternary only: `symbols` [size, max_len] uint8, `lengths` [size] uint8
    experts/{stack}-{i:03d}/group-{k:05d}.safetensors   per expert j and matrix m in wi, wo:
        ternary: `expert_{j}.{m}.words` [total] int16 (uint16 codeword indices, rows one after
                 another; no offsets: each row decodes to exactly its width, so the loader
                 rebuilds them from the codeword lengths), `.lo` / `.hi` [rows, groups] bf16
                 (the quantizer's ternary grids are bf16-representable; fp32 only for a
                 checkpoint quantized before they were)
        b-bit:   `expert_{j}.{m}.packed` [rows, ceil(cols * b / 8)] uint8,
                 `.scale` / `.zero` [rows, groups] fp32
    experts/{stack}-{i:03d}/shared.safetensors   the block's shared expert where the quantized
        checkpoint stores it quantized (`settings.shared_experts`): `shared.{m}.*` as above,
        coded with the same dictionary

Per row of a 768-wide ternary matrix that is 32 bits of grid (0.04 bits/weight) where version 1
spent 96 (int32 offset, fp32 grids). In memory a `DictionaryMatrix` is as before: int32 offsets,
fp32 grids (what the CPU codec and the GPU kernels read).

Safety: every file is checked against its size and sha256 before use (a flipped or truncated
byte is an error, never a wrong model), and every matrix is validated before any decoder sees
it: dtypes and shapes against the architecture, codewords inside the dictionary, and the
offsets rebuilt from the codeword lengths only if every row ends exactly on a codeword
boundary (a vectorized cumsum; `codec.rows.row_offsets`). So neither the C++ decoder nor a GPU
kernel can be handed a matrix that makes it read or write out of bounds.
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from ..arch import Architecture, ExpertShape, RoutedExperts, architecture_from_config
from ..codec.bitpack import row_bytes, unpack_bits
from ..codec.cpu_matmul import BITS_MAX_TOKENS, bitpacked_matmul, ternary_grids, ternary_layout, ternary_unpack
from ..codec.cpu_matmul import ternary_matmul as cpu_ternary_matmul
from ..codec.dictionary import Codebook
from ..codec.rows import decode_dense, row_offsets, row_widths
from ..errors import QmoeError
from ..execute.device import cuda_device
from ..execute.grouped import DeviceExperts, DeviceSharedExpert
from ..execute.linear import PackedLinear
from ..kernels import codebook_masks, kernel_library
from ..quant.grids import QuantSpec, dequantize
from .integrity import verify_file
from .packed_manifest import KIND, PackedManifest
from .quantized import (
    SHARED,
    DenseTensorFiles,
    expert_file,
    member_prefix,
    member_shape,
    read_manifest,
    shared_file,
    stores_shared,
)
from .safetensors_io import SafetensorsFile

GRID_DTYPES = (torch.bfloat16, torch.float32)  # stored ternary grids: bf16, fp32 from old quantizers
DICTIONARY_FILE = "dictionary.safetensors"


class DictionaryMatrix:
    """One entropy-coded ternary matrix [rows, cols], validated at construction.

    Its first CPU product replaces the codewords (~0.7 bits a weight) by the matrix's lookup
    layout (2 bits a weight, `codec.cpu_matmul.ternary_layout`), which every later product reads
    and `dense` decodes: held on the CPU, a matrix is the one or the other, never both. The GPU
    paths take fresh matrices from the checkpoint (`PackedExperts.matrices`), never a used one.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], book: Codebook, rows: int, cols: int, spec: QuantSpec,
                 where: str):
        self.words, self.offsets = tensors["words"], tensors["offsets"]  # [total] int16, [rows + 1] int32
        self.lo, self.hi = tensors["lo"], tensors["hi"]  # [rows, groups] fp32
        self.book, self.rows, self.cols = book, rows, cols
        self.group_cols = spec.group_size or cols
        self._grids: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}  # sparse_matmul's, per x dtype
        self._layout: torch.Tensor | None = None  # sparse_matmul's lookup layout, built on its first call
        groups = spec.n_groups(cols)
        _expect(where, "words", self.words, torch.int16, None)
        _expect(where, "offsets", self.offsets, torch.int32, (rows + 1,))
        _expect(where, "lo", self.lo, torch.float32, (rows, groups))
        _expect(where, "hi", self.hi, torch.float32, (rows, groups))
        offsets = self.offsets.long()
        if int(offsets[0]) != 0 or int(offsets[-1]) != self.words.numel() or bool((offsets.diff() < 0).any()):
            raise QmoeError(f"{where}: row offsets must rise from 0 to the {self.words.numel()} codewords")
        if self.words.numel() and int((self.words.long() & 0xFFFF).max()) >= book.size:
            raise QmoeError(f"{where}: a codeword is beyond the dictionary's {book.size}")
        widths = row_widths(self.words, self.offsets, book)
        bad = torch.nonzero(widths != cols + cols % 2)
        if bad.numel():
            r = int(bad[0])
            raise QmoeError(f"{where}: row {r} decodes to {int(widths[r])} weights, not its width {cols}")
        if not (bool(torch.isfinite(self.lo).all()) and bool(torch.isfinite(self.hi).all())):
            raise QmoeError(f"{where}: the ternary grid holds a non-finite value")

    def dense(self, begin: int, end: int) -> torch.Tensor:
        """Rows [begin, end) -> [end - begin, cols] fp32."""
        if self._layout is not None:
            return ternary_unpack(self._layout, self.lo, self.hi, self.cols, (begin, end))
        return decode_dense(self.words, self.offsets, self.book, self.lo, self.hi, self.group_cols, self.cols,
                            (begin, end))

    def sparse_matmul(self, x: torch.Tensor) -> torch.Tensor | None:
        """x [n, cols] @ Wᵀ -> [n, rows] in x's dtype, never dense: from the matrix's lookup layout
        (2 bits a weight, `codec.cpu_matmul.ternary_layout`), built from the codewords on the first
        call and kept, the grid rounded to x's dtype and the sums in fp32 (`round_once_linear`'s
        numerics), at any token count: it beats decoding to fp32 plus BLAS at all of them
        (docs/cpu.md). Memory: the layout, rows x cols / 4 bytes, instead of the codewords. None where
        unsupported (grids per column group, codewords too long for `book.masks`, or no native
        CPU decode-matmul)."""
        if self.lo.shape[1] != 1 or self.book.masks is None:
            return None
        if self._layout is None:
            layout = ternary_layout(self.words, self.offsets, self.book.masks, self.cols)
            if layout is None:
                return None
            self._layout, self.words, self.offsets = layout, None, None  # the layout is the matrix now
        grids = self._grids.get(x.dtype)
        if grids is None:  # rounded once per dtype, not on every product
            grids = self._grids[x.dtype] = ternary_grids(self.lo, self.hi, x.dtype)
        return cpu_ternary_matmul(self._layout, *grids, x)


class BitpackedMatrix:
    """One b-bit matrix [rows, cols] stored as dense bit-packed codes plus its integer grids."""

    def __init__(self, tensors: dict[str, torch.Tensor], rows: int, cols: int, spec: QuantSpec, where: str):
        self.packed, self.spec, self.rows, self.cols = tensors["packed"], spec, rows, cols
        self.grid_tensors = {"scale": tensors["scale"], "zero": tensors["zero"]}  # [rows, groups] fp32
        bits, groups = int(spec.bits), spec.n_groups(cols)
        _expect(where, "packed", self.packed, torch.uint8, (rows, row_bytes(cols, bits)))
        for name, value in self.grid_tensors.items():
            _expect(where, name, value, torch.float32, (rows, groups))
            if not bool(torch.isfinite(value).all()):
                raise QmoeError(f"{where}: the {name} grid holds a non-finite value")

    def dense(self, begin: int, end: int) -> torch.Tensor:
        codes = unpack_bits(self.packed[begin:end], int(self.spec.bits), self.cols)
        grid = self.spec.grid_from_tensors({k: v[begin:end] for k, v in self.grid_tensors.items()})
        return dequantize(codes[None], grid, self.spec)[0]

    def sparse_matmul(self, x: torch.Tensor) -> torch.Tensor | None:
        """x [n, cols] @ Wᵀ -> [n, rows] in x's dtype from the packed codes (`round_once_linear`'s
        numerics); None without the native CPU kernels or past BITS_MAX_TOKENS tokens, where
        decoding to fp32 plus BLAS is faster."""
        if x.shape[0] > BITS_MAX_TOKENS:
            return None
        return bitpacked_matmul(self.packed, self.grid_tensors["scale"], self.grid_tensors["zero"], x,
                                int(self.spec.bits), self.spec.group_size or self.cols)


def _expect(where: str, name: str, tensor: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...] | None) -> None:
    if (tensor.dtype != dtype or (shape is None and tensor.dim() != 1)
            or (shape is not None and tuple(tensor.shape) != shape)):
        wanted = f"{dtype}{list(shape) if shape else '[n]'}"
        raise QmoeError(f"{where}: '{name}' is {tensor.dtype}{list(tensor.shape)}, expected {wanted}")


class PackedExperts:
    """The experts of one sparse block of a packed checkpoint; one group file read at a time,
    verified against the manifest before use. Its shared expert too where the checkpoint
    stores it (`stores_shared`)."""

    def __init__(self, checkpoint: "PackedWeights", stack: str, index: int):
        self.checkpoint, self.stack, self.index = checkpoint, stack, index
        self.num_experts = checkpoint.arch.num_experts
        self.stores_shared = checkpoint.shared
        self._device: DeviceExperts | None = None
        self._shared_device: DeviceSharedExpert | None = None

    def shared(self, device: torch.device, dtype: torch.dtype) -> dict[str, nn.Module]:
        """The shared expert's matrices as `PackedLinear`s (only if `stores_shared`): their codes
        stay on the CPU, which decodes them on every call (on a GPU, `shared_on_device` runs it
        compressed there instead)."""
        return {m: PackedLinear(matrix) for m, matrix in self.shared_matrices().items()}

    def shared_matrices(self) -> dict[str, DictionaryMatrix | BitpackedMatrix]:
        """{matrix name: validated matrix} of the shared expert (only if `stores_shared`)."""
        file = self.checkpoint.open_verified(shared_file(self.stack, self.index))
        try:
            return {m: self._matrix(file, SHARED, m) for m in member_shape(self.checkpoint.arch, SHARED).matrices}
        finally:
            file.close()

    def shared_on_device(self, device: torch.device, dtype: torch.dtype) -> nn.Module | None:
        """The shared expert (only if `stores_shared`) resident and compressed on a CUDA device,
        as one module run by the grouped kernels (`DeviceSharedExpert`); uploaded on first use,
        kept while this bank lives, like `routed`. None (after one warning saying why) where the
        kernels cannot run it: then `shared`, on the CPU."""
        device = cuda_device(device)
        if device is None:
            return None
        if self._shared_device is None or self._shared_device.experts.device != device:
            self._shared_device = None  # one copy at a time
            shape = self.checkpoint.arch.shared_expert
            if not self._kernels_run(shape, "packed shared experts"):
                return None
            self._shared_device = DeviceSharedExpert(DeviceExperts.upload(
                shape, self.checkpoint.spec, [(SHARED, self.shared_matrices())], self.checkpoint.device_masks(device),
                device))
        return self._shared_device

    def load(self, ids: Sequence[int], device: torch.device, dtype: torch.dtype) -> list[nn.Module]:
        """Experts `ids` as modules decoding on the fly (compressed tensors stay on the CPU)."""
        make = self.checkpoint.arch.make_expert
        experts = {j: make({m: PackedLinear(matrix) for m, matrix in parts.items()}) for j, parts in self.matrices(ids)}
        return [experts[j] for j in ids]

    def matrices(self, ids: Sequence[int]) -> Iterator[tuple[int, dict[str, DictionaryMatrix | BitpackedMatrix]]]:
        """(j, {matrix name: validated matrix}) for experts `ids`, one group file open at a time."""
        for group in sorted({j // self.checkpoint.group_size for j in ids}):
            file = self.checkpoint.open_verified(expert_file(self.stack, self.index, group))
            try:
                for j in ids:
                    if j // self.checkpoint.group_size == group:
                        yield j, {m: self._matrix(file, j, m) for m in self.checkpoint.arch.expert.matrices}
            finally:
                file.close()

    def routed(self, device: torch.device, dtype: torch.dtype) -> RoutedExperts | None:
        """All experts of the block resident and compressed on a CUDA device, run by the grouped
        kernels (`DeviceExperts`); uploaded on first use, kept while this bank lives. None (after
        one warning saying why) where the kernels cannot run them: then `load`, on the CPU."""
        device = cuda_device(device)
        if device is None:
            return None
        if self._device is None or self._device.device != device:
            self._device = None  # one block's copy at a time
            shape = self.checkpoint.arch.expert
            if not self._kernels_run(shape, "packed experts"):
                return None
            self._device = DeviceExperts.upload(shape, self.checkpoint.spec, self.matrices(range(self.num_experts)),
                                                self.checkpoint.device_masks(device), device)
        return self._device

    def _kernels_run(self, shape: ExpertShape, what: str) -> bool:
        """Whether the grouped kernels can run experts of `shape` of this checkpoint (else one
        warning saying why `what` decode on the CPU)."""
        reason = self._device_unsupported(shape)
        if reason is not None:
            warnings.warn(f"qmoe: {reason}; {what} decode on the CPU", RuntimeWarning, stacklevel=3)
            return False
        return kernel_library() is not None  # else it warns once with the build's reason

    def _device_unsupported(self, shape: ExpertShape) -> str | None:
        arch, spec, book = self.checkpoint.arch, self.checkpoint.spec, self.checkpoint.codebook
        if shape.chain_activation is None:
            return f"the GPU kernels run ReLU and SwiGLU experts, not {arch.family}'s"
        if spec.dictionary_coded and spec.group_size is not None:
            return "the GPU kernels take one ternary grid per row, this checkpoint has one per " \
                   f"{spec.group_size} columns"
        if book is not None and book.masks is None:
            return f"the GPU kernels decode codewords of up to 14 pairs, this dictionary has {int(book.lengths.max())}"
        return None

    def _matrix(self, file: SafetensorsFile, j: int | str, name: str) -> DictionaryMatrix | BitpackedMatrix:
        """Matrix `name` of expert `j` (or `SHARED`) of open file `file`, validated."""
        spec = self.checkpoint.spec
        rows, cols = member_shape(self.checkpoint.arch, j).shapes[name]
        fields = spec.packed_fields
        prefix = f"{member_prefix(j)}{name}."
        where = f"{file.path} {prefix[:-1]}"
        missing = [f for f in fields if prefix + f not in file.entries]
        if missing:
            raise QmoeError(f"{where}: missing {', '.join(missing)}; the checkpoint is corrupt")
        tensors = {f: file.read(prefix + f) for f in fields}
        if not spec.dictionary_coded:
            return BitpackedMatrix(tensors, rows, cols, spec, where)
        return DictionaryMatrix(_stored_ternary(tensors, self.checkpoint.codebook, rows, cols, where),
                                self.checkpoint.codebook, rows, cols, spec, where)


def _stored_ternary(tensors: dict[str, torch.Tensor], book: Codebook, rows: int, cols: int,
                    where: str) -> dict[str, torch.Tensor]:
    """A stored ternary matrix (words, bf16/fp32 grids) -> `DictionaryMatrix` tensors: offsets
    [rows + 1] int32 rebuilt (and thereby bounds-checked) from the codewords, grids fp32."""
    words = tensors["words"]
    _expect(where, "words", words, torch.int16, None)
    if words.numel() and int((words.long() & 0xFFFF).max()) >= book.size:
        raise QmoeError(f"{where}: a codeword is beyond the dictionary's {book.size}")
    try:
        offsets = row_offsets(words, book, rows, cols)
    except ValueError as exc:
        raise QmoeError(f"{where}: {exc}") from None
    grids = {}
    for name in ("lo", "hi"):
        if tensors[name].dtype not in GRID_DTYPES:
            raise QmoeError(f"{where}: '{name}' is {tensors[name].dtype}, expected torch.bfloat16 (or torch.float32)")
        grids[name] = tensors[name].float()
    return {"words": words, "offsets": offsets, **grids}


@dataclass
class PackedWeights(DenseTensorFiles):
    """`ModelWeights` over a packed directory."""

    directory: Path
    manifest: PackedManifest
    arch: Architecture
    spec: QuantSpec
    group_size: int
    shared: bool  # the sparse blocks' shared experts are stored packed (`shared_file`)

    def __post_init__(self) -> None:
        self._files: dict[str, SafetensorsFile] = {}
        for name in self.manifest.files:  # tokenizer files: read by other code, so checked now
            if not name.endswith(".safetensors"):
                self.verify_file(name)
        self.check_dense_layout(self.manifest.files)
        self.codebook = self._read_codebook() if self.spec.dictionary_coded else None
        self._masks: dict[torch.device, torch.Tensor] = {}

    def device_masks(self, device: torch.device) -> torch.Tensor:
        """The dictionary as the kernels read it (`codebook_masks`, [size, 2] int32), one copy per
        device shared by every block; an empty [0, 2] for b-bit checkpoints."""
        if device not in self._masks:
            masks = torch.zeros(0, 2, dtype=torch.int32) if self.codebook is None else codebook_masks(self.codebook)
            self._masks[device] = masks.to(device)
        return self._masks[device]

    @classmethod
    def open(cls, directory: Path) -> "PackedWeights":
        where = directory / "manifest.json"
        manifest = PackedManifest.from_json(read_manifest(directory), where)
        try:
            arch = architecture_from_config(manifest.config)
            return cls(directory, manifest, arch, manifest.spec, manifest.group_size,
                       stores_shared(arch, manifest.settings))
        except (KeyError, TypeError, ValueError) as exc:
            raise QmoeError(f"{where}: malformed manifest ({exc})") from None

    def open_verified(self, name: str) -> SafetensorsFile:
        """The safetensors file `name`, opened after `verify_file`."""
        return SafetensorsFile(self.verify_file(name))

    def verify_file(self, name: str) -> Path:
        """The path of file `name` after checking its size and sha256 against the manifest."""
        return verify_file(self.directory, self.manifest.files, name, KIND)

    def _read_codebook(self) -> Codebook:
        file = self.open_verified(DICTIONARY_FILE)
        try:
            return Codebook(file.read("symbols"), file.read("lengths"))
        except (KeyError, ValueError) as exc:
            raise QmoeError(f"{file.path}: invalid dictionary ({exc})") from None
        finally:
            file.close()

    def _open(self, name: str) -> SafetensorsFile:
        return self.open_verified(name)

    def experts(self, stack: str, index: int) -> PackedExperts:
        return PackedExperts(self, stack, index)

    def verify(self) -> None:
        """Check every file's checksum and validate every expert matrix (reads everything)."""
        with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:  # sha256 releases the GIL
            list(pool.map(self.verify_file, self.manifest.files))
        for stack, i in self.arch.sparse_blocks():
            bank = self.experts(stack, i)
            bank.load(range(self.arch.num_experts), torch.device("cpu"), torch.float32)
            if bank.stores_shared:
                bank.shared(torch.device("cpu"), torch.float32)
