// CPU kernels of the decoder-Jacobian family. The matrix products of forward-mode propagation
// stay in library GEMMs (oneDNN's matmul in float32: matmul_2d); these kernels fuse what sits
// between them: an activation, its first and second derivative and the scaling of the whole
// [B, k, h] tangent block in one pass (and its backward in one pass), and the row-wise reduction
// of T M against T.
#include <algorithm>
#include <cmath>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "rows.h"

namespace vaekernels::cpu {
inline namespace CPU_CAPABILITY {
namespace {

enum class Activation { Tanh, Sigmoid, Relu, LeakyRelu, Softplus, Elu, Gelu };

Activation parse_activation(const char* op, c10::string_view name) {
  static const std::pair<const char*, Activation> known[] = {
      {"tanh", Activation::Tanh}, {"sigmoid", Activation::Sigmoid},     {"relu", Activation::Relu},
      {"leaky_relu", Activation::LeakyRelu}, {"softplus", Activation::Softplus}, {"elu", Activation::Elu},
      {"gelu", Activation::Gelu}};
  for (const auto& [key, value] : known) {
    if (name == key) return value;
  }
  TORCH_CHECK(false, op, ": activation must be one of tanh, sigmoid, relu, leaky_relu, softplus, elu, gelu, got '",
              std::string(name), "'");
}

// act(x), act'(x) and act''(x) for one vector of pre-activations. p0: leaky_relu's slope, elu's
// alpha, softplus's beta; p1: softplus's threshold (beta x above it is the identity, as in torch).
template <typename T>
void activation_vec(Activation act, const Vectorized<T>& x, T p0, T p1, Vectorized<T>& out, Vectorized<T>& d1,
                    Vectorized<T>& d2) {
  using Vec = Vectorized<T>;
  const Vec zero(T(0)), one(T(1));
  switch (act) {
    case Activation::Tanh: {
      out = x.tanh();
      d1 = one - out * out;
      d2 = Vec(T(-2)) * out * d1;
      return;
    }
    case Activation::Sigmoid: {
      // exp(-x) overflows to inf for very negative x and the quotient to 0: never NaN.
      out = one / (one + x.neg().exp());
      d1 = out * (one - out);
      d2 = d1 * (one - Vec(T(2)) * out);
      return;
    }
    case Activation::Relu: {
      const Vec positive = x > zero;
      out = at::vec::maximum(x, zero);
      d1 = Vec::blendv(zero, one, positive);
      d2 = zero;
      return;
    }
    case Activation::LeakyRelu: {
      const Vec positive = x > zero;
      out = Vec::blendv(x * Vec(p0), x, positive);
      d1 = Vec::blendv(Vec(p0), one, positive);
      d2 = zero;
      return;
    }
    case Activation::Softplus: {
      const Vec bx = x * Vec(p0);
      const Vec linear = bx > Vec(p1);
      const Vec s = one / (one + bx.neg().exp());
      out = Vec::blendv((at::vec::maximum(bx, zero) + bx.abs().neg().exp().log1p()) / Vec(p0), x, linear);
      d1 = Vec::blendv(s, one, linear);
      d2 = Vec::blendv(Vec(p0) * s * (one - s), zero, linear);
      return;
    }
    case Activation::Elu: {
      const Vec positive = x > zero;
      const Vec e = at::vec::minimum(x, zero).exp() * Vec(p0);
      out = Vec::blendv(e - Vec(p0), x, positive);
      d1 = Vec::blendv(e, one, positive);
      d2 = Vec::blendv(e, zero, positive);
      return;
    }
    case Activation::Gelu: {
      const Vec cdf = Vec(T(0.5)) * (one + (x * Vec(T(M_SQRT1_2))).erf());
      const Vec pdf = (Vec(T(-0.5)) * x * x).exp() * Vec(T(0.3989422804014326779399460599343818684759));
      out = x * cdf;
      d1 = cdf + x * pdf;
      d2 = pdf * (Vec(T(2)) - x * x);
      return;
    }
  }
}

// act, act', act'' of one row of h pre-activations into the three buffers (out may be null).
template <typename T>
void activation_row(Activation act, const T* pre, int64_t h, T p0, T p1, T* out, T* d1, T* d2) {
  using Vec = Vectorized<T>;
  for (int64_t j = 0; j < h; j += Vec::size()) {
    const int64_t n = std::min<int64_t>(Vec::size(), h - j);
    Vec o, a, b;
    activation_vec<T>(act, Vec::loadu(pre + j, n), p0, p1, o, a, b);
    if (out != nullptr) o.store(out + j, n);
    a.store(d1 + j, n);
    if (d2 != nullptr) b.store(d2 + j, n);
  }
}

// pre [B, h] and tangent [P, k, h] with P in {1, B}: the shapes of the tangent-step ops.
void check_step_inputs(const char* op, const at::Tensor& pre, const at::Tensor& tangent) {
  check_rank(op, "pre", pre, 2, "[B, h]");
  check_floating(op, "pre", pre, kCpu);
  check_rank(op, "tangent", tangent, 3, "[P, k, h]");
  check_floating(op, "tangent", tangent, kCpu);
  TORCH_CHECK(tangent.scalar_type() == pre.scalar_type(), op, ": tangent must have dtype ", pre.scalar_type(),
              ", got ", tangent.scalar_type());
  TORCH_CHECK(tangent.size(2) == pre.size(1) && (tangent.size(0) == 1 || tangent.size(0) == pre.size(0)), op,
              ": tangent must have shape [B or 1, k, h] = [", pre.size(0), " or 1, k, ", pre.size(1), "], got ",
              tangent.sizes());
}

std::tuple<at::Tensor, at::Tensor> jacobian_tangent_step(const at::Tensor& pre_in, const at::Tensor& tangent_in,
                                                         c10::string_view activation, double p0, double p1) {
  constexpr const char* op = "vaekernels::jacobian_tangent_step";
  check_step_inputs(op, pre_in, tangent_in);
  const Activation act = parse_activation(op, activation);
  const at::Tensor pre = pre_in.contiguous(), tangent = tangent_in.contiguous();
  const int64_t B = pre.size(0), h = pre.size(1), k = tangent.size(1);
  const bool shared = tangent.size(0) == 1 && B > 1;
  at::Tensor out = at::empty({B, h}, pre.options());
  at::Tensor tangent_out = at::empty({B, k, h}, pre.options());
  AT_DISPATCH_FLOATING_TYPES(pre.scalar_type(), "jacobian_tangent_step", [&] {
    using Vec = Vectorized<scalar_t>;
    const scalar_t* pre_ptr = pre.const_data_ptr<scalar_t>();
    const scalar_t* t_ptr = tangent.const_data_ptr<scalar_t>();
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    scalar_t* to_ptr = tangent_out.data_ptr<scalar_t>();
    at::parallel_for(0, B, row_grain(k * h), [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> slope(h);
      for (int64_t b = begin; b < end; ++b) {
        activation_row<scalar_t>(act, pre_ptr + b * h, h, p0, p1, out_ptr + b * h, slope.data(), nullptr);
        const scalar_t* tb = t_ptr + (shared ? 0 : b * k * h);
        scalar_t* ob = to_ptr + b * k * h;
        for (int64_t i = 0; i < k; ++i) {
          at::vec::map2<scalar_t>([](Vec s, Vec t) { return s * t; }, ob + i * h, slope.data(), tb + i * h, h);
        }
      }
    });
  });
  return {out, tangent_out};
}

// grad_pre = grad_out * act' + act'' * sum_i grad_tangent_i * tangent_i and
// grad_tangent_in = act' * grad_tangent, in one pass over the [B, k, h] blocks. A shared tangent
// (P = 1) gets its [1, k, h] gradient, the batch sum, from one partial sum per thread: the
// [B, k, h] block of terms is never written.
std::tuple<at::Tensor, at::Tensor> jacobian_tangent_step_backward(const std::optional<at::Tensor>& grad_out_in,
                                                                  const at::Tensor& grad_tangent_in,
                                                                  const at::Tensor& pre_in,
                                                                  const at::Tensor& tangent_in,
                                                                  c10::string_view activation, double p0, double p1) {
  constexpr const char* op = "vaekernels::jacobian_tangent_step_backward";
  check_step_inputs(op, pre_in, tangent_in);
  const Activation act = parse_activation(op, activation);
  const at::Tensor pre = pre_in.contiguous(), tangent = tangent_in.contiguous();
  const int64_t B = pre.size(0), h = pre.size(1), k = tangent.size(1);
  check_grad(op, "grad_tangent", grad_tangent_in, {B, k, h}, pre);
  const bool has_grad_out = grad_out_in.has_value() && grad_out_in->defined();
  at::Tensor grad_out;
  if (has_grad_out) {
    check_grad(op, "grad_out", *grad_out_in, {B, h}, pre);
    grad_out = grad_out_in->to(pre.scalar_type()).contiguous();
  }
  const at::Tensor grad_tangent = grad_tangent_in.to(pre.scalar_type()).contiguous();
  // B = 0 with a shared tangent still gives its [1, k, h] gradient, zeros.
  const bool shared = tangent.size(0) == 1 && B != 1;
  at::Tensor grad_pre = at::empty({B, h}, pre.options());
  const int64_t grain = row_grain(k * h);
  // Shared: row t of the partial sums belongs to thread t (a [k, h] block each). parallel_for
  // numbers its tasks below both the thread count and the number of grains.
  const int64_t partials = std::min<int64_t>(at::get_num_threads(), (B + grain - 1) / grain);
  at::Tensor grad_tangent_out =
      shared ? at::zeros({partials, k, h}, pre.options()) : at::empty({B, k, h}, pre.options());
  AT_DISPATCH_FLOATING_TYPES(pre.scalar_type(), "jacobian_tangent_step_backward", [&] {
    using Vec = Vectorized<scalar_t>;
    const scalar_t* pre_ptr = pre.const_data_ptr<scalar_t>();
    const scalar_t* t_ptr = tangent.const_data_ptr<scalar_t>();
    const scalar_t* gt_ptr = grad_tangent.const_data_ptr<scalar_t>();
    const scalar_t* go_ptr = has_grad_out ? grad_out.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* gp_ptr = grad_pre.data_ptr<scalar_t>();
    scalar_t* gto_ptr = grad_tangent_out.data_ptr<scalar_t>();
    at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
      TORCH_INTERNAL_ASSERT_DEBUG_ONLY(!shared || at::get_thread_num() < partials);
      std::vector<scalar_t> d1(h), d2(h), acc(h);
      for (int64_t b = begin; b < end; ++b) {
        activation_row<scalar_t>(act, pre_ptr + b * h, h, p0, p1, nullptr, d1.data(), d2.data());
        std::fill(acc.begin(), acc.end(), scalar_t(0));
        const scalar_t* tb = t_ptr + (shared ? 0 : b * k * h);
        const scalar_t* gb = gt_ptr + b * k * h;
        scalar_t* ob = gto_ptr + (shared ? at::get_thread_num() : b) * k * h;
        for (int64_t i = 0; i < k; ++i) {
          const scalar_t* g = gb + i * h;
          const scalar_t* t = tb + i * h;
          scalar_t* o = ob + i * h;
          int64_t j = 0;
          for (; j + Vec::size() <= h; j += Vec::size()) {
            const Vec gv = Vec::loadu(g + j);
            const Vec term = Vec::loadu(d1.data() + j) * gv;
            (shared ? term + Vec::loadu(o + j) : term).store(o + j);
            at::vec::fmadd(gv, Vec::loadu(t + j), Vec::loadu(acc.data() + j)).store(acc.data() + j);
          }
          for (; j < h; ++j) {
            o[j] = d1[j] * g[j] + (shared ? o[j] : scalar_t(0));
            acc[j] += g[j] * t[j];
          }
        }
        scalar_t* gp = gp_ptr + b * h;
        if (go_ptr != nullptr) {
          at::vec::map3<scalar_t>([](Vec go, Vec a, Vec c) { return go * a; }, gp, go_ptr + b * h, d1.data(),
                                  acc.data(), h);
          at::vec::map3<scalar_t>([](Vec g, Vec a2, Vec c) { return at::vec::fmadd(a2, c, g); }, gp, gp, d2.data(),
                                  acc.data(), h);
        } else {
          at::vec::map2<scalar_t>([](Vec a2, Vec c) { return a2 * c; }, gp, d2.data(), acc.data(), h);
        }
      }
    });
  });
  return {grad_pre, shared ? grad_tangent_out.sum(0, true) : grad_tangent_out};
}

// a [m, k] b [k, n] for a contiguous a. In float32 through oneDNN's matmul, the op
// mkldnn::_linear_pointwise (which inductor lowers linear layers to) where torch registers it:
// exact float32 like MKL's sgemm behind at::mm, and 15-18% faster than it on the AMD EPYC of
// bench/RESULTS.md. ops/jacobian.py's _mm makes the same choice for the products in Python.
at::Tensor matmul_2d(const at::Tensor& a, const at::Tensor& b) {
  static const std::optional<c10::OperatorHandle> onednn =
      c10::Dispatcher::singleton().findOp({"mkldnn::_linear_pointwise", ""});
  if (onednn.has_value() && a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat &&
      at::globalContext().userEnabledMkldnn() && a.is_contiguous() && (b.is_contiguous() || b.t().is_contiguous())) {
    torch::jit::Stack stack{a, b.t(), c10::IValue(), c10::IValue(std::string("none")),
                           c10::IValue(c10::List<std::optional<c10::Scalar>>()), c10::IValue()};
    onednn->callBoxed(&stack);
    return stack[0].toTensor();
  }
  return at::mm(a, b);
}

// T M in one GEMM (it is an output: the backward scales it instead of multiplying again), then
// the row-wise dots with T in one vectorised pass, or the per-example products with Tᵀ.
std::tuple<at::Tensor, at::Tensor> jacobian_gram_reduce(const at::Tensor& tangent_in, const at::Tensor& metric_in,
                                                        bool diagonal) {
  constexpr const char* op = "vaekernels::jacobian_gram_reduce";
  check_rank(op, "tangent", tangent_in, 3, "[B, k, h]");
  check_floating(op, "tangent", tangent_in, kCpu);
  const int64_t B = tangent_in.size(0), k = tangent_in.size(1), h = tangent_in.size(2);
  check_tensor(op, "metric", metric_in, {h, h}, tangent_in, kCpu);
  const at::Tensor tangent = tangent_in.contiguous();
  const at::Tensor tm = matmul_2d(tangent.view({B * k, h}), metric_in).view({B, k, h});
  if (!diagonal) return {at::bmm(tm, tangent.transpose(1, 2)), tm};
  at::Tensor norms = at::empty({B, k}, tangent.options());
  AT_DISPATCH_FLOATING_TYPES(tangent.scalar_type(), "jacobian_gram_reduce", [&] {
    using Vec = Vectorized<scalar_t>;
    scalar_t* out = norms.data_ptr<scalar_t>();
    const scalar_t* tm_ptr = tm.const_data_ptr<scalar_t>();
    const scalar_t* t_ptr = tangent.const_data_ptr<scalar_t>();
    at::parallel_for(0, B * k, row_grain(h), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        out[r] = at::vec::map2_reduce_all<scalar_t>([](Vec a, Vec b) { return a * b; },
                                                    [](Vec a, Vec b) { return a + b; }, tm_ptr + r * h,
                                                    t_ptr + r * h, h);
      }
    });
  });
  return {norms, tm};
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace vaekernels::cpu

TORCH_LIBRARY_IMPL(vaekernels, CPU, m) {
  m.impl("jacobian_tangent_step", &vaekernels::cpu::jacobian_tangent_step);
  m.impl("jacobian_tangent_step_backward", &vaekernels::cpu::jacobian_tangent_step_backward);
  m.impl("jacobian_gram_reduce", &vaekernels::cpu::jacobian_gram_reduce);
}
