// Grouped decode-matmul for compressed experts (QMoE): dictionary-coded ternary and bit-packed
// b-bit weights, decoded inside the matmul, for tiles of up to 32 tokens of one expert each;
// plus decoding to a dense matrix (the tensor-core path for many tokens), the routing plan and
// the gather of tokens into expert order. Layouts: decode_matmul.h.
//
// One warp per (row, tile). The warp's 32 lanes form G = 32 / L groups of L lanes, L the tile's
// token count rounded up to a power of two: a lane's token is lane % L, its group lane / L.
// A row is walked 32 codewords (or 32 columns) at a time; each group takes every G-th of them,
// so each codeword is decoded once per tile and its set bits are applied to all L tokens at
// once, each lane reading its own token's activation: with x stored one column per token
// ([cols, tokens]) those L reads are contiguous, one transaction instead of L. With L = 1 (one
// token) this is a warp of 32 independent codeword walkers; with L = 32 one walker whose every
// step feeds 32 tokens. The groups' partial sums meet in a butterfly at the end.
//
// Numerics (the contract of every compressed expert linear in qmoe): weights are the grid values
// rounded to the activation dtype, products are summed in fp32, and the output is rounded once.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cstdint>
#include <type_traits>

#include "decode_matmul.h"

namespace qmoe {
namespace {

constexpr int kWarp = 32;
constexpr unsigned kFull = 0xffffffffu;
constexpr int kWarpsPerBlock = 4;  // 128 threads: enough warps per SM to hide L2 latency of the mask lookups
constexpr uint32_t kPositions = (1u << kMaxPositions) - 1;

// Storage type, fp32 load/store and "round to this dtype" per activation dtype. bf16 and fp16 are
// handled as raw 16-bit words so every load can use the read-only path (__ldg) on all targets.
template <Scalar S>
struct Type;

template <>
struct Type<Scalar::kFloat> {
  using raw = float;
  static __device__ __forceinline__ float load(const raw* p) { return __ldg(p); }
  static __device__ __forceinline__ raw store(float v) { return v; }
  static __device__ __forceinline__ float round(float v) { return v; }
};

template <>
struct Type<Scalar::kBFloat16> {
  using raw = uint16_t;
  // bf16 -> fp32 is a 16-bit shift of the raw bits.
  static __device__ __forceinline__ float load(const raw* p) {
    return __uint_as_float(static_cast<uint32_t>(__ldg(p)) << 16);
  }
  static __device__ __forceinline__ raw store(float v) { return __bfloat16_as_ushort(__float2bfloat16_rn(v)); }
  static __device__ __forceinline__ float round(float v) { return __bfloat162float(__float2bfloat16_rn(v)); }
};

template <>
struct Type<Scalar::kHalf> {
  using raw = uint16_t;
  static __device__ __forceinline__ float load(const raw* p) { return __half2float(__ushort_as_half(__ldg(p))); }
  static __device__ __forceinline__ raw store(float v) { return __half_as_ushort(__float2half_rn(v)); }
  static __device__ __forceinline__ float round(float v) { return __half2float(__float2half_rn(v)); }
};

struct Tile {
  int expert, p0, n;
};

__device__ __forceinline__ Tile tile_of(const TileIO& io, int slot) {
  if (io.tiles) return {io.tiles[3 * slot], io.tiles[3 * slot + 1], io.tiles[3 * slot + 2]};
  const int p0 = slot * kTileTokens;
  return {0, p0, min(kTileTokens, io.n_positions - p0)};
}

struct Lanes {
  int width;  // L: lanes per group, a power of two >= the tile's tokens
  int groups;  // G = 32 / L
  int token;  // lane % L
  int group;  // lane / L
};

__device__ __forceinline__ Lanes lanes_for(int n) {
  const int width = n <= 1 ? 1 : 1 << (32 - __clz(n - 1));
  const int lane = threadIdx.x % kWarp;
  return {width, kWarp / width, lane & (width - 1), lane / width};
}

// Sums the groups' partials of each token (lanes of equal lane % L), then the first group stores
// token t of the tile at (row, dest(p0 + t)).
template <Scalar S>
__device__ __forceinline__ void finish(float v, const Lanes& ln, const Tile& tile, int row, const TileIO& io) {
  for (int d = ln.width; d < kWarp; d <<= 1) v += __shfl_xor_sync(kFull, v, d);
  if (ln.group == 0 && ln.token < tile.n) {
    if (io.relu) v = fmaxf(v, 0.0f);  // relu commutes with the rounding below
    const int p = tile.p0 + ln.token;
    const int64_t dest = io.order ? io.order[p] : p;
    static_cast<typename Type<S>::raw*>(io.out)[row * io.out_row + dest * io.out_pos] = Type<S>::store(v);
  }
}

// Walks the codewords of one row, 32 at a time (lane i takes codeword chunk + i), and calls
// visit(lo_bits, hi_bits, first, width) on every lane for its codeword: bits already cleared
// past `cols`, so the padding weight of an odd width is never read. Lanes past the row's end
// visit an empty codeword but still join the shuffles; every lane of the warp calls visit the
// same number of times, so visit may shuffle.
template <typename Visit>
__device__ __forceinline__ void for_each_codeword(const uint16_t* __restrict__ words, int begin, int end,
                                                  const int2* __restrict__ masks, int size, int cols,
                                                  Visit&& visit) {
  const int lane = threadIdx.x % kWarp;
  int base = 0;  // first column of this chunk
  for (int chunk = begin; chunk < end; chunk += kWarp) {
    const int i = chunk + lane;
    int2 m = make_int2(0, 0);
    // Codewords are read once per tile: stream them past L1 (__ldcs) so they do not evict the
    // mask table and x, which every row re-reads.
    if (i < end) {
      const int w = __ldcs(reinterpret_cast<const unsigned short*>(words) + i);
      // A word past the dictionary would read outside the table; the loader checks rows, this
      // only keeps a corrupt file from faulting the device (it decodes to zeros instead).
      if (w < size) m = __ldg(masks + w);
    }
    const int width = 2 * static_cast<int>(static_cast<uint32_t>(m.x) >> kMaxPositions);
    int incl = width;
#pragma unroll
    for (int d = 1; d < kWarp; d <<= 1) {
      const int v = __shfl_up_sync(kFull, incl, d);
      if (lane >= d) incl += v;
    }
    const int first = base + incl - width;
    base += __shfl_sync(kFull, incl, kWarp - 1);
    const int room = cols - first;  // < 28 only for the row's last codeword (or corrupt rows)
    const uint32_t keep = room >= kMaxPositions ? kPositions : (room <= 0 ? 0u : (1u << room) - 1u);
    visit(static_cast<uint32_t>(m.x) & keep, static_cast<uint32_t>(m.y) & keep, first, width);
  }
}

template <Scalar S>
__global__ void __launch_bounds__(kWarp * kWarpsPerBlock) ternary_tiles_kernel(TernaryWeights w, TileIO io) {
  using T = Type<S>;
  const Tile tile = tile_of(io, blockIdx.y);
  const int row = blockIdx.x * kWarpsPerBlock + threadIdx.x / kWarp;
  if (tile.n <= 0 || row >= w.rows) return;  // whole warps leave together: the shuffles stay full-mask
  const Lanes ln = lanes_for(tile.n);
  const bool active = ln.token < tile.n;
  const auto* x = static_cast<const typename T::raw*>(io.x) + (tile.p0 + min(ln.token, tile.n - 1)) * io.x_pos;
  const int64_t e = tile.expert;
  const uint16_t* words = w.words + (w.bases ? w.bases[e] : 0);
  const int* offsets = w.offsets + e * (w.rows + 1);
  float sum_lo = 0.0f, sum_hi = 0.0f;

  // Ternary weights need no multiply: each set bit adds one activation to the lo or the hi sum,
  // and the row's two scales are applied once at the end.
  for_each_codeword(words, offsets[row], offsets[row + 1], w.masks, w.size, w.cols,
                    [&](uint32_t lo_bits, uint32_t hi_bits, int first, int) {
                      for (int k = 0; k < ln.width; ++k) {
                        const int src = k * ln.groups + ln.group;  // this group's codeword at step k
                        const uint32_t lb = __shfl_sync(kFull, lo_bits, src);
                        uint32_t nz = lb | __shfl_sync(kFull, hi_bits, src);
                        const int f = __shfl_sync(kFull, first, src);
                        while (nz) {
                          // Four set bits per round: their loads are independent and in flight together.
                          float v[4];
                          bool low[4];
#pragma unroll
                          for (int j = 0; j < 4; ++j) {
                            const int bit = __ffs(nz) - 1;
                            low[j] = nz != 0 && ((lb >> bit) & 1u);
                            v[j] = (nz != 0 && active) ? T::load(x + (f + bit) * io.x_col) : 0.0f;
                            nz &= nz - 1;
                          }
#pragma unroll
                          for (int j = 0; j < 4; ++j) {
                            if (low[j]) sum_lo += v[j];
                            else sum_hi += v[j];
                          }
                        }
                      }
                    });
  const int64_t er = e * w.rows + row;
  finish<S>(T::round(w.lo[er]) * sum_lo + T::round(w.hi[er]) * sum_hi, ln, tile, row, io);
}

// The code of column `lane` of a 32-column chunk from the chunk's `bits` 32-bit words, held by
// lanes 0 .. bits-1 (`mine`, already byte-swapped so bit 31 comes first in the stream).
__device__ __forceinline__ uint32_t chunk_code(uint32_t mine, int bits, int lane) {
  const int bit = lane * bits, word = bit >> 5, shift = bit & 31;
  const uint32_t first = __shfl_sync(kFull, mine, word);
  const uint32_t second = __shfl_sync(kFull, mine, (word + 1) & (kWarp - 1));  // used only when the code straddles
  const uint64_t both = (static_cast<uint64_t>(first) << 32) | second;
  return static_cast<uint32_t>(both >> (64 - shift - bits)) & ((1u << bits) - 1u);
}

__device__ __forceinline__ uint32_t stream_word(const uint32_t* p) { return __byte_perm(__ldcs(p), 0, 0x0123); }

template <Scalar S>
__global__ void __launch_bounds__(kWarp * kWarpsPerBlock) bitpacked_tiles_kernel(BitpackedWeights w, TileIO io) {
  using T = Type<S>;
  const Tile tile = tile_of(io, blockIdx.y);
  const int row = blockIdx.x * kWarpsPerBlock + threadIdx.x / kWarp;
  if (tile.n <= 0 || row >= w.rows) return;
  const Lanes ln = lanes_for(tile.n);
  const bool active = ln.token < tile.n;
  const auto* x = static_cast<const typename T::raw*>(io.x) + (tile.p0 + min(ln.token, tile.n - 1)) * io.x_pos;
  const int lane = threadIdx.x % kWarp;
  const int64_t er = static_cast<int64_t>(tile.expert) * w.rows + row;
  const uint32_t* words = w.packed + er * w.row_words;
  const float* scale = w.scale + er * w.groups;
  const float* zero = w.zero + er * w.groups;
  float sum = 0.0f;
  // 32 columns are exactly `bits` words: lanes load them together, every lane dequantizes its
  // column once, and the groups then take the 32 weights in turn for their tokens.
  for (int c0 = 0, chunk = 0; c0 < w.cols; c0 += kWarp, ++chunk) {
    const uint32_t mine = lane < w.bits ? stream_word(words + chunk * w.bits + lane) : 0u;
    const uint32_t code = chunk_code(mine, w.bits, lane);
    const int c = c0 + lane;
    float value = 0.0f;
    if (c < w.cols) {
      const int g = c / w.group_cols;
      value = T::round(scale[g] * (static_cast<float>(code) - zero[g]));  // as IntGrid.decode, in fp32
    }
#pragma unroll 4
    for (int k = 0; k < ln.width; ++k) {
      const int slot = k * ln.groups + ln.group;
      const float weight = __shfl_sync(kFull, value, slot);
      const int col = c0 + slot;
      if (active && col < w.cols) sum += weight * T::load(x + col * io.x_col);
    }
  }
  finish<S>(sum, ln, tile, row, io);
}

// Decode to a dense matrix [rows, cols], for experts with enough tokens that a tensor-core GEMM
// on the decoded weights beats re-decoding per tile.
template <Scalar S>
__global__ void __launch_bounds__(kWarp * kWarpsPerBlock)
ternary_dense_kernel(TernaryWeights w, int expert, typename Type<S>::raw* __restrict__ out) {
  using T = Type<S>;
  const int row = blockIdx.x * kWarpsPerBlock + threadIdx.x / kWarp;
  if (row >= w.rows) return;
  const int64_t e = expert, er = e * w.rows + row;
  const typename T::raw values[3] = {T::store(w.lo[er]), T::store(0.0f), T::store(w.hi[er])};
  auto* dst = out + static_cast<int64_t>(row) * w.cols;
  const int* offsets = w.offsets + e * (w.rows + 1);
  for_each_codeword(w.words + (w.bases ? w.bases[e] : 0), offsets[row], offsets[row + 1], w.masks, w.size, w.cols,
                    [&](uint32_t lo_bits, uint32_t hi_bits, int first, int width) {
                      // Every position the codeword covers is written, zeros included, so the
                      // scratch matrix needs no memset; stopping at its width keeps lanes off
                      // each other's columns.
                      const int n = min(width, w.cols - first);
                      for (int j = 0; j < n; ++j) {
                        const int code = ((lo_bits >> j) & 1u) ? 0 : (((hi_bits >> j) & 1u) ? 2 : 1);
                        dst[first + j] = values[code];
                      }
                    });
}

template <Scalar S>
__global__ void bitpacked_dense_kernel(BitpackedWeights w, int expert, typename Type<S>::raw* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= static_cast<int64_t>(w.rows) * w.cols) return;
  const int row = static_cast<int>(i / w.cols), col = static_cast<int>(i % w.cols);
  const int64_t er = static_cast<int64_t>(expert) * w.rows + row;
  const uint32_t* words = w.packed + er * w.row_words;
  const int bit = col * w.bits, word = bit >> 5, shift = bit & 31;
  // The second word exists whenever the code straddles: rows are padded to whole chunks.
  const uint32_t second = shift + w.bits > 32 ? stream_word(words + word + 1) : 0u;
  const uint64_t both = (static_cast<uint64_t>(stream_word(words + word)) << 32) | second;
  const uint32_t code = static_cast<uint32_t>(both >> (64 - shift - w.bits)) & ((1u << w.bits) - 1u);
  const int g = col / w.group_cols;
  out[i] = Type<S>::store(w.scale[er * w.groups + g] * (static_cast<float>(code) - w.zero[er * w.groups + g]));
}

// One block, one thread per token (n <= kMaxPlanTokens): a counting sort by comparison, O(n) per
// thread, which for the few tokens of a decoding step costs less than the launches of a sort.
__global__ void route_plan_kernel(const int64_t* __restrict__ index, int n, int num_experts, int* __restrict__ order,
                                  int* __restrict__ tiles) {
  __shared__ int expert_of[kMaxPlanTokens];  // by token
  __shared__ int sorted_expert[kMaxPlanTokens];  // by position
  __shared__ int starts[kMaxPlanTokens];  // by position: 1 where a tile starts
  const int t = threadIdx.x;
  if (t < n) {
    const int64_t e = index[t];
    // An index outside [0, E) sorts last and starts no tile: its token's outputs are not written.
    expert_of[t] = (e >= 0 && e < num_experts) ? static_cast<int>(e) : num_experts;
  }
  __syncthreads();
  int rank = 0;
  if (t < n) {
    const int e = expert_of[t];
    int before = 0;
    for (int u = 0; u < n; ++u) {
      const int f = expert_of[u];
      before += f < e;
      rank += (f == e) & (u < t);
    }
    order[before + rank] = t;
    sorted_expert[before + rank] = e;
    starts[before + rank] = e < num_experts && rank % kTileTokens == 0;
  }
  __syncthreads();
  const int n_tiles = __syncthreads_count(t < n && starts[t]);
  if (t < n && starts[t]) {
    int k = 0;
    for (int u = 0; u < t; ++u) k += starts[u];
    int count = 1;
    while (count < kTileTokens && t + count < n && sorted_expert[t + count] == sorted_expert[t]) ++count;
    tiles[3 * k] = sorted_expert[t];
    tiles[3 * k + 1] = t;
    tiles[3 * k + 2] = count;
  }
  if (t < n && t >= n_tiles) tiles[3 * t] = tiles[3 * t + 1] = tiles[3 * t + 2] = 0;
}

template <typename R>
__global__ void gather_transpose_kernel(const R* __restrict__ x, const int* __restrict__ order, int n, int cols,
                                        R* __restrict__ xt) {
  __shared__ R tile[32][33];  // +1: the transposed read is free of bank conflicts
  const int c0 = blockIdx.x * 32, p0 = blockIdx.y * 32;
  for (int i = threadIdx.y; i < 32; i += blockDim.y) {
    const int p = p0 + i, c = c0 + threadIdx.x;
    if (p < n && c < cols) tile[i][threadIdx.x] = x[static_cast<int64_t>(order[p]) * cols + c];
  }
  __syncthreads();
  for (int i = threadIdx.y; i < 32; i += blockDim.y) {
    const int c = c0 + i, p = p0 + threadIdx.x;
    if (p < n && c < cols) xt[static_cast<int64_t>(c) * n + p] = tile[threadIdx.x][i];
  }
}

// Calls f with the compile-time Scalar of `dtype`.
template <typename F>
void dispatch(Scalar dtype, F&& f) {
  switch (dtype) {
    case Scalar::kFloat: f(std::integral_constant<Scalar, Scalar::kFloat>{}); break;
    case Scalar::kBFloat16: f(std::integral_constant<Scalar, Scalar::kBFloat16>{}); break;
    case Scalar::kHalf: f(std::integral_constant<Scalar, Scalar::kHalf>{}); break;
  }
}

dim3 row_grid(int rows, int tiles) { return dim3((rows + kWarpsPerBlock - 1) / kWarpsPerBlock, tiles); }

}  // namespace

void launch_ternary_tiles(const TernaryWeights& w, const TileIO& io, Scalar dtype, cudaStream_t stream) {
  dispatch(dtype, [&](auto s) {
    ternary_tiles_kernel<decltype(s)::value><<<row_grid(w.rows, io.n_tiles), kWarp * kWarpsPerBlock, 0, stream>>>(w, io);
  });
}

void launch_bitpacked_tiles(const BitpackedWeights& w, const TileIO& io, Scalar dtype, cudaStream_t stream) {
  dispatch(dtype, [&](auto s) {
    bitpacked_tiles_kernel<decltype(s)::value><<<row_grid(w.rows, io.n_tiles), kWarp * kWarpsPerBlock, 0, stream>>>(w, io);
  });
}

void launch_ternary_dense(const TernaryWeights& w, int expert, void* out, Scalar dtype, cudaStream_t stream) {
  dispatch(dtype, [&](auto s) {
    constexpr Scalar S = decltype(s)::value;
    ternary_dense_kernel<S><<<row_grid(w.rows, 1), kWarp * kWarpsPerBlock, 0, stream>>>(
        w, expert, static_cast<typename Type<S>::raw*>(out));
  });
}

void launch_bitpacked_dense(const BitpackedWeights& w, int expert, void* out, Scalar dtype, cudaStream_t stream) {
  const int64_t total = static_cast<int64_t>(w.rows) * w.cols;
  const int threads = 256;
  dispatch(dtype, [&](auto s) {
    constexpr Scalar S = decltype(s)::value;
    bitpacked_dense_kernel<S><<<static_cast<unsigned>((total + threads - 1) / threads), threads, 0, stream>>>(
        w, expert, static_cast<typename Type<S>::raw*>(out));
  });
}

void launch_route_plan(const int64_t* index, int n, int num_experts, int* order, int* tiles, cudaStream_t stream) {
  const int threads = ((n + kWarp - 1) / kWarp) * kWarp;
  route_plan_kernel<<<1, threads, 0, stream>>>(index, n, num_experts, order, tiles);
}

void launch_gather_transpose(const void* x, const int* order, int n, int cols, void* xt, Scalar dtype,
                             cudaStream_t stream) {
  const dim3 grid((cols + 31) / 32, (n + 31) / 32), block(32, 8);
  if (dtype == Scalar::kFloat) {
    gather_transpose_kernel<float><<<grid, block, 0, stream>>>(static_cast<const float*>(x), order, n, cols,
                                                               static_cast<float*>(xt));
  } else {
    gather_transpose_kernel<uint16_t><<<grid, block, 0, stream>>>(static_cast<const uint16_t*>(x), order, n, cols,
                                                                  static_cast<uint16_t*>(xt));
  }
}

}  // namespace qmoe
