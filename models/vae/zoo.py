"""The likelihood-based VAE family on vaekernels' fused ops: one module per method, one interface.

Every model maps a batch to ``(loss, stats)`` in ``forward(x, y=None, generator=None)``, so one
training loop (and DDP) drives them all, and offers ``encode``, ``decode``, ``log_weights`` (the
importance weights the test NLL is estimated from), ``reconstruct`` and ``sample``.

========================  =====================================================================
``vae``                   k-sample ELBO, E_q[log p(x|z)] - KL (Kingma & Welling 2014)
``beta-vae``              E_q[log p(x|z)] - beta KL (Higgins et al. 2017; the seed table's beta = 0.5)
``capacity-vae``          E_q[log p(x|z)] - gamma |KL - C(t)|, C(t) linear to C_max (Burgess et al. 2018)
``geco``                  min KL s.t. E[C] <= kappa^2, Lagrange multiplier as in Rezende & Viola (2018)
``iwae``                  the k-sample importance-weighted bound, estimators iwae / dreg / stl
``geco-iwae``             (lambda - 1) * constraint - L_IWAE, the seed's GECO + IWAE
``hvae`` / ``hiwae``      two stochastic layers q(z1|x) q(z2|z1), p(x|z1) p(z1|z2) p(z2)
``vhp-vae``               hierarchical prior p(z) = int p(z|zeta) p(zeta) learned by an IW bound
                          inside the constrained Lagrangian (Klushyn et al. 2019)
``cvae``                  labels (one-hot) into encoder and decoder (Sohn et al. 2015)
========================  =====================================================================

Architectures: ``mlp`` (the IWAE paper's 784-200-200-d tanh), ``conv`` (two stride-2 convolutions
each way), ``conv64`` (four each way and a 256-unit layer, for 64x64 images) and ``linear``.
Likelihoods: ``bernoulli`` (logits), ``gaussian`` (learned per-pixel log-variance) and
``logistic`` (discretised logistic over 256 levels, learned per-pixel scale).

Example::

    >>> model = build_model("iwae", data_dim=16, image_shape=(4, 4), latent_dim=2, hidden_dim=8, k=3)
    >>> loss, stats = model(torch.bernoulli(torch.full((5, 16), 0.5)))
    >>> loss.shape, sorted(stats)
    (torch.Size([]), ['bound'])
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn

import vaekernels

ARCHITECTURES = ("mlp", "conv", "linear", "conv64")
# Convolutional architectures: (channels of the stride-2 4x4 layers, width of a dense layer after them or None).
# conv64 is Burgess et al.'s (2018) dSprites network, for 64x64 images.
CONV_LAYERS = {"conv": ((32, 64), None), "conv64": ((32, 32, 64, 64), 256)}
LIKELIHOODS = ("bernoulli", "gaussian", "logistic")
ESTIMATORS = ("iwae", "dreg", "stl")
MIN_LOG_SCALE = -6.0  # a pixel that never varies would otherwise drive its Gaussian variance to zero


def mlp(
    in_dim: int, hidden_dim: int, out_dim: int, layers: int = 2, activation=nn.Tanh, output: type[nn.Linear] = nn.Linear
) -> nn.Sequential:
    """``layers`` hidden layers of ``hidden_dim`` units (``activation()`` after each: tanh by default), then a
    linear output (an instance of ``output``).

    >>> mlp(4, 8, 2)(torch.zeros(3, 4)).shape
    torch.Size([3, 2])
    """
    modules, width = [], in_dim
    for _ in range(layers):
        modules += [nn.Linear(width, hidden_dim), activation()]
        width = hidden_dim
    return nn.Sequential(*modules, output(width, out_dim))


def tanh_mlp_layers(net: nn.Sequential) -> tuple[list, list] | None:
    """(weights, biases) of ``net`` where it is linear layers with biases and a tanh between each
    two (what :func:`mlp` builds with its default activation), else None.

    >>> weights, biases = tanh_mlp_layers(mlp(4, 8, 2))
    >>> [list(w.shape) for w in weights]
    [[8, 4], [8, 8], [2, 8]]
    >>> tanh_mlp_layers(mlp(4, 8, 2, activation=nn.ReLU)) is None
    True
    """
    modules = list(net._modules.values())
    linears, activations = modules[0::2], modules[1::2]
    if len(activations) != len(linears) - 1 or not all(type(m) is nn.Tanh for m in activations):
        return None
    if not all(isinstance(m, nn.Linear) and m.bias is not None for m in linears):
        return None
    return [m.weight for m in linears], [m.bias for m in linears]


class Encoder(nn.Module):
    """x [N, D] (and a condition [N, c]) -> (mean, log_var) of a diagonal Gaussian, each [N, d]."""

    def __init__(self, arch: str, image_shape, latent_dim: int, hidden_dim: int, cond_dim: int = 0):
        super().__init__()
        height, width = image_shape
        data_dim = height * width
        if arch in CONV_LAYERS:
            channels, dense = CONV_LAYERS[arch]
            layers = [nn.Unflatten(-1, (1, height, width))]
            for c_in, c_out in itertools.pairwise((1, *channels)):
                layers += [nn.Conv2d(c_in, c_out, 4, 2, 1), nn.ReLU()]
            features = channels[-1] * (height >> len(channels)) * (width >> len(channels))
            layers.append(nn.Flatten())
            if dense:
                layers += [nn.Linear(features, dense), nn.ReLU()]
            self.body = nn.Sequential(*layers)
            self.head = nn.Linear((dense or features) + cond_dim, 2 * latent_dim)
            self.condition_first = False
        else:  # the condition joins the data at the input, as in Sohn et al.
            self.body = nn.Identity()
            self.head = mlp(data_dim + cond_dim, hidden_dim, 2 * latent_dim, 2 if arch == "mlp" else 0)
            self.condition_first = True

    def forward(self, x: torch.Tensor, condition: torch.Tensor | None = None):
        if condition is not None and self.condition_first:
            x = torch.cat([x, condition], -1)
        h = self.body(x)
        if condition is not None and not self.condition_first:
            h = torch.cat([h, condition], -1)
        mean, log_var = self.head(h).chunk(2, dim=-1)
        return mean, log_var


class Decoder(nn.Module):
    """z [B, K, d] (and a condition [B, c]) -> the likelihood's parameters [B, K, D]."""

    def __init__(self, arch: str, image_shape, latent_dim: int, hidden_dim: int, cond_dim: int = 0):
        super().__init__()
        height, width = image_shape
        if arch in CONV_LAYERS:
            channels, dense = CONV_LAYERS[arch]
            small = (channels[-1], height >> len(channels), width >> len(channels))
            layers = [nn.Linear(latent_dim + cond_dim, dense), nn.ReLU()] if dense else []
            layers += [nn.Linear(dense or latent_dim + cond_dim, math.prod(small)), nn.ReLU(), nn.Unflatten(-1, small)]
            widths = channels[::-1] + (1,)
            for c_in, c_out in itertools.pairwise(widths):
                layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1), nn.ReLU()]
            self.net = nn.Sequential(*layers[:-1], nn.Flatten())  # no ReLU on the likelihood's parameters
        else:  # a Bernoulli likelihood and bound can then be fused into the output layer
            self.net = mlp(
                latent_dim + cond_dim,
                hidden_dim,
                height * width,
                2 if arch == "mlp" else 0,
                output=vaekernels.nn.BernoulliLinear,
            )

    @staticmethod
    def _rows(z: torch.Tensor, condition: torch.Tensor | None) -> torch.Tensor:
        if condition is not None:
            z = torch.cat([z, condition.unsqueeze(1).expand(*z.shape[:2], -1)], -1)
        return z.flatten(0, 1)

    def forward(self, z: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(self._rows(z, condition)).unflatten(0, z.shape[:2])

    @property
    def output_layer(self) -> vaekernels.nn.BernoulliLinear | None:
        """The last layer, where it is one that fuses the Bernoulli likelihood (MLP decoders)."""
        last = self.net[-1]
        return last if isinstance(last, vaekernels.nn.BernoulliLinear) else None

    def features(self, z: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        """The output layer's input [B, K, H] (MLP decoders)."""
        rows = self._rows(z, condition)
        for layer in itertools.islice(self.net, len(self.net) - 1):  # slicing would build a Sequential per call
            rows = layer(rows)
        return rows.unflatten(0, z.shape[:2])


def discretized_logistic_log_prob(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Elementwise log-probability of x in {0, 1/255, ..., 1} under a logistic discretised to 256 bins.

    The end bins take the tails (PixelCNN++); a bin too thin for the CDF difference falls back on
    the density times the bin width, so the value stays finite.

    >>> levels = torch.arange(256) / 255  # the 256 bins' masses sum to one
    >>> round(discretized_logistic_log_prob(levels, torch.tensor(0.3), torch.tensor(-3.0)).exp().sum().item(), 4)
    1.0
    """
    half_bin = 0.5 / 255
    inverse_scale = torch.exp(-log_scale)
    centred = x - mean
    upper = (centred + half_bin) * inverse_scale
    lower = (centred - half_bin) * inverse_scale
    log_cdf_upper = nn.functional.logsigmoid(upper)  # log F(x + 1/510), the x = 0 bin
    log_survival_lower = -nn.functional.softplus(lower)  # log (1 - F(x - 1/510)), the x = 1 bin
    mass = torch.sigmoid(upper) - torch.sigmoid(lower)
    mid = centred * inverse_scale
    log_density = mid - log_scale - 2 * nn.functional.softplus(mid) + math.log(2 * half_bin)
    log_mass = torch.where(mass > 1e-5, torch.log(mass.clamp(min=1e-12)), log_density)
    return torch.where(x < half_bin, log_cdf_upper, torch.where(x > 1 - half_bin, log_survival_lower, log_mass))


class Likelihood(nn.Module):
    """p(x | z) from the decoder output: ``log_prob(out [B, K, D], x [B, D]) -> [B, K]``."""

    def __init__(self, kind: str, data_dim: int):
        super().__init__()
        self.kind = kind
        if kind != "bernoulli":  # gaussian: log-variance; logistic: log-scale, per pixel
            self.raw_log_scale = nn.Parameter(torch.full((data_dim,), -2.0 if kind == "gaussian" else -3.0))

    @property
    def log_scale(self) -> torch.Tensor:
        return self.raw_log_scale.clamp(min=MIN_LOG_SCALE)

    @property
    def fused(self) -> bool:
        """Whether :func:`vaekernels.iwae_bound` takes this likelihood directly."""
        return self.kind in ("bernoulli", "gaussian")

    def bound_kwargs(self) -> dict:
        if self.kind == "gaussian":
            return {"likelihood": "gaussian", "log_var": self.log_scale}
        return {"likelihood": "bernoulli"}

    def log_prob(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "bernoulli":
            return vaekernels.bernoulli_log_prob(out, x)
        if self.kind == "gaussian":
            return vaekernels.gaussian_log_prob(x.unsqueeze(1), out, self.log_scale)
        return discretized_logistic_log_prob(x.unsqueeze(1), out, self.log_scale).sum(-1)

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(out) if self.kind == "bernoulli" else out.clamp(0, 1)


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    zero = z.new_zeros(())
    return vaekernels.gaussian_log_prob(z, zero, zero)


def standard_normal_noise(rows: int, k: int, dims: int, like: torch.Tensor, generator=None) -> torch.Tensor:
    """eps ~ N(0, I) [rows, k, dims] on ``like``'s device and dtype: the noise of :func:`reparameterize`."""
    return torch.randn((rows, k, dims), generator=generator, device=like.device, dtype=like.dtype)


def reparameterize(mean, log_var, k: int, generator=None) -> torch.Tensor:
    """k samples z = mean + exp(log_var / 2) * eps per row: [N, d] -> [N, k, d]."""
    eps = standard_normal_noise(mean.shape[0], k, mean.shape[1], mean, generator)
    return mean.unsqueeze(1) + torch.exp(0.5 * log_var).unsqueeze(1) * eps


def reweight_path_gradient(z: torch.Tensor, log_w: torch.Tensor) -> None:
    """DReG (Tucker et al. 2018) for a bound composed outside :func:`vaekernels.iwae_bound`: the gradient
    reaching z [B, K, d], already weighted by w~ = softmax_K(log_w) through the bound, gets w~ once more.

    A row whose weights are all zero (log_w all -inf) passes no gradient, as in the fused bound.

    >>> z = torch.zeros(1, 2, 1, requires_grad=True)
    >>> reweight_path_gradient(z, torch.tensor([[0.0, -float("inf")]]))
    >>> z.sum().backward(); z.grad.flatten().tolist()
    [1.0, 0.0]
    """
    weights = torch.where(torch.isneginf(log_w).all(1, keepdim=True), 0.0, torch.softmax(log_w, dim=1))
    weights = weights.unsqueeze(-1)
    z.register_hook(lambda grad: grad * weights)


class VAE(nn.Module):
    """One stochastic layer, prior N(0, I); the loss is -E_q[log p(x|z)] + beta KL with k samples.

    With ``k > 1`` this is the "VAE" column of Burda et al.'s table: the ELBO averaged over k
    samples (the IWAE column is :class:`IWAE`).
    """

    standard_prior = True

    def __init__(
        self,
        data_dim: int,
        image_shape=None,
        *,
        arch: str = "mlp",
        likelihood: str = "bernoulli",
        latent_dim: int = 50,
        hidden_dim: int = 200,
        num_classes: int = 0,
        k: int = 1,
        beta: float = 1.0,
    ):
        super().__init__()
        image_shape = tuple(image_shape) if image_shape else (1, data_dim)
        if image_shape[0] * image_shape[1] != data_dim:
            raise ValueError(f"models.vae.zoo: image_shape {image_shape} must hold data_dim = {data_dim} pixels")
        if arch in CONV_LAYERS:
            factor = 2 ** len(CONV_LAYERS[arch][0])
            if image_shape[0] % factor or image_shape[1] % factor:
                raise ValueError(
                    f"models.vae.zoo: arch={arch!r} needs height and width divisible by {factor}, got {image_shape}"
                )
        self.data_dim, self.image_shape, self.latent_dim = data_dim, image_shape, latent_dim
        self.num_classes, self.k, self.beta = num_classes, k, beta
        self.encoder = Encoder(arch, image_shape, latent_dim, hidden_dim, num_classes)
        self.decoder = Decoder(arch, image_shape, latent_dim, hidden_dim, num_classes)
        self.likelihood = Likelihood(likelihood, data_dim)

    def condition(self, y):
        if not self.num_classes:
            return None
        if y is None:
            raise ValueError("models.vae.zoo: a conditional model needs labels y, got None")
        return nn.functional.one_hot(y.long(), self.num_classes).to(torch.get_default_dtype())

    def encode(self, x, y=None):
        """(mean, log_var) of q(z|x), each [B, d]."""
        return self.encoder(x, self.condition(y))

    def decode(self, z, y=None):
        """z [B, K, d] -> decoder output [B, K, D]."""
        return self.decoder(z, self.condition(y))

    def log_prior(self, z: torch.Tensor) -> torch.Tensor:
        """log p(z) [B, K] for z [B, K, d]."""
        return standard_normal_log_prob(z)

    @property
    def fused_output_layer(self) -> vaekernels.nn.BernoulliLinear | None:
        """The decoder's output layer where the likelihood and the bound fuse into it (Bernoulli, MLP)."""
        return self.decoder.output_layer if self.likelihood.kind == "bernoulli" else None

    def expected_log_likelihood(self, x, z, y=None) -> torch.Tensor:
        """(1/K) sum_k log p(x | z_k) [B] for z [B, K, d]: the ELBO's reconstruction term."""
        layer = self.fused_output_layer
        if layer is None:
            return self.likelihood.log_prob(self.decode(z, y), x).mean(1)
        return layer.expected_log_prob(self.decoder.features(z, self.condition(y)), x)

    def bound(self, x, y=None, k: int = 1, estimator: str = "iwae", generator=None) -> torch.Tensor:
        """The k-sample importance-weighted bound [B] through :func:`vaekernels.iwae_bound` (or
        :func:`vaekernels.linear_iwae_bound`, with the decoder's output layer, where it fuses)."""
        mean, log_var = self.encode(x, y)
        z = reparameterize(mean, log_var, k, generator)
        layer = self.fused_output_layer
        if layer is not None:
            return layer.iwae_bound(
                self.decoder.features(z, self.condition(y)),
                x,
                self.log_prior(z),
                None,
                estimator=estimator,
                z=z,
                q=(mean, log_var),
            )
        return self._iw_bound(self.decode(z, y), x, z, (mean, log_var), self.log_prior(z), estimator)

    def _iw_bound(self, out, x, z, q, log_pz, estimator):
        if self.likelihood.fused:
            return vaekernels.iwae_bound(
                out, x, log_pz, None, estimator=estimator, z=z, q=q, **self.likelihood.bound_kwargs()
            )
        # The discretised logistic has no fused kernel: the same bound from its parts.
        mean, log_var = (t.detach() if estimator != "iwae" else t for t in q)
        log_w = (
            self.likelihood.log_prob(out, x)
            + log_pz
            - vaekernels.gaussian_log_prob(z, mean.unsqueeze(1), log_var.unsqueeze(1))
        )
        if estimator == "dreg" and z.requires_grad and torch.is_grad_enabled():
            reweight_path_gradient(z, log_w.detach())
        return vaekernels.log_mean_exp(log_w, dim=1)

    @torch.no_grad()
    def log_weights(self, x, y=None, k: int = 1, generator=None) -> torch.Tensor:
        """log p(x, z_k) - log q(z_k | x) [B, k] for k fresh samples (the test NLL's terms)."""
        mean, log_var = self.encode(x, y)
        z = reparameterize(mean, log_var, k, generator)
        log_qz = vaekernels.gaussian_log_prob(z, mean.unsqueeze(1), log_var.unsqueeze(1))
        return self.likelihood.log_prob(self.decode(z, y), x) + self.log_prior(z) - log_qz

    @property
    def fused_layers(self) -> tuple[list, list, list, list] | None:
        """The encoder's and the decoder's weights and biases where the whole loss fuses into
        :func:`vaekernels.mlp_vae`: tanh MLPs, the Bernoulli likelihood, no condition."""
        if self.num_classes or self.likelihood.kind != "bernoulli" or not isinstance(self.encoder.body, nn.Identity):
            return None
        encoder, decoder = tanh_mlp_layers(self.encoder.head), tanh_mlp_layers(self.decoder.net)
        return None if encoder is None or decoder is None else (*encoder, *decoder)

    def terms(self, x, y=None, generator=None):
        """Per-example reconstruction loss -E_q[log p(x|z)] over k samples and analytic KL, each [B]."""
        layers = self.fused_layers
        if layers is not None:
            eps = standard_normal_noise(x.shape[0], self.k, self.latent_dim, x, generator)
            return vaekernels.mlp_vae(x, eps, *layers)
        mean, log_var = self.encode(x, y)
        z = reparameterize(mean, log_var, self.k, generator)
        return -self.expected_log_likelihood(x, z, y), vaekernels.gaussian_kl(mean, log_var)

    def forward(self, x, y=None, generator=None):
        reconstruction, kl = (term.mean() for term in self.terms(x, y, generator))
        return reconstruction + self.beta * kl, {"reconstruction": reconstruction.detach(), "kl": kl.detach()}

    @torch.no_grad()
    def reconstruct(self, x, y=None) -> torch.Tensor:
        """The likelihood's mean at z = E_q[z]: [B, D]."""
        return self.likelihood.mean(self.decode(self.encode(x, y)[0].unsqueeze(1), y)).squeeze(1)

    def sample_latents(self, n: int, generator=None, device=None) -> torch.Tensor:
        return torch.randn((n, 1, self.latent_dim), generator=generator, device=device)

    @torch.no_grad()
    def sample(self, n: int, y=None, generator=None) -> torch.Tensor:
        """n draws from the prior, decoded to the likelihood's mean: [n, D]."""
        device = next(self.parameters()).device
        return self.likelihood.mean(self.decode(self.sample_latents(n, generator, device), y)).squeeze(1)


def capacity(step, capacity_max: float, capacity_steps: int):
    """Burgess et al.'s target KL: rises linearly from 0 to ``capacity_max`` over ``capacity_steps``
    (``step`` an int, or a tensor and then so is the target).

    >>> [capacity(t, 25.0, 100) for t in (0, 50, 100, 1000)]
    [0.0, 12.5, 25.0, 25.0]
    """
    if isinstance(step, torch.Tensor):  # a step counter of the model: the target stays a tensor
        return capacity_max * (step / capacity_steps).clamp(max=1.0)
    return capacity_max * min(1.0, step / capacity_steps)


class CapacityVAE(VAE):
    """beta-VAE with controlled capacity: -E_q[log p(x|z)] + gamma |KL - C(t)|, t counting training steps."""

    def __init__(self, *args, gamma: float = 100.0, capacity_max: float = 25.0, capacity_steps: int = 10000, **kwargs):
        super().__init__(*args, **kwargs)
        self.gamma, self.capacity_max, self.capacity_steps = gamma, capacity_max, capacity_steps
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def forward(self, x, y=None, generator=None):
        reconstruction, kl = self.terms(x, y, generator)
        # From the step buffer as a tensor: a Python number would recompile a compiled loss every step.
        target = capacity(self.step, self.capacity_max, self.capacity_steps)
        if self.training:  # a new tensor, as LagrangeMultiplier's log_lambda, not an in-place update
            self.step = self.step + 1
        loss = reconstruction.mean() + self.gamma * (kl.mean() - target).abs()
        return loss, {"reconstruction": reconstruction.mean().detach(), "kl": kl.mean().detach(), "capacity": target}


class LagrangeMultiplier(nn.Module):
    """GECO's multiplier (Rezende & Viola 2018, Algorithm 1) for the constraint E[C] <= 0.

    lambda starts at 1. At each training step: C_ma <- alpha C_ma + (1 - alpha) C_hat (C_ma = C_hat
    at the first step); the constraint used in the loss is the straight-through
    C = C_hat + stopgrad(C_ma - C_hat) (the value of the moving average, the gradient of the
    batch); after it, log lambda <- log lambda + rate * C. So lambda grows while the constraint is
    violated (C > 0) and shrinks once it is met (C < 0).

    >>> multiplier = LagrangeMultiplier(alpha=0.5, rate=0.1)
    >>> lam, c = multiplier(torch.tensor(2.0))  # violated: lambda rises after this step
    >>> float(lam), round(float(multiplier.value), 4)
    (1.0, 1.2214)
    """

    def __init__(self, alpha: float = 0.99, rate: float = 1e-4):
        super().__init__()
        self.alpha, self.rate = alpha, rate
        self.register_buffer("log_lambda", torch.zeros(()))
        self.register_buffer("moving_average", torch.zeros(()))
        self.register_buffer("started", torch.zeros((), dtype=torch.bool))

    @property
    def value(self) -> torch.Tensor:
        return self.log_lambda.exp()

    def forward(self, constraint: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(lambda for this step's loss, straight-through constraint C) for the batch average C_hat.

        lambda is a tensor taken before this step's update, outside the graph: as a Python number
        it would be a new constant to torch.compile at every step, and a recompilation."""
        lam = self.log_lambda.exp().detach()
        if not self.training:
            return lam, constraint
        with torch.no_grad():  # branch-free, so that a compiled loss keeps one graph
            blended = self.moving_average * self.alpha + (1 - self.alpha) * constraint
            self.moving_average.copy_(torch.where(self.started, blended, constraint))
            self.started.fill_(True)
            # A new tensor, not an in-place update: inductor's backward recomputes lambda from the
            # buffer it was read from, and would read this step's update (seen with torch 2.13).
            self.log_lambda = self.log_lambda + self.rate * self.moving_average
        return lam, constraint + (self.moving_average - constraint).detach()


class GECO(VAE):
    """min KL subject to E[-log p(x|z)] <= kappa^2: loss = KL + lambda * C with C = recon - kappa^2.

    The reconstruction error of the constraint is -log p(x|z) in nats per example (for the Gaussian
    likelihood, the squared error scaled by the variance plus a constant); ``tolerance`` is kappa^2.
    """

    def __init__(self, *args, tolerance: float = 60.0, alpha: float = 0.99, rate: float = 1e-4, **kwargs):
        super().__init__(*args, **kwargs)
        self.tolerance = tolerance
        self.multiplier = LagrangeMultiplier(alpha, rate)

    def forward(self, x, y=None, generator=None):
        reconstruction, kl = self.terms(x, y, generator)
        lam, constraint = self.multiplier(reconstruction.mean() - self.tolerance)
        loss = kl.mean() + lam * constraint
        return loss, {"reconstruction": reconstruction.mean().detach(), "kl": kl.mean().detach(), "lambda": lam}


class IWAE(VAE):
    """Burda et al.'s k-sample bound, with the IWAE, DReG or STL gradient estimator."""

    def __init__(self, *args, estimator: str = "iwae", **kwargs):
        super().__init__(*args, **kwargs)
        if estimator not in ESTIMATORS:
            raise ValueError(f"models.vae.zoo.IWAE: estimator must be one of {ESTIMATORS}, got {estimator!r}")
        self.estimator = estimator

    def forward(self, x, y=None, generator=None):
        bound = self.bound(x, y, self.k, self.estimator, generator)
        return -bound.mean(), {"bound": bound.mean().detach()}


class GECOIWAE(IWAE):
    """The seed's GECO + IWAE: loss = -L_IWAE + (lambda - 1) * C, C = E_k[-log p(x|z_k)] - kappa^2.

    With lambda = 1 it is IWAE; the multiplier follows :class:`LagrangeMultiplier`. DReG is not
    offered: its reweighting of z's gradient would also reweight the constraint's.
    """

    def __init__(self, *args, tolerance: float = 60.0, alpha: float = 0.99, rate: float = 1e-4, **kwargs):
        super().__init__(*args, **kwargs)
        if self.estimator == "dreg":
            raise ValueError("models.vae.zoo.GECOIWAE: estimator must be 'iwae' or 'stl', got 'dreg'")
        self.tolerance = tolerance
        self.multiplier = LagrangeMultiplier(alpha, rate)

    def forward(self, x, y=None, generator=None):
        mean, log_var = self.encode(x, y)
        z = reparameterize(mean, log_var, self.k, generator)
        out = self.decode(z, y)
        bound = self._iw_bound(out, x, z, (mean, log_var), self.log_prior(z), self.estimator)
        reconstruction = -self.likelihood.log_prob(out, x).mean(1)
        lam, constraint = self.multiplier(reconstruction.mean() - self.tolerance)
        loss = -bound.mean() + (lam - 1) * constraint
        return loss, {"bound": bound.mean().detach(), "reconstruction": reconstruction.mean().detach(), "lambda": lam}


class GaussianMLP(nn.Module):
    """input [..., n] -> (mean, log_var) [..., d]: the conditional Gaussians between latent layers."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.net = mlp(in_dim, hidden_dim, 2 * out_dim)

    def forward(self, h):
        mean, log_var = self.net(h).chunk(2, dim=-1)
        return mean, log_var


class HierarchicalVAE(VAE):
    """Two stochastic layers: q(z1|x) q(z2|z1), p(x|z1) p(z1|z2) p(z2) (Burda et al.'s second model).

    ``importance_weighted`` picks the k-sample bound (hiwae) over the k-sample ELBO (hvae); both
    through the fused ops, with log p(z) = log p(z1|z2) + log p(z2) and log q = log q(z1|x) +
    log q(z2|z1) handed to :func:`vaekernels.linear_iwae_bound` (:func:`vaekernels.iwae_bound` for a
    decoder without a fusable output layer). The estimator is IWAE's own.
    """

    standard_prior = False

    def __init__(
        self,
        data_dim,
        image_shape=None,
        *,
        latent_dim: int = 100,
        hidden_dim: int = 100,
        top_latent_dim: int = 50,
        top_hidden_dim: int = 50,
        importance_weighted: bool = False,
        **kwargs,
    ):
        super().__init__(data_dim, image_shape, latent_dim=latent_dim, hidden_dim=hidden_dim, **kwargs)
        self.top_latent_dim, self.importance_weighted = top_latent_dim, importance_weighted
        self.up = GaussianMLP(latent_dim, top_hidden_dim, top_latent_dim)  # q(z2 | z1)
        self.down = GaussianMLP(top_latent_dim, top_hidden_dim, latent_dim)  # p(z1 | z2)

    def _latents(self, x, y, k, generator):
        mean1, log_var1 = self.encode(x, y)
        z1 = reparameterize(mean1, log_var1, k, generator)
        mean2, log_var2 = self.up(z1)
        z2 = mean2 + torch.exp(0.5 * log_var2) * torch.randn(
            z1.shape[:2] + (self.top_latent_dim,), generator=generator, device=x.device, dtype=z1.dtype
        )
        prior_mean1, prior_log_var1 = self.down(z2)
        log_pz = vaekernels.gaussian_log_prob(z1, prior_mean1, prior_log_var1) + standard_normal_log_prob(z2)
        log_qz = vaekernels.gaussian_log_prob(
            z1, mean1.unsqueeze(1), log_var1.unsqueeze(1)
        ) + vaekernels.gaussian_log_prob(z2, mean2, log_var2)
        return z1, log_pz, log_qz

    def _log_weights(self, x, y, k, generator):
        z1, log_pz, log_qz = self._latents(x, y, k, generator)
        out = self.decode(z1, y)
        return out, log_pz, log_qz

    def log_weights(self, x, y=None, k: int = 1, generator=None):
        with torch.no_grad():
            out, log_pz, log_qz = self._log_weights(x, y, k, generator)
            return self.likelihood.log_prob(out, x) + log_pz - log_qz

    def forward(self, x, y=None, generator=None):
        z1, log_pz, log_qz = self._latents(x, y, self.k, generator)
        layer = self.fused_output_layer
        if layer is not None and self.importance_weighted:
            bound = layer.iwae_bound(self.decoder.features(z1, self.condition(y)), x, log_pz, log_qz)
        elif layer is not None:
            bound = self.expected_log_likelihood(x, z1, y) + (log_pz - log_qz).mean(1)
        elif self.importance_weighted and self.likelihood.fused:
            bound = vaekernels.iwae_bound(self.decode(z1, y), x, log_pz, log_qz, **self.likelihood.bound_kwargs())
        else:
            log_w = self.likelihood.log_prob(self.decode(z1, y), x) + log_pz - log_qz
            bound = vaekernels.log_mean_exp(log_w, dim=1) if self.importance_weighted else log_w.mean(1)
        return -bound.mean(), {"bound": bound.mean().detach()}

    def sample_latents(self, n, generator=None, device=None):
        z2 = torch.randn((n, 1, self.top_latent_dim), generator=generator, device=device)
        mean1, log_var1 = self.down(z2)
        return mean1 + torch.exp(0.5 * log_var1) * torch.randn(mean1.shape, generator=generator, device=device)

    @torch.no_grad()
    def top_means(self, x, y=None) -> torch.Tensor:
        """E[z2] under q(z2 | E_q[z1]): [B, d2], for the active units of the top layer."""
        return self.up(self.encode(x, y)[0])[0]


class VHPVAE(VAE):
    """VHP-VAE (Klushyn et al. 2019): a learned hierarchical prior inside the constrained Lagrangian.

    The prior p(z) = int p_Theta(z | zeta) N(zeta; 0, I) dzeta enters through the
    importance-weighted bound F(Theta, Phi; z) = log (1/K) sum_k p_Theta(z, zeta_k) / q_Phi(zeta_k | z),
    zeta_k ~ q_Phi(zeta | z), one fused :func:`vaekernels.iwae_bound` call with a Gaussian
    "likelihood" p_Theta(z | zeta). The Lagrangian

        L = E_x E_q(z|x) [log q(z|x) - F(Theta, Phi; z) + lambda (C(x, z) - kappa^2)],  lambda >= 0,

    with C = -log p(x|z), is minimised by one optimiser over phi (E-step), theta (M-step) and
    Theta, Phi (empirical Bayes), while lambda ascends it: log lambda <- log lambda + rate * C_ma,
    GECO's update, which keeps lambda positive.
    """

    standard_prior = False

    def __init__(
        self,
        *args,
        prior_latent_dim: int | None = None,
        prior_hidden_dim: int = 100,
        prior_k: int = 8,
        tolerance: float = 60.0,
        alpha: float = 0.99,
        rate: float = 1e-4,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.prior_latent_dim = prior_latent_dim or self.latent_dim
        self.prior_k, self.tolerance = prior_k, tolerance
        self.prior_net = GaussianMLP(self.prior_latent_dim, prior_hidden_dim, self.latent_dim)  # p_Theta(z | zeta)
        self.prior_posterior = GaussianMLP(self.latent_dim, prior_hidden_dim, self.prior_latent_dim)  # q_Phi
        self.multiplier = LagrangeMultiplier(alpha, rate)
        self._generator = None

    def log_prior(self, z: torch.Tensor) -> torch.Tensor:
        """F(Theta, Phi; z) [B, K], a lower bound on log p(z), with ``prior_k`` samples of zeta."""
        flat = z.reshape(-1, z.shape[-1])
        mean, log_var = self.prior_posterior(flat)
        zeta = reparameterize(mean, log_var, self.prior_k, self._generator)
        z_mean, z_log_var = self.prior_net(zeta)
        bound = vaekernels.iwae_bound(
            z_mean,
            flat,
            standard_normal_log_prob(zeta),
            None,
            likelihood="gaussian",
            log_var=z_log_var,
            z=zeta,
            q=(mean, log_var),
        )
        return bound.reshape(z.shape[:2])

    def forward(self, x, y=None, generator=None):
        self._generator = generator
        mean, log_var = self.encode(x, y)
        z = reparameterize(mean, log_var, self.k, generator)
        reconstruction = -self.expected_log_likelihood(x, z, y)
        log_q = vaekernels.gaussian_log_prob(z, mean.unsqueeze(1), log_var.unsqueeze(1))
        kl = (log_q - self.log_prior(z)).mean(1)
        lam, constraint = self.multiplier(reconstruction.mean() - self.tolerance)
        loss = kl.mean() + lam * constraint
        return loss, {"reconstruction": reconstruction.mean().detach(), "kl": kl.mean().detach(), "lambda": lam}

    def log_weights(self, x, y=None, k: int = 1, generator=None):
        self._generator = generator
        return super().log_weights(x, y, k, generator)

    def sample_latents(self, n, generator=None, device=None):
        zeta = torch.randn((n, 1, self.prior_latent_dim), generator=generator, device=device)
        mean, log_var = self.prior_net(zeta)
        return mean + torch.exp(0.5 * log_var) * torch.randn(mean.shape, generator=generator, device=device)


MODELS = ("vae", "beta-vae", "capacity-vae", "geco", "iwae", "geco-iwae", "hvae", "hiwae", "vhp-vae", "cvae")


def build_model(name: str, data_dim: int, image_shape=None, **options) -> VAE:
    """The model ``name`` (one of :data:`MODELS`); ``options`` are its constructor's keywords.

    Options a model does not take are dropped, so one settings dictionary serves every model.

    >>> build_model("geco", data_dim=16, latent_dim=2, hidden_dim=8, tolerance=5.0).tolerance
    5.0
    """
    import inspect

    if name not in MODELS:
        raise ValueError(f"models.vae.zoo.build_model: name must be one of {MODELS}, got {name!r}")
    cls, fixed = {
        "vae": (VAE, {}),
        "beta-vae": (VAE, {}),
        "capacity-vae": (CapacityVAE, {}),
        "geco": (GECO, {}),
        "iwae": (IWAE, {}),
        "geco-iwae": (GECOIWAE, {}),
        "hvae": (HierarchicalVAE, {"importance_weighted": False}),
        "hiwae": (HierarchicalVAE, {"importance_weighted": True}),
        "vhp-vae": (VHPVAE, {}),
        "cvae": (VAE, {}),
    }[name]
    accepted = set()
    for klass in cls.__mro__:
        if klass is nn.Module:
            break
        accepted |= set(inspect.signature(klass.__init__).parameters)
    kwargs = {key: value for key, value in options.items() if key in accepted and value is not None}
    if name != "cvae":
        kwargs.pop("num_classes", None)
    return cls(data_dim, image_shape, **kwargs, **fixed)
