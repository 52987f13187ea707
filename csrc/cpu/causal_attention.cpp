// CPU kernels of strictly causal attention (PixelSNAIL): row i of the output is the softmax over
// keys j < i of scale * q_i . k_j applied to v. As in FlashAttention, the work goes in tiles of
// kBlock queries x kBlock keys, those above the diagonal skipped. The forward keeps a running max
// and sum per query over its key tiles (online softmax), so no [L, L] score matrix exists, and
// saves the row's log-sum-exp [N, L]; the backward recomputes each tile's scores once for d(q),
// d(k) and d(v) together. Inside a tile every product broadcasts one element against whole
// vectors of a row (keys and values are transposed once per call for the products over their
// features), so there are no horizontal sums in the inner loops.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include <torch/library.h>

#include "rows.h"

namespace vaekernels::cpu {
inline namespace CPU_CAPABILITY {
namespace {

// Queries and keys per tile. A multiple of every vector width, so that a row of a tile is whole
// vectors; 64 x 64 tiles of scores, probabilities and their gradients stay in L1 and L2.
constexpr int64_t kBlock = 64;

// Rows of a block held in registers, kVecs vectors each: 16 accumulators where there are 32
// vector registers (AVX-512), 8 where there are 16.
template <typename T, int64_t kVecs>
constexpr int64_t kBlockRows = std::max<int64_t>(1, (sizeof(Vectorized<T>) >= 64 ? 16 : 8) / kVecs);

// tile[r, c] = scale sum_d a[r, d] bt[d, c] for r < rows and c < kBlock: a's rows (leading dim
// lda) against kBlock columns of a transposed block bt (leading dim ldb). Each a[r, d] is broadcast
// against whole vectors of columns, so no horizontal sums; several rows at a time where the
// registers hold their accumulators (four with AVX-512 float), so that each loaded vector of bt
// feeds several multiply-adds. (Double on AVX2 spills some of its 16 accumulators: its kernels
// serve gradcheck, not speed.)
template <typename T>
void tile_products(const T* a, int64_t lda, int64_t rows, const T* bt, int64_t ldb, int64_t depth, T scale,
                   T* tile) {
  using Vec = Vectorized<T>;
  constexpr int64_t kVecs = kBlock / Vec::size();
  constexpr int64_t kRows = kBlockRows<T, kVecs>;
  for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
    const int64_t count = std::min(kRows, rows - r0);
    Vec acc[kRows][kVecs];
    for (auto& row : acc)
      for (auto& x : row) x = Vec(T(0));
    for (int64_t d = 0; d < depth; ++d) {
      Vec x[kRows];
      // A row past `rows` reads row 0 again rather than past the end; it is never stored.
      for (int64_t t = 0; t < kRows; ++t) x[t] = Vec(scale * a[(t < count ? r0 + t : 0) * lda + d]);
      for (int64_t c = 0; c < kVecs; ++c) {
        const Vec column = Vec::loadu(bt + d * ldb + c * Vec::size());
        for (int64_t t = 0; t < kRows; ++t) acc[t][c] = at::vec::fmadd(x[t], column, acc[t][c]);
      }
    }
    // Loops of constant trip count (the guard inside), so that acc stays in registers.
    for (int64_t t = 0; t < kRows; ++t)
      if (t < count)
        for (int64_t c = 0; c < kVecs; ++c) acc[t][c].store(tile + (r0 + t) * kBlock + c * Vec::size());
  }
}

// One block of accumulate_rows: out[t, w + v-th vector] += sum_b coef[t * sa + b * sb]
// src[b, w + v-th vector] for t < kBlockRows (stored for t < count), w the block's first column,
// lanes[v] of each vector valid. kFull: every vector whole, so the loop over b has no branch and
// the accumulators stay in registers (with a branch in it, gcc also stores them to the stack every
// iteration, which halved the speed).
template <typename T, int64_t kVecs, bool kFull>
void accumulate_block(const T* coef, int64_t sa, int64_t sb, int64_t count, int64_t nb, const T* src, int64_t ld,
                      const int64_t (&lanes)[kVecs], T* out, int64_t ldo) {
  using Vec = Vectorized<T>;
  constexpr int64_t kRows = kBlockRows<T, kVecs>;
  Vec acc[kRows][kVecs];
  for (auto& row : acc)
    for (auto& x : row) x = Vec(T(0));
  for (int64_t b = 0; b < nb; ++b) {
    Vec x[kVecs];
    for (int64_t v = 0; v < kVecs; ++v)
      x[v] = kFull ? Vec::loadu(src + b * ld + v * Vec::size()) : Vec::loadu(src + b * ld + v * Vec::size(), lanes[v]);
    for (int64_t t = 0; t < kRows; ++t) {
      const Vec c(coef[t * sa + b * sb]);
      for (int64_t v = 0; v < kVecs; ++v) acc[t][v] = at::vec::fmadd(c, x[v], acc[t][v]);
    }
  }
  for (int64_t t = 0; t < kRows; ++t)
    for (int64_t v = 0; v < kVecs; ++v)
      if (t < count && lanes[v] > 0) {
        T* o = out + t * ldo + v * Vec::size();
        (Vec::loadu(o, lanes[v]) + acc[t][v]).store(o, lanes[v]);
      }
}

// accumulate_rows over the kVecs vectors of columns from w on, for every row of out.
template <typename T, int64_t kVecs, bool kFull>
void accumulate_columns(const T* coef, int64_t sa, int64_t sb, int64_t na, int64_t nb, const T* src, int64_t ld,
                        int64_t width, int64_t w, T* out, int64_t ldo) {
  constexpr int64_t kRows = kBlockRows<T, kVecs>, kSize = Vectorized<T>::size();
  static_assert(kBlock % kRows == 0);
  int64_t lanes[kVecs];
  for (int64_t v = 0; v < kVecs; ++v) lanes[v] = std::clamp<int64_t>(width - w - v * kSize, 0, kSize);
  for (int64_t a0 = 0; a0 < na; a0 += kRows)
    accumulate_block<T, kVecs, kFull>(coef + a0 * sa, sa, sb, std::min(kRows, na - a0), nb, src + w, ld, lanes,
                                      out + a0 * ldo + w, ldo);
}

// out[a, :width] += sum_{b < nb} coef[a * sa + b * sb] src[b, :width] for a < na: a tile (or its
// transpose, sa = 1) times rows of src (leading dim ld) into rows of out (leading dim ldo). Blocks
// of rows by one or two vectors of columns are held in registers, so that each broadcast
// coefficient feeds every vector of its row and each loaded vector of src every row of the block.
// coef must hold rows up to na rounded up to 16 (the tiles are kBlock x kBlock); those past na are
// read and dropped.
template <typename T>
void accumulate_rows(const T* coef, int64_t sa, int64_t sb, int64_t na, int64_t nb, const T* src, int64_t ld,
                     int64_t width, T* out, int64_t ldo) {
  constexpr int64_t kSize = Vectorized<T>::size();
  for (int64_t w = 0; w < width;) {
    const int64_t left = width - w;
    if (left >= 2 * kSize) {
      accumulate_columns<T, 2, true>(coef, sa, sb, na, nb, src, ld, width, w, out, ldo);
      w += 2 * kSize;
    } else if (left > kSize) {
      accumulate_columns<T, 2, false>(coef, sa, sb, na, nb, src, ld, width, w, out, ldo);
      w += 2 * kSize;
    } else if (left == kSize) {
      accumulate_columns<T, 1, true>(coef, sa, sb, na, nb, src, ld, width, w, out, ldo);
      w += kSize;
    } else {
      accumulate_columns<T, 1, false>(coef, sa, sb, na, nb, src, ld, width, w, out, ldo);
      w += kSize;
    }
  }
}

// x[c] = exp(x[c] - shift) for c < valid and 0 for valid <= c < width; returns the sum.
template <typename T>
T exponentiate(T* x, int64_t valid, int64_t width, T shift) {
  using Vec = Vectorized<T>;
  Vec total(T(0));
  int64_t c = 0;
  for (; c + Vec::size() <= valid; c += Vec::size()) {
    const Vec p = (Vec::loadu(x + c) - Vec(shift)).exp();
    total = total + p;
    p.store(x + c);
  }
  if (c < valid) {
    const Vec p = (Vec::loadu(x + c, valid - c) - Vec(shift)).exp();
    // The lanes past `valid` hold exp(-shift): blend them out of the sum.
    const Vec kept = Vec::set(Vec(T(0)), p, valid - c);
    total = total + kept;
    kept.store(x + c, valid - c);
    c = valid;
  }
  std::fill(x + c, x + width, T(0));
  return at::vec::vec_reduce_all<T>(vec_add<T>, total);
}

template <typename T>
T max_of(const T* x, int64_t n) {
  using Vec = Vectorized<T>;
  Vec top(-std::numeric_limits<T>::infinity());
  int64_t c = 0;
  for (; c + Vec::size() <= n; c += Vec::size()) top = at::vec::maximum(top, Vec::loadu(x + c));
  T result = at::vec::vec_reduce_all<T>([](const Vec& a, const Vec& b) { return at::vec::maximum(a, b); }, top);
  for (; c < n; ++c) result = std::isnan(x[c]) ? x[c] : std::max(result, x[c]);
  return result;
}

// Tiles along the sequence cost 1, 2, ..., blocks key-query tile pairs (or the reverse): slot s
// takes tile 0, blocks - 1, 1, blocks - 2, ... so that the contiguous ranges of slots parallel_for
// hands each thread cost about the same.
int64_t balanced_block(int64_t slot, int64_t blocks) { return slot % 2 == 0 ? slot / 2 : blocks - 1 - slot / 2; }

struct Shape {
  int64_t N, L, D, Dv;
  int64_t blocks() const { return (L + kBlock - 1) / kBlock; }
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

// x [N, L, F] transposed to [N, F, L'] with L' = L rounded up to whole tiles, zeros past L: a key
// tile's columns are then always there to load (those past L are masked, as every j >= i is).
at::Tensor transposed_tiles(const at::Tensor& x, const Shape& s) {
  at::Tensor t = at::empty({x.size(0), x.size(2), s.blocks() * kBlock}, x.options());
  t.narrow(2, 0, s.L).copy_(x.transpose(1, 2));
  t.narrow(2, s.L, t.size(2) - s.L).zero_();
  return t;
}

std::tuple<at::Tensor, at::Tensor> causal_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                    double scale) {
  const Shape s = check_inputs("vaekernels::causal_attention", q, k, v);
  at::Tensor out = at::zeros({s.N, s.L, s.Dv}, q.options());
  at::Tensor lse = at::empty({s.N, s.L}, q.options());
  if (s.N * s.L == 0) return {out, lse};
  const at::Tensor kt = transposed_tiles(k, s);
  const int64_t padded = kt.size(2);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "causal_attention", [&] {
    using T = scalar_t;
    const T *q_ptr = q.const_data_ptr<T>(), *kt_ptr = kt.const_data_ptr<T>(), *v_ptr = v.const_data_ptr<T>();
    T *out_ptr = out.data_ptr<T>(), *lse_ptr = lse.data_ptr<T>();
    const T sc = static_cast<T>(scale), minus_inf = -std::numeric_limits<T>::infinity();
    // A task is one tile of queries of one sequence: it walks the key tiles up to its diagonal.
    at::parallel_for(0, s.N * s.blocks(), 1, [&](int64_t begin, int64_t end) {
      std::vector<T> tile(kBlock * kBlock, T(0)), top(kBlock), total(kBlock);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / s.blocks(), i0 = balanced_block(task % s.blocks(), s.blocks()) * kBlock;
        const int64_t rows = std::min(kBlock, s.L - i0);
        const T* qb = q_ptr + (n * s.L + i0) * s.D;
        T* ob = out_ptr + (n * s.L + i0) * s.Dv;
        std::fill(top.begin(), top.end(), minus_inf);
        std::fill(total.begin(), total.end(), T(0));
        // Keys j < i <= i0 + rows - 1.
        for (int64_t j0 = 0; j0 < i0 + rows - 1; j0 += kBlock) {
          const int64_t keys = std::min(kBlock, i0 + rows - 1 - j0);
          tile_products(qb, s.D, rows, kt_ptr + n * s.D * padded + j0, padded, s.D, sc, tile.data());
          for (int64_t r = 0; r < rows; ++r) {
            T* p = tile.data() + r * kBlock;
            const int64_t valid = std::clamp<int64_t>(i0 + r - j0, 0, keys);
            if (valid == 0) {
              std::fill(p, p + keys, T(0));
              continue;
            }
            const T new_top = std::max(top[r], max_of(p, valid));
            // Scores of -inf so far (an overflowing scale * q . k) weigh 0, not exp(-inf + inf).
            const T shrink = top[r] == minus_inf ? T(0) : std::exp(top[r] - new_top);
            total[r] = total[r] * shrink + exponentiate(p, valid, keys, new_top == minus_inf ? T(0) : new_top);
            if (shrink != T(1)) {
              T* o = ob + r * s.Dv;
              for (int64_t c = 0; c < s.Dv; ++c) o[c] *= shrink;
            }
            top[r] = new_top;
          }
          accumulate_rows(tile.data(), kBlock, 1, rows, keys, v_ptr + (n * s.L + j0) * s.Dv, s.Dv, s.Dv, ob, s.Dv);
        }
        for (int64_t r = 0; r < rows; ++r) {
          // Row 0 has no keys: total 0, output 0 and log-sum-exp -inf. A later row whose scores are
          // all -inf has no softmax (0 / 0): NaN, as the reference's softmax gives.
          T* o = ob + r * s.Dv;
          const bool row_zero = i0 + r == 0;
          if (row_zero) {
            // Exactly 0, also where a v_j it may not see is infinite (its zero weight times inf).
            std::fill(o, o + s.Dv, T(0));
          } else {
            const T norm = total[r] != T(0) ? total[r] : std::numeric_limits<T>::quiet_NaN();
            for (int64_t c = 0; c < s.Dv; ++c) o[c] /= norm;
          }
          lse_ptr[n * s.L + i0 + r] = row_zero ? minus_inf
                                       : total[r] != T(0) ? top[r] + std::log(total[r])
                                                          : std::numeric_limits<T>::quiet_NaN();
        }
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
  at::Tensor grad_k = at::zeros_like(k), grad_v = at::zeros_like(v);
  if (s.N * s.L == 0) return {at::zeros_like(q), grad_k, grad_v};
  const at::Tensor kt = transposed_tiles(k, s), vt = transposed_tiles(v, s);
  const int64_t padded = kt.size(2);
  // A task is one tile of keys of one sequence and writes its rows of d(k) and d(v) alone; d(q)
  // gathers from every key tile. With a sequence per thread or more, a task takes a whole
  // sequence and owns its rows of d(q) too; with fewer, each thread sums into its own copy.
  const int64_t threads = at::get_num_threads();
  const bool whole_sequences = s.N >= threads;
  at::Tensor grad_q = whole_sequences ? at::zeros_like(q) : at::zeros({threads, s.N, s.L, s.D}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "causal_attention_backward", [&] {
    using T = scalar_t;
    const T *q_ptr = q.const_data_ptr<T>(), *k_ptr = k.const_data_ptr<T>(), *kt_ptr = kt.const_data_ptr<T>();
    const T *vt_ptr = vt.const_data_ptr<T>(), *g_ptr = g.const_data_ptr<T>();
    const T* lse_ptr = l.const_data_ptr<T>();
    T *gq_ptr = grad_q.data_ptr<T>(), *gk_ptr = grad_k.data_ptr<T>(), *gv_ptr = grad_v.data_ptr<T>();
    // delta_i = dO_i . O_i, the softmax backward's row term.
    const at::Tensor delta = reduce_rows<T>([](const auto& g_d, const auto& o_d) { return g_d * o_d; },
                                            [](T sum) { return sum; }, g, o);
    const T* delta_ptr = delta.const_data_ptr<T>();
    const T sc = static_cast<T>(scale);
    // For queries i > j of the key tile at j0, by query tiles: P_ij = exp(scale q_i . k_j - lse_i),
    // dS_ij = scale P_ij (dO_i . v_j - delta_i); d(v_j) += P_ij dO_i, d(k_j) += dS_ij q_i and
    // d(q_i) += dS_ij k_j, into gq, sequence n's rows of d(q) or of a thread's copy.
    auto key_tile = [&](int64_t n, int64_t j0, T* gq, T* probs, T* scores, T* grads) {
      const int64_t keys = std::min(kBlock, s.L - j0);
      for (int64_t i0 = j0; i0 < s.L; i0 += kBlock) {
        const int64_t rows = std::min(kBlock, s.L - i0), cols = std::min(keys, i0 + rows - 1 - j0);
        if (cols <= 0) continue;
        const int64_t first = n * s.L + i0;
        tile_products(q_ptr + first * s.D, s.D, rows, kt_ptr + n * s.D * padded + j0, padded, s.D, sc, probs);
        tile_products(g_ptr + first * s.Dv, s.Dv, rows, vt_ptr + n * s.Dv * padded + j0, padded, s.Dv, T(1), grads);
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t valid = std::clamp<int64_t>(i0 + r - j0, 0, cols);
          T *p = probs + r * kBlock, *ds = scores + r * kBlock;
          const T* dp = grads + r * kBlock;
          // valid is 0 where i <= j0 (the first row of a diagonal tile): the only rows whose
          // log-sum-exp can be -inf (row 0), and whose probabilities are all 0 anyway.
          exponentiate(p, valid, cols, valid > 0 ? lse_ptr[first + r] : T(0));
          // Where P_ij rounds to 1 the row's other weights sum to below the rounding, and so does
          // the true dS_ij = sum_{l != j} P_il (dP_ij - dP_il); dP_ij - delta_i would be the
          // rounding of two differently summed dot products instead (1e-7 relative in float, which
          // a score scale of 1e4 carries into d(q) and d(k)). 0, as the reference's one-hot softmax.
          // Masked pairs (j >= i) are exactly 0, also where the row's delta is NaN or inf.
          for (int64_t c = 0; c < cols; ++c)
            ds[c] = c >= valid || p[c] == T(1) ? T(0) : sc * p[c] * (dp[c] - delta_ptr[first + r]);
        }
        // Row 0 attends to nothing: its q and dO reach no gradient (left out, not multiplied by 0,
        // so that an infinite or NaN q_0 or dO_0 does not make 0 * inf = NaN in d(k) and d(v)).
        const int64_t skip = i0 == 0 ? 1 : 0, first_kept = first + skip;
        accumulate_rows(probs + skip * kBlock, 1, kBlock, cols, rows - skip, g_ptr + first_kept * s.Dv, s.Dv, s.Dv,
                        gv_ptr + (n * s.L + j0) * s.Dv, s.Dv);
        accumulate_rows(scores + skip * kBlock, 1, kBlock, cols, rows - skip, q_ptr + first_kept * s.D, s.D, s.D,
                        gk_ptr + (n * s.L + j0) * s.D, s.D);
        accumulate_rows(scores + skip * kBlock, kBlock, 1, rows - skip, cols, k_ptr + (n * s.L + j0) * s.D, s.D, s.D,
                        gq + (i0 + skip) * s.D, s.D);
      }
    };
    const int64_t tasks = whole_sequences ? s.N : s.N * s.blocks();
    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
      // A row more than a tile: accumulate_rows past row 0 (skip above) reads whole blocks of rows.
      std::vector<T> probs((kBlock + 1) * kBlock, T(0)), scores((kBlock + 1) * kBlock, T(0)),
          grads((kBlock + 1) * kBlock, T(0));
      for (int64_t task = begin; task < end; ++task) {
        if (whole_sequences) {
          for (int64_t j0 = 0; j0 < s.L; j0 += kBlock)
            key_tile(task, j0, gq_ptr + task * s.L * s.D, probs.data(), scores.data(), grads.data());
        } else {
          const int64_t n = task / s.blocks();
          TORCH_CHECK(at::get_thread_num() < threads, op, ": thread ", at::get_thread_num(), " of ", threads);
          T* copy = gq_ptr + (at::get_thread_num() * s.N + n) * s.L * s.D;
          key_tile(n, balanced_block(task % s.blocks(), s.blocks()) * kBlock, copy, probs.data(), scores.data(),
                   grads.data());
        }
      }
    });
  });
  return {whole_sequences ? grad_q : grad_q.sum(0), grad_k, grad_v};
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace vaekernels::cpu

TORCH_LIBRARY_IMPL(vaekernels, CPU, m) {
  m.impl("causal_attention", &vaekernels::cpu::causal_attention);
  m.impl("causal_attention_backward", &vaekernels::cpu::causal_attention_backward);
}
