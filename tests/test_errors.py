"""Bad arguments that raised a raw torch or Python error, or none (issue 19): each must raise a
ValueError or TypeError whose message starts with the public function (or module) and names the
argument."""

import pytest
import torch
from torch import nn

import vaekernels
from vaekernels import nn as vnn
from vaekernels.nn import CausalAttention2d, GatedPixelCNN, GatedPixelCNNLayer


def _mlp():
    return nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 3))


def _encode(x):
    return torch.zeros(len(x), 2), torch.zeros(len(x), 2)


_Q = torch.zeros(1, 5, 4)
_LAYER = GatedPixelCNNLayer(2, 4, 3, skip_channels=2, cond_features=3)
_MODEL = GatedPixelCNN(channels=4, layers=1, num_classes=3, first_kernel=3)
_ATTEND = CausalAttention2d(4, 5, key_channels=4, value_channels=4, heads=2)
_IMAGE = torch.zeros(2, 1, 4, 4)

CASES = [
    # causal_attention
    (lambda: vaekernels.causal_attention(_Q, _Q, _Q, scale="a"), TypeError, "causal_attention: scale must be a real"),
    (lambda: vaekernels.causal_attention(_Q, _Q, _Q, scale=torch.ones(2)), TypeError, "causal_attention: scale must"),
    (
        lambda: vaekernels.causal_attention(_Q, _Q, _Q, scale=float("nan")),
        ValueError,
        "causal_attention: scale must be finite",
    ),
    (
        lambda: vaekernels.causal_attention(_Q[:, :0], _Q[:, :0], _Q[:, :0]),
        ValueError,
        r"causal_attention: q must have at least one position \(L >= 1\)",
    ),
    (
        lambda: vaekernels.causal_attention(_Q, _Q, _Q[..., :0]),
        ValueError,
        r"causal_attention: v must have a non-empty last dim \(Dv >= 1\)",
    ),
    # gated_activation
    (lambda: vaekernels.gated_activation(torch.zeros(0, 4, 3)), ValueError, r"gated_activation: x must have B >= 1"),
    (lambda: vaekernels.gated_activation(torch.zeros(2, 0, 3)), ValueError, r"gated_activation: x must have .*C >= 1"),
    # log_mean_exp
    (lambda: vaekernels.log_mean_exp(torch.zeros(2, 3), dim="a"), TypeError, "log_mean_exp: dim must be an int"),
    # importance_sampled_nll
    (
        lambda: vaekernels.importance_sampled_nll(torch.ones(2, 3), None, lambda z: z),
        TypeError,
        "importance_sampled_nll: encode must be a callable",
    ),
    (
        lambda: vaekernels.importance_sampled_nll(
            torch.ones(2, 3), _encode, lambda z: torch.zeros(2, z.shape[1], 5), 4
        ),
        ValueError,
        r"importance_sampled_nll: decode\(z\) must return \[B, k, \*event\] = \[2, 4, 3\]",
    ),
    (
        lambda: vaekernels.importance_sampled_nll(torch.ones(2, 3), lambda x: x, lambda z: z, 4),
        TypeError,
        r"importance_sampled_nll: encode\(x\) must return a \(mean, log_var\) pair",
    ),
    # the Jacobian ops
    (
        lambda: vaekernels.jacobian_column_sq_norms(_mlp(), torch.zeros(3, 2, dtype=torch.float64)),
        TypeError,
        r"jacobian_column_sq_norms: z must have the dtype of the decoder's parameters \(torch.float32\)",
    ),
    (
        lambda: vaekernels.jacobian_gram(_mlp().double(), torch.zeros(3, 2)),
        TypeError,
        r"jacobian_gram: z must have the dtype of the decoder's parameters",
    ),
    (
        lambda: vaekernels.jacobian_column_sq_norms(_mlp(), torch.zeros(3, 2), columns="a"),
        TypeError,
        "jacobian_column_sq_norms: columns must be",
    ),
    (
        lambda: vaekernels.grae_regularizer(_mlp(), torch.zeros(3, 5), 1.0),
        ValueError,
        r"grae_regularizer: z must have shape \[B, 2\]",
    ),
    (
        lambda: vaekernels.grae_regularizer(_mlp(), torch.zeros(3, 5), 1.0, exact=True),
        ValueError,
        r"grae_regularizer: z must have shape \[B, 2\]",
    ),
    (
        lambda: vaekernels.grae_regularizer(_mlp(), torch.zeros(3, 2, dtype=torch.float64), 1.0),
        TypeError,
        r"grae_regularizer: z must have the dtype",
    ),
    # CausalAttention2d
    (lambda: CausalAttention2d(4, 5, heads=0), ValueError, r"nn.CausalAttention2d: heads must be an int >= 1, got 0"),
    (lambda: CausalAttention2d(4, 5, heads=3), ValueError, r"nn.CausalAttention2d: key_channels \(16\) and value"),
    (lambda: CausalAttention2d(0, 5), ValueError, r"nn.CausalAttention2d: query_channels must be an int >= 1"),
    (
        lambda: _ATTEND(torch.zeros(1, 3, 4, 4), torch.zeros(1, 5, 4, 4)),
        ValueError,
        r"nn.CausalAttention2d: query must have shape \[B, 4, H, W\] with B, H, W >= 1, got \[1, 3, 4, 4\]",
    ),
    (lambda: _ATTEND(torch.zeros(1, 4, 16), torch.zeros(1, 5, 16)), ValueError, r"nn.CausalAttention2d: query must"),
    (
        lambda: _ATTEND(torch.zeros(1, 4, 4, 4), torch.zeros(1, 5, 4, 3)),
        ValueError,
        r"nn.CausalAttention2d: context must have query's batch and spatial size",
    ),
    # GatedPixelCNNLayer
    (lambda: GatedPixelCNNLayer(1, 0), ValueError, r"nn.GatedPixelCNNLayer: channels must be an int >= 1, got 0"),
    (
        lambda: GatedPixelCNNLayer(1, 4, skip_channels=-1),
        ValueError,
        r"nn.GatedPixelCNNLayer: skip_channels must be an int >= 0, got -1",
    ),
    (lambda: GatedPixelCNNLayer(1, 4, cond_features=2.5), TypeError, r"nn.GatedPixelCNNLayer: cond_features must be"),
    (
        lambda: _LAYER(torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4, 4), torch.zeros(1, 5)),
        ValueError,
        r"nn.GatedPixelCNNLayer: cond must have shape \[B, cond_features\] = \[B, 3\], got \[1, 5\]",
    ),
    (
        lambda: _LAYER(torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4, 5), torch.zeros(1, 3)),
        ValueError,
        r"nn.GatedPixelCNNLayer: h must have v's shape \[1, 2, 4, 4\], got \[1, 2, 4, 5\]",
    ),
    (
        lambda: _LAYER(torch.zeros(1, 2, 4, 4).long(), torch.zeros(1, 2, 4, 4), torch.zeros(1, 3)),
        TypeError,
        r"nn.GatedPixelCNNLayer: v must be a floating-point tensor",
    ),
    (
        lambda: _LAYER(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4), torch.zeros(1, 3)),
        ValueError,
        r"nn.GatedPixelCNNLayer: v must have shape \[B, in_channels = 2, H, W\]",
    ),
    # GatedPixelCNN
    (lambda: GatedPixelCNN(layers=0), ValueError, r"nn.GatedPixelCNN: layers must be an int >= 1, got 0"),
    (lambda: GatedPixelCNN(levels=1), ValueError, r"nn.GatedPixelCNN: levels must be an int >= 2, got 1"),
    (
        lambda: _MODEL(_IMAGE, torch.tensor([0, 3])),
        ValueError,
        r"nn.GatedPixelCNN: y must hold class labels in \[0, 2\]",
    ),
    (lambda: _MODEL(_IMAGE, torch.tensor([0, -1])), ValueError, r"nn.GatedPixelCNN: y must hold class labels"),
    (lambda: _MODEL(_IMAGE, torch.tensor([0.0, 1.0])), TypeError, r"nn.GatedPixelCNN: y must be an integer tensor"),
    (lambda: _MODEL(_IMAGE, torch.tensor([0, 1, 2])), ValueError, r"nn.GatedPixelCNN: y must have shape \[B\] = \[2\]"),
    (
        lambda: _MODEL(torch.zeros(2, 2, 4, 4), torch.tensor([0, 1])),
        ValueError,
        r"nn.GatedPixelCNN: x must have shape \[B, in_channels = 1, H, W\]",
    ),
    (lambda: _MODEL.sample(0, (4, 4), torch.tensor(1)), ValueError, r"nn.GatedPixelCNN.sample: n must be an int >= 1"),
    (
        lambda: _MODEL.sample(2, 4, torch.tensor(1)),
        TypeError,
        r"nn.GatedPixelCNN.sample: size must be a \(height, width\)",
    ),
    (lambda: _MODEL.sample(2, (0, 4), torch.tensor(1)), ValueError, r"nn.GatedPixelCNN.sample: size\[0\] \(height\)"),
    (lambda: GatedPixelCNN(gate="relu"), ValueError, r"nn.GatedPixelCNN: gate must be one of"),
    (lambda: GatedPixelCNN(first_kernel=4), ValueError, r"nn.GatedPixelCNN: first_kernel must be an odd int >= 3"),
    # MaskedConv2d, masked_conv2d
    (lambda: vnn.MaskedConv2d(0, 4, 3), ValueError, r"nn.MaskedConv2d: in_channels must be an int >= 1, got 0"),
    (lambda: vnn.MaskedConv2d(2, 4, 2.5), TypeError, r"nn.MaskedConv2d: kernel_size must be an int or a pair"),
    (
        lambda: vaekernels.masked_conv2d(torch.zeros(1, 2, 0, 4), torch.zeros(3, 2, 3, 3)),
        ValueError,
        r"masked_conv2d: x must have non-empty dims",
    ),
    (
        lambda: _ATTEND(torch.zeros(0, 4, 3, 3), torch.zeros(0, 5, 3, 3)),
        ValueError,
        r"nn.CausalAttention2d: query must have shape \[B, 4, H, W\] with B, H, W >= 1",
    ),
    # modules name themselves (or the method called), not the functional op they wrap
    (
        lambda: vnn.IWAEBound()(torch.zeros(2, 3, 5), torch.zeros(1, 5), torch.zeros(2, 3), torch.zeros(2, 3)),
        ValueError,
        r"nn.IWAEBound: x must have shape \[B, \*event\] = \[2, 5\], got \[1, 5\]",
    ),
    (
        lambda: vnn.IWAEBound()(torch.zeros(2, 3, 5), torch.ones(2, 5), torch.zeros(2, 3), None),
        ValueError,
        r"nn.IWAEBound: log_qz must be a \[B, K\] tensor",
    ),
    (lambda: vnn.BernoulliLinear(0, 3), ValueError, r"nn.BernoulliLinear: in_features must be an int >= 1, got 0"),
    (
        lambda: vnn.BernoulliLinear(4, 5).iwae_bound(
            torch.zeros(2, 3, 6), torch.ones(2, 5), torch.zeros(2, 3), torch.zeros(2, 3)
        ),
        ValueError,
        r"nn.BernoulliLinear.iwae_bound: h must have shape \[B, K, in_features = 4\] with B, K >= 1, got \[2, 3, 6\]",
    ),
    (
        lambda: vnn.BernoulliLinear(4, 5).expected_log_prob(torch.zeros(2, 3, 4).double(), torch.ones(2, 5)),
        TypeError,
        r"nn.BernoulliLinear.expected_log_prob: h must have the dtype of the layer's parameters",
    ),
    (
        lambda: vnn.BernoulliLinear(4, 5).expected_log_prob(torch.zeros(2, 3, 4), torch.ones(2, 4)),
        ValueError,
        r"nn.BernoulliLinear.expected_log_prob: x must have shape \[B, \*event\]",
    ),
    (lambda: vnn.GRAERegularizer(-1.0), ValueError, r"nn.GRAERegularizer: beta must be a positive number"),
    (lambda: vnn.GRAERegularizer(1.0, exact="yes"), TypeError, r"nn.GRAERegularizer: exact must be a bool"),
    (
        lambda: vnn.GRAERegularizer(1.0)(_mlp(), torch.zeros(3, 5)),
        ValueError,
        r"nn.GRAERegularizer: z must have shape \[B, 2\]",
    ),
    (
        lambda: vnn.GRAERegularizer(1.0, num_columns=5)(_mlp(), torch.zeros(3, 2)),
        ValueError,
        r"nn.GRAERegularizer: num_columns must be an integer in \[1, 2\]",
    ),
    (
        lambda: vnn.MaskedConv2d(2, 4, 3)(torch.zeros(1, 3, 4, 4)),
        ValueError,
        r"nn.MaskedConv2d: x must have shape \[B, in_channels = 2, H, W\] with B, H, W >= 1, got \[1, 3, 4, 4\]",
    ),
    (
        lambda: vnn.MaskedConv2d(2, 4, 3)(torch.zeros(1, 2, 4, 4).double()),
        TypeError,
        r"nn.MaskedConv2d: x must have the dtype of the module's parameters",
    ),
    (lambda: vnn.MaskedConv2d(2, 4, 3, stride=None), TypeError, r"nn.MaskedConv2d: stride must be an int or a pair"),
    (
        lambda: vnn.MaskedConv2d(2, 4, 3, channel_groups="a"),
        TypeError,
        r"nn.MaskedConv2d: channel_groups must be an int",
    ),
    (
        lambda: _MODEL.sample(1, (2, 2), torch.tensor(5)),
        ValueError,
        r"nn.GatedPixelCNN.sample: y must hold class labels",
    ),
    (lambda: vnn.InvertibleDownsample()("a"), TypeError, r"nn.InvertibleDownsample: input must be a torch.Tensor"),
    (
        lambda: vnn.AdditiveCoupling(nn.Linear(2, 2))(torch.zeros(3, 4).double()),
        TypeError,
        r"nn.AdditiveCoupling: input must have the dtype of the block's parameters \(torch.float32\)",
    ),
    (
        lambda: vnn.AffineCoupling(nn.Linear(2, 4))(torch.zeros(3, 6)),
        ValueError,
        r"nn.AffineCoupling: net could not be applied to a half of shape \[3, 3\]",
    ),
    # functions
    (
        lambda: vaekernels.importance_sampled_nll(
            torch.ones(2, 3), _encode, lambda z: torch.zeros(2, z.shape[1], 3).long(), 4
        ),
        TypeError,
        r"importance_sampled_nll: decode\(z\) must be a floating-point tensor, got dtype torch.int64",
    ),
    (
        lambda: vaekernels.aggregate_posterior_log_density(_Q[0], _Q[0], _Q[0], per_dim="a"),
        TypeError,
        "aggregate_posterior_log_density: per_dim must be a bool",
    ),
    (
        lambda: vaekernels.discretized_logistic_mixture_sample(torch.zeros(0, 30, 2, 2), 3, 3),
        ValueError,
        r"discretized_logistic_mixture_sample: params must have non-empty dims",
    ),
    (
        lambda: vaekernels.discretized_logistic_mixture_sample(torch.zeros(1, 30, 2, 2), 3, 3, "a"),
        TypeError,
        "discretized_logistic_mixture_sample: generator must be a torch.Generator",
    ),
    (
        lambda: vaekernels.importance_sampled_nll(
            torch.ones(2, 3), _encode, lambda z: torch.zeros(2, z.shape[1], 4), 4, output_layer=nn.Linear(4, 5)
        ),
        ValueError,
        r"importance_sampled_nll: output_layer must have out_features = 3",
    ),
    (
        lambda: vaekernels.importance_sampled_nll(
            torch.ones(2, 3), _encode, lambda z: torch.zeros(2, z.shape[1], 5), 4, output_layer=nn.Linear(4, 3)
        ),
        ValueError,
        r"importance_sampled_nll: decode\(z\) must return the output layer's input \[B, k, in_features\] = \[2, 4, 4\]",
    ),
    # the reversible stack
    (
        lambda: vaekernels.reversible_sequential(None, torch.zeros(3, 4)),
        TypeError,
        "reversible_sequential: blocks must be a sequence of invertible modules, got NoneType",
    ),
    (
        lambda: vnn.AdditiveCoupling(nn.Linear(2, 2))("a"),
        TypeError,
        "nn.AdditiveCoupling: input must be a torch.Tensor",
    ),
    # a block that cannot take the stream: the error names the call the user made, then the block
    (
        lambda: vaekernels.reversible_sequential([vnn.AdditiveCoupling(nn.Linear(2, 2))], torch.zeros(3, 4).double()),
        ValueError,
        r"reversible_sequential: blocks\[0\] \(AdditiveCoupling\) could not be applied to the halves "
        r"\[3, 2\] and \[3, 2\] \(torch.float64\) of its input: .*same dtype",
    ),
    (
        lambda: vnn.ReversibleSequential(vnn.AdditiveCoupling(nn.Linear(2, 2)))(torch.zeros(3, 4, 5)),
        ValueError,
        r"nn.ReversibleSequential: blocks\[0\] \(AdditiveCoupling\) could not be applied",
    ),
    (
        lambda: vnn.ReversibleSequential(vnn.AdditiveCoupling(nn.Linear(2, 2)))(torch.zeros(3, 5)),
        ValueError,
        r"nn.ReversibleSequential: blocks\[0\] \(AdditiveCoupling\) could not be applied .*even channel count",
    ),
]


def test_exact_grae_of_a_non_finite_gram_matrix_is_nan_not_an_error():
    # The Cholesky factorisation fails on a NaN Gram matrix; the regulariser says NaN for that
    # example (as the reference's logdet) instead of raising for the whole batch.
    z = torch.tensor([[0.1, 0.2], [float("nan"), 0.0]])
    out = vaekernels.grae_regularizer(_mlp(), z, 1.0, exact=True)
    assert torch.isfinite(out[0]) and torch.isnan(out[1])


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_linear_iwae_bound_checks_log_pz_and_q_on_every_backend(backend):
    # The reference path went straight to the oracle: a bad log_pz or q met a raw torch error there.
    h, weight, x = torch.zeros(2, 3, 4), torch.zeros(5, 4), torch.ones(2, 5)
    with vaekernels.use_backend(backend):
        with pytest.raises(ValueError, match=r"^vaekernels.linear_iwae_bound: log_pz must have shape \[B, K\]"):
            vaekernels.linear_iwae_bound(h, weight, None, x, torch.zeros(2, 4), torch.zeros(2, 3))
        with pytest.raises(ValueError, match=r"^vaekernels.linear_iwae_bound: estimator 'dreg' needs z="):
            vaekernels.linear_iwae_bound(h, weight, None, x, torch.zeros(2, 3), None, estimator="dreg")
        with pytest.raises(TypeError, match=r"^vaekernels.linear_iwae_bound: q must be a \(mean, log_var\) pair"):
            vaekernels.linear_iwae_bound(h, weight, None, x, torch.zeros(2, 3), None, z=torch.zeros(2, 3, 2), q="a")


@pytest.mark.parametrize("call, error, message", CASES)
def test_bad_argument_gets_an_error_naming_the_function_and_the_argument(call, error, message):
    with pytest.raises(error, match=f"^vaekernels.{message}"):
        call()
