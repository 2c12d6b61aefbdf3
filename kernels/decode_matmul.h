// Launchers of decode_matmul.cu, called by binding.cpp after it has validated every argument.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <cstdint>

namespace qmoe {

constexpr int kMaxTokens = 32;  // one lane stores each token's sum: a warp's worth at most
constexpr int kMaxPositions = 28;  // codeword width the 28-bit masks can hold (14 pairs)

// y [n_tokens, rows] bf16 = decode(words, offsets) x^T, x [n_tokens, cols] bf16, 1 <= n_tokens <= kMaxTokens.
void launch_decode_matmul(const uint16_t* words, const int* offsets, const int2* masks, int size, const float* lo,
                          const float* hi, const uint16_t* x, __nv_bfloat16* y, int rows, int cols, int n_tokens,
                          cudaStream_t stream);

// out [rows, cols] bf16 = the decoded weights.
void launch_decode_dense(const uint16_t* words, const int* offsets, const int2* masks, int size, const float* lo,
                         const float* hi, __nv_bfloat16* out, int rows, int cols, cudaStream_t stream);

}  // namespace qmoe
