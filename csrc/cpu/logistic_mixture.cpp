// CPU kernels of the PixelCNN++ discretised logistic mixture likelihood. params [B, P, H, W] is
// read in its own layout: for one image and one parameter channel the H*W pixels are contiguous,
// so a vector holds the same parameter of neighbouring pixels and every pixel's whole mixture
// (all channels, all components) is evaluated in registers. Nothing of size B*C*M*H*W is
// written: the forward writes the per-pixel NLL, the backward recomputes each pixel's terms
// from the inputs and that NLL and writes the parameter gradient in the same pass.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include <torch/library.h>

#include "fast_math.h"
#include "rows.h"

namespace vaekernels::cpu {
inline namespace CPU_CAPABILITY {
namespace {

constexpr double kLogScaleMin = -7.0;
constexpr double kHalfBin = 1.0 / 255.0;
constexpr double kEdge = 0.999;
constexpr double kTinyLogProb = -11.512925464970229;  // log(1e-5)
constexpr double kLogHalfLevels = 4.848116364598481;   // log(127.5)
// Floor of the standardised bin width: a log-scale past ~88 would make it 0 and its log -inf.
constexpr double kMinWidth = 1e-30;

template <typename T>
using Vec = Vectorized<T>;

// The log-probability of one channel's value under one logistic component, and its derivatives
// with respect to the centred value u = x - mean and to the clamped log-scale.
template <typename T>
struct BinTerm {
  Vec<T> log_prob, d_centred, d_log_scale;
};

// log sigmoid(y) = min(y, 0) - log(1 + exp(-|y|)), for the density branch, which serves bins of
// log-mass below log(1e-5): log's absolute error there is relatively negligible, log1p's care not needed.
template <typename T>
Vec<T> log_sigmoid(const Vec<T>& y) {
  return at::vec::minimum(y, Vec<T>(T(0))) - log_of(Vec<T>(T(1)) + y.abs().neg().exp_u20());
}

// See vaekernels.reference.logistic_mixture.bin_log_probs for the formula and its branches. The bin
// mass log sigmoid(plus) + log sigmoid(-minus) + log(1 - exp(-width)) is written as
// min(plus, 0) + min(-minus, 0) - width + log(expm1(width) / ((1 + e_plus) (1 + e_minus))), with
// e = exp(-|.|): one log where the three terms take two log1p and a log, the kernel's main cost.
// An edge bin drops the end it does not have (its e set to 0) and the width term. exp_u20 (float:
// ATen's faster exp; double: the exact one) serves every exponential of the file: the e's, whose
// error log1p scales down, 1 / scale and the mixture weights (NLL within 2.3e-7 relative of
// float64 at the bench's shape, the gradient within 1.2e-6 of its largest entry); float's expm1,
// log and tanh are fast_math.h's (a few ulp), not Sleef's, which cost more.
template <typename T, bool kGrad>
BinTerm<T> bin_term(const Vec<T>& x, const Vec<T>& centred, const Vec<T>& log_scale) {
  using V = Vec<T>;
  const V zero(T(0)), one(T(1)), half_bin{T(kHalfBin)};
  // exp_u20 clamps its argument, NaN included: a NaN log-scale is put back, so that it reaches
  // the pixel's NLL and gradient as through torch.exp.
  const V inv_scale = V::blendv(log_scale.neg().exp_u20(), log_scale, log_scale.isnan());
  const V plus = inv_scale * (centred + half_bin), minus = inv_scale * (centred - half_bin);
  const V lower = x < V(T(-kEdge)), upper = x > V(T(kEdge));
  const V edge = lower | upper;
  const V width = at::vec::maximum(V(T(2 * kHalfBin)) * inv_scale, V(T(kMinWidth)));
  const V expm1_width = expm1_of(width);
  // Where plus and minus = plus - width have one sign, exp(-|minus|) is exp(-|plus|) times
  // exp(+-width): one exponential less; a bin around the mean (minus < 0 < plus) needs its own.
  // Divisions are shared through reciprocals of products: 1 / (expm1(w) exp(w)) serves exp(-w)
  // and w / expm1(w); 1 / ((1 + e_plus) (1 + e_minus)) the bin mass and both sigmoids.
  const V exp_width = one + expm1_width, inv_expm1_exp = one / (expm1_width * exp_width);
  const V e_abs_plus = plus.abs().neg().exp_u20();
  const V positive = minus >= zero, straddle = (minus < zero) & (plus > zero);
  V e_abs_minus = V::blendv(e_abs_plus * expm1_width * inv_expm1_exp, e_abs_plus * exp_width, positive);
  if (straddle.zero_mask() != (1 << V::size()) - 1)
    e_abs_minus = V::blendv(e_abs_minus, minus.abs().neg().exp_u20(), straddle);
  const V e_plus = V::blendv(e_abs_plus, zero, upper);
  const V e_minus = V::blendv(e_abs_minus, zero, lower);
  const V one_plus = one + e_plus, one_minus = one + e_minus, inv_both = one / (one_plus * one_minus);
  const V log_main = V::blendv(at::vec::minimum(plus, zero), zero, upper) +
                     V::blendv(at::vec::minimum(minus.neg(), zero), zero, lower) - V::blendv(width, zero, edge) +
                     log_of(V::blendv(expm1_width, one, edge) * inv_both);
  const V take_main = (log_main > V(T(kTinyLogProb))) | edge;
  // The density branch (a bin of mass below 1e-5) is rare: evaluated only when a lane takes it.
  const bool any_density = take_main.zero_mask() != 0;
  const V mid = inv_scale * centred;
  V log_density = zero, density_slope = zero;
  if (any_density) {
    log_density = mid - log_scale + V(T(2)) * log_sigmoid(mid.neg()) - V(T(kLogHalfLevels));
    // 1 - 2 sigmoid(mid) = -tanh(mid / 2).
    if constexpr (kGrad) density_slope = tanh_of(mid * V(T(-0.5)));
  }
  BinTerm<T> term;
  term.log_prob = V::blendv(log_density, log_main, take_main);
  if constexpr (kGrad) {
    // sigmoid(-plus) (0 at the upper edge) and sigmoid(minus) (0 at the lower edge) from the e's,
    // exact in both tails; with them one formula covers the middle and both edges.
    const V inv_plus = one_minus * inv_both, inv_minus = one_plus * inv_both;
    const V sig_neg_plus = V::blendv(V::blendv(inv_plus, e_plus * inv_plus, plus > zero), zero, upper);
    const V sig_minus = V::blendv(V::blendv(e_minus * inv_minus, inv_minus, minus > zero), zero, lower);
    const V width_term = V::blendv(width * exp_width * inv_expm1_exp, zero, edge);
    term.d_centred = V::blendv(inv_scale * density_slope, inv_scale * (sig_neg_plus - sig_minus), take_main);
    term.d_log_scale = V::blendv(mid.neg() * density_slope - one,
                                 (plus * sig_neg_plus - minus * sig_minus + width_term).neg(), take_main);
  }
  return term;
}

// Where a parameter of a pixel block lives: channel k of image b is at base + (b * P + k) * HW.
struct Layout {
  int64_t B, C, M, P, HW, block;  // block: the per-colour-channel stride, 3 M (with coefficients) or 2 M
  int64_t mean(int64_t c, int64_t m) const { return M + c * block + m; }
  int64_t log_scale(int64_t c, int64_t m) const { return M + c * block + M + m; }
  int64_t coeff(int64_t c, int64_t m) const { return M + c * block + 2 * M + m; }
};

Layout layout_of(const char* op, const at::Tensor& params, const at::Tensor& x, int64_t num_mixtures) {
  check_floating(op, "params", params, kCpu);
  check_rank(op, "params", params, 4, "[B, P, H, W]");
  check_rank(op, "x", x, 4, "[B, C, H, W]");
  const int64_t B = params.size(0), C = x.size(1), H = params.size(2), W = params.size(3), M = num_mixtures;
  TORCH_CHECK(M >= 1, op, ": num_mixtures must be >= 1, got ", M);
  TORCH_CHECK(C == 1 || C == 3, op, ": x must have 1 or 3 channels, got ", C);
  const int64_t P = C == 3 ? 10 * M : 3 * M;
  check_tensor(op, "params", params, {B, P, H, W}, params, kCpu);
  check_tensor(op, "x", x, {B, C, H, W}, params, kCpu);
  TORCH_CHECK(params.is_contiguous() && x.is_contiguous(), op, ": params and x must be contiguous");
  return {B, C, M, P, H * W, C == 3 ? 3 * M : 2 * M};
}

// Calls body(b, offset, count, scratch) for every block of up to Vec::size() pixels of every
// image, in parallel; scratch holds 2 M vectors, allocated once per task rather than per block.
template <typename T, typename Body>
void for_each_pixel_block(const Layout& l, Body body) {
  const int64_t lanes = Vec<T>::size(), blocks = (l.HW + lanes - 1) / lanes;
  // A block costs ~C*M logistic terms of a dozen transcendental functions each.
  const int64_t grain = std::max<int64_t>(1, 256 / (l.C * l.M));
  at::parallel_for(0, l.B * blocks, grain, [&](int64_t begin, int64_t end) {
    std::vector<Vec<T>> scratch(2 * l.M);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / blocks, offset = (i % blocks) * lanes;
      body(b, offset, std::min(lanes, l.HW - offset), scratch.data());
    }
  });
}

// exp(v) that keeps NaN NaN (exp_u20 clamps its argument, NaN included, to a finite value).
template <typename T>
Vec<T> exp_nan(const Vec<T>& v) {
  return Vec<T>::blendv(v.exp_u20(), v, v.isnan());
}

// log sum exp over the M vectors of one pixel block. A lane whose values are all -inf (every
// component gives the pixel zero mass, as a log-scale of +inf does) sums to -inf: shifted by 0, not
// by -inf (-inf - -inf = NaN), with its exponentials set to 0 (exp_u20 clamps -inf to a finite
// argument).
template <typename T>
Vec<T> log_sum_exp(const Vec<T>* values, int64_t M) {
  const Vec<T> zero(T(0)), minus_inf(-std::numeric_limits<T>::infinity());
  Vec<T> top = values[0];
  for (int64_t m = 1; m < M; ++m) top = at::vec::maximum(top, values[m]);
  const Vec<T> shift = Vec<T>::blendv(top, zero, top == minus_inf);
  Vec<T> sum(T(0));
  for (int64_t m = 0; m < M; ++m) sum += Vec<T>::blendv((values[m] - shift).exp_u20(), zero, values[m] == minus_inf);
  return shift + sum.log();
}

// The mixture terms of component m at one pixel block: its channels' log-probabilities summed
// (returned) and, with kGrad, their derivatives in terms[c].
template <typename T, bool kGrad, typename Load>
Vec<T> component(const Layout& l, int64_t m, const T* pb, const Vec<T>* xs, const Vec<T>* tanh_coeffs,
                 BinTerm<T>* terms, const Load& load) {
  Vec<T> sum(T(0));
  for (int64_t c = 0; c < l.C; ++c) {
    Vec<T> mean = load(pb, l.mean(c, m));
    if (c == 1) mean = mean + tanh_coeffs[0] * xs[0];
    if (c == 2) mean = mean + tanh_coeffs[1] * xs[0] + tanh_coeffs[2] * xs[1];
    const Vec<T> log_scale = at::vec::maximum(load(pb, l.log_scale(c, m)), Vec<T>(T(kLogScaleMin)));
    const BinTerm<T> term = bin_term<T, kGrad>(xs[c], xs[c] - mean, log_scale);
    sum += term.log_prob;
    if constexpr (kGrad) terms[c] = term;
  }
  return sum;
}

at::Tensor discretized_logistic_mixture_nll(const at::Tensor& params, const at::Tensor& x, int64_t num_mixtures) {
  const Layout l = layout_of("vaekernels::discretized_logistic_mixture_nll", params, x, num_mixtures);
  at::Tensor nll = at::empty({l.B, params.size(2), params.size(3)}, params.options());
  AT_DISPATCH_FLOATING_TYPES(params.scalar_type(), "discretized_logistic_mixture_nll", [&] {
    using V = Vec<scalar_t>;
    const scalar_t* p_ptr = params.const_data_ptr<scalar_t>();
    const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
    scalar_t* out_ptr = nll.data_ptr<scalar_t>();
    for_each_pixel_block<scalar_t>(l, [&](int64_t b, int64_t offset, int64_t count, V* scratch) {
      const auto load = [&](const scalar_t* base, int64_t channel) {
        return count == V::size() ? V::loadu(base + channel * l.HW + offset)
                                  : V::loadu(base + channel * l.HW + offset, count);
      };
      const scalar_t* pb = p_ptr + b * l.P * l.HW;
      V xs[3], tanh_coeffs[3];
      for (int64_t c = 0; c < l.C; ++c) xs[c] = load(x_ptr + b * l.C * l.HW, c);
      V* logits = scratch;
      V* joint = scratch + l.M;
      for (int64_t m = 0; m < l.M; ++m) logits[m] = load(pb, m);
      // log pi_m = logit_m - log sum exp(logits) before the component's log-probability is added:
      // logit_m + log p_m(x) would lose log p_m(x) to a logit of 1e30 (1e30 - 1e30 = 0 after).
      const V log_norm = log_sum_exp(logits, l.M);
      for (int64_t m = 0; m < l.M; ++m) {
        if (l.C == 3)
          for (int64_t c = 0; c < 3; ++c) tanh_coeffs[c] = tanh_of(load(pb, l.coeff(c, m)));
        joint[m] = (logits[m] - log_norm) + component<scalar_t, false>(l, m, pb, xs, tanh_coeffs, nullptr, load);
      }
      const V out = log_sum_exp(joint, l.M).neg();
      out.store(out_ptr + b * l.HW + offset, count);
    });
  });
  return nll;
}

at::Tensor discretized_logistic_mixture_nll_backward(const at::Tensor& grad, const at::Tensor& params,
                                                     const at::Tensor& x, const at::Tensor& nll,
                                                     int64_t num_mixtures) {
  constexpr const char* op = "vaekernels::discretized_logistic_mixture_nll_backward";
  const Layout l = layout_of(op, params, x, num_mixtures);
  const std::vector<int64_t> pixels{l.B, params.size(2), params.size(3)};
  check_grad(op, "grad", grad, pixels, params);
  check_tensor(op, "nll", nll, pixels, params, kCpu);
  const at::Tensor grad_c = grad.to(params.scalar_type()).contiguous(), nll_c = nll.contiguous();
  at::Tensor grad_params = at::empty_like(params);
  AT_DISPATCH_FLOATING_TYPES(params.scalar_type(), "discretized_logistic_mixture_nll_backward", [&] {
    using V = Vec<scalar_t>;
    const scalar_t* p_ptr = params.const_data_ptr<scalar_t>();
    const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
    const scalar_t* g_ptr = grad_c.const_data_ptr<scalar_t>();
    const scalar_t* nll_ptr = nll_c.const_data_ptr<scalar_t>();
    scalar_t* gp_ptr = grad_params.data_ptr<scalar_t>();
    for_each_pixel_block<scalar_t>(l, [&](int64_t b, int64_t offset, int64_t count, V* scratch) {
      const auto load = [&](const scalar_t* base, int64_t channel) {
        return count == V::size() ? V::loadu(base + channel * l.HW + offset)
                                  : V::loadu(base + channel * l.HW + offset, count);
      };
      const auto store = [&](const V& v, int64_t channel) {
        v.store(gp_ptr + (b * l.P + channel) * l.HW + offset, count);
      };
      const scalar_t* pb = p_ptr + b * l.P * l.HW;
      V xs[3], tanh_coeffs[3];
      for (int64_t c = 0; c < l.C; ++c) xs[c] = load(x_ptr + b * l.C * l.HW, c);
      V* logits = scratch;
      for (int64_t m = 0; m < l.M; ++m) logits[m] = load(pb, m);
      const V g = load(g_ptr + b * l.HW, 0);
      const V log_norm = log_sum_exp(logits, l.M);
      // The forward's NLL, -log sum_m pi_m p_m(x).
      const V nll_b = load(nll_ptr + b * l.HW, 0);
      const V one(scalar_t(1)), log_scale_min{scalar_t(kLogScaleMin)};
      BinTerm<scalar_t> terms[3];
      for (int64_t m = 0; m < l.M; ++m) {
        if (l.C == 3)
          for (int64_t c = 0; c < 3; ++c) tanh_coeffs[c] = tanh_of(load(pb, l.coeff(c, m)));
        const V log_prob = component<scalar_t, true>(l, m, pb, xs, tanh_coeffs, terms, load);
        // d nll / d logit_m = pi_m - r_m; d nll / d log p_cm(x) = -r_m (r: the posterior of m).
        // log pi_m first, as in the forward (a logit of 1e30 would swallow log_prob); exp_nan keeps
        // a NaN (a pixel whose NLL is NaN) NaN in every gradient of the pixel, as autograd does.
        const V log_pi = logits[m] - log_norm;
        const V r = exp_nan(log_pi + log_prob + nll_b);
        store(g * (exp_nan(log_pi) - r), m);
        const V gr = g * r;
        for (int64_t c = 0; c < l.C; ++c) {
          store(gr * terms[c].d_centred, l.mean(c, m));
          // The clamp at -7 passes the gradient where the raw log-scale is at or above it.
          const V raw = load(pb, l.log_scale(c, m));
          store(V::blendv(V(scalar_t(0)), (gr * terms[c].d_log_scale).neg(), raw >= log_scale_min),
                l.log_scale(c, m));
        }
        if (l.C == 3) {
          store(gr * terms[1].d_centred * xs[0] * (one - tanh_coeffs[0] * tanh_coeffs[0]), l.coeff(0, m));
          store(gr * terms[2].d_centred * xs[0] * (one - tanh_coeffs[1] * tanh_coeffs[1]), l.coeff(1, m));
          store(gr * terms[2].d_centred * xs[1] * (one - tanh_coeffs[2] * tanh_coeffs[2]), l.coeff(2, m));
        }
      }
    });
  });
  return grad_params;
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace vaekernels::cpu

TORCH_LIBRARY_IMPL(vaekernels, CPU, m) {
  m.impl("discretized_logistic_mixture_nll", &vaekernels::cpu::discretized_logistic_mixture_nll);
  m.impl("discretized_logistic_mixture_nll_backward", &vaekernels::cpu::discretized_logistic_mixture_nll_backward);
}
