// The sparse ("slot") form of the ternary CPU decode-matmul: work per non-zero weight, not per
// lane of a codeword. Torch-free, so it can be timed on its own; cpu_matmul.cpp calls it.
//
// At p_zero ~0.9 a codeword (~22 weights) holds ~2.3 non-zeros. Expanding it to 32 lanes and
// doing an FMA per token (the masked kernels) is dense work on ~90% zeros, which a dense bf16
// GEMM beats from 8 tokens on. Here:
// - The dictionary becomes a slot table (8 bytes a codeword): the rows, in the slotted x below,
//   of its first 3 lo and first 3 hi positions, unused slots pointing at a zero row; the rows it
//   advances; and a flag when a side has more than 3 (0.35% of the codewords at p_zero 0.9,
//   which then loop over their remaining mask bits).
// - x is laid out "slotted": column c of a tile of TP tokens is row 3 * (c / 2) + c % 2 (TP
//   floats, one token a lane), and row 3 * (c / 2) + 2 is zeros. Codewords start on even columns
//   (they hold pairs), so the zero row is at a fixed offset from any codeword's start and an
//   unused slot costs an add of zeros, never a branch.
// - Per codeword: 3 T-vector loads and adds into a lo sum, 3 into a hi sum, then
//   y = lo * Σ x[lo] + hi * Σ x[hi]: fp32 sums of exact terms, one product per grid, i.e. the
//   masked kernels' numerics in another summation order (covered by the same error bound).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace qmoe_slots {

#define QMOE_SLOTS_AVX2 __attribute__((target("avx2,fma")))

constexpr int kSlots = 3;        // per side (lo, hi) in the table; more fall back to the masks
constexpr uint8_t kZeroRow = 2;  // the zero row after a codeword's first pair
constexpr int64_t kTailCols = 32;  // zero columns after the width: a codeword reads <= 28 past its start

// masks [size, 2] (`Codebook.masks`: bits 0..27 lo / hi positions, pairs in bits 28..31 of word 0)
// -> slots [size, 8]: lo rows, hi rows, rows advanced (3 a pair), overflow flags (1 lo, 2 hi).
inline void build_slots(const uint32_t* masks, int64_t size, uint8_t* slots) {
  for (int64_t w = 0; w < size; ++w) {
    uint8_t* e = slots + 8 * w;
    e[7] = 0;
    for (int side = 0; side < 2; ++side) {
      uint32_t bits = masks[2 * w + side] & 0x0FFFFFFFu;
      for (int s = 0; s < kSlots; ++s, bits &= bits - 1)
        e[side * kSlots + s] = bits ? uint8_t(3 * (__builtin_ctz(bits) >> 1) + (__builtin_ctz(bits) & 1)) : kZeroRow;
      e[7] = uint8_t(e[7] | (bits ? 1 << side : 0));
    }
    e[6] = uint8_t(3 * (masks[2 * w] >> 28));
  }
}

// Rows of the slotted x for `width` columns (the tail included).
inline int64_t slotted_rows(int64_t width) { return 3 * ((width + kTailCols + 1) / 2); }

// x [n, width] (row stride `stride`, `n` <= tp) -> xs [slotted_rows(width), tp], zeroed first.
template <typename T, typename ToFloat>
inline void slot_x(const T* x, int64_t stride, int64_t n, int64_t width, int64_t tp, float* xs, ToFloat to_float) {
  std::memset(xs, 0, sizeof(float) * slotted_rows(width) * tp);
  for (int64_t c = 0; c < width; ++c) {
    float* row = xs + (3 * (c >> 1) + (c & 1)) * tp;
    for (int64_t t = 0; t < n; ++t) row[t] = to_float(x[t * stride + c]);
  }
}

struct Matrix {  // one dictionary-coded matrix, raw
  const uint16_t* words;
  const int32_t* offsets;
  const uint32_t* masks;
  const uint8_t* slots;
  const float* lo;
  const float* hi;
  int64_t size, width, total;
};

// The table entries are random reads in 512 KB that the x tile pushes out of L2: fetching the
// entry of the codeword this far ahead hides the miss (~25% faster on Zen 4).
constexpr int64_t kPrefetch = 16;
inline void prefetch_entry(const uint16_t* words, int64_t k, int64_t total, const void* table, int64_t bytes) {
  __builtin_prefetch(static_cast<const char*>(table) + bytes * words[std::min(k + kPrefetch, total - 1)]);
}

// The rows past a codeword's first 3 of a side: positions of `bits` (mask) from its 4th set bit.
inline uint32_t beyond_slots(uint32_t bits) {
  bits &= 0x0FFFFFFFu;
  for (int s = 0; s < kSlots; ++s) bits &= bits - 1;
  return bits;
}

inline int64_t row_of(int bit) { return 3 * (bit >> 1) + (bit & 1); }

// One codeword k of a row at rows `c3` of the slotted x (TP = 8 * V floats a row): its lo and hi
// sums added into lo/hi, c3 advanced. False for a codeword beyond the dictionary or past the width.
template <int V>
QMOE_SLOTS_AVX2 __attribute__((always_inline)) inline bool slot_step(const Matrix& m, int64_t k, const float* xs,
                                                                     int64_t& c3, int64_t limit, __m256* lo,
                                                                     __m256* hi) {
  constexpr int64_t tp = 8 * V;
  const uint32_t w = m.words[k];
  prefetch_entry(m.words, k, m.total, m.slots, 8);
  if (w >= m.size || c3 >= limit) return false;
  const uint8_t* e = m.slots + 8 * w;
  const float* x = xs + c3 * tp;
  for (int v = 0; v < V; ++v) {
    const float* xv = x + 8 * v;
    const __m256 l = _mm256_add_ps(_mm256_add_ps(_mm256_loadu_ps(xv + e[0] * tp), _mm256_loadu_ps(xv + e[1] * tp)),
                                   _mm256_loadu_ps(xv + e[2] * tp));
    const __m256 h = _mm256_add_ps(_mm256_add_ps(_mm256_loadu_ps(xv + e[3] * tp), _mm256_loadu_ps(xv + e[4] * tp)),
                                   _mm256_loadu_ps(xv + e[5] * tp));
    lo[v] = _mm256_add_ps(lo[v], l);
    hi[v] = _mm256_add_ps(hi[v], h);
  }
  if (__builtin_expect(e[7] != 0, 0)) {
    for (uint32_t b = beyond_slots(m.masks[2 * w]); b; b &= b - 1)
      for (int v = 0; v < V; ++v) lo[v] = _mm256_add_ps(lo[v], _mm256_loadu_ps(x + row_of(__builtin_ctz(b)) * tp + 8 * v));
    for (uint32_t b = beyond_slots(m.masks[2 * w + 1]); b; b &= b - 1)
      for (int v = 0; v < V; ++v) hi[v] = _mm256_add_ps(hi[v], _mm256_loadu_ps(x + row_of(__builtin_ctz(b)) * tp + 8 * v));
  }
  c3 += e[6];
  return true;
}

// TP = 8 * V tokens (one AVX2 register per 8), xs rows of TP floats; y[t] for t < TP. Returns
// false on a malformed row (a codeword beyond the dictionary, a codeword starting past the width,
// or a row not ending at its width): the caller raises.
template <int V>
QMOE_SLOTS_AVX2 bool row_v(const Matrix& m, int64_t r, const float* xs, float* y) {
  const int64_t limit = 3 * ((m.width + 1) / 2);  // rows of the width, rounded up to a pair
  // Two sets of sums, a codeword each in turn: the add latency, not its throughput, would bound one.
  __m256 lo0[V], hi0[V], lo1[V], hi1[V];
  for (int v = 0; v < V; ++v) lo0[v] = hi0[v] = lo1[v] = hi1[v] = _mm256_setzero_ps();
  int64_t c3 = 0, k = m.offsets[r];
  const int64_t stop = m.offsets[r + 1];
  for (; k + 1 < stop; k += 2)
    if (!slot_step<V>(m, k, xs, c3, limit, lo0, hi0) || !slot_step<V>(m, k + 1, xs, c3, limit, lo1, hi1)) return false;
  if (k < stop && !slot_step<V>(m, k, xs, c3, limit, lo0, hi0)) return false;
  if (c3 != limit) return false;
  const __m256 lov = _mm256_set1_ps(m.lo[r]), hiv = _mm256_set1_ps(m.hi[r]);
  for (int v = 0; v < V; ++v)
    _mm256_storeu_ps(y + 8 * v, _mm256_fmadd_ps(lov, _mm256_add_ps(lo0[v], lo1[v]),
                                                _mm256_mul_ps(hiv, _mm256_add_ps(hi0[v], hi1[v]))));
  return true;
}

}  // namespace qmoe_slots
