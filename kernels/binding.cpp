// The CUDA implementations of the qmoe ops (schemas and fake implementations: qmoe_cli/kernels/ops.py,
// so shape inference works without this library). This file only validates and launches: device,
// dtype, rank, contiguity and shapes are checked with the values in the message; values that
// live on the device (offsets, tiles, routing indices) are not, since reading them costs a sync:
// the packed loader validates every row, and the tiles come from route_plan or the host plan.
// c10/cuda only (not ATen/cuda/CUDAContext.h): that one pulls in cuBLAS/cuSPARSE headers, which a
// minimal CUDA toolkit lacks and these kernels never use.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <tuple>

#include "decode_matmul.h"

#define QMOE_CHECK(cond, ...) TORCH_CHECK(cond, "qmoe kernels: ", __VA_ARGS__)

namespace qmoe {
namespace {

constexpr int64_t kIntMax = std::numeric_limits<int>::max();
constexpr int64_t kMaxGridY = 65535;

void check_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t dim, const at::Device& device) {
  QMOE_CHECK(t.device() == device, name, " must be on ", device, " (where the weights are), got ", t.device());
  QMOE_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  QMOE_CHECK(t.dim() == dim, name, " must have ", dim, " dimensions, got shape ", t.sizes());
  QMOE_CHECK(t.is_contiguous(), name, " must be contiguous, got strides ", t.strides(), " for shape ", t.sizes());
}

Scalar scalar_of(at::ScalarType t, const char* name) {
  switch (t) {
    case at::kFloat: return Scalar::kFloat;
    case at::kBFloat16: return Scalar::kBFloat16;
    case at::kHalf: return Scalar::kHalf;
    default: QMOE_CHECK(false, name, " must be Float, BFloat16 or Half, got ", t);
  }
  return Scalar::kFloat;
}

// Experts, rows and the weight pointers of a dictionary-coded stack; throws on any mismatch.
TernaryWeights ternary_weights(const at::Tensor& words, const std::optional<at::Tensor>& bases,
                               const at::Tensor& offsets, const at::Tensor& masks, const at::Tensor& lo,
                               const at::Tensor& hi, int64_t cols, int64_t* experts) {
  const at::Device device = words.device();
  QMOE_CHECK(device.is_cuda(), "words must be a CUDA tensor, got ", device);
  check_tensor(words, "words", at::kShort, 1, device);
  check_tensor(offsets, "offsets", at::kInt, 2, device);
  check_tensor(masks, "masks", at::kInt, 2, device);
  check_tensor(lo, "lo", at::kFloat, 2, device);
  check_tensor(hi, "hi", at::kFloat, 2, device);
  const int64_t e = offsets.size(0), rows = offsets.size(1) - 1;
  QMOE_CHECK(rows >= 0, "offsets must be [experts, rows + 1], got ", offsets.sizes());
  QMOE_CHECK(masks.size(1) == 2 && masks.size(0) >= 1 && masks.size(0) <= 65536,
             "masks must be [size, 2] with 1 <= size <= 65536 (from codebook_masks), got ", masks.sizes());
  QMOE_CHECK(lo.size(0) == e && lo.size(1) == rows && hi.sizes() == lo.sizes(), "lo/hi must be [", e, ", ", rows,
             "] (one grid per row on the GPU), got ", lo.sizes(), " and ", hi.sizes());
  QMOE_CHECK(cols >= 1 && cols <= kIntMax && rows <= kIntMax, "1 <= cols and rows <= 2^31 - 1, got cols ", cols,
             " and rows ", rows);
  if (bases) {
    check_tensor(*bases, "bases", at::kLong, 1, device);
    QMOE_CHECK(bases->size(0) == e, "bases must hold one start per expert (", e, "), got ", bases->sizes());
  } else {
    QMOE_CHECK(e == 1 && words.numel() <= kIntMax, "without bases there must be one expert of < 2^31 words, got ",
               e, " experts and ", words.numel(), " words");
  }
  *experts = e;
  return {reinterpret_cast<const uint16_t*>(words.data_ptr<int16_t>()),
          bases ? bases->data_ptr<int64_t>() : nullptr,
          offsets.data_ptr<int>(),
          reinterpret_cast<const int2*>(masks.data_ptr<int>()),
          static_cast<int>(masks.size(0)),
          lo.data_ptr<float>(),
          hi.data_ptr<float>(),
          static_cast<int>(rows),
          static_cast<int>(cols)};
}

BitpackedWeights bitpacked_weights(const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& zero,
                                   int64_t bits, int64_t group_cols, int64_t cols, int64_t* experts) {
  const at::Device device = packed.device();
  QMOE_CHECK(device.is_cuda(), "packed must be a CUDA tensor, got ", device);
  check_tensor(packed, "packed", at::kInt, 3, device);
  check_tensor(scale, "scale", at::kFloat, 3, device);
  check_tensor(zero, "zero", at::kFloat, 3, device);
  QMOE_CHECK(bits >= 2 && bits <= 8, "bits must be in 2..8, got ", bits);
  QMOE_CHECK(cols >= 1 && cols <= kIntMax && group_cols >= 1, "cols and group_cols must be >= 1, got ", cols,
             " and ", group_cols);
  const int64_t e = packed.size(0), rows = packed.size(1), chunks = (cols + 31) / 32;
  QMOE_CHECK(packed.size(2) == chunks * bits, "packed must be [experts, rows, ceil(cols / 32) * bits] = [", e, ", ",
             rows, ", ", chunks * bits, "] int32 (device_bitpacked), got ", packed.sizes());
  const int64_t groups = (cols + group_cols - 1) / group_cols;
  QMOE_CHECK(scale.size(0) == e && scale.size(1) == rows && scale.size(2) == groups && zero.sizes() == scale.sizes(),
             "scale/zero must be [", e, ", ", rows, ", ", groups, "], got ", scale.sizes(), " and ", zero.sizes());
  QMOE_CHECK(rows <= kIntMax, "at most 2^31 - 1 rows, got ", rows);
  *experts = e;
  return {reinterpret_cast<const uint32_t*>(packed.data_ptr<int>()),
          static_cast<int>(chunks * bits),
          static_cast<int>(bits),
          scale.data_ptr<float>(),
          zero.data_ptr<float>(),
          static_cast<int>(groups),
          static_cast<int>(group_cols),
          static_cast<int>(rows),
          static_cast<int>(cols)};
}

// Checks x, tiles and order and allocates the output; *io is ready to launch when out has elements.
at::Tensor tile_io(const at::Tensor& x, bool x_transposed, const std::optional<at::Tensor>& tiles,
                   const std::optional<at::Tensor>& order, bool relu, bool out_transposed, int64_t rows, int64_t cols,
                   int64_t experts, const at::Device& device, TileIO* io) {
  QMOE_CHECK(x.device() == device, "x must be on ", device, " (where the weights are), got ", x.device());
  QMOE_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous 2-d tensor, got shape ", x.sizes(),
             " strides ", x.strides());
  scalar_of(x.scalar_type(), "x");
  const int64_t n = x_transposed ? x.size(1) : x.size(0), x_cols = x_transposed ? x.size(0) : x.size(1);
  QMOE_CHECK(x_cols == cols, "x must be ", x_transposed ? "[cols, tokens]" : "[tokens, cols]", " with cols = ", cols,
             ", got ", x.sizes());
  QMOE_CHECK(n <= kIntMax, "at most 2^31 - 1 tokens, got ", n);
  int64_t n_tiles = (n + kTileTokens - 1) / kTileTokens;
  if (tiles) {
    check_tensor(*tiles, "tiles", at::kInt, 2, device);
    QMOE_CHECK(tiles->size(1) == 3, "tiles must be [n_tiles, 3] (expert, first position, count), got ",
               tiles->sizes());
    n_tiles = tiles->size(0);
  } else {
    QMOE_CHECK(experts == 1, "tiles are required for ", experts, " experts");
  }
  QMOE_CHECK(n_tiles <= kMaxGridY, "at most ", kMaxGridY, " tiles per launch, got ", n_tiles);
  if (order) {
    check_tensor(*order, "order", at::kInt, 1, device);
    QMOE_CHECK(order->size(0) == n, "order must hold one token id per position (", n, "), got ", order->sizes());
  }
  auto out = out_transposed ? at::empty({rows, n}, x.options()) : at::empty({n, rows}, x.options());
  *io = TileIO{tiles ? tiles->data_ptr<int>() : nullptr,
               static_cast<int>(n_tiles),
               static_cast<int>(n),
               x.data_ptr(),
               x_transposed ? n : 1,
               x_transposed ? 1 : cols,
               out.data_ptr(),
               out_transposed ? n : 1,
               out_transposed ? 1 : rows,
               order ? order->data_ptr<int>() : nullptr,
               relu};
  return out;
}

at::Tensor ternary_tiles_cuda(const at::Tensor& words, const std::optional<at::Tensor>& bases,
                              const at::Tensor& offsets, const at::Tensor& masks, const at::Tensor& lo,
                              const at::Tensor& hi, const at::Tensor& x, bool x_transposed,
                              const std::optional<at::Tensor>& tiles, const std::optional<at::Tensor>& order,
                              bool relu, bool out_transposed) {
  int64_t experts = 0;
  const int64_t cols = x.dim() == 2 ? x.size(x_transposed ? 0 : 1) : 0;
  const TernaryWeights w = ternary_weights(words, bases, offsets, masks, lo, hi, cols, &experts);
  const c10::cuda::CUDAGuard guard(words.device());
  TileIO io;
  auto out = tile_io(x, x_transposed, tiles, order, relu, out_transposed, w.rows, cols, experts, words.device(), &io);
  if (out.numel() == 0 || io.n_tiles == 0) return out;
  launch_ternary_tiles(w, io, scalar_of(x.scalar_type(), "x"), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor bitpacked_tiles_cuda(const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& zero,
                                int64_t bits, int64_t group_cols, const at::Tensor& x, bool x_transposed,
                                const std::optional<at::Tensor>& tiles, const std::optional<at::Tensor>& order,
                                bool relu, bool out_transposed) {
  int64_t experts = 0;
  const int64_t cols = x.dim() == 2 ? x.size(x_transposed ? 0 : 1) : 0;
  const BitpackedWeights w = bitpacked_weights(packed, scale, zero, bits, group_cols, cols, &experts);
  const c10::cuda::CUDAGuard guard(packed.device());
  TileIO io;
  auto out = tile_io(x, x_transposed, tiles, order, relu, out_transposed, w.rows, cols, experts, packed.device(), &io);
  if (out.numel() == 0 || io.n_tiles == 0) return out;
  launch_bitpacked_tiles(w, io, scalar_of(x.scalar_type(), "x"), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

void check_expert(int64_t expert, int64_t experts) {
  QMOE_CHECK(expert >= 0 && expert < experts, "expert must be in 0..", experts - 1, ", got ", expert);
}

at::Tensor ternary_dense_cuda(const at::Tensor& words, const std::optional<at::Tensor>& bases,
                              const at::Tensor& offsets, const at::Tensor& masks, const at::Tensor& lo,
                              const at::Tensor& hi, int64_t expert, int64_t cols, at::ScalarType dtype) {
  int64_t experts = 0;
  const TernaryWeights w = ternary_weights(words, bases, offsets, masks, lo, hi, cols, &experts);
  check_expert(expert, experts);
  const Scalar s = scalar_of(dtype, "dtype");
  const c10::cuda::CUDAGuard guard(words.device());
  auto out = at::empty({w.rows, cols}, words.options().dtype(dtype));
  if (out.numel() == 0) return out;
  launch_ternary_dense(w, static_cast<int>(expert), out.data_ptr(), s, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor bitpacked_dense_cuda(const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& zero,
                                int64_t bits, int64_t group_cols, int64_t cols, int64_t expert, at::ScalarType dtype) {
  int64_t experts = 0;
  const BitpackedWeights w = bitpacked_weights(packed, scale, zero, bits, group_cols, cols, &experts);
  check_expert(expert, experts);
  const Scalar s = scalar_of(dtype, "dtype");
  const c10::cuda::CUDAGuard guard(packed.device());
  auto out = at::empty({w.rows, cols}, packed.options().dtype(dtype));
  if (out.numel() == 0) return out;
  launch_bitpacked_dense(w, static_cast<int>(expert), out.data_ptr(), s, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor> route_plan_cuda(const at::Tensor& index, int64_t num_experts) {
  QMOE_CHECK(index.device().is_cuda(), "index must be a CUDA tensor, got ", index.device());
  check_tensor(index, "index", at::kLong, 1, index.device());
  const int64_t n = index.size(0);
  QMOE_CHECK(n >= 1 && n <= kMaxPlanTokens, "route_plan takes 1..", kMaxPlanTokens,
             " tokens (sort on the host beyond), got ", n);
  QMOE_CHECK(num_experts >= 1 && num_experts <= kIntMax - 1, "num_experts must be >= 1, got ", num_experts);
  const c10::cuda::CUDAGuard guard(index.device());
  auto order = at::empty({n}, index.options().dtype(at::kInt));
  auto tiles = at::empty({n, 3}, index.options().dtype(at::kInt));
  launch_route_plan(index.data_ptr<int64_t>(), static_cast<int>(n), static_cast<int>(num_experts),
                    order.data_ptr<int>(), tiles.data_ptr<int>(), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {order, tiles};
}

at::Tensor gather_transpose_cuda(const at::Tensor& x, const at::Tensor& order) {
  QMOE_CHECK(x.device().is_cuda(), "x must be a CUDA tensor, got ", x.device());
  QMOE_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous [tokens, cols] tensor, got shape ", x.sizes());
  const Scalar s = scalar_of(x.scalar_type(), "x");
  check_tensor(order, "order", at::kInt, 1, x.device());
  const int64_t n = order.size(0), cols = x.size(1);
  // n may exceed x's rows: top-k gathers each token once per routing slot.
  QMOE_CHECK(cols <= kIntMax && (n + 31) / 32 <= kMaxGridY, "order must hold fewer than 2^21 positions, got ", n,
             " (x has ", cols, " columns)");
  const c10::cuda::CUDAGuard guard(x.device());
  auto xt = at::empty({cols, n}, x.options());
  if (xt.numel() == 0) return xt;
  launch_gather_transpose(x.data_ptr(), order.data_ptr<int>(), static_cast<int>(n), static_cast<int>(cols),
                          xt.data_ptr(), s, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return xt;
}

}  // namespace

TORCH_LIBRARY_IMPL(qmoe, CUDA, m) {
  m.impl("ternary_tiles", &ternary_tiles_cuda);
  m.impl("bitpacked_tiles", &bitpacked_tiles_cuda);
  m.impl("ternary_dense", &ternary_dense_cuda);
  m.impl("bitpacked_dense", &bitpacked_dense_cuda);
  m.impl("route_plan", &route_plan_cuda);
  m.impl("gather_transpose", &gather_transpose_cuda);
}

}  // namespace qmoe
