// The CPU decode-matmul of packed experts: y = x Wᵀ for dictionary-coded ternary W, at any token
// count through a lookup layout built once per matrix, and for bit-packed b-bit W at 1..32 tokens
// (qmoe_cli/codec/cpu_matmul.py is the typed Python side; qmoe_cli/codec/rows.py and
// codec/bitpack.py hold the stored formats).
//
// Ternary. The dictionary code (~0.7 bits a weight) has codewords of 1..14 pairs that start at any
// even column, so a kernel reading it pays per codeword for turning its masks into lanes: ~9 cycles
// (docs/cpu.md), 7% of the bytes-read floor. Each matrix is therefore transcoded once
// (`ternary_layout`, the time of 7-10 one-token products) into a *lookup layout*
// whose codes align to groups of 4 input columns, 2 bits a weight (the T-MAC / bitnet.cpp idea):
// - rows in blocks of 16 and columns in chunks of 16 (4 groups of 4): [blocks][chunks][16 rows]
//   uint32. Byte k of a row's word is group k's lo nibble | hi nibble << 4 (bit j: column 4k + j
//   of the chunk is lo / hi). Padding rows and columns hold zeros.
// - Per product and token, the tables of each group's 16 subset sums: tab[g][m] = the sum of
//   x[4g + j] over the bits j of m, fp32 (64 bytes a group).
// - y[r] = lo[r] * sum_g tab[g][lo nibble] + hi[r] * sum_g tab[g][hi nibble]: round_once_linear's
//   numerics (grids rounded to x's dtype by the caller, fp32 sums, one rounding); only the order
//   of the fp32 sums differs from a dense product. On AVX-512 one register holds one group's
//   table and one permute (vpermps) looks up 16 rows: 2 permutes and 2 adds per 64 weights, and
//   no horizontal sums, since rows are lanes. AVX2 splits a table over two registers (2 permutes
//   and a blend a lookup); portable C++ looks up row by row.
// b-bit (cpu_matmul_bits.cpp): 16 codes (2b bytes, MSB first) become 16 int32 lanes with one byte
// shuffle and one variable shift, then w = scale * (q - zero), rounded to x's dtype.
//
// Variants: AVX-512 (F/BW/VL/DQ), AVX2 (+FMA, F16C), portable C++, compiled side by side with
// `target` attributes and picked at run time (`isa` argument: 0 portable, 1 AVX2, 2 AVX-512,
// -1 the best this CPU runs). Rows are split over torch's intra-op threads (at::parallel_for),
// and rows are independent, so the thread count cannot change a result.

#include "cpu_matmul.h"

#include <torch/library.h>

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

// ---------------------------------------------------------------- the lookup layout
constexpr int64_t kBlock = 16;  // rows a block: one 32-bit lane each
constexpr int64_t kChunk = 16;  // columns a chunk: 4 groups of 4, one byte of each in a row's word
constexpr int64_t kFloatsPerChunk = 64;  // 4 groups x 16 subset sums
constexpr int64_t kTableTokens = 32;  // tokens whose tables are built at once: 16 bytes a column each

inline int64_t chunks_of(int64_t width) { return (width + kChunk - 1) / kChunk; }
inline int64_t blocks_of(int64_t rows) { return (rows + kBlock - 1) / kBlock; }

// 16 bits -> 4 bytes: nibble k to the low half of byte k.
inline uint32_t spread(uint32_t v) { return (v & 0xFu) | (v & 0xF0u) << 4 | (v & 0xF00u) << 8 | (v & 0xF000u) << 12; }

struct Coded {  // one dictionary-coded matrix, raw: row r's codewords are words[offsets[r]:offsets[r + 1]]
  const uint16_t* words;
  const int32_t* offsets;
  const uint32_t* masks;  // `Codebook.masks`: lo positions in bits 0..27 of word 0, hi of word 1, pairs in 28..31
  int64_t size, width;
};

// Row r's lo and hi bitmaps (bit c: column c is lo / hi), OR-ed into zeroed `lo`/`hi` of at least
// (max(16 * chunks, span + 28) + 63) / 64 + 1 words. False on a codeword beyond the dictionary or
// a row that does not end exactly at its span (width + 1 for an odd width: the padded pair), so
// not even a malformed matrix writes out of bounds.
bool row_bits(const Coded& m, int64_t r, uint64_t* lo, uint64_t* hi) {
  const int64_t span = m.width + m.width % 2;
  int64_t col = 0;
  for (int64_t k = m.offsets[r]; k < m.offsets[r + 1]; ++k) {
    const uint32_t w = m.words[k];
    if (w >= m.size || col >= span) return false;
    const uint64_t l = m.masks[2 * w] & 0x0FFFFFFFu, h = m.masks[2 * w + 1] & 0x0FFFFFFFu;
    const int64_t i = col >> 6, s = col & 63;
    lo[i] |= l << s;
    hi[i] |= h << s;
    if (s > 36) {  // the 28 bits spill into the next word
      lo[i + 1] |= l >> (64 - s);
      hi[i + 1] |= h >> (64 - s);
    }
    col += 2 * int64_t(m.masks[2 * w] >> 28);
  }
  return col == span;
}

// Row r's words of the layout (stride kBlock) from its bitmaps. 16 columns never straddle a
// 64-bit word of the bitmaps.
void row_words_portable(const uint64_t* lo, const uint64_t* hi, int64_t chunks, uint32_t* dst) {
  for (int64_t c = 0; c < chunks; ++c) {
    const int s = int(c % 4) * 16;
    dst[c * kBlock] = spread(uint32_t(lo[c / 4] >> s) & 0xFFFFu) | spread(uint32_t(hi[c / 4] >> s) & 0xFFFFu) << 4;
  }
}

// The same, two chunks a pair of pdep (the whole build of 4096x14336 on one Zen 4 thread: 30 ms
// -> 18). Used where AVX-512 runs: pdep is microcoded (~250 cycles) on AMD CPUs before Zen 3,
// which have no AVX-512.
__attribute__((target("bmi2"))) void row_words_bmi2(const uint64_t* lo, const uint64_t* hi, int64_t chunks,
                                                    uint32_t* dst) {
  for (int64_t c = 0; c < chunks; c += 2) {
    const int s = int(c % 4) * 16;
    const uint64_t two = _pdep_u64(uint32_t(lo[c / 4] >> s), 0x0F0F0F0F0F0F0F0Full) |
                         _pdep_u64(uint32_t(hi[c / 4] >> s), 0xF0F0F0F0F0F0F0F0ull);
    dst[c * kBlock] = uint32_t(two);
    if (c + 1 < chunks) dst[(c + 1) * kBlock] = uint32_t(two >> 32);
  }
}

// ---------------------------------------------------------------- the tables of a product
// tab [groups][16] for one token's x [width] (fp32, or bf16 bits: exact in fp32), zeros past the width.
template <typename T>
inline float as_float(T v) { return v; }
template <>
inline float as_float(uint16_t b) {  // bf16: the top 16 bits of a float
  float f;
  const uint32_t u = uint32_t(b) << 16;
  std::memcpy(&f, &u, 4);
  return f;
}

template <typename T>
void tables_portable(const T* x, int64_t width, int64_t groups, float* tab) {
  for (int64_t g = 0; g < groups; ++g, tab += 16) {
    float v[4];
    for (int j = 0; j < 4; ++j) v[j] = 4 * g + j < width ? as_float(x[4 * g + j]) : 0.0f;
    tab[0] = 0.0f;
    for (int s = 1; s < 16; ++s) tab[s] = tab[s & (s - 1)] + v[__builtin_ctz(s)];  // the subset less its lowest bit
  }
}

template <typename T>
AVX512 void tables_avx512(const T* x, int64_t width, int64_t groups, float* tab) {
  static constexpr __mmask16 kHas[4] = {0xAAAA, 0xCCCC, 0xF0F0, 0xFF00};  // subsets holding input j
  for (int64_t g = 0; g < groups; ++g) {
    __m512 t = _mm512_setzero_ps();
    for (int j = 0; j < 4; ++j)  // masked, so an inf or nan input reaches only the subsets that hold it
      if (4 * g + j < width) t = _mm512_mask_add_ps(t, kHas[j], t, _mm512_set1_ps(as_float(x[4 * g + j])));
    _mm512_storeu_ps(tab + 16 * g, t);
  }
}

template <typename T>
void build_tables(int64_t isa, const T* x, int64_t width, int64_t groups, float* tab) {
  isa == kAvx512 ? tables_avx512(x, width, groups, tab) : tables_portable(x, width, groups, tab);
}

// ---------------------------------------------------------------- the kernels
struct Lut {  // one product's tile of `n` tokens over row blocks
  const uint32_t* layout;  // [blocks][chunks][16]
  const float* lo;  // [rows], already rounded to x's dtype
  const float* hi;
  const float* tab;  // token t's tables at tab + t * stride
  int64_t rows, chunks, stride, n;
  float* y;  // token t's outputs at y[t * rows + r]
};

void lut_portable(const Lut& m, int64_t b0, int64_t b1) {
  std::vector<float> acc(2 * m.n);
  for (int64_t b = b0; b < b1; ++b)
    for (int64_t i = 0; i < kBlock && b * kBlock + i < m.rows; ++i) {
      const int64_t r = b * kBlock + i;
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t c = 0; c < m.chunks; ++c) {
        const uint32_t word = m.layout[(b * m.chunks + c) * kBlock + i];
        for (int k = 0; k < 4; ++k) {
          const uint32_t l = word >> (8 * k) & 15, h = word >> (8 * k + 4) & 15;
          for (int64_t t = 0; t < m.n; ++t) {
            const float* tab = m.tab + t * m.stride + c * kFloatsPerChunk + 16 * k;
            acc[t] += tab[l];
            acc[m.n + t] += tab[h];
          }
        }
      }
      for (int64_t t = 0; t < m.n; ++t) m.y[t * m.rows + r] = m.lo[r] * acc[t] + m.hi[r] * acc[m.n + t];
    }
}

// NT tokens of 16 rows: A chains of sums per token and side, enough to hide the add latency.
template <int NT>
AVX512 void lut_avx512(const Lut& m, int64_t b0, int64_t b1) {
  constexpr int A = NT == 1 ? 4 : NT == 2 ? 2 : 1;
  for (int64_t b = b0; b < b1; ++b) {
    __m512 lo[A][NT], hi[A][NT];
    for (int a = 0; a < A; ++a)
      for (int t = 0; t < NT; ++t) lo[a][t] = hi[a][t] = _mm512_setzero_ps();
    const uint32_t* words = m.layout + b * m.chunks * kBlock;
    for (int64_t c = 0; c < m.chunks; ++c) {
      const __m512i v = _mm512_loadu_si512(words + c * kBlock);
      const __m512i idx[8] = {v,  // vpermps reads the low 4 bits of each lane
                              _mm512_srli_epi32(v, 4),  _mm512_srli_epi32(v, 8),  _mm512_srli_epi32(v, 12),
                              _mm512_srli_epi32(v, 16), _mm512_srli_epi32(v, 20), _mm512_srli_epi32(v, 24),
                              _mm512_srli_epi32(v, 28)};
      for (int t = 0; t < NT; ++t) {
        const float* tab = m.tab + t * m.stride + c * kFloatsPerChunk;
        for (int k = 0; k < 4; ++k) {
          const __m512 g = _mm512_loadu_ps(tab + 16 * k);
          lo[k % A][t] = _mm512_add_ps(lo[k % A][t], _mm512_permutexvar_ps(idx[2 * k], g));
          hi[k % A][t] = _mm512_add_ps(hi[k % A][t], _mm512_permutexvar_ps(idx[2 * k + 1], g));
        }
      }
    }
    const int64_t r0 = b * kBlock;
    const __mmask16 live = m.rows - r0 >= kBlock ? __mmask16(0xFFFF) : __mmask16((1u << (m.rows - r0)) - 1);
    const __m512 lo_grid = _mm512_maskz_loadu_ps(live, m.lo + r0), hi_grid = _mm512_maskz_loadu_ps(live, m.hi + r0);
    for (int t = 0; t < NT; ++t) {
      for (int a = 1; a < A; ++a) {
        lo[0][t] = _mm512_add_ps(lo[0][t], lo[a][t]);
        hi[0][t] = _mm512_add_ps(hi[0][t], hi[a][t]);
      }
      const __m512 y = _mm512_fmadd_ps(hi_grid, hi[0][t], _mm512_mul_ps(lo_grid, lo[0][t]));
      _mm512_mask_storeu_ps(m.y + t * m.rows + r0, live, y);
    }
  }
}

// A 16-entry table in two registers: entries 0..7 and 8..15, picked by bit 3 of the index.
AVX2 inline __m256 lookup16(__m256 low, __m256 high, __m256i idx) {
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(low, idx), _mm256_permutevar8x32_ps(high, idx),
                          _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

// NT tokens of 8 rows (half a block) at a time.
template <int NT>
AVX2 void lut_avx2(const Lut& m, int64_t b0, int64_t b1) {
  constexpr int A = NT == 1 ? 2 : 1;
  alignas(32) float sum_lo[8], sum_hi[8];
  for (int64_t b = b0; b < b1; ++b)
    for (int64_t half = 0; half < 2 && b * kBlock + 8 * half < m.rows; ++half) {
      __m256 lo[A][NT], hi[A][NT];
      for (int a = 0; a < A; ++a)
        for (int t = 0; t < NT; ++t) lo[a][t] = hi[a][t] = _mm256_setzero_ps();
      const uint32_t* words = m.layout + b * m.chunks * kBlock + 8 * half;
      for (int64_t c = 0; c < m.chunks; ++c) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(words + c * kBlock));
        for (int k = 0; k < 4; ++k) {
          const __m256i il = _mm256_srli_epi32(v, 8 * k), ih = _mm256_srli_epi32(v, 8 * k + 4);
          for (int t = 0; t < NT; ++t) {
            const float* tab = m.tab + t * m.stride + c * kFloatsPerChunk + 16 * k;
            const __m256 g0 = _mm256_loadu_ps(tab), g1 = _mm256_loadu_ps(tab + 8);
            lo[k % A][t] = _mm256_add_ps(lo[k % A][t], lookup16(g0, g1, il));
            hi[k % A][t] = _mm256_add_ps(hi[k % A][t], lookup16(g0, g1, ih));
          }
        }
      }
      const int64_t r0 = b * kBlock + 8 * half, live = std::min<int64_t>(8, m.rows - r0);
      for (int t = 0; t < NT; ++t) {
        for (int a = 1; a < A; ++a) {
          lo[0][t] = _mm256_add_ps(lo[0][t], lo[a][t]);
          hi[0][t] = _mm256_add_ps(hi[0][t], hi[a][t]);
        }
        _mm256_store_ps(sum_lo, lo[0][t]);
        _mm256_store_ps(sum_hi, hi[0][t]);
        for (int64_t i = 0; i < live; ++i) m.y[t * m.rows + r0 + i] = m.lo[r0 + i] * sum_lo[i] + m.hi[r0 + i] * sum_hi[i];
      }
    }
}

// The rows of a lookup layout with its grids lo/hi [rows] fp32, checked against them and `width`.
int64_t layout_rows(const at::Tensor& layout, const at::Tensor& lo, const at::Tensor& hi, int64_t width) {
  check(layout, "layout", at::kInt, 3);
  check(lo, "lo", at::kFloat, 1);
  check(hi, "hi", at::kFloat, 1);
  const int64_t rows = lo.size(0), chunks = chunks_of(width);
  QMOE_CHECK(hi.size(0) == rows, "lo/hi must both be [rows], got ", lo.sizes(), " and ", hi.sizes());
  QMOE_CHECK(layout.size(0) == blocks_of(rows) && layout.size(1) == chunks && layout.size(2) == kBlock, "the layout of ",
             rows, " rows of width ", width, " must be [", blocks_of(rows), ", ", chunks, ", ", kBlock, "], got ",
             layout.sizes());
  return rows;
}

using LutKernel = void (*)(const Lut&, int64_t, int64_t);

// The kernel for a tile of `n` tokens (at most tile_tokens(isa, n)) on `isa`.
LutKernel lut_kernel(int64_t isa, int64_t n) {
  if (isa == kAvx512) {
    static const LutKernel k[] = {lut_avx512<1>, lut_avx512<2>, lut_avx512<3>, lut_avx512<4>,
                                  lut_avx512<5>, lut_avx512<6>, lut_avx512<7>, lut_avx512<8>};
    return k[n - 1];
  }
  if (isa == kAvx2) {
    static const LutKernel k[] = {lut_avx2<1>, lut_avx2<2>, lut_avx2<3>, lut_avx2<4>};
    return k[n - 1];
  }
  return lut_portable;
}

}  // namespace
}  // namespace qmoe_cpu

using namespace qmoe_cpu;

// The lookup layout of a dictionary-coded ternary W [rows, width]: words [total] int16 (uint16
// codeword indices), offsets [rows + 1] int32, masks [size, 2] int32 (`Codebook.masks`) ->
// [ceil(rows / 16), ceil(width / 16), 16] int32 (uint32 words, layout above); `isa` as for the products.
at::Tensor ternary_layout(at::Tensor words, at::Tensor offsets, at::Tensor masks, int64_t width, int64_t isa) {
  check(words, "words", at::kShort, 1);
  check(offsets, "offsets", at::kInt, 1);
  check(masks, "masks", at::kInt, 2);
  QMOE_CHECK(masks.size(1) == 2 && masks.size(0) <= 65536, "masks must be [size <= 65536, 2], got ", masks.sizes());
  QMOE_CHECK(width >= 0, "width must be >= 0, got ", width);
  const int64_t rows = offsets.size(0) - 1, total = words.size(0);
  QMOE_CHECK(rows >= 0, "offsets must hold rows + 1 entries");
  const int32_t* off = offsets.data_ptr<int32_t>();
  for (int64_t r = 0; r < rows; ++r)  // monotone and inside the words: rows may then be read blindly
    QMOE_CHECK(off[r] <= off[r + 1], "row ", r, " has codeword range [", off[r], ", ", off[r + 1], ")");
  QMOE_CHECK(rows == 0 || (off[0] == 0 && off[rows] == total), "offsets must run from 0 to the ", total,
             " codewords, got ", off[0], " to ", off[rows]);
  const Coded m{reinterpret_cast<const uint16_t*>(words.data_ptr<int16_t>()), off,
                reinterpret_cast<const uint32_t*>(masks.data_ptr<int32_t>()), masks.size(0), width};
  const int64_t chunks = chunks_of(width), bitmap = (std::max(kChunk * chunks, width + 1 + 28) + 63) / 64 + 1;
  auto out = at::empty({blocks_of(rows), chunks, kBlock}, at::kInt);
  uint32_t* layout = reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>());
  const auto row_words = resolve_isa(isa) == kAvx512 ? row_words_bmi2 : row_words_portable;
  at::parallel_for(0, blocks_of(rows), 1, [&](int64_t b0, int64_t b1) {
    std::vector<uint64_t> lo(bitmap), hi(bitmap);
    for (int64_t r = b0 * kBlock; r < b1 * kBlock; ++r) {  // padding rows too: zeros
      std::fill(lo.begin(), lo.end(), 0);
      std::fill(hi.begin(), hi.end(), 0);
      QMOE_CHECK(r >= rows || row_bits(m, r, lo.data(), hi.data()), "row ", r,
                 " holds a codeword beyond the dictionary's ", m.size, " or does not decode to its width ", width);
      row_words(lo.data(), hi.data(), chunks, layout + (r / kBlock) * chunks * kBlock + r % kBlock);
    }
  });
  return out;
}

// Rows [begin, end) of a ternary W [rows, width] in its lookup layout as fp32 weights
// [end - begin, width]: lo[r] where a weight's lo bit is set, hi[r] where its hi bit is, else 0
// (lo/hi [rows] fp32: the stored grids, unrounded).
at::Tensor ternary_unpack(at::Tensor layout, at::Tensor lo, at::Tensor hi, int64_t width, int64_t begin, int64_t end) {
  const int64_t rows = layout_rows(layout, lo, hi, width), chunks = chunks_of(width);
  QMOE_CHECK(0 <= begin && begin <= end && end <= rows, "rows [", begin, ", ", end, ") are not within the ", rows);
  auto out = at::empty({end - begin, width}, at::kFloat);
  const uint32_t* words = reinterpret_cast<const uint32_t*>(layout.data_ptr<int32_t>());
  const float *lo_grid = lo.data_ptr<float>(), *hi_grid = hi.data_ptr<float>();
  float* dense = out.data_ptr<float>();
  at::parallel_for(begin, end, kBlock, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint32_t* row = words + (r / kBlock) * chunks * kBlock + r % kBlock;
      float* dst = dense + (r - begin) * width;
      for (int64_t col = 0; col < width; ++col) {
        const uint32_t word = row[col / kChunk * kBlock];
        const int bit = int(col % kChunk / 4) * 8 + int(col % 4);  // the lo bit; the hi bit is 4 above
        dst[col] = word >> bit & 1 ? lo_grid[r] : word >> (bit + 4) & 1 ? hi_grid[r] : 0.0f;
      }
    }
  });
  return out;
}

// y = x Wᵀ for a ternary W [rows, width] in its lookup layout [ceil(rows / 16), ceil(width / 16), 16]
// int32, lo/hi [rows] fp32 (one grid per row, already rounded to x's dtype by the caller), x
// [n, width] fp32 or bf16. -> y [n, rows] in x's dtype.
at::Tensor ternary_matmul(at::Tensor layout, at::Tensor lo, at::Tensor hi, at::Tensor x, int64_t isa) {
  QMOE_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x must be fp32 or bf16, got ",
             x.scalar_type());
  check(x, "x", x.scalar_type(), 2);
  const int64_t n = x.size(0), width = x.size(1), rows = layout_rows(layout, lo, hi, width), chunks = chunks_of(width);
  isa = resolve_isa(isa);
  const int64_t stride = chunks * kFloatsPerChunk, step = tile_tokens(isa, n);
  auto tables = at::empty({std::min(n, kTableTokens), stride}, at::kFloat);  // 16 bytes a column and token
  auto out = at::empty({n, rows}, at::kFloat);
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  for (int64_t first = 0; first < n; first += kTableTokens) {
    const int64_t count = std::min(kTableTokens, n - first);
    float* tab = tables.data_ptr<float>();
    at::parallel_for(0, count, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t start = (first + t) * width;
        if (bf16)
          build_tables(isa, reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()) + start, width, 4 * chunks,
                       tab + t * stride);
        else
          build_tables(isa, x.data_ptr<float>() + start, width, 4 * chunks, tab + t * stride);
      }
    });
    // One region for all token tiles; each thread runs the tiles in turn over its row blocks, so a
    // tile's tables stay in cache over the rows.
    at::parallel_for(0, blocks_of(rows), 1, [&](int64_t b0, int64_t b1) {
      for (int64_t t0 = 0; t0 < count; t0 += step) {
        const Lut m{reinterpret_cast<const uint32_t*>(layout.data_ptr<int32_t>()), lo.data_ptr<float>(),
                    hi.data_ptr<float>(), tab + t0 * stride, rows, chunks, stride, std::min(step, count - t0),
                    out.data_ptr<float>() + (first + t0) * rows};
        lut_kernel(isa, m.n)(m, b0, b1);
      }
    });
  }
  return bf16 ? out.to(at::kBFloat16) : out;
}

// torch.ops.qmoe_cpu_matmul.*: schemas in the types the Python side passes (Tensor, int = int64_t).
TORCH_LIBRARY(qmoe_cpu_matmul, m) {
  m.def("best_isa() -> int", &best_isa);  // the fastest variant this CPU runs: 0 portable, 1 AVX2, 2 AVX-512
  m.def("ternary_layout(Tensor words, Tensor offsets, Tensor masks, int width, int isa) -> Tensor", &ternary_layout);
  m.def("ternary_matmul(Tensor layout, Tensor lo, Tensor hi, Tensor x, int isa) -> Tensor", &ternary_matmul);
  m.def("ternary_unpack(Tensor layout, Tensor lo, Tensor hi, int width, int begin, int end) -> Tensor", &ternary_unpack);
  m.def("bitpacked_matmul(Tensor packed, Tensor scale, Tensor zero, Tensor x, int bits, int group_cols, int round, "
        "int isa) -> Tensor", &bitpacked_matmul);
}
