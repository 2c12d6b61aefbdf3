"""The CUDA decode-matmul kernel (top-level `kernels/`) as `torch.library` ops, with typed wrappers.

Ops, defined here so their fake (meta) implementations work without the compiled library:

    qmoe::decode_matmul(words, offsets, masks, lo, hi, x) -> y [tokens, rows] bf16, tokens <= 32
    qmoe::decode_dense(words, offsets, masks, lo, hi, cols) -> weights [rows, cols] bf16

The CUDA implementations come from `kernels/binding.cpp`, JIT-built by `torch.utils.cpp_extension`
for sm_80 and sm_90 (plus sm_90 PTX, so newer GPUs can JIT it) on first use and cached by the
sources' hash (`qmoe_cli.native_build`). Without nvcc or a CUDA build of torch, `kernel_library()` warns once and
returns None and callers keep the CPU reference (`qmoe_cli.codec.rows.decode_dense`).

The GPU reads the dictionary as `masks` [size, 2] int32 (`codebook_masks`): 8 bytes a codeword
instead of the 28-byte code table plus a length, so one aligned 8-byte load decodes a codeword.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import time
import warnings
from dataclasses import dataclass

import torch

from ..codec.dictionary import Codebook
from ..errors import QmoeError
from ..native_build import NativeBuild, load_native
from ..resources import shipped_dir

MAX_TOKENS = 32  # the fused kernel's limit: one lane writes each token's sum
# Batches above this decode to a bf16 scratch matrix and use torch.matmul (tensor cores). 32 is
# a placeholder at the fused kernel's limit, to be measured on a GPU with scripts/bench_kernel.py.
DENSE_TOKENS_THRESHOLD = 32
MAX_POSITIONS = 28  # bits of a codeword's masks: 14 pairs
ARCHS = ("80", "90")  # A100, H100/H200
PTX_ARCH = "90"  # also embedded as PTX, for GPUs newer than the listed archs
EXTENSION_NAME = "qmoe_kernels"

torch.library.define("qmoe::decode_matmul",
                     "(Tensor words, Tensor offsets, Tensor masks, Tensor lo, Tensor hi, Tensor x) -> Tensor")
torch.library.define("qmoe::decode_dense",
                     "(Tensor words, Tensor offsets, Tensor masks, Tensor lo, Tensor hi, int cols) -> Tensor")


@torch.library.register_fake("qmoe::decode_matmul")
def _decode_matmul_fake(words: torch.Tensor, offsets: torch.Tensor, masks: torch.Tensor, lo: torch.Tensor,
                        hi: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    torch._check(x.dim() == 2 and 1 <= x.shape[0] <= MAX_TOKENS, lambda: f"x must be [1..{MAX_TOKENS}, cols]")
    return x.new_empty(x.shape[0], offsets.shape[0] - 1)


@torch.library.register_fake("qmoe::decode_dense")
def _decode_dense_fake(words: torch.Tensor, offsets: torch.Tensor, masks: torch.Tensor, lo: torch.Tensor,
                       hi: torch.Tensor, cols: int) -> torch.Tensor:
    return words.new_empty(offsets.shape[0] - 1, cols, dtype=torch.bfloat16)


def codebook_masks(book: Codebook) -> torch.Tensor:
    """A codebook as the kernel's table: `book.masks` [size, 2] int32 (CPU; format in its
    docstring). ValueError when a codeword is longer than 14 pairs (28 positions)."""
    if book.masks is None:
        raise ValueError(f"the GPU kernel decodes codewords of up to {MAX_POSITIONS // 2} pairs, this dictionary "
                         f"has {int(book.lengths.max())}; pack with --max-pairs 14 or less")
    return book.masks


def decode_dense_reference(words: torch.Tensor, offsets: torch.Tensor, masks: torch.Tensor, lo: torch.Tensor,
                           hi: torch.Tensor, cols: int) -> torch.Tensor:
    """What the kernels compute, in plain torch on any device: weights [rows, cols] fp32.

    words [total] int16, offsets [rows + 1] int32, masks [size, 2] int32, lo/hi [rows, 1] fp32.
    Each codeword starts where the previous one of its row ended; positions past `cols` (the
    padding of an odd width) are dropped.
    """
    rows, device = offsets.numel() - 1, words.device
    m = masks.long()[words.long() & 0xFFFF] & 0xFFFFFFFF  # [total, 2]
    width = 2 * (m[:, 0] >> MAX_POSITIONS)  # [total]
    ends = torch.cat([torch.zeros(1, dtype=torch.long, device=device), width.cumsum(0)])
    row_of = torch.repeat_interleave(torch.arange(rows, device=device), (offsets[1:] - offsets[:-1]).long())
    first = ends[:-1] - ends[offsets[:-1].long()][row_of]  # [total] first column within the row
    positions = torch.arange(MAX_POSITIONS, device=device)
    col = first[:, None] + positions  # [total, 28]
    is_lo = (m[:, :1] >> positions) & 1
    is_hi = (m[:, 1:] >> positions) & 1
    keep = (positions[None, :] < width[:, None]) & (col < cols)
    value = torch.where(is_lo.bool(), lo[row_of], torch.where(is_hi.bool(), hi[row_of], 0.0))  # [total, 28]
    out = torch.zeros(rows, cols, dtype=torch.float32, device=device)
    out[row_of[:, None].expand_as(col)[keep], col[keep]] = value[keep].float()
    return out


@dataclass(frozen=True)
class KernelBuild:
    """How the kernel library was built: for `qmoe build-kernels` and bug reports."""

    library: str  # path of the loaded shared library
    nvcc: str  # e.g. "13.0, V13.0.48"
    archs: tuple[str, ...]  # SASS targets, e.g. ("80", "90")
    ptx: str  # PTX target
    seconds: float  # time to build (or find in the cache) and load


def nvcc_flags() -> list[str]:
    """Explicit -gencode flags: with them torch does not guess archs from a GPU (there may be none)."""
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    return flags + [f"-gencode=arch=compute_{PTX_ARCH},code=compute_{PTX_ARCH}", "-O3", "-lineinfo"]


def _nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    found = re.search(r"release ([\d.]+), (V[\d.]+)", out)
    return f"{found.group(1)}, {found.group(2)}" if found else out.strip().splitlines()[-1]


def _find_nvcc() -> str:
    """nvcc's path, or QmoeError naming what is missing."""
    if not torch.version.cuda:
        raise QmoeError(f"the CUDA kernels need a CUDA build of torch; this torch {torch.__version__} is CPU-only "
                        "(install a CUDA wheel of torch)")
    from torch.utils.cpp_extension import CUDA_HOME

    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else shutil.which("nvcc")
    if not nvcc or not os.path.exists(nvcc):
        raise QmoeError("the CUDA kernels need nvcc, found none (install the CUDA toolkit and set CUDA_HOME, "
                        "e.g. CUDA_HOME=/usr/local/cuda)")
    return nvcc


def kernels_build() -> NativeBuild:
    csrc = shipped_dir("native")
    return NativeBuild(name=EXTENSION_NAME, sources=(csrc / "binding.cpp", csrc / "decode_matmul.cu"),
                       what="the CUDA kernels", usual="a few minutes", headers=(csrc / "decode_matmul.h",),
                       extra_cflags=("-O3",), extra_cuda_cflags=tuple(nvcc_flags()), is_python_module=False,
                       include_dirs=(csrc,))


def build_kernels(verbose: bool = False) -> KernelBuild:
    """Compile (or load from the extension cache, `native_build`) and register the CUDA ops.

    QmoeError when nvcc or a CUDA build of torch is missing, the compiler fails, or another
    process's build of the same sources takes too long. Needs no GPU.
    """
    nvcc = _find_nvcc()
    start = time.perf_counter()
    try:
        library, _ = load_native(kernels_build(), verbose)
    except (OSError, RuntimeError, subprocess.CalledProcessError) as exc:
        lines = str(exc).strip().splitlines()
        raise QmoeError(f"building the CUDA kernels failed: {lines[0] if lines else type(exc).__name__} "
                        "(run `qmoe build-kernels --verbose` for the compiler output)") from exc
    return KernelBuild(str(library), _nvcc_version(nvcc), ARCHS, PTX_ARCH, time.perf_counter() - start)


@functools.cache
def kernel_library() -> KernelBuild | None:
    """The built kernels, or None (after one warning) when they cannot be built here."""
    try:
        return build_kernels()
    except QmoeError as exc:
        warnings.warn(f"qmoe: {exc}; using the CPU reference decode", RuntimeWarning, stacklevel=2)
        return None


def _check_one_grid(lo: torch.Tensor) -> None:
    if lo.dim() != 2 or lo.shape[1] != 1:
        raise ValueError(f"the GPU kernels take one grid per row, lo/hi [rows, 1]; got {list(lo.shape)} "
                         "(grouped grids run on the CPU reference path)")


def decode_matmul(words: torch.Tensor, offsets: torch.Tensor, masks: torch.Tensor, lo: torch.Tensor,
                  hi: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """y = x @ W.T for the dictionary-coded ternary W, on the GPU: y [tokens, rows] bf16.

    words [total] int16, offsets [rows + 1] int32 (a packed matrix), masks [size, 2] int32
    (`codebook_masks`), lo/hi [rows, 1] fp32, x [tokens, cols] bf16; all on one CUDA device
    (call `kernel_library()` first). Up to DENSE_TOKENS_THRESHOLD tokens one fused launch that
    never materializes W; beyond, W is decoded to a bf16 scratch matrix and torch.matmul runs.
    """
    _check_one_grid(lo)
    if x.dim() != 2 or x.shape[0] < 1:
        raise ValueError(f"x must be [tokens >= 1, cols], got {list(x.shape)}")
    if x.shape[0] <= min(DENSE_TOKENS_THRESHOLD, MAX_TOKENS):
        return torch.ops.qmoe.decode_matmul(words, offsets, masks, lo, hi, x)
    return x @ decode_dense(words, offsets, masks, lo, hi, x.shape[1]).T


def decode_dense(words: torch.Tensor, offsets: torch.Tensor, masks: torch.Tensor, lo: torch.Tensor,
                 hi: torch.Tensor, cols: int) -> torch.Tensor:
    """The decoded weights [rows, cols] bf16, on the GPU (arguments as `decode_matmul`)."""
    _check_one_grid(lo)
    return torch.ops.qmoe.decode_dense(words, offsets, masks, lo, hi, cols)
