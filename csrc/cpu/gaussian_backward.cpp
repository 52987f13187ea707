// The backward of gaussian_log_prob in one pass over [P, Q, D]: in autograd's composite it is
// about twenty elementwise ops of the row shape (the guarded standardisation twice, then the
// three products), each a pass over memory and a dispatch, and it dominated the Gaussian terms
// of the small-batch VAE steps.
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include <torch/library.h>

#include "rows.h"

namespace vaekernels::cpu {
inline namespace CPU_CAPABILITY {
namespace {

// With r = exp(-log_var / 4) (1 / std = r^2, capped where exp would overflow) and
// w = (x - mean) r^2, 0 at x = mean for any log_var:
//   d/dx = -g w r^2, d/dmean = g w r^2 (0 where w = 0), d/dlog_var = g (w^2 - 1) / 2,
// the gradients of vaekernels.reference.iwae.gaussian_log_prob: no 0 * inf at a tiny variance, and
// w held constant where it overflows (the density is 0 there).
std::vector<at::Tensor> gaussian_log_prob_backward(const at::Tensor& grad, const at::Tensor& x,
                                                   const at::Tensor& mean, const at::Tensor& log_var, bool x_grad,
                                                   bool mean_grad, bool log_var_grad) {
  constexpr const char* op = "vaekernels::gaussian_log_prob_backward";
  check_rows3(op, kCpu, {{"x", x}, {"mean", mean}, {"log_var", log_var}});
  const int64_t P = x.size(0), Q = x.size(1), D = x.size(2);
  check_grad(op, "grad", grad, {P, Q}, x);
  const at::Tensor grad_c = grad.to(x.scalar_type()).contiguous();
  const at::Tensor out_x = x_grad ? at::empty({P, Q, D}, x.options()) : at::Tensor();
  const at::Tensor out_mean = mean_grad ? at::empty({P, Q, D}, x.options()) : at::Tensor();
  const at::Tensor out_log_var = log_var_grad ? at::empty({P, Q, D}, x.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gaussian_log_prob_backward", [&] {
    using Vec = Vectorized<scalar_t>;
    const scalar_t* g_ptr = grad_c.const_data_ptr<scalar_t>();
    scalar_t* x_base = x_grad ? out_x.data_ptr<scalar_t>() : nullptr;
    scalar_t* mean_base = mean_grad ? out_mean.data_ptr<scalar_t>() : nullptr;
    scalar_t* log_var_base = log_var_grad ? out_log_var.data_ptr<scalar_t>() : nullptr;
    const Vec cap(std::log(std::numeric_limits<scalar_t>::max())), zero(scalar_t(0)), half(scalar_t(0.5)),
        one(scalar_t(1)), quarter(scalar_t(-0.25)), inf(std::numeric_limits<scalar_t>::infinity());
    for_each_row<scalar_t>(P, Q, D, [&](int64_t row, const scalar_t* x_row, const scalar_t* mean_row,
                                        const scalar_t* log_var_row) {
      const Vec g(g_ptr[row]);
      const int64_t offset = row * D;
      // A row's last partial vector through masked loads and stores: one formula for the whole row.
      auto terms = [&](int64_t d, auto whole, int64_t count) {
        auto load = [&](const scalar_t* p) {
          if constexpr (decltype(whole)::value) return Vec::loadu(p); else return Vec::loadu(p, count);
        };
        auto store = [&](const Vec& v, scalar_t* p) {
          if constexpr (decltype(whole)::value) v.store(p); else v.store(p, count);
        };
        const Vec diff = load(x_row + d) - load(mean_row + d);
        const Vec root = at::vec::minimum(load(log_var_row + d) * quarter, cap).exp();
        // An infinite w (a zero density) passes no gradient through itself, as in the reference.
        const Vec raw = diff * root * root;
        const Vec w = Vec::blendv(raw, zero, (diff == zero) | (raw.abs() == inf));
        const Vec scaled = Vec::blendv(g * w * root * root, zero, w == zero);
        if (x_grad) store(scaled.neg(), x_base + offset + d);
        if (mean_grad) store(scaled, mean_base + offset + d);
        if (log_var_grad) store(half * g * at::vec::fmsub(w, w, one), log_var_base + offset + d);
      };
      int64_t d = 0;
      for (; d + Vec::size() <= D; d += Vec::size()) terms(d, std::true_type{}, Vec::size());
      if (d < D) terms(d, std::false_type{}, D - d);
    }, x, mean, log_var);
  });
  std::vector<at::Tensor> grads;
  for (const at::Tensor& t : {out_x, out_mean, out_log_var})
    if (t.defined()) grads.push_back(t);
  return grads;
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace vaekernels::cpu

TORCH_LIBRARY_IMPL(vaekernels, CPU, m) {
  m.impl("gaussian_log_prob_backward", &vaekernels::cpu::gaussian_log_prob_backward);
}
