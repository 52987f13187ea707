// The whole loss of an MLP VAE in one op (vaekernels/ops/mlp_vae.py): a tanh MLP encoder to
// (mean, log_var), the samples z = mean + exp(log_var / 2) eps, a tanh MLP decoder to Bernoulli
// logits, and per example the reconstruction loss -(1/K) sum_k log p(x | z_k) and the KL to
// N(0, I). The matrix products are ATen's (MKL). What lies between them, which autograd runs as
// a few small ops and nodes per layer (about half of a step at batch 100), is one vectorised pass
// each here: tanh after each hidden product, the samples with the KL, the likelihood with its
// logits gradient sigmoid(l) - x (kept for the backward instead of the logits), and in the
// backward the tanh derivative and the samples' chain rule.
#include <tuple>
#include <vector>

#include <torch/library.h>

#include "fast_math.h"
#include "likelihoods.h"

namespace vaekernels::cpu {
inline namespace CPU_CAPABILITY {
namespace {

constexpr const char* kOp = "vaekernels::mlp_vae";
constexpr const char* kBackwardOp = "vaekernels::mlp_vae_backward";

// Layers weights[i] [out_i, in_i] chained from in_features to out_features, biases[i] [out_i].
void check_layers(const char* side, at::TensorList weights, at::TensorList biases, int64_t in_features,
                  int64_t out_features, const at::Tensor& x) {
  TORCH_CHECK(!weights.empty(), kOp, ": ", side, "_weights must hold at least one layer, got none");
  TORCH_CHECK(biases.size() == weights.size(), kOp, ": ", side, "_biases must hold one bias per layer (",
              weights.size(), "), got ", biases.size());
  int64_t width = in_features;
  for (size_t i = 0; i < weights.size(); ++i) {
    const at::Tensor& weight = weights[i];
    check_rank(kOp, "a weight", weight, 2, "[out, in]");
    const int64_t out = i + 1 == weights.size() ? out_features : weight.size(0);
    check_tensor(kOp, "a weight", weight, {out, width}, x, kCpu);
    check_tensor(kOp, "a bias", biases[i], {out}, x, kCpu);
    width = out;
  }
}

// f(row) for rows [0, rows) of width n, in parallel, 4096 elements a task or more: an eighth of
// the usual grain, as these passes read a product's output, which both threads wrote. On one
// thread, the tanh passes of the batch-100 VAE's forward waited on those reads: 25 µs more.
template <typename F>
void for_rows(int64_t rows, int64_t n, F f) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / std::max<int64_t>(n, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) f(row);
  });
}

// The column sums [n] of what f(row, sums) adds to sums for every row of [0, rows), each row
// row_work elements of work, in parallel. Each block of rows adds to its own partial sums, and the
// blocks follow from the sizes alone, so the result does not depend on the number of threads.
template <typename scalar_t, typename F>
at::Tensor for_rows_summing_columns(int64_t rows, int64_t row_work, int64_t n, const at::TensorOptions& options,
                                    F f) {
  const int64_t block = row_grain(row_work), blocks = (rows + block - 1) / block;
  at::Tensor partial = at::zeros({blocks, n}, options);
  scalar_t* partial_ptr = partial.data_ptr<scalar_t>();
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t row = b * block; row < std::min(rows, (b + 1) * block); ++row) f(row, partial_ptr + b * n);
    }
  });
  return blocks == 1 ? partial.view({n}) : partial.sum(0);
}

// The layers' output for input [N, in]: tanh after every layer but the last, whose output is
// returned without its bias (the caller's pass adds it); the hidden outputs are appended to
// hidden. A hidden layer's bias rides in its tanh pass rather than in addmm, which would first
// copy it into every row of the output.
template <typename scalar_t>
at::Tensor mlp_forward(const at::Tensor& input, at::TensorList weights, at::TensorList biases,
                       std::vector<at::Tensor>& hidden) {
  using Vec = Vectorized<scalar_t>;
  at::Tensor activation = input;
  for (size_t i = 0;; ++i) {
    at::Tensor out = at::mm(activation, weights[i].t());
    if (i + 1 == weights.size()) return out;
    const int64_t n = out.size(1);
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    const scalar_t* bias = biases[i].const_data_ptr<scalar_t>();
    for_rows(out.size(0), n, [&](int64_t row) {
      scalar_t* o = out_ptr + row * n;
      vector_steps<scalar_t>(n, [&](int64_t j, int64_t count) {
        tanh_of(Vec::loadu(o + j, count) + Vec::loadu(bias + j, count)).store(o + j, count);
      });
    });
    hidden.push_back(out);
    activation = out;
  }
}

// rows [N, n] with row n scaled by scale[n], as a new tensor.
template <typename scalar_t>
at::Tensor scale_rows(const at::Tensor& rows, const at::Tensor& scale) {
  using Vec = Vectorized<scalar_t>;
  const int64_t n = rows.size(1);
  at::Tensor out = at::empty_like(rows);
  const scalar_t* in_ptr = rows.const_data_ptr<scalar_t>();
  const scalar_t* scale_ptr = scale.const_data_ptr<scalar_t>();
  scalar_t* out_ptr = out.data_ptr<scalar_t>();
  for_rows(rows.size(0), n, [&](int64_t row) {
    const Vec s(scale_ptr[row]);
    vector_steps<scalar_t>(n, [&](int64_t j, int64_t count) {
      (s * Vec::loadu(in_ptr + row * n + j, count)).store(out_ptr + row * n + j, count);
    });
  });
  return out;
}

// From grad [N, out], the gradient of the last layer's output (each row n times row_scale[n]
// where row_scale is defined, which spares the caller a scaled copy of a wide grad), whose bias
// gradient the caller has: writes grad_weights[i] and, below the last layer, grad_biases[i], and
// returns the input's gradient when input_grad (else undefined).
template <typename scalar_t>
at::Tensor mlp_backward(const at::Tensor& grad, const at::Tensor& row_scale, const at::Tensor& input,
                        at::TensorList weights, at::ArrayRef<at::Tensor> hidden, at::Tensor* grad_weights,
                        at::Tensor* grad_biases, bool input_grad) {
  using Vec = Vectorized<scalar_t>;
  at::Tensor layer_grad = grad;
  for (int64_t i = static_cast<int64_t>(weights.size()) - 1;; --i) {
    const at::Tensor& layer_input = i == 0 ? input : hidden[i - 1];
    // Only the last layer's grad carries row_scale: (s grad)^T h = grad^T (s h), (s grad) W = s (grad W).
    const bool scaled = row_scale.defined() && layer_grad.is_same(grad);
    grad_weights[i] = at::mm(layer_grad.t(), scaled ? scale_rows<scalar_t>(layer_input, row_scale) : layer_input);
    if (i == 0 && !input_grad) return {};
    at::Tensor grad_input = at::mm(layer_grad, weights[i]);
    if (i == 0) return scaled ? scale_rows<scalar_t>(grad_input, row_scale) : grad_input;
    // tanh' = 1 - tanh^2, from the saved output; the bias gradient is the column sum of the result.
    const int64_t n = grad_input.size(1);
    scalar_t* grad_ptr = grad_input.data_ptr<scalar_t>();
    const scalar_t* hidden_ptr = hidden[i - 1].const_data_ptr<scalar_t>();
    const scalar_t* scale_ptr = scaled ? row_scale.const_data_ptr<scalar_t>() : nullptr;
    grad_biases[i - 1] = for_rows_summing_columns<scalar_t>(grad_input.size(0), n, n, grad_input.options(),
                                                            [&](int64_t row, scalar_t* sums) {
      const Vec s(scale_ptr ? scale_ptr[row] : scalar_t(1)), one(scalar_t(1));
      scalar_t* g = grad_ptr + row * n;
      const scalar_t* h = hidden_ptr + row * n;
      vector_steps<scalar_t>(n, [&](int64_t j, int64_t count) {
        const Vec h_j = Vec::loadu(h + j, count);
        const Vec g_j = s * Vec::loadu(g + j, count) * (one - h_j * h_j);
        g_j.store(g + j, count);
        (Vec::loadu(sums + j, count) + g_j).store(sums + j, count);
      });
    });
    layer_grad = grad_input;
  }
}

// z [B K, d] = mean + exp(log_var / 2) eps from encoded = [mean, log_var] [B, 2d], the encoder's
// last product without its bias, and eps [B, K, d]; the bias is added to encoded in place.
template <typename scalar_t>
at::Tensor sample(at::Tensor& encoded, const at::Tensor& bias, const at::Tensor& eps) {
  using Vec = Vectorized<scalar_t>;
  const int64_t K = eps.size(1), d = eps.size(2);
  at::Tensor z = at::empty({eps.size(0) * K, d}, eps.options());
  scalar_t* encoded_ptr = encoded.data_ptr<scalar_t>();
  const scalar_t* bias_ptr = bias.const_data_ptr<scalar_t>();
  const scalar_t* eps_ptr = eps.const_data_ptr<scalar_t>();
  scalar_t* z_ptr = z.data_ptr<scalar_t>();
  for_rows(eps.size(0), K * d, [&](int64_t b) {
    scalar_t* mean = encoded_ptr + b * 2 * d;
    scalar_t* log_var = mean + d;
    vector_steps<scalar_t>(d, [&](int64_t j, int64_t count) {
      const Vec mean_j = Vec::loadu(mean + j, count) + Vec::loadu(bias_ptr + j, count);
      const Vec log_var_j = Vec::loadu(log_var + j, count) + Vec::loadu(bias_ptr + d + j, count);
      mean_j.store(mean + j, count);
      log_var_j.store(log_var + j, count);
      const Vec std_j = (log_var_j * Vec(scalar_t(0.5))).exp();
      for (int64_t k = 0; k < K; ++k) {
        const int64_t row = (b * K + k) * d + j;
        at::vec::fmadd(std_j, Vec::loadu(eps_ptr + row, count), mean_j).store(z_ptr + row, count);
      }
    });
  });
  return z;
}

// For the decoder's last product without its bias, logits [B K, D], and x [B, D]: the
// reconstruction loss -(1/K) sum_k log p(x | logits_k + bias) [B]; logits is overwritten with the
// residual sigmoid(logits + bias) - x, the gradient of -log p with respect to the logits.
template <typename scalar_t>
at::Tensor bernoulli_residual(at::Tensor& logits, const at::Tensor& bias, const at::Tensor& x, int64_t K) {
  using Vec = Vectorized<scalar_t>;
  const int64_t B = x.size(0), D = x.size(1);
  at::Tensor log_px = at::empty({B * K}, x.options());
  scalar_t* logits_ptr = logits.data_ptr<scalar_t>();
  const scalar_t* bias_ptr = bias.const_data_ptr<scalar_t>();
  const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
  scalar_t* log_px_ptr = log_px.data_ptr<scalar_t>();
  at::parallel_for(0, B * K, row_grain(D), [&](int64_t begin, int64_t end) {
    // A row's residual waits here until the row is known to be finite: a row that is not is
    // redone from its logits.
    std::vector<scalar_t> residual(D);
    for (int64_t row = begin; row < end; ++row) {
      scalar_t* l = logits_ptr + row * D;
      const scalar_t* x_row = x_ptr + row / K * D;
      const Vec zero(scalar_t(0)), one(scalar_t(1));
      Vec log_p(scalar_t(0)), logit_sum(scalar_t(0));
      vector_steps<scalar_t>(D, [&](int64_t j, int64_t count) {
        // One exp for both: softplus(l) = max(l, 0) + log1p(e) and sigmoid(l) = 1 / (1 + e) for
        // l >= 0, e / (1 + e) below, with e = exp(-|l|) (as bernoulli_log_prob's kernels).
        const Vec l_j = Vec::loadu(l + j, count) + Vec::loadu(bias_ptr + j, count);
        const Vec x_j = Vec::loadu(x_row + j, count);
        const Vec e = l_j.abs().neg().exp_u20();
        const Vec term = x_j * l_j - (at::vec::maximum(l_j, zero) + log1p_unit(e));
        log_p += Vec::set(zero, term, count);
        const Vec inverse = one / (one + e);
        const Vec sigmoid = Vec::blendv(e * inverse, inverse, l_j >= zero);
        (sigmoid - x_j).store(residual.data() + j, count);
        logit_sum += l_j;  // the partial load's lanes are zeros
      });
      scalar_t sum = at::vec::vec_reduce_all<scalar_t>(vec_add<scalar_t>, log_p);
      // exp_u20 clamps its argument, so a NaN logit would give a finite residual, and x l -
      // softplus(l) is inf - inf at l = +-inf: a row whose logits do not sum to a finite value is
      // redone exactly (NaN stays NaN), as bernoulli_log_prob does.
      if (!std::isfinite(at::vec::vec_reduce_all<scalar_t>(vec_add<scalar_t>, logit_sum)) || !std::isfinite(sum)) {
        sum = 0;
        for (int64_t j = 0; j < D; ++j) {
          const scalar_t l_j = l[j] + bias_ptr[j];
          sum += bernoulli_term(l_j, x_row[j]);
          residual[j] = scalar_t(1) / (scalar_t(1) + std::exp(-l_j)) - x_row[j];
        }
      }
      std::copy(residual.begin(), residual.end(), l);
      log_px_ptr[row] = sum;
    }
  });
  at::Tensor reconstruction = at::empty({B}, x.options());
  scalar_t* reconstruction_ptr = reconstruction.data_ptr<scalar_t>();
  for (int64_t b = 0; b < B; ++b) {
    scalar_t sum = 0;
    for (int64_t k = 0; k < K; ++k) sum += log_px_ptr[b * K + k];
    reconstruction_ptr[b] = -sum / scalar_t(K);
  }
  return reconstruction;
}

// encoded's gradient [B, 2d] from z's [B K, d] and the KL's [B]: d mean = sum_k dz + g mean,
// d log_var = exp(log_var / 2) / 2 sum_k dz eps + g expm1(log_var) / 2; and its column sums [2d],
// the gradient of the encoder's last bias.
template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor> sample_backward(const at::Tensor& grad_z, const at::Tensor& grad_kl,
                                                   const at::Tensor& encoded, const at::Tensor& eps) {
  using Vec = Vectorized<scalar_t>;
  const int64_t K = eps.size(1), d = eps.size(2);
  at::Tensor grad_encoded = at::empty_like(encoded);
  const scalar_t* grad_z_ptr = grad_z.const_data_ptr<scalar_t>();
  const scalar_t* grad_kl_ptr = grad_kl.const_data_ptr<scalar_t>();
  const scalar_t* encoded_ptr = encoded.const_data_ptr<scalar_t>();
  const scalar_t* eps_ptr = eps.const_data_ptr<scalar_t>();
  scalar_t* out_ptr = grad_encoded.data_ptr<scalar_t>();
  at::Tensor grad_bias = for_rows_summing_columns<scalar_t>(eps.size(0), K * d, 2 * d, encoded.options(),
                                                            [&](int64_t b, scalar_t* sums) {
    const Vec half(scalar_t(0.5)), grad_kl_b(grad_kl_ptr[b]);
    const scalar_t* mean = encoded_ptr + b * 2 * d;
    scalar_t* out = out_ptr + b * 2 * d;
    vector_steps<scalar_t>(d, [&](int64_t j, int64_t count) {
      Vec grad_sum(scalar_t(0)), grad_eps_sum(scalar_t(0));
      for (int64_t k = 0; k < K; ++k) {
        const int64_t row = (b * K + k) * d + j;
        const Vec grad_z_j = Vec::loadu(grad_z_ptr + row, count);
        grad_sum += grad_z_j;
        grad_eps_sum = at::vec::fmadd(grad_z_j, Vec::loadu(eps_ptr + row, count), grad_eps_sum);
      }
      const Vec log_var_j = Vec::loadu(mean + d + j, count);
      const Vec grad_mean = at::vec::fmadd(grad_kl_b, Vec::loadu(mean + j, count), grad_sum);
      const Vec from_samples = half * (log_var_j * half).exp() * grad_eps_sum;
      const Vec grad_log_var = at::vec::fmadd(grad_kl_b * half, log_var_j.expm1(), from_samples);
      grad_mean.store(out + j, count);
      grad_log_var.store(out + d + j, count);
      (Vec::loadu(sums + j, count) + grad_mean).store(sums + j, count);
      (Vec::loadu(sums + d + j, count) + grad_log_var).store(sums + d + j, count);
    });
  });
  return {grad_encoded, grad_bias};
}

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> mlp_vae(
    const at::Tensor& x, const at::Tensor& eps, at::TensorList encoder_weights, at::TensorList encoder_biases,
    at::TensorList decoder_weights, at::TensorList decoder_biases) {
  check_floating(kOp, "x", x, kCpu);
  check_rank(kOp, "x", x, 2, "[B, D]");
  check_rank(kOp, "eps", eps, 3, "[B, K, d]");
  TORCH_CHECK(x.size(0) >= 1 && x.size(1) >= 1, kOp, ": x must have B, D >= 1, got shape ", x.sizes());
  TORCH_CHECK(eps.size(1) >= 1 && eps.size(2) >= 1, kOp, ": eps must have K, d >= 1, got shape ", eps.sizes());
  check_tensor(kOp, "eps", eps, {x.size(0), eps.size(1), eps.size(2)}, x, kCpu);
  const int64_t D = x.size(1), K = eps.size(1), d = eps.size(2);
  check_layers("encoder", encoder_weights, encoder_biases, D, 2 * d, x);
  check_layers("decoder", decoder_weights, decoder_biases, d, D, x);
  // The dozens of ATen calls below would each pass through autograd's dispatch layer on the way
  // to their kernels; this op's autograd is its own (the backward op), so they skip it.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mlp_vae", [&] {
    const at::Tensor x_c = x.contiguous(), eps_c = eps.contiguous();
    // The backward's tensors: encoder hidden, encoded, z, decoder hidden, residual.
    std::vector<at::Tensor> saved;
    at::Tensor encoded = mlp_forward<scalar_t>(x_c, encoder_weights, encoder_biases, saved);
    const at::Tensor z = sample<scalar_t>(encoded, encoder_biases.back(), eps_c);
    saved.push_back(encoded);
    saved.push_back(z);
    // mean and log_var as [B, 1, d] views. as_strided rather than narrow: narrow costs about 10 µs
    // a call when the op runs under its Python autograd kernel.
    const int64_t B = x.size(0);
    const at::Tensor kl = gaussian_kl_rows<scalar_t>(encoded.as_strided({B, 1, d}, {2 * d, 2 * d, 1}, 0),
                                                     encoded.as_strided({B, 1, d}, {2 * d, 2 * d, 1}, d));
    at::Tensor residual = mlp_forward<scalar_t>(z, decoder_weights, decoder_biases, saved);
    const at::Tensor reconstruction = bernoulli_residual<scalar_t>(residual, decoder_biases.back(), x_c, K);
    saved.push_back(residual);
    return std::make_tuple(reconstruction, kl.view({-1}), saved);
  });
}

std::vector<at::Tensor> mlp_vae_backward(const at::Tensor& grad_reconstruction, const at::Tensor& grad_kl,
                                         const at::Tensor& x, const at::Tensor& eps, at::TensorList encoder_weights,
                                         at::TensorList decoder_weights, at::TensorList saved) {
  const int64_t B = x.size(0), K = eps.size(1);
  const size_t encoder_layers = encoder_weights.size(), decoder_layers = decoder_weights.size();
  TORCH_CHECK(encoder_layers >= 1 && decoder_layers >= 1, kBackwardOp, ": both MLPs need at least one layer");
  TORCH_CHECK(saved.size() == encoder_layers + decoder_layers + 1, kBackwardOp, ": saved must hold ",
              encoder_layers + decoder_layers + 1, " tensors (mlp_vae's third output), got ", saved.size());
  check_grad(kBackwardOp, "grad_reconstruction", grad_reconstruction, {B}, x);
  check_grad(kBackwardOp, "grad_kl", grad_kl, {B}, x);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // as in mlp_vae
  return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mlp_vae_backward", [&] {
    const at::Tensor x_c = x.contiguous(), eps_c = eps.contiguous();
    const at::Tensor grad_rec = grad_reconstruction.to(x.scalar_type()).contiguous();
    const at::Tensor grad_kl_c = grad_kl.to(x.scalar_type()).contiguous();
    const at::ArrayRef<at::Tensor> encoder_hidden = saved.slice(0, encoder_layers - 1);
    const at::Tensor& encoded = saved[encoder_layers - 1];
    const at::Tensor& z = saved[encoder_layers];
    const at::ArrayRef<at::Tensor> decoder_hidden = saved.slice(encoder_layers + 1, decoder_layers - 1);
    const at::Tensor& residual = saved.back();
    // Layout of the result: encoder weights, encoder biases, decoder weights, decoder biases.
    std::vector<at::Tensor> grads(2 * (encoder_layers + decoder_layers));
    at::Tensor* encoder_grads = grads.data();
    at::Tensor* decoder_grads = grads.data() + 2 * encoder_layers;

    // d reconstruction_b / d logits_bk = residual_bk / K: the residual's rows scaled by
    // grad_rec_b / K, which the decoder's backward applies to the narrower tensors around it.
    at::Tensor row_scale = at::empty({B * K}, residual.options());
    const scalar_t* grad_rec_ptr = grad_rec.const_data_ptr<scalar_t>();
    scalar_t* row_scale_ptr = row_scale.data_ptr<scalar_t>();
    for (int64_t row = 0; row < B * K; ++row) row_scale_ptr[row] = grad_rec_ptr[row / K] / scalar_t(K);
    decoder_grads[2 * decoder_layers - 1] = at::mv(residual.t(), row_scale);
    const at::Tensor grad_z = mlp_backward<scalar_t>(residual, row_scale, z, decoder_weights, decoder_hidden,
                                                     decoder_grads, decoder_grads + decoder_layers, true);
    auto [grad_encoded, grad_encoded_bias] = sample_backward<scalar_t>(grad_z, grad_kl_c, encoded, eps_c);
    encoder_grads[2 * encoder_layers - 1] = grad_encoded_bias;
    mlp_backward<scalar_t>(grad_encoded, at::Tensor(), x_c, encoder_weights, encoder_hidden, encoder_grads,
                           encoder_grads + encoder_layers, false);
    return grads;
  });
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace vaekernels::cpu

TORCH_LIBRARY_IMPL(vaekernels, CPU, m) {
  m.impl("mlp_vae", &vaekernels::cpu::mlp_vae);
  m.impl("mlp_vae_backward", &vaekernels::cpu::mlp_vae_backward);
}
