// CPU kernels of strictly causal attention (PixelSNAIL): row i of the output is the softmax over
// keys j < i of scale * q_i . k_j applied to v. The forward streams over blocks of keys with a
// running max and sum (online softmax), so no [L, L] score matrix exists; it keeps the row's
// log-sum-exp [N, L] for the backward, which recomputes the scores: once per query row for
// d(q), once per key row for d(k) and d(v), so every output row is written by one task.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include <torch/library.h>

#include "rows.h"

namespace vaekernels::cpu {
inline namespace CPU_CAPABILITY {
namespace {

// Keys scored per block: the running max and the accumulator are rescaled once a block.
constexpr int64_t kKeyBlock = 64;

template <typename T>
T dot(const T* a, const T* b, int64_t n) {
  using Vec = Vectorized<T>;
  Vec acc(T(0));
  int64_t d = 0;
  for (; d + Vec::size() <= n; d += Vec::size()) acc = at::vec::fmadd(Vec::loadu(a + d), Vec::loadu(b + d), acc);
  if (d < n) acc = at::vec::fmadd(Vec::loadu(a + d, n - d), Vec::loadu(b + d, n - d), acc);
  return at::vec::vec_reduce_all<T>(vec_add<T>, acc);
}

// y += alpha * x over n elements.
template <typename T>
void axpy(T alpha, const T* x, T* y, int64_t n) {
  using Vec = Vectorized<T>;
  const Vec a(alpha);
  int64_t d = 0;
  for (; d + Vec::size() <= n; d += Vec::size()) at::vec::fmadd(a, Vec::loadu(x + d), Vec::loadu(y + d)).store(y + d);
  for (; d < n; ++d) y[d] += alpha * x[d];
}

// y *= alpha over n elements.
template <typename T>
void scale_in_place(T alpha, T* y, int64_t n) {
  using Vec = Vectorized<T>;
  int64_t d = 0;
  for (; d + Vec::size() <= n; d += Vec::size()) (Vec(alpha) * Vec::loadu(y + d)).store(y + d);
  for (; d < n; ++d) y[d] *= alpha;
}

struct Shape {
  int64_t N, L, D, Dv;
};

Shape check_inputs(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_floating(op, "q", q, kCpu);
  check_rank(op, "q", q, 3, "[N, L, D]");
  check_rank(op, "v", v, 3, "[N, L, Dv]");
  const Shape s{q.size(0), q.size(1), q.size(2), v.size(2)};
  check_tensor(op, "k", k, {s.N, s.L, s.D}, q, kCpu);
  check_tensor(op, "v", v, {s.N, s.L, s.Dv}, q, kCpu);
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous(), op, ": q, k and v must be contiguous");
  return s;
}

// Rows (n, i) per parallel task: about 64k multiply-adds.
int64_t grain(const Shape& s) { return std::max<int64_t>(1, 65536 / std::max<int64_t>(1, s.L * (s.D + s.Dv))); }

std::tuple<at::Tensor, at::Tensor> causal_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                    double scale) {
  const Shape s = check_inputs("vaekernels::causal_attention", q, k, v);
  at::Tensor out = at::empty({s.N, s.L, s.Dv}, q.options());
  at::Tensor lse = at::empty({s.N, s.L}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "causal_attention", [&] {
    using T = scalar_t;
    const T *q_ptr = q.const_data_ptr<T>(), *k_ptr = k.const_data_ptr<T>(), *v_ptr = v.const_data_ptr<T>();
    T *out_ptr = out.data_ptr<T>(), *lse_ptr = lse.data_ptr<T>();
    const T sc = static_cast<T>(scale);
    at::parallel_for(0, s.N * s.L, grain(s), [&](int64_t begin, int64_t end) {
      T scores[kKeyBlock];
      for (int64_t row = begin; row < end; ++row) {
        const int64_t n = row / s.L, i = row % s.L;
        const T* qi = q_ptr + row * s.D;
        const T* kn = k_ptr + n * s.L * s.D;
        const T* vn = v_ptr + n * s.L * s.Dv;
        T* acc = out_ptr + row * s.Dv;
        std::fill(acc, acc + s.Dv, T(0));
        T top = -std::numeric_limits<T>::infinity(), total = T(0);
        for (int64_t start = 0; start < i; start += kKeyBlock) {
          const int64_t stop = std::min(i, start + kKeyBlock);
          T block_top = -std::numeric_limits<T>::infinity();
          for (int64_t j = start; j < stop; ++j) {
            scores[j - start] = sc * dot(qi, kn + j * s.D, s.D);
            block_top = std::max(block_top, scores[j - start]);
          }
          const T new_top = std::max(top, block_top);
          if (new_top > top && total > T(0)) {
            const T shrink = std::exp(top - new_top);
            total *= shrink;
            scale_in_place(shrink, acc, s.Dv);
          }
          top = new_top;
          for (int64_t j = start; j < stop; ++j) {
            const T p = std::exp(scores[j - start] - top);
            total += p;
            axpy(p, vn + j * s.Dv, acc, s.Dv);
          }
        }
        // Row 0 has no keys: total 0, output 0 and log-sum-exp -inf.
        if (total > T(0)) scale_in_place(T(1) / total, acc, s.Dv);
        lse_ptr[row] = total > T(0) ? top + std::log(total) : -std::numeric_limits<T>::infinity();
      }
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, double scale) {
  constexpr const char* op = "vaekernels::causal_attention_backward";
  const Shape s = check_inputs(op, q, k, v);
  check_grad(op, "grad_out", grad_out, {s.N, s.L, s.Dv}, q);
  check_tensor(op, "out", out, {s.N, s.L, s.Dv}, q, kCpu);
  check_tensor(op, "lse", lse, {s.N, s.L}, q, kCpu);
  const at::Tensor g = grad_out.to(q.scalar_type()).contiguous(), o = out.contiguous(), l = lse.contiguous();
  at::Tensor grad_q = at::empty_like(q), grad_k = at::empty_like(k), grad_v = at::empty_like(v);
  at::Tensor delta = at::empty({s.N, s.L}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "causal_attention_backward", [&] {
    using T = scalar_t;
    const T *q_ptr = q.const_data_ptr<T>(), *k_ptr = k.const_data_ptr<T>(), *v_ptr = v.const_data_ptr<T>();
    const T *g_ptr = g.const_data_ptr<T>(), *o_ptr = o.const_data_ptr<T>(), *lse_ptr = l.const_data_ptr<T>();
    T *gq_ptr = grad_q.data_ptr<T>(), *gk_ptr = grad_k.data_ptr<T>(), *gv_ptr = grad_v.data_ptr<T>();
    T* delta_ptr = delta.data_ptr<T>();
    const T sc = static_cast<T>(scale);
    // delta_i = dO_i . O_i, the softmax backward's row term.
    at::parallel_for(0, s.N * s.L, std::max<int64_t>(1, 65536 / std::max<int64_t>(1, s.Dv)), [&](int64_t b, int64_t e) {
      for (int64_t row = b; row < e; ++row) delta_ptr[row] = dot(g_ptr + row * s.Dv, o_ptr + row * s.Dv, s.Dv);
    });
    // dS_ij = P_ij (dO_i . v_j - delta_i), P_ij = exp(scale q_i . k_j - lse_i), for j < i.
    // d(q_i) = scale sum_{j<i} dS_ij k_j.
    at::parallel_for(0, s.N * s.L, grain(s), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t n = row / s.L, i = row % s.L;
        T* gq = gq_ptr + row * s.D;
        std::fill(gq, gq + s.D, T(0));
        const T *qi = q_ptr + row * s.D, *gi = g_ptr + row * s.Dv;
        for (int64_t j = 0; j < i; ++j) {
          const int64_t key = n * s.L + j;
          const T p = std::exp(sc * dot(qi, k_ptr + key * s.D, s.D) - lse_ptr[row]);
          const T ds = p * (dot(gi, v_ptr + key * s.Dv, s.Dv) - delta_ptr[row]);
          axpy(sc * ds, k_ptr + key * s.D, gq, s.D);
        }
      }
    });
    // d(k_j) = scale sum_{i>j} dS_ij q_i and d(v_j) = sum_{i>j} P_ij dO_i.
    at::parallel_for(0, s.N * s.L, grain(s), [&](int64_t begin, int64_t end) {
      for (int64_t key = begin; key < end; ++key) {
        const int64_t n = key / s.L, j = key % s.L;
        T *gk = gk_ptr + key * s.D, *gv = gv_ptr + key * s.Dv;
        std::fill(gk, gk + s.D, T(0));
        std::fill(gv, gv + s.Dv, T(0));
        const T *kj = k_ptr + key * s.D, *vj = v_ptr + key * s.Dv;
        for (int64_t i = j + 1; i < s.L; ++i) {
          const int64_t row = n * s.L + i;
          const T p = std::exp(sc * dot(q_ptr + row * s.D, kj, s.D) - lse_ptr[row]);
          const T* gi = g_ptr + row * s.Dv;
          axpy(p, gi, gv, s.Dv);
          axpy(sc * p * (dot(gi, vj, s.Dv) - delta_ptr[row]), q_ptr + row * s.D, gk, s.D);
        }
      }
    });
  });
  return {grad_q, grad_k, grad_v};
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace vaekernels::cpu

TORCH_LIBRARY_IMPL(vaekernels, CPU, m) {
  m.impl("causal_attention", &vaekernels::cpu::causal_attention);
  m.impl("causal_attention_backward", &vaekernels::cpu::causal_attention_backward);
}
