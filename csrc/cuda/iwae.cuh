// Launchers of the CUDA kernels of the importance-weighted bound family. Torch-free on purpose:
// they take raw pointers, int64 strides and a stream, so this header and iwae.cu compile with a
// bare `nvcc -c` and the torch side (iwae_binding.cpp) is a thin layer of checks over them.
//
// Row-reduction inputs are rank-3 views [P, Q, D]: element (p, q, d) of `logits` lives at
// logits[p * l_sp + q * l_sq + d]. The leading strides may be zero (x broadcast over the K
// samples is never copied); the last dim is contiguous. Outputs are contiguous.
//
// T is one of float, double, __half, __nv_bfloat16 (explicitly instantiated in iwae.cu).
// Sums accumulate in float, or in double for double inputs. Each launcher enqueues its work on
// `stream`, never synchronises, and returns the launch's error (cudaSuccess when nothing was
// launched because the output is empty).
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace vaekernels::cuda {

// out[p, q] = sum_d x * l - softplus(l), with softplus(l) = max(l, 0) + log1p(exp(-|l|)).
// `out` is a contiguous [P, Q] buffer.
template <typename T>
cudaError_t bernoulli_log_prob_fwd(const T* logits, int64_t l_sp, int64_t l_sq, const T* x, int64_t x_sp,
                                   int64_t x_sq, T* out, int64_t P, int64_t Q, int64_t D, cudaStream_t stream);

// grad_logits[p, q, d] = grad[p, q] * (x - sigmoid(l)). `grad` is a contiguous [P, Q] buffer and
// `grad_logits` a contiguous [P, Q, D] one.
template <typename T>
cudaError_t bernoulli_log_prob_bwd(const T* grad, const T* logits, int64_t l_sp, int64_t l_sq, const T* x,
                                   int64_t x_sp, int64_t x_sq, T* grad_logits, int64_t P, int64_t Q, int64_t D,
                                   cudaStream_t stream);

}  // namespace vaekernels::cuda
