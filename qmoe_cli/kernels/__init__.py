"""GPU kernels: the fused dictionary-decode + matmul of packed ternary experts, as `torch.library`
ops (`ops`); the CUDA sources are in the top-level `kernels/`. Imports `codec`, `errors`, `resources`.
"""

from .ops import (
                  DENSE_TOKENS_THRESHOLD,
                  MAX_TOKENS,
                  KernelBuild,
                  build_kernels,
                  codebook_masks,
                  decode_dense,
                  decode_dense_reference,
                  decode_matmul,
                  kernel_library,
)

__all__ = ["DENSE_TOKENS_THRESHOLD", "MAX_TOKENS", "KernelBuild", "build_kernels", "codebook_masks", "decode_dense",
           "decode_dense_reference", "decode_matmul", "kernel_library"]
