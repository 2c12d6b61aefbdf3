// The CPU decode-matmul of packed experts: y = x Wᵀ for 1..32 tokens straight from the stored
// codes, for dictionary-coded ternary W and bit-packed b-bit W (qmoe_cli/codec/cpu_matmul.py is
// the typed Python side; qmoe_cli/codec/rows.py and codec/bitpack.py hold the formats).
//
// Why it is fast: a decode step is bound by the bytes of W read, and packed W is 20-40x smaller
// than bf16. So every codeword is expanded in registers, never through memory, and reused for
// every token of a tile:
// - ternary: a codeword is a 16-bit index into the dictionary's bit masks (`Codebook.masks`: bit
//   i of word 0 set when weight i is lo, of word 1 when it is hi, the codeword's pairs in bits
//   28..31; 512 KB for 65536 codewords, L2-resident). AVX-512 uses the masks as lane masks
//   directly; AVX2 maps each mask byte to 8 lanes of {0, 1} through a 256-entry table (8 KB,
//   L1-resident). x is copied once into a zero-padded buffer, so a codeword may read up to 32
//   columns past its start without a bounds branch (bits past the row's width multiply zeros).
//   That is 1..3 tokens (1..5 on a bf16 x with AVX-512 BF16); from kSlotTokens on, the slotted
//   sums of cpu_matmul_slots.h do work per non-zero weight instead of per lane.
// - b-bit: 16 codes (2b bytes, MSB first) become 16 int32 lanes with one byte shuffle and one
//   variable shift, then w = scale * (q - zero), rounded to x's dtype (`round_once_linear`'s
//   numerics: the weight in x's dtype, products summed in fp32, one rounding by the caller).
//
// Variants: AVX-512 (F/BW/VL), AVX2 (+FMA, F16C), portable C++, compiled side by side with
// `target` attributes and picked at run time (`isa` argument: 0 portable, 1 AVX2, 2 AVX-512,
// -1 the best this CPU runs). Rows are split over torch's intra-op threads (at::parallel_for).

#include "cpu_matmul.h"
#include "cpu_matmul_slots.h"

#include <torch/library.h>

#include <memory>

namespace qmoe_cpu {

int64_t best_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
  return kPortable;
}

int64_t resolve_isa(int64_t isa) {
  const int64_t best = best_isa();
  if (isa < 0) return best;
  QMOE_CHECK(isa <= best, "isa ", isa, " (0 portable, 1 AVX2, 2 AVX-512) is not supported by this CPU, which runs up to ",
             best);
  return isa;
}

void check(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t dim) {
  QMOE_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  QMOE_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  QMOE_CHECK(t.dim() == dim, name, " must have ", dim, " dims, got shape ", t.sizes());
  QMOE_CHECK(t.is_contiguous(), name, " must be contiguous");
}

at::Tensor padded(const at::Tensor& x) {
  // By hand, not zeros + narrow + copy_: three dispatched ops cost more than a small product's rows.
  const int64_t n = x.size(0), width = x.size(1), stride = width + kPad, bytes = x.element_size();
  auto out = at::empty({n, stride}, x.options());
  char* dst = static_cast<char*>(out.data_ptr());
  const char* src = static_cast<const char*>(x.data_ptr());
  for (int64_t t = 0; t < n; ++t) {
    std::memcpy(dst + t * stride * bytes, src + t * width * bytes, bytes * width);
    std::memset(dst + (t * stride + width) * bytes, 0, bytes * kPad);
  }
  return out;
}

namespace {

using Ternary = qmoe_slots::Matrix;  // one dictionary-coded matrix, raw (layouts: see ternary_matmul)

// ---------------------------------------------------------------- ternary, portable reference-like
// Every path returns false on a malformed row (a codeword beyond the dictionary, or a row that
// does not end at its width); the caller raises. The loaders validate first, so this is the
// guard that keeps even an unvalidated matrix from reading out of bounds, not an error path.
bool ternary_row_portable(const Ternary& m, int64_t r, const Tile& tile) {
  std::vector<float> acc(2 * tile.n, 0.0f);
  int64_t col = 0;
  for (int64_t k = m.offsets[r]; k < m.offsets[r + 1]; ++k) {
    const uint32_t word = m.words[k];
    if (word >= m.size || col >= m.width) return false;
    const uint32_t lo = m.masks[2 * word], hi = m.masks[2 * word + 1];
    for (int side = 0; side < 2; ++side)
      for (uint32_t bits = (side ? hi : lo) & 0x0FFFFFFFu; bits; bits &= bits - 1) {
        const float* xc = tile.x + col + __builtin_ctz(bits);
        for (int64_t t = 0; t < tile.n; ++t) acc[side * tile.n + t] += xc[t * tile.stride];
      }
    col += 2 * int64_t(lo >> 28);
  }
  if (col != m.width && col != m.width + 1) return false;
  for (int64_t t = 0; t < tile.n; ++t) tile.y[t * tile.rows + r] = m.lo[r] * acc[t] + m.hi[r] * acc[tile.n + t];
  return true;
}

// ---------------------------------------------------------------- ternary, AVX-512
AVX512 inline float hsum512(__m512 v) { return _mm512_reduce_add_ps(v); }

// A dictionary of all 65536 codewords holds every uint16 word: the kernels compiled for it drop
// the per-codeword range check (measured ~4% of a 1-token product on Zen 4).
constexpr int64_t kFullDictionary = 65536;
template <bool Full>
inline bool beyond(const Ternary& m, uint32_t w) { return !Full && w >= m.size; }

// One token: y = lo * sum(x over lo lanes) + hi * sum(x over hi lanes) with masked adds, two
// codewords per step into separate accumulators so the 4-cycle add latency is not the bound.
template <bool Full>
AVX512 bool ternary_row_avx512_1(const Ternary& m, int64_t r, const Tile& tile) {
  __m512 lo0 = _mm512_setzero_ps(), lo1 = lo0, hi0 = lo0, hi1 = lo0, lo2 = lo0, lo3 = lo0, hi2 = lo0, hi3 = lo0;
  const float* x = tile.x;
  int64_t col = 0, k = m.offsets[r];
  const int64_t stop = m.offsets[r + 1];
  for (; k + 1 < stop; k += 2) {
    const uint32_t wa = m.words[k], wb = m.words[k + 1];
    qmoe_slots::prefetch_entry(m.words, k, m.total, m.masks, 8);
    qmoe_slots::prefetch_entry(m.words, k + 1, m.total, m.masks, 8);
    if (beyond<Full>(m, wa) || beyond<Full>(m, wb) || col >= m.width) return false;
    const uint32_t la = m.masks[2 * wa], ha = m.masks[2 * wa + 1], lb = m.masks[2 * wb], hb = m.masks[2 * wb + 1];
    const int64_t cb = col + 2 * int64_t(la >> 28);
    if (cb >= m.width) return false;
    const __m512 xa0 = _mm512_loadu_ps(x + col), xa1 = _mm512_loadu_ps(x + col + 16);
    const __m512 xb0 = _mm512_loadu_ps(x + cb), xb1 = _mm512_loadu_ps(x + cb + 16);
    lo0 = _mm512_mask_add_ps(lo0, __mmask16(la), lo0, xa0);
    lo1 = _mm512_mask_add_ps(lo1, __mmask16((la >> 16) & 0x0FFF), lo1, xa1);
    hi0 = _mm512_mask_add_ps(hi0, __mmask16(ha), hi0, xa0);
    hi1 = _mm512_mask_add_ps(hi1, __mmask16(ha >> 16), hi1, xa1);
    lo2 = _mm512_mask_add_ps(lo2, __mmask16(lb), lo2, xb0);
    lo3 = _mm512_mask_add_ps(lo3, __mmask16((lb >> 16) & 0x0FFF), lo3, xb1);
    hi2 = _mm512_mask_add_ps(hi2, __mmask16(hb), hi2, xb0);
    hi3 = _mm512_mask_add_ps(hi3, __mmask16(hb >> 16), hi3, xb1);
    col = cb + 2 * int64_t(lb >> 28);
  }
  if (k < stop) {
    const uint32_t w = m.words[k];
    if (w >= m.size || col >= m.width) return false;
    const uint32_t l = m.masks[2 * w], h = m.masks[2 * w + 1];
    const __m512 x0 = _mm512_loadu_ps(x + col), x1 = _mm512_loadu_ps(x + col + 16);
    lo0 = _mm512_mask_add_ps(lo0, __mmask16(l), lo0, x0);
    lo1 = _mm512_mask_add_ps(lo1, __mmask16((l >> 16) & 0x0FFF), lo1, x1);
    hi0 = _mm512_mask_add_ps(hi0, __mmask16(h), hi0, x0);
    hi1 = _mm512_mask_add_ps(hi1, __mmask16(h >> 16), hi1, x1);
    col += 2 * int64_t(l >> 28);
  }
  if (col != m.width && col != m.width + 1) return false;
  const float s_lo = hsum512(_mm512_add_ps(_mm512_add_ps(lo0, lo1), _mm512_add_ps(lo2, lo3)));
  const float s_hi = hsum512(_mm512_add_ps(_mm512_add_ps(hi0, hi1), _mm512_add_ps(hi2, hi3)));
  tile.y[r] = m.lo[r] * s_lo + m.hi[r] * s_hi;
  return true;
}

// NT tokens: each codeword expanded once to its weights (lo, 0 or hi per lane), then two FMAs
// per token into two accumulators (halving the dependency chain per codeword).
template <int NT>
AVX512 bool ternary_row_avx512(const Ternary& m, int64_t r, const Tile& tile) {
  __m512 a[NT], b[NT];
  for (int t = 0; t < NT; ++t) a[t] = b[t] = _mm512_setzero_ps();
  const __m512 lov = _mm512_set1_ps(m.lo[r]), hiv = _mm512_set1_ps(m.hi[r]);
  int64_t col = 0;
  for (int64_t k = m.offsets[r]; k < m.offsets[r + 1]; ++k) {
    const uint32_t w = m.words[k];
    qmoe_slots::prefetch_entry(m.words, k, m.total, m.masks, 8);
    if (w >= m.size || col >= m.width) return false;
    const uint32_t l = m.masks[2 * w], h = m.masks[2 * w + 1];
    const __m512 w0 = _mm512_mask_mov_ps(_mm512_maskz_mov_ps(__mmask16(h), hiv), __mmask16(l), lov);
    const __m512 w1 = _mm512_mask_mov_ps(_mm512_maskz_mov_ps(__mmask16(h >> 16), hiv), __mmask16((l >> 16) & 0x0FFF),
                                         lov);
    const float* x = tile.x + col;
    for (int t = 0; t < NT; ++t) {
      a[t] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + t * tile.stride), a[t]);
      b[t] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + t * tile.stride + 16), b[t]);
    }
    col += 2 * int64_t(l >> 28);
  }
  if (col != m.width && col != m.width + 1) return false;
  for (int t = 0; t < NT; ++t) tile.y[t * tile.rows + r] = hsum512(_mm512_add_ps(a[t], b[t]));
  return true;
}

// ---------------------------------------------------------------- ternary, AVX-512 BF16 (bf16 x)
// A bf16 x and bf16 grids multiply exactly in fp32, so `vdpbf16ps` (32 bf16 products a
// instruction, summed in fp32) keeps round_once_linear's numerics while doing half the FMAs of
// the fp32 path: one 32-lane register holds a whole codeword (28 weights). Two codewords a step
// into separate accumulators: the dot product's latency, not its throughput, bounds one token.
#define AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,avx512bf16")))

struct TileBf16 {  // as Tile, x in bf16 bits
  const uint16_t* x;
  int64_t stride, n;
  float* y;
  int64_t rows;
};

AVX512BF16 inline __m512i bf16_weights(uint32_t lo_mask, uint32_t hi_mask, __m512i lov, __m512i hiv) {
  return _mm512_mask_mov_epi16(_mm512_maskz_mov_epi16(__mmask32(hi_mask), hiv), __mmask32(lo_mask & 0x0FFFFFFFu), lov);
}

template <int NT, bool Full>
AVX512BF16 bool ternary_row_bf16(const Ternary& m, int64_t r, const TileBf16& tile) {
  __m512 a[NT], b[NT];
  for (int t = 0; t < NT; ++t) a[t] = b[t] = _mm512_setzero_ps();
  uint32_t lo_bits, hi_bits;  // the grids are bf16 values: their top 16 bits are exact
  std::memcpy(&lo_bits, m.lo + r, 4);
  std::memcpy(&hi_bits, m.hi + r, 4);
  const __m512i lov = _mm512_set1_epi16(short(lo_bits >> 16)), hiv = _mm512_set1_epi16(short(hi_bits >> 16));
  int64_t col = 0, k = m.offsets[r];
  const int64_t stop = m.offsets[r + 1];
  for (; k < stop; k += 2) {
    const uint32_t wa = m.words[k], wb = k + 1 < stop ? m.words[k + 1] : 0;
    qmoe_slots::prefetch_entry(m.words, k, m.total, m.masks, 8);
    qmoe_slots::prefetch_entry(m.words, k + 1, m.total, m.masks, 8);
    if (beyond<Full>(m, wa) || beyond<Full>(m, wb) || col >= m.width) return false;
    const uint32_t la = m.masks[2 * wa], lb = k + 1 < stop ? m.masks[2 * wb] : 0, hb = k + 1 < stop ? m.masks[2 * wb + 1] : 0;
    const int64_t cb = col + 2 * int64_t(la >> 28);
    if (k + 1 < stop && cb >= m.width) return false;
    const __m512i w0 = bf16_weights(la, m.masks[2 * wa + 1], lov, hiv), w1 = bf16_weights(lb, hb, lov, hiv);
    for (int t = 0; t < NT; ++t) {
      const uint16_t* x = tile.x + t * tile.stride;
      a[t] = _mm512_dpbf16_ps(a[t], (__m512bh)w0, (__m512bh)_mm512_loadu_si512(x + col));
      b[t] = _mm512_dpbf16_ps(b[t], (__m512bh)w1, (__m512bh)_mm512_loadu_si512(x + std::min(cb, m.width)));
    }
    col = cb + 2 * int64_t(lb >> 28);
  }
  if (col != m.width && col != m.width + 1) return false;
  for (int t = 0; t < NT; ++t) tile.y[t * tile.rows + r] = _mm512_reduce_add_ps(_mm512_add_ps(a[t], b[t]));
  return true;
}

// From these many tokens the slotted sums beat expanding codewords to lanes (measured, docs/cpu.md):
// on an fp32 x, and on a bf16 x where the bf16 dot products run (half the FMAs of fp32).
constexpr int64_t kSlotTokens = 4, kSlotTokensBf16 = 6;

using TernaryRowBf16 = bool (*)(const Ternary&, int64_t, const TileBf16&);

TernaryRowBf16 ternary_kernel_bf16(int64_t n, bool full) {
  static_assert(kSlotTokensBf16 == 6, "one kernel per token count below kSlotTokensBf16");
  static const TernaryRowBf16 k[] = {ternary_row_bf16<1, false>, ternary_row_bf16<2, false>, ternary_row_bf16<3, false>,
                                     ternary_row_bf16<4, false>, ternary_row_bf16<5, false>};
  static const TernaryRowBf16 k_full[] = {ternary_row_bf16<1, true>, ternary_row_bf16<2, true>,
                                          ternary_row_bf16<3, true>, ternary_row_bf16<4, true>,
                                          ternary_row_bf16<5, true>};
  return (full ? k_full : k)[n - 1];
}

bool runs_bf16() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512bf16");
}

// ---------------------------------------------------------------- ternary, AVX2
alignas(32) float kByteLanes[256][8];  // bit j of byte i -> lane j: 1.0 or 0.0
const bool kByteLanesReady = [] {
  for (int i = 0; i < 256; ++i)
    for (int j = 0; j < 8; ++j) kByteLanes[i][j] = float((i >> j) & 1);
  return true;
}();

AVX2 inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

AVX2 inline __m256 lanes(uint32_t mask, int byte) {
  return _mm256_load_ps(kByteLanes[(mask >> (8 * byte)) & (byte == 3 ? 0x0F : 0xFF)]);
}

AVX2 bool ternary_row_avx2_1(const Ternary& m, int64_t r, const Tile& tile) {
  __m256 lo[4], hi[4];
  for (int g = 0; g < 4; ++g) lo[g] = hi[g] = _mm256_setzero_ps();
  int64_t col = 0;
  for (int64_t k = m.offsets[r]; k < m.offsets[r + 1]; ++k) {
    const uint32_t w = m.words[k];
    qmoe_slots::prefetch_entry(m.words, k, m.total, m.masks, 8);
    if (w >= m.size || col >= m.width) return false;
    const uint32_t l = m.masks[2 * w], h = m.masks[2 * w + 1];
    for (int g = 0; g < 4; ++g) {
      const __m256 x = _mm256_loadu_ps(tile.x + col + 8 * g);
      lo[g] = _mm256_fmadd_ps(lanes(l, g), x, lo[g]);
      hi[g] = _mm256_fmadd_ps(lanes(h, g), x, hi[g]);
    }
    col += 2 * int64_t(l >> 28);
  }
  if (col != m.width && col != m.width + 1) return false;
  const __m256 s_lo = _mm256_add_ps(_mm256_add_ps(lo[0], lo[1]), _mm256_add_ps(lo[2], lo[3]));
  const __m256 s_hi = _mm256_add_ps(_mm256_add_ps(hi[0], hi[1]), _mm256_add_ps(hi[2], hi[3]));
  tile.y[r] = m.lo[r] * hsum256(s_lo) + m.hi[r] * hsum256(s_hi);
  return true;
}

template <int NT>
AVX2 bool ternary_row_avx2(const Ternary& m, int64_t r, const Tile& tile) {
  __m256 a[NT], b[NT];
  for (int t = 0; t < NT; ++t) a[t] = b[t] = _mm256_setzero_ps();
  const __m256 lov = _mm256_set1_ps(m.lo[r]), hiv = _mm256_set1_ps(m.hi[r]);
  int64_t col = 0;
  for (int64_t k = m.offsets[r]; k < m.offsets[r + 1]; ++k) {
    const uint32_t w = m.words[k];
    qmoe_slots::prefetch_entry(m.words, k, m.total, m.masks, 8);
    if (w >= m.size || col >= m.width) return false;
    const uint32_t l = m.masks[2 * w], h = m.masks[2 * w + 1];
    const float* x = tile.x + col;
    for (int g = 0; g < 4; ++g) {
      const __m256 wg = _mm256_fmadd_ps(lov, lanes(l, g), _mm256_mul_ps(hiv, lanes(h, g)));
      for (int t = 0; t < NT; ++t) {
        __m256& acc = g % 2 ? b[t] : a[t];
        acc = _mm256_fmadd_ps(wg, _mm256_loadu_ps(x + t * tile.stride + 8 * g), acc);
      }
    }
    col += 2 * int64_t(l >> 28);
  }
  if (col != m.width && col != m.width + 1) return false;
  for (int t = 0; t < NT; ++t) tile.y[t * tile.rows + r] = hsum256(_mm256_add_ps(a[t], b[t]));
  return true;
}

using TernaryRow = bool (*)(const Ternary&, int64_t, const Tile&);

// The row function for `n` tokens on `isa` (`full`: a dictionary of kFullDictionary codewords): SIMD for
// n < kSlotTokens, portable for any n.
TernaryRow ternary_kernel(int64_t isa, int64_t n, bool full) {
  static_assert(kSlotTokens == 4, "one SIMD kernel per token count below kSlotTokens");
  if (isa == kAvx512) {
    static const TernaryRow k[] = {ternary_row_avx512_1<false>, ternary_row_avx512<2>, ternary_row_avx512<3>};
    return n == 1 && full ? ternary_row_avx512_1<true> : k[n - 1];
  }
  if (isa == kAvx2) {
    static const TernaryRow k[] = {ternary_row_avx2_1, ternary_row_avx2<2>, ternary_row_avx2<3>};
    return k[n - 1];
  }
  return ternary_row_portable;
}

// kSlotTokens..32 tokens on AVX2 or AVX-512 (cpu_matmul_slots.h): tiles of TP = 8, 16 or 32 tokens, x
// slotted once per tile before the rows are split over the threads.
template <typename T, typename ToFloat>
void slot_matmul(const Ternary& m, const T* x, int64_t n, int64_t rows, float* y, ToFloat to_float) {
  using qmoe_slots::row_v;
  const int64_t tp = n <= 8 ? 8 : n <= 16 ? 16 : 32, tiles = (n + tp - 1) / tp;
  const int64_t tile_floats = qmoe_slots::slotted_rows(m.width) * tp;
  std::unique_ptr<float[]> xs(new float[tiles * tile_floats]);
  for (int64_t i = 0; i < tiles; ++i)
    qmoe_slots::slot_x(x + i * tp * m.width, m.width, std::min(tp, n - i * tp), m.width, tp, xs.get() + i * tile_floats,
                       to_float);
  const auto row = tp == 8 ? row_v<1> : tp == 16 ? row_v<2> : row_v<4>;
  at::parallel_for(0, rows, kGrain, [&](int64_t begin, int64_t end) {
    alignas(32) float sums[32];
    for (int64_t i = 0; i < tiles; ++i) {  // tiles outermost: one tile of x stays in L2 over the rows
      const int64_t t0 = i * tp, nt = std::min(tp, n - t0);
      for (int64_t r = begin; r < end; ++r) {
        QMOE_CHECK(row(m, r, xs.get() + i * tile_floats, sums), "row ", r, " holds a codeword beyond the dictionary's ",
                   m.size, " or does not decode to its width ", m.width);
        for (int64_t j = 0; j < nt; ++j) y[(t0 + j) * rows + r] = sums[j];
      }
    }
  });
}

}  // namespace
}  // namespace qmoe_cpu

using namespace qmoe_cpu;

// The slot table of a dictionary (cpu_matmul_slots.h): masks [size, 2] int32 -> [size, 8] uint8.
at::Tensor ternary_slots(at::Tensor masks) {
  check(masks, "masks", at::kInt, 2);
  QMOE_CHECK(masks.size(1) == 2 && masks.size(0) <= 65536, "masks must be [size <= 65536, 2], got ", masks.sizes());
  auto slots = at::empty({masks.size(0), 8}, at::kByte);
  qmoe_slots::build_slots(reinterpret_cast<const uint32_t*>(masks.data_ptr<int32_t>()), masks.size(0),
                          slots.data_ptr<uint8_t>());
  return slots;
}

// y = x Wᵀ for a dictionary-coded ternary W [rows, width] with one grid per row.
// words [total] int16 (uint16 codeword indices), offsets [rows + 1] int32, masks [size, 2] int32
// (`Codebook.masks`), slots [size, 8] uint8 (`ternary_slots(masks)`), lo/hi [rows] fp32 (already
// rounded to x's dtype by the caller), x [n, width] fp32 or bf16. -> y [n, rows] in x's dtype.
// Few tokens: each codeword expanded to lanes (masked adds; bf16 x on AVX-512 BF16: bf16 dot
// products); from kSlotTokens on: slotted sums, whose cost grows slower with the tokens.
at::Tensor ternary_matmul(at::Tensor words, at::Tensor offsets, at::Tensor masks, at::Tensor slots,
                             at::Tensor lo, at::Tensor hi, at::Tensor x, int64_t isa) {
  check(words, "words", at::kShort, 1);
  check(offsets, "offsets", at::kInt, 1);
  check(masks, "masks", at::kInt, 2);
  check(slots, "slots", at::kByte, 2);
  check(lo, "lo", at::kFloat, 1);
  check(hi, "hi", at::kFloat, 1);
  QMOE_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x must be fp32 or bf16, got ",
             x.scalar_type());
  check(x, "x", x.scalar_type(), 2);
  const int64_t rows = offsets.size(0) - 1, n = x.size(0);
  QMOE_CHECK(rows >= 0 && lo.size(0) == rows && hi.size(0) == rows, "lo/hi must be [", rows, "], got ", lo.sizes(),
             " and ", hi.sizes());
  QMOE_CHECK(masks.size(1) == 2 && masks.size(0) <= 65536, "masks must be [size <= 65536, 2], got ", masks.sizes());
  QMOE_CHECK(slots.size(0) == masks.size(0) && slots.size(1) == 8, "slots must be [", masks.size(0), ", 8], got ",
             slots.sizes());
  isa = resolve_isa(isa);
  const Ternary m{reinterpret_cast<const uint16_t*>(words.data_ptr<int16_t>()), offsets.data_ptr<int32_t>(),
                  reinterpret_cast<const uint32_t*>(masks.data_ptr<int32_t>()), slots.data_ptr<uint8_t>(),
                  lo.data_ptr<float>(), hi.data_ptr<float>(), masks.size(0), x.size(1), words.size(0)};
  const int32_t* off = m.offsets;
  for (int64_t r = 0; r < rows; ++r)  // monotone and inside the words: rows may then be read blindly
    QMOE_CHECK(off[r] <= off[r + 1], "row ", r, " has codeword range [", off[r], ", ", off[r + 1], ")");
  QMOE_CHECK(rows == 0 || (off[0] == 0 && off[rows] == m.total), "offsets must run from 0 to the ", m.total,
             " codewords, got ", off[0], " to ", off[rows]);
  auto out = at::empty({n, rows}, at::kFloat);
  float* y = out.data_ptr<float>();
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  if (isa != kPortable && n >= (bf16 && isa == kAvx512 && runs_bf16() ? kSlotTokensBf16 : kSlotTokens)) {
    if (bf16)  // exact in fp32: the top 16 bits of a float
      slot_matmul(m, reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()), n, rows, y,
                  [](uint16_t b) {
                    float f;
                    const uint32_t u = uint32_t(b) << 16;
                    std::memcpy(&f, &u, 4);
                    return f;
                  });
    else
      slot_matmul(m, x.data_ptr<float>(), n, rows, y, [](float v) { return v; });
    return bf16 ? out.to(at::kBFloat16) : out;
  }
  // Fewer tokens than the slotted sums take (or portable): one tile of all n.
  if (bf16 && isa == kAvx512 && runs_bf16()) {
    auto xp = padded(x);
    const TileBf16 tile{reinterpret_cast<const uint16_t*>(xp.data_ptr<at::BFloat16>()), xp.size(1), n, y, rows};
    const TernaryRowBf16 row = ternary_kernel_bf16(n, m.size == kFullDictionary);
    at::parallel_for(0, rows, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        QMOE_CHECK(row(m, r, tile), "row ", r, " holds a codeword beyond the dictionary's ", m.size,
                   " or does not decode to its width ", m.width);
    });
    return out.to(at::kBFloat16);
  }
  auto xp = padded(x.to(at::kFloat));  // a bf16 x is exact in fp32
  const Tile tile{xp.data_ptr<float>(), xp.size(1), n, y, rows};
  const TernaryRow row = ternary_kernel(isa, n, m.size == kFullDictionary);
  at::parallel_for(0, rows, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      QMOE_CHECK(row(m, r, tile), "row ", r, " holds a codeword beyond the dictionary's ", m.size,
                 " or does not decode to its width ", m.width);
  });
  return bf16 ? out.to(at::kBFloat16) : out;
}

// torch.ops.qmoe_cpu_matmul.*: schemas in the types the Python side passes (Tensor, int = int64_t).
TORCH_LIBRARY(qmoe_cpu_matmul, m) {
  m.def("best_isa() -> int", &best_isa);  // the fastest variant this CPU runs: 0 portable, 1 AVX2, 2 AVX-512
  m.def("ternary_slots(Tensor masks) -> Tensor", &ternary_slots);  // a dictionary's slot table
  m.def("ternary_matmul(Tensor words, Tensor offsets, Tensor masks, Tensor slots, Tensor lo, Tensor hi, Tensor x, "
        "int isa) -> Tensor", &ternary_matmul);
  m.def("bitpacked_matmul(Tensor packed, Tensor scale, Tensor zero, Tensor x, int bits, int group_cols, int round, "
        "int isa) -> Tensor", &bitpacked_matmul);
}
