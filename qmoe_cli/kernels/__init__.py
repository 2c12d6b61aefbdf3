"""GPU kernels: the grouped decode-matmul of compressed experts (dictionary-coded ternary and
bit-packed b-bit) as `torch.library` ops (`ops`; defined on first use, `define_ops`, never at
import), and `round_once_linear`, the numerics every compressed expert linear follows; the CUDA
sources are in the top-level `kernels/`. Imports `codec`, `errors`, `resources`, `native_build`.
"""

from .ops import (
                  DENSE_TOKENS_THRESHOLD,
                  MAX_PLAN_TOKENS,
                  TILE_TOKENS,
                  KernelBuild,
                  bitpacked_dense,
                  bitpacked_tiles,
                  build_kernels,
                  codebook_masks,
                  decode_dense,
                  decode_dense_reference,
                  decode_matmul,
                  define_ops,
                  device_bitpacked,
                  gather_transpose,
                  host_plan,
                  kernel_library,
                  round_once_linear,
                  route_plan,
                  ternary_dense,
                  ternary_tiles,
)

__all__ = ["DENSE_TOKENS_THRESHOLD", "MAX_PLAN_TOKENS", "TILE_TOKENS", "KernelBuild", "bitpacked_dense",
           "bitpacked_tiles", "build_kernels", "codebook_masks", "decode_dense", "decode_dense_reference",
           "decode_matmul", "define_ops", "device_bitpacked", "gather_transpose", "host_plan", "kernel_library",
           "round_once_linear", "route_plan", "ternary_dense", "ternary_tiles"]
