// Shared helpers of the C++ CPU kernels (maskkv_kernels' "cpp" backend).
//
// Everything is accumulated in fp32 whatever the input dtype (fp32, bf16, fp16). Matrix products
// of one tile go through product kernels of our own, for position-independent rounding: the fp32
// register tiles of tile_products_cpu.h, or AMX for bf16 inputs where the CPU has it
// (amx_tiles_cpu.h); the element-wise softmax work through at::vec. The kernels are parallel
// over (batch row, KV head) with at::parallel_for; inside one task everything is single-threaded.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <limits>

namespace maskkv_cpu {

using at::Tensor;
using Vec = at::vec::Vectorized<float>;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Argument checks: every message names the argument (direct torch.ops calls skip the Python
// wrappers' checks, so these are what stands between a bad call and an out-of-bounds read).
inline void check_cpu(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got ", t.device());
}

inline void check_float(const Tensor& t, const char* name) {
  check_cpu(t, name);
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, name,
              ": expected dtype float32, bfloat16 or float16, got ", dt);
}

inline void check_dim(const Tensor& t, int64_t dim, const char* name, const char* doc) {
  TORCH_CHECK(t.dim() == dim, name, ": expected a ", dim, "-D tensor ", doc, ", got shape ",
              t.sizes());
}

inline void check_int32(const Tensor& t, const char* name, at::IntArrayRef sizes) {
  check_cpu(t, name);
  TORCH_CHECK(t.scalar_type() == at::kInt, name, ": expected dtype int32, got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == sizes, name, ": expected shape ", sizes, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor");
}

// A tensor without elements has nothing to read: its strides are no error.
inline void check_last_dim_contiguous(const Tensor& t, const char* name) {
  TORCH_CHECK(t.numel() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1, name,
              ": expected the last (head) dim to be contiguous (stride 1), got strides ",
              t.strides());
}

// The element-wise loops below handle their last partial vector with partial loads/stores
// instead of scalar code, so every element goes through the same instructions wherever it sits
// (the same exp for every key: identical keys keep bitwise-identical scores).

// x[i] *= scale for i < n; returns max_i x[i] (NaN-propagating like the vector max).
inline float scale_and_max(float* x, int64_t n, float scale) {
  const Vec vs(scale);
  Vec vmax(kNegInf);
  for (int64_t i = 0; i < n; i += Vec::size()) {
    const int64_t c = std::min<int64_t>(Vec::size(), n - i);
    Vec v = Vec::loadu(x + i, c) * vs;
    v.store(x + i, c);
    if (c < Vec::size()) v = Vec::set(Vec(kNegInf), v, c);  // lanes past n stay -inf
    vmax = at::vec::maximum(vmax, v);
  }
  return at::vec::vec_reduce_all<float>(
      [](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vmax);
}

// x[i] = exp(x[i] - sub) for i < n; returns the sum.
inline float exp_sub_sum(float* x, int64_t n, float sub) {
  const Vec vsub(sub);
  Vec vsum(0.0f);
  for (int64_t i = 0; i < n; i += Vec::size()) {
    const int64_t c = std::min<int64_t>(Vec::size(), n - i);
    Vec p = (Vec::loadu(x + i, c) - vsub).exp_u20();
    p.store(x + i, c);
    if (c < Vec::size()) p = Vec::set(Vec(0.0f), p, c);
    vsum = vsum + p;
  }
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, vsum);
}

// x[i] *= a for i < n.
inline void scale_inplace(float* x, int64_t n, float a) {
  const Vec va(a);
  for (int64_t i = 0; i < n; i += Vec::size()) {
    const int64_t c = std::min<int64_t>(Vec::size(), n - i);
    (Vec::loadu(x + i, c) * va).store(x + i, c);
  }
}

// Rows [r0, r0 + n) of a [rows, D] view as fp32 with contiguous rows: the view itself when it
// already is one (fp32, unit stride), else a copy into `buf` (a flat fp32 buffer).
inline Tensor rows_as_float(const Tensor& src, int64_t r0, int64_t n, Tensor& buf) {
  Tensor rows = src.narrow(0, r0, n);
  if (rows.scalar_type() == at::kFloat && (rows.size(1) <= 1 || rows.stride(1) == 1)) return rows;
  Tensor out = buf.narrow(0, 0, n * src.size(1)).view({n, src.size(1)});
  out.copy_(rows);
  return out;
}

}  // namespace maskkv_cpu
