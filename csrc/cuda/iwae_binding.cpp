// CUDA implementations of the importance-weighted bound ops: argument checks that name the op
// (csrc/checks.h, shared with the CPU kernels), then the torch-free launchers of iwae.cu on the
// current stream of the inputs' device.
//
// Only c10's CUDA headers are used (not ATen/cuda/CUDAContext.h), so a toolkit without the
// cuBLAS / cuSPARSE development headers still builds this file.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../checks.h"
#include "iwae.cuh"

namespace vaekernels::cuda {
namespace {

// at::Half and at::BFloat16 have the bit layout of CUDA's __half and __nv_bfloat16, which are
// what the torch-free launchers take.
template <typename scalar_t>
struct CudaScalar {
  using type = scalar_t;
};
template <>
struct CudaScalar<at::Half> {
  using type = __half;
};
template <>
struct CudaScalar<at::BFloat16> {
  using type = __nv_bfloat16;
};
static_assert(sizeof(at::Half) == sizeof(__half) && alignof(at::Half) == alignof(__half));
static_assert(sizeof(at::BFloat16) == sizeof(__nv_bfloat16) && alignof(at::BFloat16) == alignof(__nv_bfloat16));

template <typename scalar_t>
using cuda_scalar_t = typename CudaScalar<scalar_t>::type;

template <typename scalar_t>
const cuda_scalar_t<scalar_t>* cuda_data(const at::Tensor& t) {
  return reinterpret_cast<const cuda_scalar_t<scalar_t>*>(t.const_data_ptr<scalar_t>());
}

template <typename scalar_t>
cuda_scalar_t<scalar_t>* cuda_mutable_data(at::Tensor& t) {
  return reinterpret_cast<cuda_scalar_t<scalar_t>*>(t.mutable_data_ptr<scalar_t>());
}

constexpr KernelDevice kCuda{c10::DeviceType::CUDA, true};

at::Tensor bernoulli_log_prob(const at::Tensor& logits, const at::Tensor& x) {
  check_rows3("vaekernels::bernoulli_log_prob", kCuda, {{"logits", logits}, {"x", x}});
  const c10::cuda::CUDAGuard device_guard(logits.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const int64_t P = logits.size(0), Q = logits.size(1), D = logits.size(2);
  at::Tensor out = at::empty({P, Q}, logits.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, logits.scalar_type(),
                                  "bernoulli_log_prob", [&] {
                                    C10_CUDA_CHECK(bernoulli_log_prob_fwd<cuda_scalar_t<scalar_t>>(
                                        cuda_data<scalar_t>(logits), logits.stride(0), logits.stride(1),
                                        cuda_data<scalar_t>(x), x.stride(0), x.stride(1),
                                        cuda_mutable_data<scalar_t>(out), P, Q, D, stream));
                                  });
  return out;
}

at::Tensor bernoulli_log_prob_backward(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& x) {
  constexpr const char* op = "vaekernels::bernoulli_log_prob_backward";
  check_rows3(op, kCuda, {{"logits", logits}, {"x", x}});
  const int64_t P = logits.size(0), Q = logits.size(1), D = logits.size(2);
  check_grad(op, "grad", grad, {P, Q}, logits);
  const c10::cuda::CUDAGuard device_guard(logits.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const at::Tensor grad_c = grad.to(logits.scalar_type()).contiguous();
  at::Tensor grad_logits = at::empty({P, Q, D}, logits.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, logits.scalar_type(),
                                  "bernoulli_log_prob_backward", [&] {
                                    C10_CUDA_CHECK(bernoulli_log_prob_bwd<cuda_scalar_t<scalar_t>>(
                                        cuda_data<scalar_t>(grad_c), cuda_data<scalar_t>(logits), logits.stride(0),
                                        logits.stride(1), cuda_data<scalar_t>(x), x.stride(0), x.stride(1),
                                        cuda_mutable_data<scalar_t>(grad_logits), P, Q, D, stream));
                                  });
  return grad_logits;
}

}  // namespace
}  // namespace vaekernels::cuda

TORCH_LIBRARY_IMPL(vaekernels, CUDA, m) {
  m.impl("bernoulli_log_prob", &vaekernels::cuda::bernoulli_log_prob);
  m.impl("bernoulli_log_prob_backward", &vaekernels::cuda::bernoulli_log_prob_backward);
}
