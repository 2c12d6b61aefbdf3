// Shared by the CPU decode-matmul's sources (cpu_matmul.cpp: ternary and the module,
// cpu_matmul_bits.cpp: b-bit): variant selection, argument checks, the padded copy of x.
#pragma once

// Only the ATen headers these files use (not <torch/extension.h>: all of libtorch and pybind11,
// ~28 s of compile time per source), and ops registered with TORCH_LIBRARY, not a Python module.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace qmoe_cpu {

#define QMOE_CHECK(cond, ...) TORCH_CHECK(cond, "qmoe cpu_matmul: ", __VA_ARGS__)
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#define AVX2 __attribute__((target("avx2,fma,f16c")))

constexpr int64_t kPad = 64;  // zero floats after each token's row of x: a b-bit chunk reads <= 15 past its width
constexpr int64_t kGrain = 8;  // rows per parallel task at least
enum Isa : int64_t { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

struct Tile {  // `n` tokens of padded x (row stride `stride`) and their outputs y[t * rows + r]
  const float* x;
  int64_t stride, n;
  float* y;
  int64_t rows;
};

// Token tiles: 8 (AVX-512: 16 accumulators of 32 registers), 4 (AVX2: 8 of 16), all (portable).
inline int64_t tile_tokens(int64_t isa, int64_t n) { return isa == kAvx512 ? 8 : isa == kAvx2 ? 4 : std::max<int64_t>(n, 1); }

int64_t best_isa();
// `isa` itself (an error if this CPU cannot run it), or the best variant for a negative one.
int64_t resolve_isa(int64_t isa);
void check(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t dim);
// x [n, width] -> [n, width + kPad] in x's dtype, with zeros after each row.
at::Tensor padded(const at::Tensor& x);

}  // namespace qmoe_cpu

at::Tensor bitpacked_matmul(at::Tensor packed, at::Tensor scale, at::Tensor zero, at::Tensor x,
                               int64_t bits, int64_t group_cols, int64_t round, int64_t isa);
