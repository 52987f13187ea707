// Argument checks shared by the CPU kernels (csrc/cpu) and the CUDA bindings (csrc/cuda/*_binding.cpp),
// so an op rejects bad input with the same message on every device. Torch-only: the .cu files
// must not include it.
#pragma once

#include <initializer_list>

#include <ATen/ATen.h>

namespace vaekernels {

// The device a build's kernels run on, and whether it has float16 / bfloat16 kernels besides
// float32 and float64.
struct KernelDevice {
  c10::DeviceType type;
  bool half_precision;
};

inline void check_floating(const char* op, const char* arg, const at::Tensor& t, KernelDevice device) {
  TORCH_CHECK(t.device().type() == device.type, op, ": ", arg, " must be a ", c10::DeviceTypeName(device.type),
              " tensor, got ", t.device());
  const at::ScalarType dtype = t.scalar_type();
  const bool half = dtype == at::kHalf || dtype == at::kBFloat16;
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || (device.half_precision && half), op, ": ", arg,
              " must be ", device.half_precision ? "float16, bfloat16, float32 or float64" : "float32 or float64",
              ", got ", dtype);
}

inline void check_rank(const char* op, const char* arg, const at::Tensor& t, int64_t rank, const char* layout) {
  TORCH_CHECK(t.dim() == rank, op, ": ", arg, " must be a rank-", rank, " ", layout, " tensor, got shape ", t.sizes());
}

// t must have the given shape, and the dtype and device of like, the tensor that fixes the kernel's dtype.
inline void check_tensor(const char* op, const char* arg, const at::Tensor& t, at::IntArrayRef shape,
                         const at::Tensor& like, KernelDevice device) {
  TORCH_CHECK(t.sizes() == shape, op, ": ", arg, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", arg, " must have dtype ", like.scalar_type(),
              ", got ", t.scalar_type());
  check_floating(op, arg, t, device);
  TORCH_CHECK(t.device() == like.device(), op, ": ", arg, " must be on ", like.device(), ", got ", t.device());
}

struct NamedTensor {
  const char* name;
  const at::Tensor& tensor;
};

// The inputs of a row-reduction op: [P, Q, D] views shaped like the first, contiguous in their
// last dim; their leading strides are free.
inline void check_rows3(const char* op, KernelDevice device, std::initializer_list<NamedTensor> views) {
  const at::Tensor& like = views.begin()->tensor;
  for (const NamedTensor& view : views) {
    check_rank(op, view.name, view.tensor, 3, "[P, Q, D]");
    check_tensor(op, view.name, view.tensor, like.sizes(), like, device);
    TORCH_CHECK(view.tensor.size(2) <= 1 || view.tensor.stride(2) == 1, op, ": ", view.name,
                " must be contiguous in its last dim, got strides ", view.tensor.strides());
  }
}

// A backward's incoming gradient is cast to the kernel's dtype, so any floating dtype will do.
inline void check_grad(const char* op, const char* arg, const at::Tensor& grad, at::IntArrayRef shape,
                       const at::Tensor& like) {
  TORCH_CHECK(grad.sizes() == shape, op, ": ", arg, " must have shape ", shape, ", got ", grad.sizes());
  TORCH_CHECK(at::isFloatingType(grad.scalar_type()), op, ": ", arg, " must be a floating-point tensor, got ",
              grad.scalar_type());
  TORCH_CHECK(grad.device() == like.device(), op, ": ", arg, " must be on ", like.device(), ", got ", grad.device());
}

}  // namespace vaekernels
