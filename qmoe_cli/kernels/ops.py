"""The CUDA kernels (top-level `kernels/`) as `torch.library` ops, with typed wrappers.

Ops, defined here (on first use, `define_ops`) so their fake (meta) implementations work without the
compiled library (shapes and layouts in `kernels/decode_matmul.h`; x and the outputs are fp32, bf16 or fp16):

    qmoe::ternary_tiles(words, bases?, offsets, masks, lo, hi, x, x_transposed, tiles?, order?,
                        relu, out_transposed) -> y      dictionary-coded ternary experts
    qmoe::bitpacked_tiles(packed, scale, zero, bits, group_cols, x, x_transposed, tiles?, order?,
                          relu, out_transposed) -> y    bit-packed b-bit experts
    qmoe::ternary_dense(words, bases?, offsets, masks, lo, hi, expert, cols, dtype) -> [rows, cols]
    qmoe::bitpacked_dense(packed, scale, zero, bits, group_cols, cols, expert, dtype) -> [rows, cols]
    qmoe::route_plan(index, num_experts) -> (order [n] int32, tiles [n, 3] int32)
    qmoe::gather_transpose(x [N, cols], order [n]) -> xt [cols, n]

A *tile* is up to 32 tokens of one expert; the tile ops compute every row of the expert's matrix
for those tokens in one launch over all tiles, so a sparse block costs one launch per expert
matrix however many experts are active, and an expert without tokens costs nothing.

The CUDA implementations come from `kernels/binding.cpp`, JIT-built by `torch.utils.cpp_extension`
for sm_80 and sm_90 (plus sm_90 PTX, so newer GPUs can JIT it) on first use and cached by the
sources' hash (`qmoe_cli.native_build`). Without nvcc or a CUDA build of torch, `kernel_library()`
warns once and returns None and callers keep the CPU path (`qmoe_cli.execute.linear.PackedLinear`).

The GPU reads the dictionary as `masks` [size, 2] int32 (`codebook_masks`): 8 bytes a codeword
instead of the 28-byte code table plus a length, so one aligned 8-byte load decodes a codeword.

Numerics, on every path (kernels, `round_once_linear`, the CPU decoders): weights are the grid
values rounded to the activation dtype, products are summed in fp32, the output is rounded once.
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
import torch.nn.functional as F

from ..codec.dictionary import Codebook
from ..errors import QmoeError
from ..native_build import NativeBuild, load_native
from ..resources import shipped_dir

TILE_TOKENS = 32  # tokens per tile: one warp lane per token at most
MAX_PLAN_TOKENS = 1024  # route_plan sorts in one block of one thread per token
# An expert with more tokens than this is decoded to a scratch matrix and multiplied with tensor
# cores; up to it, the fused tiles. 32 (one tile) is where the per-shape benchmark's estimate
# puts the crossover; set it from scripts/bench_kernel.py's crossover column on each GPU generation.
DENSE_TOKENS_THRESHOLD = 32
MAX_POSITIONS = 28  # bits of a codeword's masks: 14 pairs
ARCHS = ("80", "90")  # A100, H100/H200
PTX_ARCH = "90"  # also embedded as PTX, for GPUs newer than the listed archs
EXTENSION_NAME = "qmoe_kernels"
FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _tiles_out(x: torch.Tensor, x_transposed: bool, rows: int, out_transposed: bool) -> torch.Tensor:
    n = x.shape[1] if x_transposed else x.shape[0]
    return x.new_empty(rows, n) if out_transposed else x.new_empty(n, rows)


def _ternary_tiles_fake(words, bases, offsets, masks, lo, hi, x, x_transposed, tiles, order, relu, out_transposed):
    return _tiles_out(x, x_transposed, offsets.shape[1] - 1, out_transposed)


def _bitpacked_tiles_fake(packed, scale, zero, bits, group_cols, x, x_transposed, tiles, order, relu, out_transposed):
    return _tiles_out(x, x_transposed, packed.shape[1], out_transposed)


def _ternary_dense_fake(words, bases, offsets, masks, lo, hi, expert, cols, dtype):
    return words.new_empty(offsets.shape[1] - 1, cols, dtype=dtype)


def _bitpacked_dense_fake(packed, scale, zero, bits, group_cols, cols, expert, dtype):
    return packed.new_empty(packed.shape[1], cols, dtype=dtype)


def _route_plan_fake(index, num_experts):
    n = index.shape[0]
    return index.new_empty(n, dtype=torch.int32), index.new_empty(n, 3, dtype=torch.int32)


def _gather_transpose_fake(x, order):
    return x.new_empty(x.shape[1], order.shape[0])


@functools.cache
def define_ops() -> None:
    """Define the qmoe ops and their fake (meta) implementations, once per process.

    Called on first use (every wrapper below, and before the CUDA library loads), never at
    import: importing qmoe on a CPU-only machine leaves torch's op registry untouched.
    """
    torch.library.define("qmoe::ternary_tiles",
                         "(Tensor words, Tensor? bases, Tensor offsets, Tensor masks, Tensor lo, Tensor hi, Tensor x, "
                         "bool x_transposed, Tensor? tiles, Tensor? order, bool relu, bool out_transposed) -> Tensor")
    torch.library.define("qmoe::bitpacked_tiles",
                         "(Tensor packed, Tensor scale, Tensor zero, int bits, int group_cols, Tensor x, "
                         "bool x_transposed, Tensor? tiles, Tensor? order, bool relu, bool out_transposed) -> Tensor")
    torch.library.define("qmoe::ternary_dense",
                         "(Tensor words, Tensor? bases, Tensor offsets, Tensor masks, Tensor lo, Tensor hi, int expert, "
                         "int cols, ScalarType dtype) -> Tensor")
    torch.library.define("qmoe::bitpacked_dense",
                         "(Tensor packed, Tensor scale, Tensor zero, int bits, int group_cols, int cols, int expert, "
                         "ScalarType dtype) -> Tensor")
    torch.library.define("qmoe::route_plan", "(Tensor index, int num_experts) -> (Tensor, Tensor)")
    torch.library.define("qmoe::gather_transpose", "(Tensor x, Tensor order) -> Tensor")
    torch.library.register_fake("qmoe::ternary_tiles", _ternary_tiles_fake)
    torch.library.register_fake("qmoe::bitpacked_tiles", _bitpacked_tiles_fake)
    torch.library.register_fake("qmoe::ternary_dense", _ternary_dense_fake)
    torch.library.register_fake("qmoe::bitpacked_dense", _bitpacked_dense_fake)
    torch.library.register_fake("qmoe::route_plan", _route_plan_fake)
    torch.library.register_fake("qmoe::gather_transpose", _gather_transpose_fake)


def codebook_masks(book: Codebook) -> torch.Tensor:
    """A codebook as the kernel's table: `book.masks` [size, 2] int32 (CPU; format in its
    docstring). ValueError when a codeword is longer than 14 pairs (28 positions)."""
    if book.masks is None:
        raise ValueError(f"the GPU kernel decodes codewords of up to {MAX_POSITIONS // 2} pairs, this dictionary "
                         f"has {int(book.lengths.max())}; pack with --max-pairs 14 or less")
    return book.masks


def decode_dense_reference(words: torch.Tensor, offsets: torch.Tensor, masks: torch.Tensor, lo: torch.Tensor,
                           hi: torch.Tensor, cols: int) -> torch.Tensor:
    """What the kernels decode, in plain torch on any device: weights [rows, cols] fp32.

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
        define_ops()  # the library registers CUDA implementations of these schemas
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


def round_once_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [n, in] @ w.T for w [out, in] in x's dtype (the grid values rounded to it): products
    summed in fp32, the result [n, out] rounded once to x's dtype.

    The one dense matmul of compressed experts, so the quantized checkpoint, the packed one on the
    CPU and the packed one on a GPU (its kernels, and its tensor-core path for many tokens) all
    compute the same function. A plain bf16 `F.linear` on CUDA does not: cuBLAS may split the
    sum and reduce the parts in bf16 (`allow_bf16_reduced_precision_reduction`), differently for
    every problem shape, so two shapes of the same product round differently.
    """
    if x.dtype == torch.float32:
        return F.linear(x, w)
    if x.is_cuda:
        return torch.mm(x, w.T, out_dtype=torch.float32).to(x.dtype)
    return F.linear(x.float(), w.float()).to(x.dtype)


def _check_x(x: torch.Tensor) -> None:
    if x.dim() != 2 or x.dtype not in FLOATS:
        raise ValueError(f"x must be [tokens, cols] fp32, bf16 or fp16, got {x.dtype}{list(x.shape)}")


def ternary_tiles(words: torch.Tensor, bases: torch.Tensor | None, offsets: torch.Tensor, masks: torch.Tensor,
                  lo: torch.Tensor, hi: torch.Tensor, x: torch.Tensor, tiles: torch.Tensor | None,
                  order: torch.Tensor | None, relu: bool, out_transposed: bool) -> torch.Tensor:
    """Dictionary-coded ternary experts on the tiles of x, in one launch.

    words [total] int16 (all experts' codewords; expert e's start at bases[e], [E] int64, or 0
    when bases is None and E = 1), offsets [E, rows + 1] int32, masks [size, 2] int32, lo/hi
    [E, rows] fp32; x [cols, n] (one column per token position); tiles [T, 3] int32 (expert,
    first position, count <= 32; count 0 = unused) or None (expert 0, positions 32 at a time);
    order [n] int32 or None. Returns [rows, n] (out_transposed) or [n, rows] with position p
    written to row order[p] (or p), in x's dtype; positions in no tile are left unwritten.
    """
    define_ops()
    return torch.ops.qmoe.ternary_tiles(words, bases, offsets, masks, lo, hi, x, True, tiles, order, relu,
                                        out_transposed)


def bitpacked_tiles(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_cols: int,
                    x: torch.Tensor, tiles: torch.Tensor | None, order: torch.Tensor | None, relu: bool,
                    out_transposed: bool) -> torch.Tensor:
    """`ternary_tiles` for b-bit experts: packed [E, rows, ceil(cols / 32) * bits] int32
    (`device_bitpacked`), scale/zero [E, rows, ceil(cols / group_cols)] fp32."""
    define_ops()
    return torch.ops.qmoe.bitpacked_tiles(packed, scale, zero, bits, group_cols, x, True, tiles, order, relu,
                                          out_transposed)


def route_plan(index: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens sorted by expert on the GPU, no host sync: index [n] int64 (n <= MAX_PLAN_TOKENS)
    -> order [n] int32 (position -> token, stable) and tiles [n, 3] int32."""
    define_ops()
    return torch.ops.qmoe.route_plan(index, num_experts)


def host_plan(counts: list[int], threshold: int) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
    """Tiles [T, 3] int32 (CPU) of the experts with at most `threshold` tokens, and the (expert,
    first position, count) of the heavier ones, from tokens per expert (positions sorted by expert)."""
    tiles, heavy, begin = [], [], 0
    for e, count in enumerate(counts):
        if count > threshold:
            heavy.append((e, begin, count))
        else:
            tiles += [(e, p, min(TILE_TOKENS, begin + count - p)) for p in range(begin, begin + count, TILE_TOKENS)]
        begin += count
    return torch.tensor(tiles, dtype=torch.int32).reshape(-1, 3), heavy


def gather_transpose(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """x [N, cols] -> [cols, n] with column p = x[order[p]] (order [n] int32, any n: a row may be
    gathered several times), on the GPU."""
    define_ops()
    return torch.ops.qmoe.gather_transpose(x, order)


def _check_one_grid(lo: torch.Tensor) -> None:
    if lo.dim() != 2 or lo.shape[1] != 1:
        raise ValueError(f"the GPU kernels take one grid per row, lo/hi [rows, 1]; got {list(lo.shape)} "
                         "(grouped grids run on the CPU reference path)")


def decode_matmul(words: torch.Tensor, offsets: torch.Tensor, masks: torch.Tensor, lo: torch.Tensor,
                  hi: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """y = x @ W.T for one dictionary-coded ternary W, on the GPU: y [tokens, rows] in x's dtype.

    words [total] int16, offsets [rows + 1] int32 (a packed matrix), masks [size, 2] int32
    (`codebook_masks`), lo/hi [rows, 1] fp32, x [tokens, cols] fp32/bf16/fp16; all on one CUDA
    device (call `kernel_library()` first). Up to DENSE_TOKENS_THRESHOLD tokens the fused tiles,
    which never materialize W; beyond, W decoded to a scratch matrix and `round_once_linear`.
    """
    _check_one_grid(lo)
    _check_x(x)
    if x.shape[0] < 1:
        raise ValueError(f"x must hold at least one token, got {list(x.shape)}")
    if x.shape[0] > DENSE_TOKENS_THRESHOLD:
        return round_once_linear(x, decode_dense(words, offsets, masks, lo, hi, x.shape[1], x.dtype))
    xt = x.reshape(-1, 1) if x.shape[0] == 1 else x.T.contiguous()  # [cols, tokens]
    return ternary_tiles(words, None, offsets[None], masks, lo.reshape(1, -1), hi.reshape(1, -1), xt, None, None,
                         relu=False, out_transposed=False)


def decode_dense(words: torch.Tensor, offsets: torch.Tensor, masks: torch.Tensor, lo: torch.Tensor,
                 hi: torch.Tensor, cols: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The decoded weights [rows, cols] in `dtype`, on the GPU (arguments as `decode_matmul`)."""
    _check_one_grid(lo)
    define_ops()
    return torch.ops.qmoe.ternary_dense(words, None, offsets[None], masks, lo.reshape(1, -1), hi.reshape(1, -1), 0,
                                        cols, dtype)


def device_bitpacked(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """The kernels' layout of bit-packed rows: packed [..., rows, ceil(cols * bits / 8)] uint8
    (MSB-first, `codec.bitpack`) -> [..., rows, ceil(cols / 32) * bits] int32, each row zero-padded
    to whole 32-column chunks (a chunk is exactly `bits` words, so a warp loads it in one go)."""
    words = -(-cols // TILE_TOKENS) * bits
    return F.pad(packed, (0, 4 * words - packed.shape[-1])).contiguous().view(torch.int32)


def bitpacked_dense(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_cols: int,
                    cols: int, expert: int, dtype: torch.dtype) -> torch.Tensor:
    """Expert `expert`'s b-bit weights [rows, cols] in `dtype` (arguments as `bitpacked_tiles`)."""
    define_ops()
    return torch.ops.qmoe.bitpacked_dense(packed, scale, zero, bits, group_cols, cols, expert, dtype)


def ternary_dense(words: torch.Tensor, bases: torch.Tensor | None, offsets: torch.Tensor, masks: torch.Tensor,
                  lo: torch.Tensor, hi: torch.Tensor, expert: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """Expert `expert`'s ternary weights [rows, cols] in `dtype` (arguments as `ternary_tiles`)."""
    define_ops()
    return torch.ops.qmoe.ternary_dense(words, bases, offsets, masks, lo, hi, expert, cols, dtype)
