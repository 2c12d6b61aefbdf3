// The CPU decode-matmul of bit-packed b-bit experts (see cpu_matmul.cpp for the plan): each row
// is ceil(width * b / 8) bytes of codes, MSB first (qmoe_cli/codec/bitpack.py); w = scale *
// (q - zero) per column group, rounded to x's dtype, products summed in fp32.
//
// 16 codes are 2b bytes, so a chunk of 16 columns starts on a byte. Lane i's code lies in the two
// bytes from bit i * b: one byte shuffle puts them big-endian in lane i (pshufb works within
// 128-bit lanes, so the 16 bytes are broadcast to each), one variable shift and a mask finish it.

#include "cpu_matmul.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace qmoe_cpu {
namespace {

enum Round : int64_t { kNone = 0, kBf16 = 1, kHalf = 2 };  // the dtype of x, which the weights are rounded to

struct Bits {  // one bit-packed matrix, raw, with its unpacking controls
  const uint8_t* packed;
  const uint8_t* end;  // past the last row
  const float* scale;
  const float* zero;
  int64_t row_bytes, groups, group_cols, bits, width, round;
  alignas(64) int8_t shuffle[64];  // lane i: bytes (second, first, none, none) of its code
  alignas(64) int32_t shift[16];  // lane i: right shift that leaves its code in the low bits
};

void unpack_controls(Bits& m) {
  for (int i = 0; i < 16; ++i) {
    const int p = i * int(m.bits), j = p >> 3, off = p & 7;
    m.shuffle[4 * i] = off + m.bits > 8 ? int8_t(j + 1) : int8_t(-128);  // -128: pshufb writes a zero
    m.shuffle[4 * i + 1] = int8_t(j);
    m.shuffle[4 * i + 2] = m.shuffle[4 * i + 3] = int8_t(-128);
    m.shift[i] = 16 - off - int(m.bits);
  }
}

// The 2b bytes of a chunk at `p` in the low bytes of a register (the rest is never shuffled in):
// one unaligned load, or a copy for the last chunks of the matrix, which must not read past it.
inline __m128i chunk_bytes(const Bits& m, const uint8_t* p) {
  if (__builtin_expect(p + 16 <= m.end, 1)) return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  alignas(16) uint8_t buf[16] = {0};
  std::memcpy(buf, p, 2 * m.bits);
  return _mm_load_si128(reinterpret_cast<const __m128i*>(buf));
}

// Columns of one grid in the SIMD paths (a multiple of 16 there), or all `full` with one grid a row.
inline int64_t span(const Bits& m, int64_t full) { return m.groups > 1 ? m.group_cols : full; }

inline float code_at(const uint8_t* row, int64_t c, int64_t bits) {
  const int64_t p = c * bits, j = p >> 3, off = p & 7;
  uint32_t v = uint32_t(row[j]) << 8;
  if (off + bits > 8) v |= row[j + 1];
  return float((v >> (16 - off - bits)) & ((1u << bits) - 1));
}

inline float rounded(float w, int64_t round) {
  return round == kBf16 ? float(c10::BFloat16(w)) : round == kHalf ? float(c10::Half(w)) : w;
}

// Columns [begin, width) of row r, one weight at a time, added to acc[t] (the SIMD paths' tail).
void bits_tail(const Bits& m, int64_t r, const Tile& tile, int64_t begin, float* acc) {
  const uint8_t* row = m.packed + r * m.row_bytes;
  for (int64_t c = begin; c < m.width; ++c) {
    const int64_t g = r * m.groups + c / m.group_cols;
    const float w = rounded(m.scale[g] * (code_at(row, c, m.bits) - m.zero[g]), m.round);
    for (int64_t t = 0; t < tile.n; ++t) acc[t] += w * tile.x[t * tile.stride + c];
  }
}

void bits_row_portable(const Bits& m, int64_t r, const Tile& tile) {
  std::vector<float> acc(tile.n, 0.0f);
  bits_tail(m, r, tile, 0, acc.data());
  for (int64_t t = 0; t < tile.n; ++t) tile.y[t * tile.rows + r] = acc[t];
}

AVX512 inline __m512 round512(__m512 w, int64_t round) {
  if (round == kBf16) {  // round to nearest even on the top 16 bits, as c10::BFloat16 does for finite values
    const __m512i u = _mm512_castps_si512(w);
    const __m512i bias = _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), _mm512_and_si512(_mm512_srli_epi32(u, 16),
                                                                                          _mm512_set1_epi32(1)));
    return _mm512_castsi512_ps(_mm512_and_si512(_mm512_add_epi32(u, bias), _mm512_set1_epi32(int(0xFFFF0000u))));
  }
  if (round == kHalf) return _mm512_cvtph_ps(_mm512_cvtps_ph(w, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  return w;
}

template <int NT>
AVX512 void bits_row_avx512(const Bits& m, int64_t r, const Tile& tile) {
  __m512 acc[NT];
  for (int t = 0; t < NT; ++t) acc[t] = _mm512_setzero_ps();
  const uint8_t* row = m.packed + r * m.row_bytes;
  const __m512i shuffle = _mm512_load_si512(m.shuffle), shift = _mm512_load_si512(m.shift);
  const __m512i low = _mm512_set1_epi32((1 << m.bits) - 1);
  const int64_t full = m.width / 16 * 16, chunk = 2 * m.bits;
  for (int64_t c0 = 0; c0 < full; c0 += span(m, full)) {  // one grid at a time: no division per chunk
    const int64_t g = r * m.groups + c0 / m.group_cols, stop = std::min(full, c0 + span(m, full));
    const __m512 scale = _mm512_set1_ps(m.scale[g]), zero = _mm512_set1_ps(m.zero[g]);
    for (int64_t c = c0; c < stop; c += 16) {
      const __m512i bytes = _mm512_broadcast_i32x4(chunk_bytes(m, row + c / 16 * chunk));
      const __m512i q = _mm512_and_si512(_mm512_srlv_epi32(_mm512_shuffle_epi8(bytes, shuffle), shift), low);
      const __m512 w = round512(_mm512_mul_ps(scale, _mm512_sub_ps(_mm512_cvtepi32_ps(q), zero)), m.round);
      for (int t = 0; t < NT; ++t) acc[t] = _mm512_fmadd_ps(w, _mm512_loadu_ps(tile.x + t * tile.stride + c), acc[t]);
    }
  }
  float sums[NT];
  for (int t = 0; t < NT; ++t) sums[t] = _mm512_reduce_add_ps(acc[t]);
  bits_tail(m, r, tile, full, sums);
  for (int t = 0; t < NT; ++t) tile.y[t * tile.rows + r] = sums[t];
}

AVX2 inline __m256 round256(__m256 w, int64_t round) {
  if (round == kBf16) {
    const __m256i u = _mm256_castps_si256(w);
    const __m256i bias = _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), _mm256_and_si256(_mm256_srli_epi32(u, 16),
                                                                                          _mm256_set1_epi32(1)));
    return _mm256_castsi256_ps(_mm256_and_si256(_mm256_add_epi32(u, bias), _mm256_set1_epi32(int(0xFFFF0000u))));
  }
  if (round == kHalf) return _mm256_cvtph_ps(_mm256_cvtps_ph(w, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  return w;
}

template <int NT>
AVX2 void bits_row_avx2(const Bits& m, int64_t r, const Tile& tile) {
  __m256 acc[NT];
  for (int t = 0; t < NT; ++t) acc[t] = _mm256_setzero_ps();
  const uint8_t* row = m.packed + r * m.row_bytes;
  const __m256i low = _mm256_set1_epi32((1 << m.bits) - 1);
  const int64_t full = m.width / 16 * 16, chunk = 2 * m.bits;
  for (int64_t c0 = 0; c0 < full; c0 += span(m, full)) {
    const int64_t g = r * m.groups + c0 / m.group_cols, stop = std::min(full, c0 + span(m, full));
    const __m256 scale = _mm256_set1_ps(m.scale[g]), zero = _mm256_set1_ps(m.zero[g]);
    for (int64_t c = c0; c < stop; c += 16) {
      const __m256i bytes = _mm256_broadcastsi128_si256(chunk_bytes(m, row + c / 16 * chunk));
      for (int h = 0; h < 2; ++h) {  // lanes 8h .. 8h + 7
        const __m256i ctl = _mm256_load_si256(reinterpret_cast<const __m256i*>(m.shuffle + 32 * h));
        const __m256i sh = _mm256_load_si256(reinterpret_cast<const __m256i*>(m.shift + 8 * h));
        const __m256i q = _mm256_and_si256(_mm256_srlv_epi32(_mm256_shuffle_epi8(bytes, ctl), sh), low);
        const __m256 w = round256(_mm256_mul_ps(scale, _mm256_sub_ps(_mm256_cvtepi32_ps(q), zero)), m.round);
        for (int t = 0; t < NT; ++t)
          acc[t] = _mm256_fmadd_ps(w, _mm256_loadu_ps(tile.x + t * tile.stride + c + 8 * h), acc[t]);
      }
    }
  }
  float sums[NT];
  for (int t = 0; t < NT; ++t) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc[t]), _mm256_extractf128_ps(acc[t], 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    sums[t] = _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
  bits_tail(m, r, tile, full, sums);
  for (int t = 0; t < NT; ++t) tile.y[t * tile.rows + r] = sums[t];
}

using BitsRow = void (*)(const Bits&, int64_t, const Tile&);

BitsRow bits_kernel(int64_t isa, int64_t n) {
  if (isa == kAvx512) {
    static const BitsRow k[] = {bits_row_avx512<1>, bits_row_avx512<2>, bits_row_avx512<3>, bits_row_avx512<4>,
                                bits_row_avx512<5>, bits_row_avx512<6>, bits_row_avx512<7>, bits_row_avx512<8>};
    return k[n - 1];
  }
  if (isa == kAvx2) {
    static const BitsRow k[] = {bits_row_avx2<1>, bits_row_avx2<2>, bits_row_avx2<3>, bits_row_avx2<4>};
    return k[n - 1];
  }
  return bits_row_portable;
}

}  // namespace
}  // namespace qmoe_cpu

using namespace qmoe_cpu;

// y = x Wᵀ for a bit-packed W [rows, width]: packed [rows, ceil(width * bits / 8)] uint8,
// scale/zero [rows, groups] fp32 (column c in group c / group_cols), x [n, width] fp32, round:
// 0 fp32 weights, 1 rounded to bf16, 2 to fp16 (x's dtype). -> y [n, rows] fp32.
at::Tensor bitpacked_matmul(at::Tensor packed, at::Tensor scale, at::Tensor zero, at::Tensor x,
                               int64_t bits, int64_t group_cols, int64_t round, int64_t isa) {
  check(packed, "packed", at::kByte, 2);
  check(scale, "scale", at::kFloat, 2);
  check(zero, "zero", at::kFloat, 2);
  check(x, "x", at::kFloat, 2);
  const int64_t rows = packed.size(0), width = x.size(1), n = x.size(0), groups = scale.size(1);
  QMOE_CHECK(1 <= bits && bits <= 8, "bits must be in [1, 8], got ", bits);
  QMOE_CHECK(packed.size(1) == (width * bits + 7) / 8, width, " codes of ", bits, " bits need ", (width * bits + 7) / 8,
             " bytes a row, got ", packed.size(1));
  QMOE_CHECK(group_cols >= 1 && (width + group_cols - 1) / group_cols == groups, "width ", width, " in groups of ",
             group_cols, " columns needs ", (width + group_cols - 1) / group_cols, " grids a row, got ", groups);
  QMOE_CHECK(scale.size(0) == rows && zero.sizes() == scale.sizes(), "scale/zero must be [", rows, ", ", groups,
             "], got ", scale.sizes(), " and ", zero.sizes());
  QMOE_CHECK(0 <= round && round <= 2, "round must be 0 (fp32), 1 (bf16) or 2 (fp16), got ", round);
  isa = resolve_isa(isa);
  if (groups > 1 && group_cols % 16) isa = kPortable;  // a 16-column chunk would straddle two grids
  Bits m{packed.data_ptr<uint8_t>(), packed.data_ptr<uint8_t>() + packed.numel(), scale.data_ptr<float>(), zero.data_ptr<float>(), packed.size(1), groups,
         group_cols, bits, width, round, {}, {}};
  unpack_controls(m);
  auto xp = padded(x);
  auto out = at::empty({n, rows}, at::kFloat);
  const int64_t step = tile_tokens(isa, n);
  at::parallel_for(0, rows, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t t0 = 0; t0 < n; t0 += step) {
      const int64_t nt = std::min(step, n - t0);
      const Tile tile{xp.data_ptr<float>() + t0 * xp.size(1), xp.size(1), nt, out.data_ptr<float>() + t0 * rows, rows};
      const BitsRow row = bits_kernel(isa, nt);
      for (int64_t r = begin; r < end; ++r) row(m, r, tile);
    }
  });
  return out;
}
