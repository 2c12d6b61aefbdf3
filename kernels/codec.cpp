// Dictionary codec of ternary rows (see qmoe_cli/codec/dictionary.py for the algorithm and
// qmoe_cli/codec/rows.py for the typed Python wrappers): greedy longest-match encoding over a
// trie, decoding through an expanded table, and decoding straight into a dense fp32 block for
// the CPU decode-matmul. Rows are independent, so every function splits rows over threads.
//
// Codes are uint8 0 (lo), 1 (zero), 2 (hi); symbols are pairs 3a + b; an odd width pads its
// last pair with the zero code. Codewords are 16-bit indices into the dictionary.

// Only the headers this file uses: <torch/extension.h> (all of libtorch and pybind11) takes ~28 s of
// CPU time to compile, this set ~5 s, and the ops are registered with the dispatcher
// (TORCH_LIBRARY) instead of as a Python module, so no Python headers are needed.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace {

constexpr int kSymbols = 9;

#define QMOE_CHECK(cond, ...) TORCH_CHECK(cond, "qmoe codec: ", __VA_ARGS__)

void check_cpu_contiguous(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t dim) {
  QMOE_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  QMOE_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  QMOE_CHECK(t.dim() == dim, name, " must have ", dim, " dims, got shape ", t.sizes());
  QMOE_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// Runs fn(begin, end) over [0, n) split into at most `threads` contiguous ranges; rethrows the
// first error of any worker on the calling thread (a C++ exception must not escape a thread).
void parallel_rows(int64_t n, int64_t threads, const std::function<void(int64_t, int64_t)>& fn) {
  threads = std::max<int64_t>(1, std::min<int64_t>(threads, n));
  if (threads == 1) {
    fn(0, n);
    return;
  }
  std::vector<std::thread> pool;
  std::vector<std::string> errors(threads);
  int64_t step = (n + threads - 1) / threads;
  for (int64_t t = 0; t < threads; ++t) {
    int64_t begin = t * step, end = std::min(n, begin + step);
    pool.emplace_back([&, t, begin, end] {
      try {
        if (begin < end) fn(begin, end);
      } catch (const std::exception& e) {
        errors[t] = e.what();
      }
    });
  }
  for (auto& th : pool) th.join();
  for (const auto& e : errors) QMOE_CHECK(e.empty(), e);
}

}  // namespace

// codes [rows, width] uint8 in {0,1,2}; children [size + 1, 9] int32: children[v][s] is the
// codeword extending codeword v by symbol s, or -1; row `size` is the root (every single symbol
// must be a codeword). Returns (words [total] int16 holding uint16 bits, offsets [rows + 1] int32).
std::vector<at::Tensor> encode(at::Tensor codes, at::Tensor children, int64_t threads) {
  check_cpu_contiguous(codes, "codes", at::kByte, 2);
  check_cpu_contiguous(children, "children", at::kInt, 2);
  QMOE_CHECK(children.size(1) == kSymbols && children.size(0) >= kSymbols + 1,
             "children must be [size + 1, 9], got ", children.sizes());
  const int64_t rows = codes.size(0), width = codes.size(1), pairs = (width + 1) / 2;
  const int64_t size = children.size(0) - 1;
  QMOE_CHECK(size <= 65536, "at most 65536 codewords fit 16 bits, got ", size);
  const uint8_t* data = codes.data_ptr<uint8_t>();
  const int32_t* child = children.data_ptr<int32_t>();
  const int32_t* root = child + size * kSymbols;
  for (int s = 0; s < kSymbols; ++s) QMOE_CHECK(root[s] >= 0 && root[s] < size, "symbol ", s, " has no codeword");

  std::vector<int64_t> counts(rows);
  const int64_t n_threads = std::max<int64_t>(1, std::min<int64_t>(threads, rows));
  std::vector<std::vector<uint16_t>> parts(n_threads);
  const int64_t step = rows ? (rows + n_threads - 1) / n_threads : 1;
  parallel_rows(n_threads, n_threads, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      std::vector<uint16_t>& out = parts[t];
      std::vector<uint8_t> symbols(pairs);
      for (int64_t r = t * step; r < std::min(rows, (t + 1) * step); ++r) {
        const uint8_t* row = data + r * width;
        uint8_t bad = 0;  // validate while pairing: one pass over the row, no branch per code
        for (int64_t i = 0; i < pairs; ++i) {
          const uint8_t a = row[2 * i], b = 2 * i + 1 < width ? row[2 * i + 1] : 1;
          bad |= static_cast<uint8_t>(a > 2) | static_cast<uint8_t>(b > 2);
          symbols[i] = static_cast<uint8_t>(3 * a + b);
        }
        QMOE_CHECK(!bad, "row ", r, " holds a code above 2; ternary codes are 0, 1, 2");
        const size_t before = out.size();
        int64_t i = 0;
        while (i < pairs) {
          int32_t node = root[symbols[i++]];
          int32_t next;  // longest match: follow the trie until the next symbol leaves it
          while (i < pairs && (next = child[node * kSymbols + symbols[i]]) >= 0) {
            node = next;
            ++i;
          }
          out.push_back(static_cast<uint16_t>(node));
        }
        counts[r] = static_cast<int64_t>(out.size() - before);
      }
    }
  });
  auto offsets = at::empty({rows + 1}, at::kInt);
  int32_t* off = offsets.data_ptr<int32_t>();
  int64_t total = 0;
  off[0] = 0;
  for (int64_t r = 0; r < rows; ++r) {
    total += counts[r];
    QMOE_CHECK(total <= INT32_MAX, "a matrix of more than 2^31 codewords does not fit int32 offsets");
    off[r + 1] = static_cast<int32_t>(total);
  }
  auto words = at::empty({total}, at::kShort);
  auto* dst = reinterpret_cast<uint16_t*>(words.data_ptr<int16_t>());
  for (const auto& part : parts) {
    std::memcpy(dst, part.data(), part.size() * sizeof(uint16_t));
    dst += part.size();
  }
  return {words, offsets};
}

namespace {

// Decodes rows [row_begin, row_end) of one matrix, handing each finished row of `width` codes to
// emit(r, codes). Offsets and lengths are bounds-checked here too, so even an unvalidated file
// can only raise, never read or write out of bounds.
template <typename Emit>
void decode_rows(const at::Tensor& words, const at::Tensor& offsets, const at::Tensor& table,
                 const at::Tensor& lengths, int64_t width, int64_t row_begin, int64_t row_end,
                 int64_t threads, Emit emit) {
  check_cpu_contiguous(words, "words", at::kShort, 1);
  check_cpu_contiguous(offsets, "offsets", at::kInt, 1);
  check_cpu_contiguous(table, "table", at::kByte, 2);
  check_cpu_contiguous(lengths, "lengths", at::kByte, 1);
  QMOE_CHECK(table.size(0) == lengths.size(0), "table has ", table.size(0), " codewords but lengths ", lengths.size(0));
  const int64_t rows = offsets.size(0) - 1, total = words.size(0), size = table.size(0);
  const int64_t max_weights = table.size(1);
  QMOE_CHECK(0 <= row_begin && row_begin <= row_end && row_end <= rows, "rows [", row_begin, ", ", row_end,
             ") outside the matrix's ", rows);
  const auto* w = reinterpret_cast<const uint16_t*>(words.data_ptr<int16_t>());
  const int32_t* off = offsets.data_ptr<int32_t>();
  const uint8_t* tab = table.data_ptr<uint8_t>();
  const uint8_t* len = lengths.data_ptr<uint8_t>();
  for (int64_t k = 0; k < size; ++k)
    QMOE_CHECK(len[k] >= 1 && 2 * int64_t(len[k]) <= max_weights, "codeword ", k, " has length ", int(len[k]),
               " pairs; the table holds 1 to ", max_weights / 2);
  parallel_rows(row_end - row_begin, threads, [&](int64_t b, int64_t e) {
    std::vector<uint8_t> buf(width + max_weights);  // slack: a codeword may overrun the row end
    for (int64_t r = row_begin + b; r < row_begin + e; ++r) {
      const int64_t start = off[r], stop = off[r + 1];
      QMOE_CHECK(0 <= start && start <= stop && stop <= total, "row ", r, " has codeword range [", start, ", ",
                 stop, ") outside the ", total, " codewords");
      int64_t pos = 0;
      for (int64_t k = start; k < stop; ++k) {
        const int64_t word = w[k];
        QMOE_CHECK(word < size, "row ", r, " holds codeword ", word, " beyond the dictionary's ", size);
        const int64_t n = 2 * int64_t(len[word]);
        QMOE_CHECK(pos < width, "row ", r, " decodes past its width ", width);
        std::memcpy(buf.data() + pos, tab + word * max_weights, n);
        pos += n;
      }
      QMOE_CHECK(pos == width || pos == width + 1, "row ", r, " decodes to ", pos, " codes, not its width ", width);
      emit(r - row_begin, buf.data());
    }
  });
}

}  // namespace

// words [total] int16 (uint16 bits), offsets [rows + 1] int32, table [size, 2 * max_len] uint8
// (codes of each codeword, padded), lengths [size] uint8 (pairs). -> codes [row_end - row_begin, width] uint8.
at::Tensor decode(at::Tensor words, at::Tensor offsets, at::Tensor table, at::Tensor lengths,
                     int64_t width, int64_t row_begin, int64_t row_end, int64_t threads) {
  auto out = at::empty({row_end - row_begin, width}, at::kByte);
  uint8_t* dst = out.data_ptr<uint8_t>();
  decode_rows(words, offsets, table, lengths, width, row_begin, row_end, threads,
              [&](int64_t i, const uint8_t* codes) { std::memcpy(dst + i * width, codes, width); });
  return out;
}

// As decode, but writes the weights: code 0 -> lo, 1 -> 0, 2 -> hi of the row's grid, where
// lo and hi are [rows, groups] fp32 and column c uses group c / group_cols. -> [row_end - row_begin, width] fp32.
at::Tensor decode_dense(at::Tensor words, at::Tensor offsets, at::Tensor table, at::Tensor lengths,
                           at::Tensor lo, at::Tensor hi, int64_t width, int64_t group_cols, int64_t row_begin,
                           int64_t row_end, int64_t threads) {
  check_cpu_contiguous(lo, "lo", at::kFloat, 2);
  check_cpu_contiguous(hi, "hi", at::kFloat, 2);
  const int64_t rows = offsets.size(0) - 1, groups = lo.size(1);
  QMOE_CHECK(lo.size(0) == rows && hi.sizes() == lo.sizes(), "lo/hi must be [", rows, ", groups], got ", lo.sizes(),
             " and ", hi.sizes());
  QMOE_CHECK(group_cols >= 1 && (width + group_cols - 1) / group_cols == groups, "width ", width, " in groups of ",
             group_cols, " columns needs ", (width + group_cols - 1) / group_cols, " grids per row, got ", groups);
  auto out = at::empty({row_end - row_begin, width}, at::kFloat);
  float* dst = out.data_ptr<float>();
  const float* lo_p = lo.data_ptr<float>();
  const float* hi_p = hi.data_ptr<float>();
  decode_rows(words, offsets, table, lengths, width, row_begin, row_end, threads,
              [&](int64_t i, const uint8_t* codes) {
                const int64_t r = row_begin + i;
                float* o = dst + i * width;
                for (int64_t g = 0; g < groups; ++g) {
                  const float lo_v = lo_p[r * groups + g], hi_v = hi_p[r * groups + g];
                  // selects, not a lookup: a code above 2 (never in a valid table) reads as zero
                  for (int64_t c = g * group_cols; c < std::min(width, (g + 1) * group_cols); ++c)
                    o[c] = codes[c] == 0 ? lo_v : (codes[c] == 2 ? hi_v : 0.0f);
                }
              });
  return out;
}

// The ops of the library `qmoe_codec` (torch.ops.qmoe_codec.*); schemas name the argument types
// the Python side passes: Tensor, int (int64_t).
TORCH_LIBRARY(qmoe_codec, m) {
  m.def("encode(Tensor codes, Tensor children, int threads) -> Tensor[]", &encode);
  m.def("decode(Tensor words, Tensor offsets, Tensor table, Tensor lengths, int width, int row_begin, "
        "int row_end, int threads) -> Tensor", &decode);
  m.def("decode_dense(Tensor words, Tensor offsets, Tensor table, Tensor lengths, Tensor lo, Tensor hi, "
        "int width, int group_cols, int row_begin, int row_end, int threads) -> Tensor", &decode_dense);
}
