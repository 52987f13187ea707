// The whole loss of an MLP VAE in one op (vaekernels/ops/mlp_vae.py): a tanh MLP encoder to
// (mean, log_var), the samples z = mean + exp(log_var / 2) eps, a tanh MLP decoder to Bernoulli
// logits, and per example the reconstruction loss -(1/K) sum_k log p(x | z_k) and the KL to
// N(0, I). The matrix products are ATen's (MKL). What lies between them, which autograd runs as
// a few small ops and nodes per layer (about half of a step at batch 100), is one vectorised pass
// each here: tanh after each hidden product, the samples with the KL, the likelihood with its
// logits gradient sigmoid(l) - x (kept for the backward instead of the logits), and in the
// backward the tanh derivative and the samples' chain rule.
#include <array>
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
// Elements per parallel task of the elementwise passes: enough that thread hand-off is noise.
constexpr int64_t kGrain = 32768;

// f(offset, count) over [0, n) in vector-sized steps, the last one partial.
template <typename scalar_t, typename F>
void vector_steps(int64_t n, F f) {
  constexpr int64_t width = Vectorized<scalar_t>::size();
  int64_t i = 0;
  for (; i + width <= n; i += width) f(i, width);
  if (i < n) f(i, n - i);
}

// t = f(t, others...) elementwise over contiguous tensors of one size, in parallel.
template <typename scalar_t, typename F, typename... Others>
void map_in_place(at::Tensor& t, F f, const Others&... others) {
  using Vec = Vectorized<scalar_t>;
  scalar_t* data = t.data_ptr<scalar_t>();
  const std::array<const scalar_t*, sizeof...(Others)> other_data{others.template const_data_ptr<scalar_t>()...};
  at::parallel_for(0, t.numel(), kGrain, [&](int64_t begin, int64_t end) {
    vector_steps<scalar_t>(end - begin, [&](int64_t offset, int64_t count) {
      const int64_t i = begin + offset;
      std::apply(
          [&](const auto*... other) {
            f(Vec::loadu(data + i, count), Vec::loadu(other + i, count)...).store(data + i, count);
          },
          other_data);
    });
  });
}

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

// The layers' outputs for input [N, in]: tanh after every layer but the last, whose linear output
// is returned; the hidden ones are appended to hidden.
template <typename scalar_t>
at::Tensor mlp_forward(const at::Tensor& input, at::TensorList weights, at::TensorList biases,
                       std::vector<at::Tensor>& hidden) {
  at::Tensor activation = input;
  for (size_t i = 0;; ++i) {
    at::Tensor out = at::addmm(biases[i], activation, weights[i].t());
    if (i + 1 == weights.size()) return out;
    map_in_place<scalar_t>(out, [](const auto& v) { return tanh_of(v); });
    hidden.push_back(out);
    activation = out;
  }
}

// From the gradient of the last layer's output: the weights' and biases' gradients, written to
// grad_weights[i] and grad_biases[i], and the input's gradient when input_grad (else undefined).
template <typename scalar_t>
at::Tensor mlp_backward(at::Tensor grad, const at::Tensor& input, at::TensorList weights,
                        at::ArrayRef<at::Tensor> hidden, at::Tensor* grad_weights, at::Tensor* grad_biases,
                        bool input_grad) {
  using Vec = Vectorized<scalar_t>;
  for (int64_t i = static_cast<int64_t>(weights.size()) - 1;; --i) {
    const at::Tensor& layer_input = i == 0 ? input : hidden[i - 1];
    grad_weights[i] = at::mm(grad.t(), layer_input);
    grad_biases[i] = grad.sum(0);
    if (i == 0 && !input_grad) return {};
    at::Tensor grad_input = at::mm(grad, weights[i]);
    if (i == 0) return grad_input;
    // tanh' = 1 - tanh^2, from the saved output.
    map_in_place<scalar_t>(grad_input, [](const Vec& g, const Vec& h) { return g * (Vec(scalar_t(1)) - h * h); },
                           hidden[i - 1]);
    grad = grad_input;
  }
}

// z [B K, d] = mean + exp(log_var / 2) eps from encoded = [mean, log_var] [B, 2d] and eps [B, K, d].
template <typename scalar_t>
at::Tensor sample(const at::Tensor& encoded, const at::Tensor& eps) {
  using Vec = Vectorized<scalar_t>;
  const int64_t B = eps.size(0), K = eps.size(1), d = eps.size(2);
  at::Tensor z = at::empty({B * K, d}, eps.options());
  const scalar_t* encoded_ptr = encoded.const_data_ptr<scalar_t>();
  const scalar_t* eps_ptr = eps.const_data_ptr<scalar_t>();
  scalar_t* z_ptr = z.data_ptr<scalar_t>();
  at::parallel_for(0, B, std::max<int64_t>(1, kGrain / (K * d)), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const scalar_t* mean = encoded_ptr + b * 2 * d;
      const scalar_t* log_var = mean + d;
      vector_steps<scalar_t>(d, [&](int64_t j, int64_t count) {
        const Vec mean_j = Vec::loadu(mean + j, count);
        const Vec std_j = (Vec::loadu(log_var + j, count) * Vec(scalar_t(0.5))).exp();
        for (int64_t k = 0; k < K; ++k) {
          const int64_t row = (b * K + k) * d + j;
          at::vec::fmadd(std_j, Vec::loadu(eps_ptr + row, count), mean_j).store(z_ptr + row, count);
        }
      });
    }
  });
  return z;
}

// For logits [B K, D] and x [B, D]: the reconstruction loss -(1/K) sum_k log p(x | logits_k) [B]
// and the residual sigmoid(logits) - x [B K, D], the gradient of -log p with respect to the logits.
template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor> bernoulli_residual(const at::Tensor& logits, const at::Tensor& x, int64_t K) {
  using Vec = Vectorized<scalar_t>;
  const int64_t B = x.size(0), D = x.size(1);
  at::Tensor residual = at::empty_like(logits);
  at::Tensor log_px = at::empty({B * K}, x.options());
  const scalar_t* logits_ptr = logits.const_data_ptr<scalar_t>();
  const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
  scalar_t* residual_ptr = residual.data_ptr<scalar_t>();
  scalar_t* log_px_ptr = log_px.data_ptr<scalar_t>();
  at::parallel_for(0, B * K, row_grain(D), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const scalar_t* l = logits_ptr + row * D;
      const scalar_t* x_row = x_ptr + row / K * D;
      scalar_t* r = residual_ptr + row * D;
      const Vec zero(scalar_t(0)), one(scalar_t(1));
      Vec log_p(scalar_t(0)), logit_sum(scalar_t(0));
      vector_steps<scalar_t>(D, [&](int64_t j, int64_t count) {
        // One exp for both: softplus(l) = max(l, 0) + log1p(e) and sigmoid(l) = 1 / (1 + e) for
        // l >= 0, e / (1 + e) below, with e = exp(-|l|) (as bernoulli_log_prob's kernels).
        const Vec l_j = Vec::loadu(l + j, count), x_j = Vec::loadu(x_row + j, count);
        const Vec e = l_j.abs().neg().exp_u20();
        const Vec term = x_j * l_j - (at::vec::maximum(l_j, zero) + log1p_unit(e));
        log_p += Vec::set(zero, term, count);
        const Vec inverse = one / (one + e);
        const Vec sigmoid = Vec::blendv(e * inverse, inverse, l_j >= zero);
        (sigmoid - x_j).store(r + j, count);
        logit_sum += l_j;  // the partial load's lanes are zeros
      });
      scalar_t sum = at::vec::vec_reduce_all<scalar_t>(vec_add<scalar_t>, log_p);
      // exp_u20 clamps its argument, so a NaN logit would give a finite residual, and x l -
      // softplus(l) is inf - inf at l = +-inf: a row whose logits do not sum to a finite value is
      // redone exactly (NaN stays NaN), as bernoulli_log_prob does.
      if (!std::isfinite(at::vec::vec_reduce_all<scalar_t>(vec_add<scalar_t>, logit_sum)) || !std::isfinite(sum)) {
        sum = 0;
        for (int64_t j = 0; j < D; ++j) {
          sum += bernoulli_term(l[j], x_row[j]);
          r[j] = scalar_t(1) / (scalar_t(1) + std::exp(-l[j])) - x_row[j];
        }
      }
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
  return {reconstruction, residual};
}

// encoded's gradient [B, 2d] from z's [B K, d] and the KL's [B]: d mean = sum_k dz + g mean,
// d log_var = exp(log_var / 2) / 2 sum_k dz eps + g expm1(log_var) / 2.
template <typename scalar_t>
at::Tensor sample_backward(const at::Tensor& grad_z, const at::Tensor& grad_kl, const at::Tensor& encoded,
                           const at::Tensor& eps) {
  using Vec = Vectorized<scalar_t>;
  const int64_t B = eps.size(0), K = eps.size(1), d = eps.size(2);
  at::Tensor grad_encoded = at::empty({B, 2 * d}, eps.options());
  const scalar_t* grad_z_ptr = grad_z.const_data_ptr<scalar_t>();
  const scalar_t* grad_kl_ptr = grad_kl.const_data_ptr<scalar_t>();
  const scalar_t* encoded_ptr = encoded.const_data_ptr<scalar_t>();
  const scalar_t* eps_ptr = eps.const_data_ptr<scalar_t>();
  scalar_t* out_ptr = grad_encoded.data_ptr<scalar_t>();
  at::parallel_for(0, B, std::max<int64_t>(1, kGrain / (K * d)), [&](int64_t begin, int64_t end) {
    const Vec half(scalar_t(0.5));
    for (int64_t b = begin; b < end; ++b) {
      const scalar_t* mean = encoded_ptr + b * 2 * d;
      const Vec grad_kl_b(grad_kl_ptr[b]);
      vector_steps<scalar_t>(d, [&](int64_t j, int64_t count) {
        Vec grad_sum(scalar_t(0)), grad_eps_sum(scalar_t(0));
        for (int64_t k = 0; k < K; ++k) {
          const int64_t row = (b * K + k) * d + j;
          const Vec grad_z_j = Vec::loadu(grad_z_ptr + row, count);
          grad_sum += grad_z_j;
          grad_eps_sum = at::vec::fmadd(grad_z_j, Vec::loadu(eps_ptr + row, count), grad_eps_sum);
        }
        const Vec log_var_j = Vec::loadu(mean + d + j, count);
        at::vec::fmadd(grad_kl_b, Vec::loadu(mean + j, count), grad_sum).store(out_ptr + b * 2 * d + j, count);
        const Vec from_samples = half * (log_var_j * half).exp() * grad_eps_sum;
        at::vec::fmadd(grad_kl_b * half, log_var_j.expm1(), from_samples).store(out_ptr + b * 2 * d + d + j, count);
      });
    }
  });
  return grad_encoded;
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
  return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mlp_vae", [&] {
    const at::Tensor x_c = x.contiguous(), eps_c = eps.contiguous();
    // The backward's tensors: encoder hidden, encoded, z, decoder hidden, residual.
    std::vector<at::Tensor> saved;
    const at::Tensor encoded = mlp_forward<scalar_t>(x_c, encoder_weights, encoder_biases, saved);
    saved.push_back(encoded);
    const at::Tensor z = sample<scalar_t>(encoded, eps_c);
    saved.push_back(z);
    const at::Tensor kl = gaussian_kl_rows<scalar_t>(encoded.view({-1, 1, 2 * d}).narrow(2, 0, d),
                                                     encoded.view({-1, 1, 2 * d}).narrow(2, d, d));
    const at::Tensor logits = mlp_forward<scalar_t>(z, decoder_weights, decoder_biases, saved);
    auto [reconstruction, residual] = bernoulli_residual<scalar_t>(logits, x_c, K);
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
  return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mlp_vae_backward", [&] {
    using Vec = Vectorized<scalar_t>;
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

    // d reconstruction_b / d logits = residual / K.
    at::Tensor grad_logits = at::empty_like(residual);
    const scalar_t* grad_rec_ptr = grad_rec.const_data_ptr<scalar_t>();
    const scalar_t* residual_ptr = residual.const_data_ptr<scalar_t>();
    scalar_t* grad_logits_ptr = grad_logits.data_ptr<scalar_t>();
    const int64_t D = residual.size(1);
    at::parallel_for(0, B * K, row_grain(D), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const Vec scale(grad_rec_ptr[row / K] / scalar_t(K));
        vector_steps<scalar_t>(D, [&](int64_t j, int64_t count) {
          (scale * Vec::loadu(residual_ptr + row * D + j, count)).store(grad_logits_ptr + row * D + j, count);
        });
      }
    });
    const at::Tensor grad_z = mlp_backward<scalar_t>(grad_logits, z, decoder_weights, decoder_hidden, decoder_grads,
                                                     decoder_grads + decoder_layers, true);
    const at::Tensor grad_encoded = sample_backward<scalar_t>(grad_z, grad_kl_c, encoded, eps_c);
    mlp_backward<scalar_t>(grad_encoded, x_c, encoder_weights, encoder_hidden, encoder_grads,
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
