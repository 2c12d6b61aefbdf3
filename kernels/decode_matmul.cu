// Fused dictionary decode + matmul for ternary expert weights (QMoE), and a plain decode to bf16.
//
// Inputs (validated by binding.cpp):
//   words   [total] int16     uint16 codeword indices; row r is words[offsets[r] : offsets[r + 1]]
//   offsets [rows + 1] int32
//   masks   [size, 2] int32   per codeword: word 0 bits 0..27 = positions decoding to lo,
//                             bits 28..31 = pairs (1..14); word 1 bits 0..27 = positions -> hi
//   lo, hi  [rows] fp32       one ternary grid per row
//   x       [tokens, cols] bf16, tokens <= 32
//   y       [tokens, rows] bf16 = lo[r] * sum_{c: lo} x[t, c] + hi[r] * sum_{c: hi} x[t, c]
//
// One warp per row: a row is ~100-200 codewords at 0.8 bits/weight, so 32 lanes each take a
// codeword and a warp prefix sum of decoded widths gives every lane its first column without
// touching memory; rows are independent, so there is no inter-warp communication at all.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <cstdint>

#include "decode_matmul.h"

namespace qmoe {
namespace {

constexpr int kWarp = 32;
constexpr unsigned kFull = 0xffffffffu;
constexpr int kWarpsPerBlock = 4;  // 128 threads: enough warps per SM to hide L2 latency of the mask lookups
constexpr uint32_t kPositions = (1u << 28) - 1;

// bf16 -> fp32 is a 16-bit shift; done on the raw bits so x can be read through the read-only
// (non-coherent) path with a plain 16-bit __ldg, which exists for every arch we target.
__device__ __forceinline__ float load_bf16(const uint16_t* p) {
  return __uint_as_float(static_cast<uint32_t>(__ldg(p)) << 16);
}

// Walks the codewords of one row, 32 at a time, and calls visit(lo_bits, hi_bits, first, width) for
// each lane's codeword (bits already cleared past `cols`, so the padding weight of an odd width
// is never read). Lanes past the row's end visit nothing but still join the shuffles.
template <typename Visit>
__device__ __forceinline__ void for_each_codeword(const uint16_t* __restrict__ words, int begin, int end,
                                                  const int2* __restrict__ masks, int size, int cols,
                                                  Visit&& visit) {
  const int lane = threadIdx.x % kWarp;
  int base = 0;  // first column of this chunk
  for (int chunk = begin; chunk < end; chunk += kWarp) {
    const int i = chunk + lane;
    int2 m = make_int2(0, 0);
    // Codewords are read once per matmul: stream them past L1 (__ldcs) so they do not evict
    // the mask table and x, which every row re-reads.
    if (i < end) {
      const int w = __ldcs(reinterpret_cast<const unsigned short*>(words) + i);
      // A word past the dictionary would read outside the table; the loader checks rows, this
      // only keeps a corrupt file from faulting the device (it decodes to zeros instead).
      if (w < size) m = __ldg(masks + w);
    }
    const int width = 2 * static_cast<int>(static_cast<uint32_t>(m.x) >> 28);
    int incl = width;
#pragma unroll
    for (int d = 1; d < kWarp; d <<= 1) {
      const int v = __shfl_up_sync(kFull, incl, d);
      if (lane >= d) incl += v;
    }
    const int first = base + incl - width;
    base += __shfl_sync(kFull, incl, kWarp - 1);
    const int room = cols - first;  // < 28 only for the row's last codeword (or corrupt rows)
    const uint32_t keep = room >= 28 ? kPositions : (room <= 0 ? 0u : (1u << room) - 1u);
    visit(static_cast<uint32_t>(m.x) & keep, static_cast<uint32_t>(m.y) & keep, first, width);
  }
}

// TOKENS is the smallest power of two >= n_tokens: the per-token sums live in registers only
// if their indices are compile-time constants, so each bucket is its own instantiation.
template <int TOKENS>
__global__ void __launch_bounds__(kWarp * kWarpsPerBlock)
decode_matmul_kernel(const uint16_t* __restrict__ words, const int* __restrict__ offsets,
                     const int2* __restrict__ masks, int size, const float* __restrict__ lo,
                     const float* __restrict__ hi, const uint16_t* __restrict__ x,
                     __nv_bfloat16* __restrict__ y, int rows, int cols, int n_tokens) {
  const int row = blockIdx.x * kWarpsPerBlock + threadIdx.x / kWarp;
  if (row >= rows) return;  // whole warps leave together: the shuffles below stay full-mask
  const int lane = threadIdx.x % kWarp;
  float sum_lo[TOKENS], sum_hi[TOKENS];
#pragma unroll
  for (int t = 0; t < TOKENS; ++t) sum_lo[t] = sum_hi[t] = 0.0f;

  // Ternary weights need no multiply: each set bit adds one activation to the lo or the hi sum,
  // and the row's two scales are applied once at the end.
  for_each_codeword(words, offsets[row], offsets[row + 1], masks, size, cols,
                    [&](uint32_t lo_bits, uint32_t hi_bits, int first, int width) {
                      while (lo_bits) {
                        const int c = first + __ffs(lo_bits) - 1;
                        lo_bits &= lo_bits - 1;
#pragma unroll
                        for (int t = 0; t < TOKENS; ++t)
                          if (t < n_tokens) sum_lo[t] += load_bf16(x + static_cast<int64_t>(t) * cols + c);
                      }
                      while (hi_bits) {
                        const int c = first + __ffs(hi_bits) - 1;
                        hi_bits &= hi_bits - 1;
#pragma unroll
                        for (int t = 0; t < TOKENS; ++t)
                          if (t < n_tokens) sum_hi[t] += load_bf16(x + static_cast<int64_t>(t) * cols + c);
                      }
                    });

  // Scale before reducing: one butterfly per token instead of two.
  const float a = lo[row], b = hi[row];
#pragma unroll
  for (int t = 0; t < TOKENS; ++t) {
    float v = a * sum_lo[t] + b * sum_hi[t];
#pragma unroll
    for (int d = kWarp / 2; d > 0; d >>= 1) v += __shfl_xor_sync(kFull, v, d);
    // Lane t stores token t: the TOKENS stores of a row go out from different lanes in one
    // instruction each instead of serializing on lane 0.
    if (lane == t && t < n_tokens) y[static_cast<int64_t>(t) * rows + row] = __float2bfloat16_rn(v);
  }
}

// Decode to a dense bf16 matrix [rows, cols], for batches large enough that a tensor-core GEMM
// on the decoded weights beats re-decoding per token.
__global__ void __launch_bounds__(kWarp * kWarpsPerBlock)
decode_dense_kernel(const uint16_t* __restrict__ words, const int* __restrict__ offsets,
                    const int2* __restrict__ masks, int size, const float* __restrict__ lo,
                    const float* __restrict__ hi, __nv_bfloat16* __restrict__ out, int rows, int cols) {
  const int row = blockIdx.x * kWarpsPerBlock + threadIdx.x / kWarp;
  if (row >= rows) return;
  const __nv_bfloat16 values[3] = {__float2bfloat16_rn(lo[row]), __float2bfloat16_rn(0.0f),
                                   __float2bfloat16_rn(hi[row])};
  __nv_bfloat16* dst = out + static_cast<int64_t>(row) * cols;
  for_each_codeword(words, offsets[row], offsets[row + 1], masks, size, cols,
                    [&](uint32_t lo_bits, uint32_t hi_bits, int first, int width) {
                      // Every position the codeword covers is written, zeros included, so the
                      // scratch matrix needs no memset; stopping at its width keeps lanes off
                      // each other's columns.
                      const int n = min(width, cols - first);
                      for (int j = 0; j < n; ++j) {
                        const int code = ((lo_bits >> j) & 1u) ? 0 : (((hi_bits >> j) & 1u) ? 2 : 1);
                        dst[first + j] = values[code];
                      }
                    });
}

}  // namespace

void launch_decode_matmul(const uint16_t* words, const int* offsets, const int2* masks, int size, const float* lo,
                          const float* hi, const uint16_t* x, __nv_bfloat16* y, int rows, int cols, int n_tokens,
                          cudaStream_t stream) {
  const dim3 block(kWarp * kWarpsPerBlock), grid((rows + kWarpsPerBlock - 1) / kWarpsPerBlock);
  const auto launch = [&](auto kernel) {
    kernel<<<grid, block, 0, stream>>>(words, offsets, masks, size, lo, hi, x, y, rows, cols, n_tokens);
  };
  if (n_tokens <= 1) launch(decode_matmul_kernel<1>);
  else if (n_tokens <= 2) launch(decode_matmul_kernel<2>);
  else if (n_tokens <= 4) launch(decode_matmul_kernel<4>);
  else if (n_tokens <= 8) launch(decode_matmul_kernel<8>);
  else if (n_tokens <= 16) launch(decode_matmul_kernel<16>);
  else launch(decode_matmul_kernel<kMaxTokens>);
}

void launch_decode_dense(const uint16_t* words, const int* offsets, const int2* masks, int size, const float* lo,
                         const float* hi, __nv_bfloat16* out, int rows, int cols, cudaStream_t stream) {
  const dim3 block(kWarp * kWarpsPerBlock), grid((rows + kWarpsPerBlock - 1) / kWarpsPerBlock);
  decode_dense_kernel<<<grid, block, 0, stream>>>(words, offsets, masks, size, lo, hi, out, rows, cols);
}

}  // namespace qmoe
