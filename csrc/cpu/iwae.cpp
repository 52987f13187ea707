// CPU kernels of the importance-weighted bound family. Each row of a [P, Q, D] view is reduced
// in one vectorised pass with accumulators of the input dtype; rows run in parallel. The
// aggregate posterior streams over the pairs (z_i, posterior_j) instead, never holding the
// [B, N, d] table of their log-densities.
#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include <torch/library.h>

#include "likelihoods.h"

namespace vaekernels::cpu {
inline namespace CPU_CAPABILITY {
namespace {

at::Tensor bernoulli_log_prob(const at::Tensor& logits, const at::Tensor& x) {
  check_rows3("vaekernels::bernoulli_log_prob", kCpu, {{"logits", logits}, {"x", x}});
  return AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "bernoulli_log_prob", [&] {
    at::Tensor out = reduce_rows<scalar_t>(
        [](const auto& l, const auto& x_d) { return x_d * l - softplus(l); }, [](scalar_t sum) { return sum; },
        logits, x);
    redo_non_finite_rows<scalar_t>(out, &bernoulli_term<scalar_t>, logits, x);
    return out;
  });
}

at::Tensor bernoulli_log_prob_backward(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& x) {
  constexpr const char* op = "vaekernels::bernoulli_log_prob_backward";
  check_rows3(op, kCpu, {{"logits", logits}, {"x", x}});
  const int64_t P = logits.size(0), Q = logits.size(1), D = logits.size(2);
  check_grad(op, "grad", grad, {P, Q}, logits);
  auto grad_c = grad.to(logits.scalar_type()).contiguous();
  auto grad_logits = at::empty({P, Q, D}, logits.options());
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "bernoulli_log_prob_backward", [&] {
    using Vec = Vectorized<scalar_t>;
    const scalar_t* g_ptr = grad_c.const_data_ptr<scalar_t>();
    scalar_t* out_base = grad_logits.data_ptr<scalar_t>();
    for_each_row<scalar_t>(P, Q, D, [&](int64_t row, const scalar_t* l, const scalar_t* xr) {
      const scalar_t g = g_ptr[row];
      scalar_t* o = out_base + row * D;
      const Vec gv(g), one(scalar_t(1));
      Vec logit_sum(scalar_t(0));
      int64_t d = 0;
      for (; d + Vec::size() <= D; d += Vec::size()) {
        // sigmoid(l) = 1 / (1 + exp(-l)): exp overflows to inf and the quotient to 0, never NaN.
        const Vec l_d = Vec::loadu(l + d);
        (gv * (Vec::loadu(xr + d) - one / (one + l_d.neg().exp_u20()))).store(o + d);
        logit_sum += l_d;
      }
      // The float exp_u20 clamps its argument, turning a NaN logit into a finite gradient. A row
      // whose logits do not sum to a finite value (a NaN, or an infinity) is redone with std::exp,
      // which keeps NaN NaN: one add per vector, cheaper than testing and blending every lane.
      if (!std::isfinite(at::vec::vec_reduce_all<scalar_t>(vec_add<scalar_t>, logit_sum))) d = 0;
      for (; d < D; ++d) o[d] = g * (xr[d] - scalar_t(1) / (scalar_t(1) + std::exp(-l[d])));
    }, logits, x);
  });
  return grad_logits;
}

constexpr double kLog2Pi = 1.83787706640934548356065947281123527;
constexpr double kSqrtHalf = 0.70710678118654752440084436210484904;

template <typename T>
Vectorized<T> vec_max(const Vectorized<T>& a, const Vectorized<T>& b) {
  return at::vec::maximum(a, b);  // propagates NaN, unlike std::max
}

// The x of log_mean_exp and of its backward.
void check_log_mean_exp_input(const char* op, const at::Tensor& x) {
  check_rank(op, "x", x, 2, "[R, N]");
  check_floating(op, "x", x, kCpu);
  TORCH_CHECK(x.is_contiguous(), op, ": x must be contiguous, got strides ", x.strides());
  TORCH_CHECK(x.size(1) >= 1, op, ": x must have at least one column, got shape ", x.sizes());
}

at::Tensor log_mean_exp(const at::Tensor& x) {
  check_log_mean_exp_input("vaekernels::log_mean_exp", x);
  const int64_t R = x.size(0), N = x.size(1);
  auto out = at::empty({R}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "log_mean_exp", [&] {
    using Vec = Vectorized<scalar_t>;
    const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    at::parallel_for(0, R, row_grain(N), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* row = x_ptr + r * N;
        const scalar_t max = at::vec::reduce_all<scalar_t>(vec_max<scalar_t>, row, N);
        // NaN, +inf and an all -inf row are their own answer; shifting by an infinite max gives NaN.
        if (!std::isfinite(max)) {
          out_ptr[r] = max;
          continue;
        }
        const Vec shift(max);
        const scalar_t sum = at::vec::map_reduce_all<scalar_t>(
            [&](const Vec& v) { return (v - shift).exp(); }, vec_add<scalar_t>, row, N);
        out_ptr[r] = max + std::log(sum / scalar_t(N));
      }
    });
  });
  return out;
}

at::Tensor log_mean_exp_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& out) {
  constexpr const char* op = "vaekernels::log_mean_exp_backward";
  check_log_mean_exp_input(op, x);
  const int64_t R = x.size(0), N = x.size(1);
  check_tensor(op, "out", out, {R}, x, kCpu);
  check_grad(op, "grad", grad, {R}, x);
  auto grad_c = grad.to(x.scalar_type()).contiguous();
  auto out_c = out.contiguous();
  auto grad_x = at::empty({R, N}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "log_mean_exp_backward", [&] {
    using Vec = Vectorized<scalar_t>;
    const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
    const scalar_t* grad_ptr = grad_c.const_data_ptr<scalar_t>();
    const scalar_t* out_ptr = out_c.const_data_ptr<scalar_t>();
    scalar_t* grad_x_ptr = grad_x.data_ptr<scalar_t>();
    at::parallel_for(0, R, row_grain(N), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        scalar_t* grad_row = grad_x_ptr + r * N;
        // A row of all -inf has out = -inf and no weight anywhere, where x - out would be NaN.
        if (out_ptr[r] == -std::numeric_limits<scalar_t>::infinity()) {
          std::fill_n(grad_row, N, scalar_t(0));
          continue;
        }
        // A row holding +inf (and no NaN, or out would be NaN) has out = +inf, and its softmax is,
        // in the limit, spread evenly over the +inf entries, where exp(x - out) is inf / inf = NaN
        // there and 0 elsewhere.
        if (out_ptr[r] == std::numeric_limits<scalar_t>::infinity()) {
          const scalar_t* row = x_ptr + r * N;
          const scalar_t inf = std::numeric_limits<scalar_t>::infinity();
          const scalar_t share = grad_ptr[r] / scalar_t(std::count(row, row + N, inf));
          for (int64_t n = 0; n < N; ++n) grad_row[n] = row[n] == inf ? share : scalar_t(0);
          continue;
        }
        // exp(x - out) normalised by its own sum, not by N: out is rounded (by a whole unit at
        // out = -1e7 in float), and exp(x - out) / N would then sum to anything between 1/e and e.
        // out still serves as the shift that keeps the exponentials in range: x - out is at most
        // log N plus out's rounding.
        const scalar_t* row = x_ptr + r * N;
        const Vec shift(out_ptr[r]);
        Vec sum(scalar_t(0));
        int64_t n = 0;
        for (; n + Vec::size() <= N; n += Vec::size()) {
          const Vec e = (Vec::loadu(row + n) - shift).exp();
          e.store(grad_row + n);
          sum += e;
        }
        if (n < N) {
          const Vec e = (Vec::loadu(row + n, N - n) - shift).exp();
          e.store(grad_row + n, N - n);
          sum += Vec::set(Vec(scalar_t(0)), e, N - n);
        }
        const Vec scale(grad_ptr[r] / at::vec::vec_reduce_all<scalar_t>(vec_add<scalar_t>, sum));
        at::vec::map([&](const Vec& e) { return scale * e; }, grad_row, grad_row, N);
      }
    });
  });
  return grad_x;
}

// log_var + ((x - mean) / std)^2 in double, exactly log_var at x = mean, where the fast loop's
// (x - mean) exp(-lv / 2) is 0 * inf = NaN once exp(-lv / 2) overflows (lv < -176 in float).
// 1 / std as exp(-lv / 4) twice keeps a tiny difference over a tiny std finite while the quotient
// is; a zero variance (lv = -inf) away from the mean is a zero density.
template <typename T>
double gaussian_term(T x, T mean, T log_var) {
  const double diff = double(x) - double(mean), lv = log_var;
  if (diff == 0) return lv;
  const double root = std::exp(-0.25 * lv), w = diff * root * root;
  return std::isinf(w) ? std::numeric_limits<double>::infinity() : lv + w * w;
}

at::Tensor gaussian_log_prob(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& log_var) {
  check_rows3("vaekernels::gaussian_log_prob", kCpu, {{"x", x}, {"mean", mean}, {"log_var", log_var}});
  return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gaussian_log_prob", [&] {
    // D log(2 pi) is added once per row, keeping a constant add out of the inner loop.
    const scalar_t row_constant = scalar_t(kLog2Pi) * scalar_t(x.size(2));
    // (x - mean) exp(-lv / 2), squared: (x - mean)^2 exp(-lv) would be 0 * inf = NaN at x = mean
    // once exp(-lv) overflows (lv < -88 in float); a row that still comes out non-finite is redone
    // by gaussian_term.
    at::Tensor out = reduce_rows<scalar_t>(
        [](const auto& x_d, const auto& mean_d, const auto& log_var_d) {
          const auto scaled_diff = (x_d - mean_d) * (log_var_d * Vectorized<scalar_t>(scalar_t(-0.5))).exp();
          return at::vec::fmadd(scaled_diff, scaled_diff, log_var_d);
        },
        [&](scalar_t sum) { return scalar_t(-0.5) * (row_constant + sum); }, x, mean, log_var);
    redo_non_finite_rows<scalar_t>(
        out, [](scalar_t x_d, scalar_t mean_d, scalar_t log_var_d) {
          return static_cast<scalar_t>(-0.5 * (kLog2Pi + gaussian_term(x_d, mean_d, log_var_d)));
        }, x, mean, log_var);
    return out;
  });
}

at::Tensor gaussian_kl(const at::Tensor& mean, const at::Tensor& log_var) {
  check_rows3("vaekernels::gaussian_kl", kCpu, {{"mean", mean}, {"log_var", log_var}});
  return AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "gaussian_kl",
                                     [&] { return gaussian_kl_rows<scalar_t>(mean, log_var); });
}

// Streaming log-sum-exp, one per vector lane: the running max and the sum of exp(value - max).
template <typename T>
struct LaneLogSumExp {
  using Vec = Vectorized<T>;
  // Lowest rather than -inf: a lane that has only seen -inf would otherwise compute
  // -inf - (-inf) = NaN on the next -inf.
  Vec max = Vec(std::numeric_limits<T>::lowest());
  Vec sum = Vec(T(0));

  void add(const Vec& value) {
    // One exp per value: exp(-|value - max|) rescales whichever of the sum and the new term is
    // below the new max.
    const Vec gap = value - max;
    const Vec decay = gap.abs().neg().exp();
    sum = Vec::blendv(sum + decay, at::vec::fmadd(sum, decay, Vec(T(1))), gap > Vec(T(0)));
    max = at::vec::maximum(max, value);
  }

  T reduce() const {
    const T overall_max = at::vec::vec_reduce_all<T>(vec_max<T>, max);
    if (std::isnan(overall_max) || overall_max == std::numeric_limits<T>::infinity()) return overall_max;
    const T total = at::vec::vec_reduce_all<T>(vec_add<T>, sum * (max - Vec(overall_max)).exp());
    return overall_max + std::log(total);
  }
};

// a * b, but 0 where a or b is 0 even if the other is inf: a zero difference or weight times a
// term that overflowed (1 / std for log_var < -176 in float, or w far from the mean of a tiny
// variance), and an infinite z against a padding column (1 / std stored as 0), which would be
// 0 * inf = NaN in the padding lanes and so in the whole row's log-sum-exp.
template <typename T>
Vectorized<T> times_unless_zero(const Vectorized<T>& a, const Vectorized<T>& b) {
  const Vectorized<T> zero(T(0));
  return (a != zero) & (b != zero) & (a * b);
}

// a * b and a * b + c, through times_unless_zero where kGuarded.
template <bool kGuarded, typename T>
Vectorized<T> times(const Vectorized<T>& a, const Vectorized<T>& b) {
  return kGuarded ? times_unless_zero(a, b) : a * b;
}

template <bool kGuarded, typename T>
Vectorized<T> times_plus(const Vectorized<T>& a, const Vectorized<T>& b, const Vectorized<T>& c) {
  return kGuarded ? times_unless_zero(a, b) + c : at::vec::fmadd(a, b, c);
}

// The posteriors (mean, log_var) [N, d] transposed to one row per latent dim k, so that a vector
// holds consecutive j: d is small (~10) while N is a batch, so vectorising over j fills every
// lane. Rows are padded to whole vectors with posteriors of zero density.
template <typename T>
class PosteriorColumns {
 public:
  using Vec = Vectorized<T>;

  // The pieces of log N(z_k; mean_jk, exp(log_var_jk)) for a vector of j, as the gradients reuse
  // them. They are built from w = (z - mean) / sqrt(2 var), never from 1 / var: that overflows
  // for a tiny variance (log_var < -88 in float) and makes 0 * inf = NaN at z = mean, and so
  // would (z - mean) / var times a zero weight where z is far from the mean.
  struct Terms {
    Vec inverse_scale;  // 1 / sqrt(2 var)
    Vec scaled_diff;    // w
    Vec log_density;    // -log(2 pi var) / 2 - w^2 + nearest^2 (csrc/ops.cpp)
  };

  PosteriorColumns(const at::Tensor& mean, const at::Tensor& log_var)
      : dims_(mean.size(1)),
        width_((mean.size(0) + Vec::size() - 1) / Vec::size() * Vec::size()),
        table_((3 * dims_ + 1) * width_) {
    const int64_t N = mean.size(0);
    const T* mean_ptr = mean.const_data_ptr<T>();
    const T* log_var_ptr = log_var.const_data_ptr<T>();
    mean_bound_ = max_abs(mean);
    inverse_scale_bound_ = log_var.numel() ? std::exp(-0.5 * log_var.min().item<double>()) * kSqrtHalf : 0.0;
    const T neg_inf = -std::numeric_limits<T>::infinity();
    at::parallel_for(0, width_, row_grain(3 * std::max<int64_t>(dims_, 1)), [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        const bool padding = j >= N;
        for (int64_t k = 0; k < dims_; ++k) {
          const T lv = padding ? T(0) : log_var_ptr[j * dims_ + k];
          table_[k * width_ + j] = padding ? T(0) : mean_ptr[j * dims_ + k];
          table_[(dims_ + k) * width_ + j] = padding ? T(0) : static_cast<T>(std::exp(-0.5 * lv) * kSqrtHalf);
          table_[(2 * dims_ + k) * width_ + j] = padding ? neg_inf : T(-0.5) * (T(kLog2Pi) + lv);
        }
        table_[3 * dims_ * width_ + j] = padding ? neg_inf : T(0);
      }
    });
  }

  int64_t width() const { return width_; }

  // Whether some w = (z - mean) / sqrt(2 var), its square or 1 / sqrt(2 var) may overflow (or a
  // NaN is about): then the kernels take the guarded products of times_unless_zero, so that z =
  // mean gives w = 0 rather than 0 * inf, and a zero weight times an infinite w or 1 / sqrt(2 var)
  // gives 0. Finite bounds leave the plain products, which cost less.
  bool needs_guards(const at::Tensor& z) const {
    return !((max_abs(z) + mean_bound_) * inverse_scale_bound_ < std::sqrt(double(std::numeric_limits<T>::max())));
  }

  // nearest[k] = min_j |w_jk| for the sample z_i, over the posteriors (not the padding), or 0 where
  // every |w| is inf: the shift of the terms (csrc/ops.cpp). A NaN about stays NaN.
  template <bool kGuarded>
  void nearest(const T* z_i, T* out) const {
    const Vec inf(std::numeric_limits<T>::infinity());
    std::array<T, Vec::size()> lanes;
    for (int64_t k = 0; k < dims_; ++k) {
      const Vec z_k(z_i[k]);
      Vec best = inf;
      for (int64_t j = 0; j < width_; j += Vec::size()) {
        const Vec distance = times<kGuarded>(z_k - Vec::loadu(row(k) + j), Vec::loadu(row(dims_ + k) + j)).abs();
        best = at::vec::minimum(best, Vec::blendv(distance, inf, joint_start(j) == inf.neg()));
      }
      best.store(lanes.data());
      T least = lanes[0];
      for (const T lane : lanes)
        if (std::isnan(lane) || lane < least) least = lane;
      out[k] = least == std::numeric_limits<T>::infinity() ? T(0) : least;
    }
  }

  template <bool kGuarded>
  Terms terms(int64_t k, int64_t j, const Vec& z_k, const Vec& nearest_k) const {
    const Vec inverse_scale = Vec::loadu(row(dims_ + k) + j), diff = z_k - Vec::loadu(row(k) + j);
    const Vec w = times<kGuarded>(diff, inverse_scale);
    const Vec start = Vec::loadu(row(2 * dims_ + k) + j);
    // w^2 - nearest^2 as a product, exactly 0 for the nearest posterior even where w^2 overflows.
    const Vec distance = w.abs();
    const Vec excess = times<kGuarded>(distance - nearest_k, distance + nearest_k);
    Vec log_density = start - excess;
    if constexpr (kGuarded) {
      // A variance of 0 (start = +inf) away from the mean (excess = inf): a density of 0, as w^2
      // outgrows the log-variance, not inf - inf = NaN. Padding (start = -inf) stays -inf where
      // nearest^2 overflows and excess is -inf.
      const Vec inf(std::numeric_limits<T>::infinity());
      log_density = Vec::blendv(log_density, inf.neg(), ((start == inf) & (excess == inf)) | (start == inf.neg()));
    }
    return {inverse_scale, w, log_density};
  }

  // Where sum_k log N(z_k; ...) starts: 0 for a posterior, -inf for padding (so padding stays out
  // of the joint log-sum-exp even when d == 0).
  Vec joint_start(int64_t j) const { return Vec::loadu(row(3 * dims_) + j); }

  // Writes L[i, j] = sum_k (log N(z_ik; mean_jk, var_jk) + nearest_ik^2) for j in [j0, j0 + count)
  // to joint; visit(k, terms) sees every per-dim term on the way.
  template <bool kGuarded, typename Visit>
  void joint_log_density(const T* z_i, const T* nearest_i, int64_t j0, int64_t count, T* joint, Visit visit) const {
    for (int64_t j = 0; j < count; j += Vec::size()) joint_start(j0 + j).store(joint + j);
    for (int64_t k = 0; k < dims_; ++k) {
      const Vec z_k(z_i[k]), nearest_k(nearest_i[k]);
      for (int64_t j = 0; j < count; j += Vec::size()) {
        const Terms t = terms<kGuarded>(k, j0 + j, z_k, nearest_k);
        (Vec::loadu(joint + j) + t.log_density).store(joint + j);
        visit(k, t);
      }
    }
  }

 private:
  const T* row(int64_t r) const { return table_.data() + r * width_; }

  static double max_abs(const at::Tensor& t) { return t.numel() ? t.abs().max().item<double>() : 0.0; }

  int64_t dims_, width_;
  double mean_bound_ = 0, inverse_scale_bound_ = 0;
  std::vector<T> table_;  // rows of width_: mean [d], 1/sqrt(2 var) [d], -log(2 pi var)/2 [d], joint_start [1]
};

// Columns of j handled together, so that the per-j joint log-densities stay in L1.
constexpr int64_t kJointTile = 256;

// Calls body(std::true_type) or body(std::false_type), so that the inner loops in body test the
// flag at compile time instead of once per element.
template <typename Body>
void with_flag(bool flag, const Body& body) {
  if (flag) {
    body(std::true_type{});
  } else {
    body(std::false_type{});
  }
}

// with_flag for two flags: body(flag_a, flag_b) with both known at compile time.
template <typename Body>
void with_flags(bool a, bool b, const Body& body) {
  with_flag(a, [&](auto flag_a) { with_flag(b, [&](auto flag_b) { body(flag_a, flag_b); }); });
}

// The weight c[i, j, k] = grad_joint[i] a[i, j] + grad_marginal[i, k] b[i, j, k] of the (i, j, k)
// term in every gradient, for one (i, k), given the joint part. Without the marginal (a forward
// run for the joint only) there is no b, and no exp per term.
template <typename T, bool kWithMarginal>
class PairWeight {
 public:
  using Vec = Vectorized<T>;

  PairWeight(const T* grad_marginal, const T* marginal, int64_t ik) {
    if constexpr (kWithMarginal) {
      // A marginal of -inf (every pair's density 0) passes no gradient, as for the joint.
      const bool empty = marginal[ik] == -std::numeric_limits<T>::infinity();
      grad_marginal_ = Vec(empty ? T(0) : grad_marginal[ik]);
      log_marginal_ = Vec(empty ? T(0) : marginal[ik]);
    }
  }

  Vec operator()(const Vec& joint_weight, const Vec& log_density) const {
    if constexpr (kWithMarginal) {
      return at::vec::fmadd(grad_marginal_, (log_density - log_marginal_).exp(), joint_weight);
    } else {
      return joint_weight;
    }
  }

 private:
  Vec grad_marginal_, log_marginal_;
};

void check_aggregate_inputs(const char* op, const at::Tensor& z, const at::Tensor& mean, const at::Tensor& log_var) {
  check_rank(op, "z", z, 2, "[B, d]");
  check_floating(op, "z", z, kCpu);
  check_rank(op, "mean", mean, 2, "[N, d]");
  check_tensor(op, "mean", mean, {mean.size(0), z.size(1)}, z, kCpu);
  check_tensor(op, "log_var", log_var, mean.sizes(), z, kCpu);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> aggregate_posterior(const at::Tensor& z, const at::Tensor& mean,
                                                                   const at::Tensor& log_var, bool with_marginal) {
  constexpr const char* op = "vaekernels::aggregate_posterior";
  check_aggregate_inputs(op, z, mean, log_var);
  const int64_t B = z.size(0), d = z.size(1);
  auto z_c = z.contiguous();
  auto joint = at::empty({B}, z.options());
  auto marginal = at::empty({B, with_marginal ? d : 0}, z.options());
  auto nearest = at::empty({B, d}, z.options());
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "aggregate_posterior", [&] {
    using LSE = LaneLogSumExp<scalar_t>;
    const PosteriorColumns<scalar_t> columns(mean.contiguous(), log_var.contiguous());
    const int64_t width = columns.width();
    const scalar_t* z_ptr = z_c.const_data_ptr<scalar_t>();
    scalar_t* joint_ptr = joint.data_ptr<scalar_t>();
    scalar_t* marginal_ptr = marginal.data_ptr<scalar_t>();
    scalar_t* nearest_ptr = nearest.data_ptr<scalar_t>();
    with_flags(with_marginal, columns.needs_guards(z_c), [&](auto marginal_flag, auto guard_flag) {
      constexpr bool kWithMarginal = decltype(marginal_flag)::value, kGuarded = decltype(guard_flag)::value;
      at::parallel_for(0, B, row_grain(width * std::max<int64_t>(d, 1)), [&](int64_t begin, int64_t end) {
        std::vector<scalar_t> joint_tile(kJointTile);
        std::vector<LSE> marginal_lse(kWithMarginal ? d : 0);
        for (int64_t i = begin; i < end; ++i) {
          const scalar_t* z_i = z_ptr + i * d;
          scalar_t* nearest_i = nearest_ptr + i * d;
          columns.template nearest<kGuarded>(z_i, nearest_i);
          std::fill(marginal_lse.begin(), marginal_lse.end(), LSE());
          LSE joint_lse;
          for (int64_t j0 = 0; j0 < width; j0 += kJointTile) {
            const int64_t count = std::min(kJointTile, width - j0);
            columns.template joint_log_density<kGuarded>(z_i, nearest_i, j0, count, joint_tile.data(),
                                                         [&](int64_t k, const auto& t) {
              if constexpr (kWithMarginal) marginal_lse[k].add(t.log_density);
            });
            for (int64_t j = 0; j < count; j += LSE::Vec::size())
              joint_lse.add(LSE::Vec::loadu(joint_tile.data() + j));
          }
          joint_ptr[i] = joint_lse.reduce();
          if constexpr (kWithMarginal)
            for (int64_t k = 0; k < d; ++k) marginal_ptr[i * d + k] = marginal_lse[k].reduce();
        }
      });
    });
  });
  return {joint, marginal, nearest};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> aggregate_posterior_backward(
    const at::Tensor& grad_joint, const at::Tensor& grad_marginal, const at::Tensor& z, const at::Tensor& mean,
    const at::Tensor& log_var, const at::Tensor& joint, const at::Tensor& marginal, const at::Tensor& nearest) {
  constexpr const char* op = "vaekernels::aggregate_posterior_backward";
  check_aggregate_inputs(op, z, mean, log_var);
  const int64_t B = z.size(0), d = z.size(1), N = mean.size(0);
  // A forward run for the joint only saved a [B, 0] marginal, whose gradient is [B, 0] too.
  const bool with_marginal = !(marginal.dim() == 2 && marginal.size(1) == 0);
  const int64_t marginal_dims = with_marginal ? d : 0;
  check_tensor(op, "joint", joint, {B}, z, kCpu);
  check_tensor(op, "marginal", marginal, {B, marginal_dims}, z, kCpu);
  check_tensor(op, "nearest", nearest, {B, d}, z, kCpu);
  check_grad(op, "grad_joint", grad_joint, {B}, z);
  check_grad(op, "grad_marginal", grad_marginal, {B, marginal_dims}, z);
  auto z_c = z.contiguous(), joint_c = joint.contiguous(), marginal_c = marginal.contiguous();
  auto nearest_c = nearest.contiguous();
  auto grad_joint_c = grad_joint.to(z.scalar_type()).contiguous();
  auto grad_marginal_c = grad_marginal.to(z.scalar_type()).contiguous();
  auto grad_z = at::empty({B, d}, z.options());
  auto grad_mean = at::empty({N, d}, z.options());
  auto grad_log_var = at::empty({N, d}, z.options());
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "aggregate_posterior_backward", [&] {
    using Vec = Vectorized<scalar_t>;
    using Terms = typename PosteriorColumns<scalar_t>::Terms;
    const PosteriorColumns<scalar_t> columns(mean.contiguous(), log_var.contiguous());
    const int64_t width = columns.width();
    const scalar_t* z_ptr = z_c.const_data_ptr<scalar_t>();
    const scalar_t* joint_ptr = joint_c.const_data_ptr<scalar_t>();
    const scalar_t* marginal_ptr = marginal_c.const_data_ptr<scalar_t>();
    const scalar_t* nearest_ptr = nearest_c.const_data_ptr<scalar_t>();
    const scalar_t* grad_joint_ptr = grad_joint_c.const_data_ptr<scalar_t>();
    const scalar_t* grad_marginal_ptr = grad_marginal_c.const_data_ptr<scalar_t>();

    // Turns the tile's L[i, j] into grad_joint[i] * exp(L[i, j] - joint[i]) in place. A row whose
    // joint is -inf (every pair's density 0: z_i infinite, say) passes no gradient, as the
    // reference's log-mean-exp of an all -inf slice: its weights are 0, not exp(-inf + inf) = NaN.
    auto to_joint_weight = [&](int64_t i, int64_t count, scalar_t* tile) {
      const bool empty = joint_ptr[i] == -std::numeric_limits<scalar_t>::infinity();
      const Vec grad(empty ? scalar_t(0) : grad_joint_ptr[i]), shift(empty ? scalar_t(0) : joint_ptr[i]);
      for (int64_t j = 0; j < count; j += Vec::size())
        (empty ? Vec(scalar_t(0)) : grad * (Vec::loadu(tile + j) - shift).exp()).store(tile + j);
    };

    with_flags(with_marginal, columns.needs_guards(z_c), [&](auto marginal_flag, auto guard_flag) {
      using Weight = PairWeight<scalar_t, decltype(marginal_flag)::value>;
      constexpr bool kGuarded = decltype(guard_flag)::value;
      scalar_t* grad_z_ptr = grad_z.data_ptr<scalar_t>();
      // grad_z[i, k] = sum_j c (z - mean) / (-var), parallel over i so each row sums on its own.
      at::parallel_for(0, B, row_grain(2 * width * std::max<int64_t>(d, 1)), [&](int64_t begin, int64_t end) {
        std::vector<scalar_t> tile(kJointTile);
        std::vector<Vec> grad_z_lanes(d);
        for (int64_t i = begin; i < end; ++i) {
          const scalar_t* z_i = z_ptr + i * d;
          const scalar_t* nearest_i = nearest_ptr + i * d;
          std::fill(grad_z_lanes.begin(), grad_z_lanes.end(), Vec(scalar_t(0)));
          for (int64_t j0 = 0; j0 < width; j0 += kJointTile) {
            const int64_t count = std::min(kJointTile, width - j0);
            columns.template joint_log_density<kGuarded>(z_i, nearest_i, j0, count, tile.data(),
                                                         [](int64_t, const Terms&) {});
            to_joint_weight(i, count, tile.data());
            for (int64_t k = 0; k < d; ++k) {
              const Vec z_k(z_i[k]), nearest_k(nearest_i[k]);
              const Weight weight(grad_marginal_ptr, marginal_ptr, i * d + k);
              Vec acc = grad_z_lanes[k];
              for (int64_t j = 0; j < count; j += Vec::size()) {
                const Terms t = columns.template terms<kGuarded>(k, j0 + j, z_k, nearest_k);
                const Vec c = weight(Vec::loadu(tile.data() + j), t.log_density);
                acc = times_plus<kGuarded>(times<kGuarded>(c, t.scaled_diff), t.inverse_scale, acc);
              }
              grad_z_lanes[k] = acc;
            }
          }
          // -r = (mean - z) / var = -2 w / sqrt(2 var), summed as (c w) / sqrt(2 var) so that a zero
          // weight gives 0 even where w / sqrt(2 var) would overflow.
          for (int64_t k = 0; k < d; ++k)
            grad_z_ptr[i * d + k] =
                scalar_t(-2) * at::vec::vec_reduce_all<scalar_t>(vec_add<scalar_t>, grad_z_lanes[k]);
        }
      });

      // grad_mean and grad_log_var sum over i: parallel over tiles of j, each summing its own
      // columns over every i, with a second recomputation of the densities instead of a reduction
      // across threads. Tiles are a few vectors wide so every thread gets several.
      const int64_t vectors = width / Vec::size();
      const int64_t tile_vectors = std::clamp<int64_t>(vectors / (4 * at::get_num_threads()), 1, 8);
      const int64_t tile_width = tile_vectors * Vec::size();
      const int64_t tiles = (width + tile_width - 1) / tile_width;
      scalar_t* grad_mean_ptr = grad_mean.data_ptr<scalar_t>();
      scalar_t* grad_log_var_ptr = grad_log_var.data_ptr<scalar_t>();
      const int64_t grain = row_grain(2 * B * std::max<int64_t>(d, 1) * tile_width);
      at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
        std::vector<scalar_t> tile(tile_width), mean_acc(d * tile_width), log_var_acc(d * tile_width);
        for (int64_t t_index = begin; t_index < end; ++t_index) {
          const int64_t j0 = t_index * tile_width, count = std::min(tile_width, width - j0);
          std::fill(mean_acc.begin(), mean_acc.end(), scalar_t(0));
          std::fill(log_var_acc.begin(), log_var_acc.end(), scalar_t(0));
          for (int64_t i = 0; i < B; ++i) {
            const scalar_t* z_i = z_ptr + i * d;
            const scalar_t* nearest_i = nearest_ptr + i * d;
            columns.template joint_log_density<kGuarded>(z_i, nearest_i, j0, count, tile.data(),
                                                         [](int64_t, const Terms&) {});
            to_joint_weight(i, count, tile.data());
            for (int64_t k = 0; k < d; ++k) {
              const Vec z_k(z_i[k]), nearest_k(nearest_i[k]);
              const Weight weight(grad_marginal_ptr, marginal_ptr, i * d + k);
              const Vec half(scalar_t(0.5));
              scalar_t* mean_k = mean_acc.data() + k * tile_width;
              scalar_t* log_var_k = log_var_acc.data() + k * tile_width;
              for (int64_t j = 0; j < count; j += Vec::size()) {
                const Terms t = columns.template terms<kGuarded>(k, j0 + j, z_k, nearest_k);
                const Vec c = weight(Vec::loadu(tile.data() + j), t.log_density);
                const Vec c_w = times<kGuarded>(c, t.scaled_diff);
                times_plus<kGuarded>(c_w, t.inverse_scale, Vec::loadu(mean_k + j)).store(mean_k + j);
                times_plus<kGuarded>(c_w, t.scaled_diff, at::vec::fnmadd(c, half, Vec::loadu(log_var_k + j)))
                    .store(log_var_k + j);
              }
            }
          }
          // r = (z - mean) / var = 2 w / sqrt(2 var); 0.5 (r (z - mean) - 1) = w^2 - 0.5, summed as
          // (c w) w - c / 2 for the reason of grad_z's (c w) / sqrt(2 var).
          for (int64_t j = j0; j < std::min(j0 + count, N); ++j)
            for (int64_t k = 0; k < d; ++k) {
              grad_mean_ptr[j * d + k] = scalar_t(2) * mean_acc[k * tile_width + j - j0];
              grad_log_var_ptr[j * d + k] = log_var_acc[k * tile_width + j - j0];
            }
        }
      });
    });
  });
  return {grad_z, grad_mean, grad_log_var};
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace vaekernels::cpu

TORCH_LIBRARY_IMPL(vaekernels, CPU, m) {
  m.impl("bernoulli_log_prob", &vaekernels::cpu::bernoulli_log_prob);
  m.impl("bernoulli_log_prob_backward", &vaekernels::cpu::bernoulli_log_prob_backward);
  m.impl("log_mean_exp", &vaekernels::cpu::log_mean_exp);
  m.impl("log_mean_exp_backward", &vaekernels::cpu::log_mean_exp_backward);
  m.impl("gaussian_log_prob", &vaekernels::cpu::gaussian_log_prob);
  m.impl("gaussian_kl", &vaekernels::cpu::gaussian_kl);
  m.impl("aggregate_posterior", &vaekernels::cpu::aggregate_posterior);
  m.impl("aggregate_posterior_backward", &vaekernels::cpu::aggregate_posterior_backward);
}
