// float32 tanh, expm1 and log for the elementwise kernels. Sleef's tanhf, expm1f and logf (u10),
// which Vectorized<float>::tanh(), ::expm1() and ::log() call, cost about five, four and two
// times an exp, and dominated the gated activation and the logistic mixture. These stay within
// a few ulp, relatively (so tanh and expm1 also near 0); the polynomial and rational
// coefficients were fitted for them with numpy (minimax relative error by Lawson-weighted least
// squares in float64, then rounded to float one at a time, the rest refitted), and the tests of
// the gate and of the mixture bound their error. tanh_of / expm1_of / log_of pick them for
// float; double keeps ATen's functions: its kernels serve gradcheck, not speed.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

namespace vaekernels::cpu {
inline namespace CPU_CAPABILITY {

// tanh(x) = x P(x^2) / Q(x^2), P and Q of degree 4, the minimax relative fit on [0, 9] with
// float coefficients (3.5e-8; float evaluation adds a few ulp). Past |x| = 9 tanh rounds to +-1
// in float: x is clamped there, and the result to [-1, 1] so that 1 - tanh^2 is never negative.
inline at::vec::Vectorized<float> tanh_fast(const at::vec::Vectorized<float>& x) {
  using V = at::vec::Vectorized<float>;
  const V one(1.0f), c = at::vec::clamp(x, V(-9.0f), V(9.0f));
  const V y = c * c;
  V p = at::vec::fmadd(V(1.335543053926358e-08f), y, V(2.0609177227015607e-05f));
  p = at::vec::fmadd(p, y, V(0.003495600540190935f));
  p = at::vec::fmadd(p, y, V(0.13381032645702362f));
  p = at::vec::fmadd(p, y, one);
  V q = at::vec::fmadd(V(7.776648658364138e-07f), y, V(0.00032856513280421495f));
  q = at::vec::fmadd(q, y, V(0.02587702125310898f));
  q = at::vec::fmadd(q, y, V(0.4671435058116913f));
  q = at::vec::fmadd(q, y, one);
  return at::vec::clamp(c * p / q, one.neg(), one);
}

// expm1(x) = x + x^2 (1/2 + x P(x)) for |x| < 0.7, P of degree 5 (the minimax relative fit with
// float coefficients: 1.6e-9), and exp(x) - 1 past it (Sleef's exp: within 2 ulp there), that
// exp evaluated only when a lane needs it. Sleef's expm1 costs four exps.
inline at::vec::Vectorized<float> expm1_fast(const at::vec::Vectorized<float>& x) {
  using V = at::vec::Vectorized<float>;
  V p = at::vec::fmadd(V(2.4821365514071658e-05f), x, V(0.00020093785133212805f));
  p = at::vec::fmadd(p, x, V(0.0013889928814023733f));
  p = at::vec::fmadd(p, x, V(0.008332652039825916f));
  p = at::vec::fmadd(p, x, V(0.04166664183139801f));
  p = at::vec::fmadd(p, x, V(0.16666671633720398f));
  p = at::vec::fmadd(p, x, V(0.5f));
  const V near_zero = at::vec::fmadd(x * x, p, x);
  const V far = x.abs() >= V(0.7f);
  if (far.zero_mask() == (1 << V::size()) - 1) return near_zero;
  return V::blendv(near_zero, x.exp() - V(1.0f), far);
}

// log(x) for positive normal x (the kernels' arguments are bounded away from 0 and inf):
// x = 2^e m with m in [sqrt(1/2), sqrt(2)), log m = 2 atanh(s) with s = (m - 1) / (m + 1) in
// [-0.172, 0.172], from its series to s^9 (truncation error 2.2e-9, relative), written around
// f = m - 1 (exact) so that log stays relatively accurate near x = 1; e ln 2 added in two parts.
// Sleef's log costs about three of these.
inline at::vec::Vectorized<float> log_fast(const at::vec::Vectorized<float>& x) {
  using V = at::vec::Vectorized<float>;
  using I = at::vec::Vectorized<int32_t>;
  const I bits = at::vec::cast<int32_t>(x);
  const I e = (bits - I(0x3f3504f3)) >> I(23);  // 0x3f3504f3: sqrt(1/2)'s bits
  const V m = at::vec::cast<float>(bits - (e << I(23)));
  const V f = m - V(1.0f);
  const V s = f / (m + V(1.0f));
  const V s2 = s * s;
  V p = at::vec::fmadd(V(2.0f / 9), s2, V(2.0f / 7));
  p = at::vec::fmadd(p, s2, V(2.0f / 5));
  p = at::vec::fmadd(p, s2, V(2.0f / 3));
  // 2 s + s^3 p = f - s f + s^3 p.
  const V log_m = at::vec::fmadd(s, at::vec::fmsub(s2, p, f), f);
  const V ef = at::vec::convert_to_fp_of_same_size<float>(e);
  return at::vec::fmadd(ef, V(0.693145751953125f), at::vec::fmadd(ef, V(1.4286068203094172e-06f), log_m));
}

template <typename T>
at::vec::Vectorized<T> log_of(const at::vec::Vectorized<T>& x) {
  if constexpr (std::is_same_v<T, float>) {
    return log_fast(x);
  } else {
    return x.log();
  }
}

template <typename T>
at::vec::Vectorized<T> expm1_of(const at::vec::Vectorized<T>& x) {
  if constexpr (std::is_same_v<T, float>) {
    return expm1_fast(x);
  } else {
    return x.expm1();
  }
}

template <typename T>
at::vec::Vectorized<T> tanh_of(const at::vec::Vectorized<T>& x) {
  if constexpr (std::is_same_v<T, float>) {
    return tanh_fast(x);
  } else {
    return x.tanh();
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace vaekernels::cpu
