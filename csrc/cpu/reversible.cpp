// CPU kernel of the reversible family: one step of the backward walk of a coupling block,
// in place. The walk rebuilds a half of the block's input from its output (stream -= update,
// e.g. x2 = y2 - G(y1) into y2's buffer) and adds the gradient that the recomputed branch sent
// to the other half (grad += grad_update) in the same pass, so no full-size buffer is allocated
// per block and each element is read and written once.
#include <torch/library.h>

#include "rows.h"

namespace vaekernels::cpu {
inline namespace CPU_CAPABILITY {
namespace {

// Elements per parallel task: a few pages of each of the four tensors.
constexpr int64_t kGrain = 16384;

void coupling_backward_step(const at::Tensor& stream, const at::Tensor& update, const at::Tensor& grad,
                            const at::Tensor& grad_update) {
  constexpr const char* op = "vaekernels::coupling_backward_step";
  check_floating(op, "stream", stream, kCpu);
  for (const NamedTensor& t : {NamedTensor{"update", update}, NamedTensor{"grad", grad},
                               NamedTensor{"grad_update", grad_update}}) {
    check_tensor(op, t.name, t.tensor, stream.sizes(), stream, kCpu);
  }
  for (const NamedTensor& t : {NamedTensor{"stream", stream}, NamedTensor{"update", update},
                               NamedTensor{"grad", grad}, NamedTensor{"grad_update", grad_update}}) {
    TORCH_CHECK(t.tensor.is_contiguous(), op, ": ", t.name, " must be contiguous, got strides ", t.tensor.strides());
  }
  const int64_t n = stream.numel();
  AT_DISPATCH_FLOATING_TYPES(stream.scalar_type(), "coupling_backward_step", [&] {
    using Vec = Vectorized<scalar_t>;
    scalar_t* s = stream.data_ptr<scalar_t>();
    scalar_t* g = grad.data_ptr<scalar_t>();
    const scalar_t* u = update.const_data_ptr<scalar_t>();
    const scalar_t* gu = grad_update.const_data_ptr<scalar_t>();
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      int64_t i = begin;
      for (; i + Vec::size() <= end; i += Vec::size()) {
        (Vec::loadu(s + i) - Vec::loadu(u + i)).store(s + i);
        (Vec::loadu(g + i) + Vec::loadu(gu + i)).store(g + i);
      }
      for (; i < end; ++i) {
        s[i] -= u[i];
        g[i] += gu[i];
      }
    });
  });
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace vaekernels::cpu

TORCH_LIBRARY_IMPL(vaekernels, CPU, m) {
  m.impl("coupling_backward_step", &vaekernels::cpu::coupling_backward_step);
}
