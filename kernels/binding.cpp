// The CUDA implementations of the `qmoe::decode_matmul` and `qmoe::decode_dense` ops. The
// schemas and the fake (meta) implementations are defined in Python (qmoe_cli/kernels/ops.py),
// so shape inference works without this library; this file only validates and launches.
// c10/cuda only (not ATen/cuda/CUDAContext.h): that one pulls in cuBLAS/cuSPARSE headers, which a
// minimal CUDA toolkit lacks and these kernels never use.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "decode_matmul.h"

#define QMOE_CHECK(cond, ...) TORCH_CHECK(cond, "qmoe kernels: ", __VA_ARGS__)

namespace qmoe {
namespace {

void check_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t dim, const at::Device& device) {
  QMOE_CHECK(t.device() == device, name, " must be on ", device, " (where x is), got ", t.device());
  QMOE_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  QMOE_CHECK(t.dim() == dim, name, " must have ", dim, " dimensions, got shape ", t.sizes());
  QMOE_CHECK(t.is_contiguous(), name, " must be contiguous, got strides ", t.strides(), " for shape ", t.sizes());
}

// Shared checks of the encoded matrix; returns rows. Offsets themselves stay on the device:
// checking them would cost a sync per call, and the packed loader validates every row's width.
int64_t check_encoded(const at::Tensor& words, const at::Tensor& offsets, const at::Tensor& masks,
                      const at::Tensor& lo, const at::Tensor& hi, const at::Device& device) {
  QMOE_CHECK(device.is_cuda(), "the inputs must be CUDA tensors, got ", device);
  check_tensor(words, "words", at::kShort, 1, device);
  check_tensor(offsets, "offsets", at::kInt, 1, device);
  check_tensor(masks, "masks", at::kInt, 2, device);
  check_tensor(lo, "lo", at::kFloat, 2, device);
  check_tensor(hi, "hi", at::kFloat, 2, device);
  const int64_t rows = offsets.size(0) - 1;
  QMOE_CHECK(rows >= 0, "offsets must hold rows + 1 entries, got none");
  QMOE_CHECK(masks.size(1) == 2 && masks.size(0) >= 1 && masks.size(0) <= 65536,
             "masks must be [size, 2] with 1 <= size <= 65536 (from codebook_masks), got ", masks.sizes());
  QMOE_CHECK(lo.size(0) == rows && lo.size(1) == 1 && hi.sizes() == lo.sizes(), "lo/hi must be [", rows,
             ", 1] (one grid per row on the GPU), got ", lo.sizes(), " and ", hi.sizes());
  QMOE_CHECK(words.numel() <= std::numeric_limits<int>::max() && rows < std::numeric_limits<int>::max(),
             "at most 2^31 - 1 words and rows per matrix, got ", words.numel(), " words and ", rows, " rows");
  return rows;
}

at::Tensor decode_matmul_cuda(const at::Tensor& words, const at::Tensor& offsets, const at::Tensor& masks,
                              const at::Tensor& lo, const at::Tensor& hi, const at::Tensor& x) {
  const int64_t rows = check_encoded(words, offsets, masks, lo, hi, x.device());
  check_tensor(x, "x", at::kBFloat16, 2, x.device());
  const int64_t n_tokens = x.size(0), cols = x.size(1);
  QMOE_CHECK(n_tokens >= 1 && n_tokens <= kMaxTokens, "x must hold 1..", kMaxTokens,
             " tokens (decode_dense + matmul beyond), got shape ", x.sizes());
  QMOE_CHECK(cols >= 1 && cols <= std::numeric_limits<int>::max(), "x must have 1..2^31-1 columns, got ", cols);
  const c10::cuda::CUDAGuard guard(x.device());
  auto y = at::empty({n_tokens, rows}, x.options());
  if (rows == 0) return y;
  launch_decode_matmul(reinterpret_cast<const uint16_t*>(words.data_ptr<int16_t>()), offsets.data_ptr<int>(),
                       reinterpret_cast<const int2*>(masks.data_ptr<int>()), static_cast<int>(masks.size(0)),
                       lo.data_ptr<float>(), hi.data_ptr<float>(),
                       reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()),
                       reinterpret_cast<__nv_bfloat16*>(y.data_ptr<at::BFloat16>()), static_cast<int>(rows),
                       static_cast<int>(cols), static_cast<int>(n_tokens), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

at::Tensor decode_dense_cuda(const at::Tensor& words, const at::Tensor& offsets, const at::Tensor& masks,
                             const at::Tensor& lo, const at::Tensor& hi, int64_t cols) {
  const int64_t rows = check_encoded(words, offsets, masks, lo, hi, words.device());
  QMOE_CHECK(cols >= 1 && cols <= std::numeric_limits<int>::max(), "cols must be in 1..2^31-1, got ", cols);
  const c10::cuda::CUDAGuard guard(words.device());
  auto out = at::empty({rows, cols}, words.options().dtype(at::kBFloat16));
  if (rows == 0) return out;
  launch_decode_dense(reinterpret_cast<const uint16_t*>(words.data_ptr<int16_t>()), offsets.data_ptr<int>(),
                      reinterpret_cast<const int2*>(masks.data_ptr<int>()), static_cast<int>(masks.size(0)),
                      lo.data_ptr<float>(), hi.data_ptr<float>(),
                      reinterpret_cast<__nv_bfloat16*>(out.data_ptr<at::BFloat16>()), static_cast<int>(rows),
                      static_cast<int>(cols), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(qmoe, CUDA, m) {
  m.impl("decode_matmul", &decode_matmul_cuda);
  m.impl("decode_dense", &decode_dense_cuda);
}

}  // namespace qmoe
