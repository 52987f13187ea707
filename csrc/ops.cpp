// Every vaekernels op schema, declared once. Kernels register themselves elsewhere:
// csrc/cpu/*.cpp for the CPU key (one extension per CPU capability, loaded at run time),
// csrc/cuda/*_binding.cpp for the CUDA key; fake kernels and autograd live in Python
// (vaekernels/ops/*.py).
//
// Row-reduction ops take rank-3 views [P, Q, D] whose last dim is contiguous and whose
// leading strides may be zero, so an input broadcast over samples (x over K) is never copied.
#include <torch/library.h>
#ifdef TORCH_EXTENSION_NAME
#include <pybind11/pybind11.h>
#endif

TORCH_LIBRARY(vaekernels, m) {
  // log(mean(exp(x))) over the last dim of a contiguous [R, N] tensor -> [R].
  m.def("log_mean_exp(Tensor x) -> Tensor");
  // Its x gradient grad[r] * exp(x[r, n] - out[r]) / N: the softmax weights, 0 on a row of all -inf.
  m.def("log_mean_exp_backward(Tensor grad, Tensor x, Tensor out) -> Tensor");
  // sum_d x*l - softplus(l) over [P, Q, D] -> [P, Q], and its logits gradient grad*(x - sigmoid(l)).
  m.def("bernoulli_log_prob(Tensor logits, Tensor x) -> Tensor");
  m.def("bernoulli_log_prob_backward(Tensor grad, Tensor logits, Tensor x) -> Tensor");
  // sum_d log N(x; mean, exp(log_var)) over [P, Q, D] -> [P, Q].
  m.def("gaussian_log_prob(Tensor x, Tensor mean, Tensor log_var) -> Tensor");
  // Its gradients with respect to the inputs asked for, in the order x, mean, log_var: [P, Q, D] each.
  m.def("gaussian_log_prob_backward(Tensor grad, Tensor x, Tensor mean, Tensor log_var, bool x_grad, "
        "bool mean_grad, bool log_var_grad) -> Tensor[]");
  // KL(N(mean, exp(log_var)) || N(0, I)) summed over the last dim of [P, Q, D] -> [P, Q].
  m.def("gaussian_kl(Tensor mean, Tensor log_var) -> Tensor");
  // For z [B, d] and a batch of posteriors (mean, log_var) [N, d], with the terms
  // l[i, j, k] = log N(z_ik; mean_jk, exp(log_var_jk)) = -log(2 pi var_jk) / 2 - w_ijk^2,
  // w = (z_ik - mean_jk) / sqrt(2 var_jk), and nearest[i, k] = min_j |w_ijk| (0 where that is inf):
  //   joint[i]       = logsumexp_j sum_k (l[i, j, k] + nearest[i, k]^2)   -> [B]
  //   marginal[i, k] = logsumexp_j       (l[i, j, k] + nearest[i, k]^2)   -> [B, d]
  //   nearest[i, k]                                                        -> [B, d]
  // without materialising the [B, N, d] table; the backward recomputes it block by block.
  // The log-densities are joint - sum_k nearest^2 and marginal - nearest^2. Each term is taken as
  // -log(2 pi var) / 2 - (|w| - nearest)(|w| + nearest), so the nearest posterior's is finite
  // where w^2 overflows (a code 1e30 away in float32), and the total correlation, joint - sum_k
  // marginal, is finite wherever its value is. The backward's gradients are those of the
  // log-densities (nearest a constant; it has none).
  // The marginal costs an exp per (i, j, k) where the joint costs one per (i, j), so a caller that
  // needs only the joint passes with_marginal=false and gets an empty [B, 0] marginal; the
  // backward then takes that [B, 0] marginal with a [B, 0] grad_marginal and skips its term.
  m.def("aggregate_posterior(Tensor z, Tensor mean, Tensor log_var, bool with_marginal) -> (Tensor, Tensor, Tensor)");
  m.def("aggregate_posterior_backward(Tensor grad_joint, Tensor grad_marginal, Tensor z, Tensor mean, Tensor log_var, Tensor joint, Tensor marginal, Tensor nearest) -> (Tensor, Tensor, Tensor)");
  // The decoder's output layer fused with the Bernoulli likelihood and the bound (ops/linear_iwae.py).
  // h [B, K, H], weight [D, H], bias [D] or none, x [B, D], log_ratio = log p(z) - log q(z|x) [B, K]:
  // logits h W^T + b are made chunk_rows rows at a time and consumed at once, never [B, K, D].
  // Returns (bound [B], log p(x|z) [B, K], the weights d bound / d log_ratio [B, K]) and, with
  // with_grads, the gradients of sum_b bound_b for h [B, K, H], weight [D, H] and bias [D] (else
  // empty [0] tensors), computed in the same pass. elbo: the mean over K instead of the log-mean-exp.
  m.def("linear_bernoulli_iwae(Tensor h, Tensor weight, Tensor? bias, Tensor x, Tensor log_ratio, bool elbo, bool with_grads, SymInt chunk_rows) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Gradients for (h, weight, bias, log_ratio): the forward's, scaled, when grad_bound is the same
  // for every example and log p(x|z) fed nothing; otherwise (or after a forward without them)
  // recomputed chunk by chunk.
  m.def("linear_bernoulli_iwae_backward(Tensor grad_bound, Tensor grad_log_px, Tensor h, Tensor weight, Tensor? bias, Tensor x, Tensor weights, Tensor grad_h, Tensor grad_weight, Tensor grad_bias, SymInt chunk_rows) -> (Tensor, Tensor, Tensor, Tensor)");
  // The whole loss of an MLP VAE (ops/mlp_vae.py): x [B, D] in [0, 1], eps [B, K, d] ~ N(0, I), and
  // the weights [out, in] and biases [out] of a tanh MLP encoder D -> 2d (its last layer linear:
  // [mean, log_var]) and of a tanh MLP decoder d -> D (its last layer linear: Bernoulli logits).
  // Returns per example the reconstruction loss -(1/K) sum_k log p(x | z_k), z_k = mean +
  // exp(log_var / 2) eps_k, and KL(q(z | x) || N(0, I)), each [B], and what the backward reads: the
  // encoder's hidden outputs, [mean, log_var] [B, 2d], z [B K, d], the decoder's hidden outputs and
  // sigmoid(logits) - x [B K, D]. The backward returns the gradients of the encoder's weights, its
  // biases, the decoder's weights and its biases, in that order (x and eps get none).
  m.def("mlp_vae(Tensor x, Tensor eps, Tensor[] encoder_weights, Tensor[] encoder_biases, Tensor[] decoder_weights, Tensor[] decoder_biases) -> (Tensor, Tensor, Tensor[])");
  m.def("mlp_vae_backward(Tensor grad_reconstruction, Tensor grad_kl, Tensor x, Tensor eps, Tensor[] encoder_weights, Tensor[] decoder_weights, Tensor[] saved) -> Tensor[]");

  // Reversible family. One step of a coupling block's backward walk, in place on two
  // contiguous tensors of one shape: stream -= update (a half of the block's input rebuilt from
  // its output, e.g. x2 = y2 - G(y1)) and grad += grad_update (the gradient the recomputed
  // branch sent to the other half). update and grad_update are read only.
  m.def("coupling_backward_step(Tensor(a!) stream, Tensor update, Tensor(b!) grad, Tensor grad_update) -> ()");

  // Decoder Jacobians (forward mode through an MLP decoder, ops/jacobian.py).
  // One activation layer: pre [B, h], tangent [P, k, h] with P = B, or 1 for a tangent shared by
  // the batch -> (act(pre) [B, h], act'(pre)[:, None, :] * tangent [B, k, h]). activation is one of
  // tanh, sigmoid, relu, leaky_relu, softplus, elu, gelu; p0 is leaky_relu's slope, elu's alpha or
  // softplus's beta, p1 softplus's threshold. The backward takes the output gradients (grad_out
  // may be None: the output fed nothing) and returns the pre gradient and the tangent gradient
  // [P, k, h]: for a shared tangent (P = 1) its sum over the batch.
  m.def("jacobian_tangent_step(Tensor pre, Tensor tangent, str activation, float p0, float p1) -> (Tensor, Tensor)");
  m.def("jacobian_tangent_step_backward(Tensor? grad_out, Tensor grad_tangent, Tensor pre, Tensor tangent, str activation, float p0, float p1) -> (Tensor, Tensor)");
  // tangent T [B, k, h], symmetric metric M [h, h] (WᵀW of the last linear layer): T M Tᵀ per
  // example [B, k, k], or with diagonal=true only its diagonal [B, k] (the squared column norms);
  // second output T M [B, k, h], which the backward reuses: d/dT of the norms is 2 g (T M).
  m.def("jacobian_gram_reduce(Tensor tangent, Tensor metric, bool diagonal) -> (Tensor, Tensor)");

  // PixelCNN family: the discretised logistic mixture and causal attention (csrc/cpu/logistic_mixture.cpp,
  // csrc/cpu/causal_attention.cpp).
  // params [B, P, H, W] (P = 10 M for x [B, 3, H, W], 3 M for x [B, 1, H, W]) -> the per-pixel NLL [B, H, W];
  // the backward recomputes every pixel's mixture from the inputs and that NLL.
  m.def("discretized_logistic_mixture_nll(Tensor params, Tensor x, int num_mixtures) -> Tensor");
  m.def("discretized_logistic_mixture_nll_backward(Tensor grad, Tensor params, Tensor x, Tensor nll, int num_mixtures) -> Tensor");
  // Strictly causal softmax attention over q, k [N, L, D], v [N, L, Dv]: position i attends to j < i
  // (position 0 to nothing: zeros). Returns the output [N, L, Dv] and the row log-sum-exp [N, L]
  // (-inf on row 0), all the backward keeps besides the inputs; it recomputes the scores block by block.
  m.def("causal_attention(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor, Tensor)");
  m.def("causal_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float scale) -> (Tensor, Tensor, Tensor)");

  // PixelCNN family: the gated activation (csrc/cpu/pixelcnn.cpp). x [B, 2C, N] (rows contiguous,
  // batch and channel strides free), cond [B, 2C] or none, gate 'tanh' | 'linear' ->
  // tanh(a + c_a) * sigmoid(b + c_b) [B, C, N]. The backward recomputes the gate from x and returns
  // (grad_x [B, 2C, N], grad_cond [B, 2C], or an empty [0] tensor without a condition).
  m.def("gated_activation(Tensor x, Tensor? cond, str gate) -> Tensor");
  m.def("gated_activation_backward(Tensor grad, Tensor x, Tensor? cond, str gate) -> (Tensor, Tensor)");
  // PixelCNN++'s concat-ELU (csrc/cpu/pixelcnn.cpp): x [B, C, H, W] (each example contiguous, any
  // batch stride) -> [elu(x), elu(-x)] [B, 2C, H + top + bottom, W + left + right], zero-padded by
  // padding = [left, right, top, bottom] ([] for none) as F.pad would; the backward reads x and the
  // gradient's interior only.
  m.def("concat_elu(Tensor x, int[] padding) -> Tensor");
  m.def("concat_elu_backward(Tensor grad, Tensor x, int[] padding) -> Tensor");
}

namespace {
bool built_with_cuda() {
#ifdef VAEKERNELS_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace

// The Python module exists only in the setup.py build; the CMake build is a plain library.
#ifdef TORCH_EXTENSION_NAME
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "vaekernels op schemas (and the CUDA kernels when built with CUDA)";
  m.def("built_with_cuda", &built_with_cuda, "Whether the CUDA kernels were compiled into this build.");
}
#endif
