// Shared plumbing of the CPU row-reduction kernels: argument checks that name the op, and the
// [P, Q, D] row walk (leading strides may be zero, last dim contiguous).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

namespace vaekernels::cpu {
inline namespace CPU_CAPABILITY {

using at::vec::Vectorized;

// Kernels dispatch on float32 and float64 only.
inline void check_cpu_floating(const char* op, const char* arg, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", arg, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", arg,
              " must be float32 or float64, got ", t.scalar_type());
}

inline void check_rank(const char* op, const char* arg, const at::Tensor& t, int64_t rank, const char* layout) {
  TORCH_CHECK(t.dim() == rank, op, ": ", arg, " must be a rank-", rank, " ", layout, " tensor, got shape ", t.sizes());
}

// t must have the given shape and the dtype of like, the tensor that fixes the kernel's dtype.
inline void check_tensor(const char* op, const char* arg, const at::Tensor& t, at::IntArrayRef shape,
                         const at::Tensor& like) {
  TORCH_CHECK(t.sizes() == shape, op, ": ", arg, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", arg, " must have dtype ", like.scalar_type(),
              ", got ", t.scalar_type());
  check_cpu_floating(op, arg, t);
}

inline void check_rows3(const char* op, const char* arg, const at::Tensor& t, const at::Tensor& like) {
  check_rank(op, arg, t, 3, "[P, Q, D]");
  check_tensor(op, arg, t, like.sizes(), like);
  TORCH_CHECK(t.size(2) <= 1 || t.stride(2) == 1, op, ": ", arg, " must be contiguous in its last dim, got strides ",
              t.strides());
}

// Rows per parallel task: enough elements that thread hand-off is noise.
inline int64_t row_grain(int64_t D) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(D, 1)); }

// Calls body(row, ptrs...) for every (p, q) row of the rank-3 views, in parallel.
template <typename scalar_t, typename Body, typename... Views>
void for_each_row(int64_t P, int64_t Q, int64_t D, Body body, const Views&... views) {
  at::parallel_for(0, P * Q, row_grain(D), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t p = row / Q, q = row % Q;
      body(row, (views.template const_data_ptr<scalar_t>() + p * views.stride(0) + q * views.stride(1))...);
    }
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace vaekernels::cpu
