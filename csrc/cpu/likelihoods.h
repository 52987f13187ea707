// Row math of the likelihoods shared by the IWAE family's kernels (iwae.cpp) and the fused MLP
// VAE (mlp_vae.cpp): the Bernoulli log-probability's softplus and its exact fallback, and the
// Gaussian KL's exp(x) - 1 - x.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>

#include "rows.h"

namespace vaekernels::cpu {
inline namespace CPU_CAPABILITY {

// log1p(t) for t in [0, 1] as 2 atanh(s), s = t / (2 + t) <= 1/3: the odd series in s converges
// by a factor 1/9 a term, so terms through s^13 are within 1e-8 of the float result, where
// Sleef's full-range log1p costs twice as much.
template <typename T>
Vectorized<T> log1p_unit(const Vectorized<T>& t) {
  return t.log1p();
}

template <>
inline Vectorized<float> log1p_unit(const Vectorized<float>& t) {
  using Vec = Vectorized<float>;
  const Vec s = t / (Vec(2.f) + t);
  const Vec s2 = s * s;
  Vec series(1.f / 13.f);
  for (float c : {1.f / 11.f, 1.f / 9.f, 1.f / 7.f, 1.f / 5.f, 1.f / 3.f, 1.f}) series = at::vec::fmadd(series, s2, Vec(c));
  return Vec(2.f) * s * series;
}

template <typename T>
Vectorized<T> softplus(const Vectorized<T>& l) {
  // max(l, 0) + log1p(exp(-|l|)): exact for |l| up to the dtype's range, never overflows.
  // exp_u20 (float: ATen's 20-ulp exp, double: the exact one) makes the forward and backward
  // passes 25-35% faster than Sleef's 1-ulp exp; the row sums stay within 1e-7 relative. It
  // clamps a NaN argument to a finite one, but maximum keeps a NaN l NaN.
  return at::vec::maximum(l, Vectorized<T>(T(0))) + log1p_unit(l.abs().neg().exp_u20());
}

// x log sigmoid(l) + (1 - x) log sigmoid(-l), a term of weight 0 counting 0 where its log is -inf
// (as xlogy does): the fast x l - softplus(l) is inf - inf or 0 * inf at l = +-inf, where the
// answer is 0 or -inf. A NaN l stays NaN through the log1p term.
template <typename T>
T bernoulli_term(T l, T x) {
  const T log1p_exp = std::log1p(std::exp(-std::abs(l)));
  const T positive = x == T(0) ? T(0) : x * (std::min(l, T(0)) - log1p_exp);
  const T negative = x == T(1) ? T(0) : (T(1) - x) * (-std::max(l, T(0)) - log1p_exp);
  return positive + negative;
}

// Redoes with exact(first[d], rest[d]...) each row of out whose fast sum is not finite: only a
// non-finite input (or a sum past the dtype's range) gets there, so the fast loop stays as it is.
template <typename scalar_t, typename Exact, typename... Views>
void redo_non_finite_rows(at::Tensor& out, Exact exact, const Views&... views) {
  const auto& first = std::get<0>(std::tie(views...));
  scalar_t* out_ptr = out.data_ptr<scalar_t>();
  for_each_row<scalar_t>(first.size(0), first.size(1), first.size(2), [&](int64_t row, const auto*... rows) {
    if (std::isfinite(out_ptr[row])) return;
    scalar_t sum = 0;
    for (int64_t d = 0; d < first.size(2); ++d) sum += exact(rows[d]...);
    out_ptr[row] = sum;
  }, views...);
}

// 1 / n! for n = 0 .. kCount - 1, each rounded once from double.
template <typename T, int kCount>
constexpr std::array<T, kCount> inverse_factorials() {
  std::array<T, kCount> coefficients{};
  double inverse = 1.0;
  for (int n = 0; n < kCount; ++n) {
    inverse /= std::max(n, 1);
    coefficients[n] = static_cast<T>(inverse);
  }
  return coefficients;
}

// exp(x) - 1 - x. Near 0 it is about x^2 / 2, where even expm1(x) - x keeps only the rounding
// of expm1(x): a relative error of about eps / |x| (7e-4 at x = 1e-4 in float). So |x| < 1 takes
// the series x^2 sum_{n >= 2} x^(n - 2) / n!, cut where the next term falls below eps x^2 / 2;
// beyond, exp(x) - 1 - x is within a few ulp, at half the cost of expm1(x) - x.
template <typename T>
Vectorized<T> exp_minus_one_minus(const Vectorized<T>& x) {
  using Vec = Vectorized<T>;
  static constexpr auto kCoefficients = inverse_factorials<T, std::is_same_v<T, float> ? 12 : 19>();
  Vec series(kCoefficients.back());
  for (int n = static_cast<int>(kCoefficients.size()) - 2; n >= 2; --n)
    series = at::vec::fmadd(series, x, Vec(kCoefficients[n]));
  return Vec::blendv(x.exp() - Vec(T(1)) - x, x * x * series, x.abs() < Vec(T(1)));
}

// KL(N(mean, exp(log_var)) || N(0, I)) of each row of the checked [P, Q, D] views -> [P, Q].
template <typename scalar_t>
at::Tensor gaussian_kl_rows(const at::Tensor& mean, const at::Tensor& log_var) {
  // exp(lv) - 1 - lv per element rather than subtracting D at the end: a posterior close to
  // the prior has a KL near 0, which a row sum near D would bury in rounding.
  at::Tensor out = reduce_rows<scalar_t>(
      [](const auto& mean_d, const auto& log_var_d) {
        return at::vec::fmadd(mean_d, mean_d, exp_minus_one_minus(log_var_d));
      },
      [](scalar_t sum) { return scalar_t(0.5) * sum; }, mean, log_var);
  // exp(lv) - 1 - lv is inf - inf at lv = +inf, where the KL is +inf.
  redo_non_finite_rows<scalar_t>(out, [](scalar_t mean_d, scalar_t log_var_d) {
    const scalar_t excess = log_var_d == std::numeric_limits<scalar_t>::infinity()
                                ? log_var_d : std::expm1(log_var_d) - log_var_d;
    return scalar_t(0.5) * (mean_d * mean_d + excess);
  }, mean, log_var);
  return out;
}

}  // namespace CPU_CAPABILITY
}  // namespace vaekernels::cpu
