// Launchers of decode_matmul.cu, called by binding.cpp after it has validated every argument.
//
// The grouped kernels compute, for a list of tiles (expert e, first token position p0, n <= 32
// tokens), out[:, p0 : p0 + n] = W_e x[:, p0 : p0 + n] for every row of W_e, where W_e is expert
// e's compressed matrix. Token positions index the columns of x; the caller sorts tokens by
// expert, so a tile's tokens are contiguous. Element (c, p) of x is x[c * x_col + p * x_pos] and
// element (r, p) of the output is out[r * out_row + dest(p) * out_pos], dest(p) = order[p] (or p
// when order is null): one kernel reads either layout and scatters back to token order.
#pragma once

#include <cuda_runtime.h>
#include <cstdint>

namespace qmoe {

constexpr int kTileTokens = 32;  // tokens per tile: one warp lane per token at most
constexpr int kMaxPositions = 28;  // codeword width the 28-bit masks can hold (14 pairs)
constexpr int kMaxPlanTokens = 1024;  // route_plan runs in one block of one thread per token

enum class Scalar { kFloat, kBFloat16, kHalf };

// Where the tokens are and where the results go (shared by both weight formats).
struct TileIO {
  const int* tiles;  // [n_tiles, 3] int32 (expert, p0, n); n == 0 marks an unused slot; null: one
                     // expert (0) and tiles of 32 consecutive positions
  int n_tiles;
  int n_positions;  // token positions (columns of x)
  const void* x;  // Scalar
  int64_t x_col, x_pos;
  void* out;  // Scalar
  int64_t out_row, out_pos;
  const int* order;  // [n_positions] int32 or null
  bool relu;  // fused activation of the first expert matrix
};

// Dictionary-coded ternary experts: words of expert e start at words + bases[e] (bases null: 0),
// its row offsets are offsets[e * (rows + 1) ...], its grid lo/hi[e * rows + r].
struct TernaryWeights {
  const uint16_t* words;
  const int64_t* bases;
  const int* offsets;
  const int2* masks;
  int size;
  const float* lo;
  const float* hi;
  int rows, cols;
};

// Bit-packed b-bit experts in the device layout: row r of expert e is the 32-bit words
// packed[(e * rows + r) * row_words ...], row_words = ceil(cols / 32) * bits, holding the
// row's MSB-first bit stream in byte order (so a byte swap of each word gives the stream);
// grids scale/zero[(e * rows + r) * groups + c / group_cols].
struct BitpackedWeights {
  const uint32_t* packed;
  int row_words;
  int bits;
  const float* scale;
  const float* zero;
  int groups, group_cols;
  int rows, cols;
};

void launch_ternary_tiles(const TernaryWeights& w, const TileIO& io, Scalar dtype, cudaStream_t stream);
void launch_bitpacked_tiles(const BitpackedWeights& w, const TileIO& io, Scalar dtype, cudaStream_t stream);

// out [rows, cols] of `dtype` = expert `expert`'s decoded weights, each rounded once.
void launch_ternary_dense(const TernaryWeights& w, int expert, void* out, Scalar dtype, cudaStream_t stream);
void launch_bitpacked_dense(const BitpackedWeights& w, int expert, void* out, Scalar dtype, cudaStream_t stream);

// Counting sort of n <= kMaxPlanTokens expert indices: order [n] int32 (positions -> token ids,
// stable) and tiles [n, 3] int32 (one per run of <= 32 tokens of one expert, then unused slots).
void launch_route_plan(const int64_t* index, int n, int num_experts, int* order, int* tiles, cudaStream_t stream);

// xt [cols, n] = x[order[p], c] for p < n: the tokens sorted by expert, one column per token (a
// token may appear at several positions: top-k, one per routing slot).
void launch_gather_transpose(const void* x, const int* order, int n, int cols, void* xt, Scalar dtype,
                             cudaStream_t stream);

}  // namespace qmoe
