// Shared plumbing of the CPU row-reduction kernels: the [P, Q, D] row walk (leading strides may
// be zero, last dim contiguous) and the vectorised row sum built on it.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "../checks.h"

namespace vaekernels::cpu {
inline namespace CPU_CAPABILITY {

using at::vec::Vectorized;

// Kernels dispatch on float32 and float64 only.
inline constexpr KernelDevice kCpu{c10::DeviceType::CPU, false};

template <typename T>
Vectorized<T> vec_add(const Vectorized<T>& a, const Vectorized<T>& b) {
  return a + b;
}

// f(offset, count) over [0, n) in vector-sized steps, the last one partial.
template <typename scalar_t, typename F>
void vector_steps(int64_t n, F f) {
  constexpr int64_t width = Vectorized<scalar_t>::size();
  int64_t i = 0;
  for (; i + width <= n; i += width) f(i, width);
  if (i < n) f(i, n - i);
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

// out[p, q] = finish(sum_d summand(first[p, q, d], rest[p, q, d]...)) over rank-3 views of one
// shape, as a new contiguous [P, Q] tensor. summand maps vectors of elements to vectors of
// terms; a row's last partial vector is loaded and summed under a mask, so that one formula
// covers the whole row and no scalar twin of it is needed.
template <typename scalar_t, typename Summand, typename Finish, typename... Views>
at::Tensor reduce_rows(Summand summand, Finish finish, const at::Tensor& first, const Views&... rest) {
  using Vec = Vectorized<scalar_t>;
  const int64_t P = first.size(0), Q = first.size(1), D = first.size(2);
  at::Tensor out = at::empty({P, Q}, first.options());
  scalar_t* out_ptr = out.data_ptr<scalar_t>();
  for_each_row<scalar_t>(P, Q, D, [&](int64_t row, const auto*... rows) {
    Vec acc(scalar_t(0));
    int64_t d = 0;
    for (; d + Vec::size() <= D; d += Vec::size()) acc += summand(Vec::loadu(rows + d)...);
    if (d < D) acc += Vec::set(Vec(scalar_t(0)), summand(Vec::loadu(rows + d, D - d)...), D - d);
    out_ptr[row] = finish(at::vec::vec_reduce_all<scalar_t>(vec_add<scalar_t>, acc));
  }, first, rest...);
  return out;
}

}  // namespace CPU_CAPABILITY
}  // namespace vaekernels::cpu
