"""Hierarchical VAEs for binary images: the self-reflective VAE and two baselines of equal size.

All three models share one interface (`HierarchicalVAE`): ``model(x)`` returns the per-sample
negative ELBO in nats (the Trainer's loss is its mean), ``model.log_weights(x, k)`` the importance
log-weights ``log p(x, z) - log q(z | x)`` of `k` posterior samples, ``model.layers(x, noise)``
the per-layer posterior and prior parameters (for tests and diagnostics), and
``model.sample(n)`` images from the generative model. Inputs are images with values in [0, 1]
(binary for the `-bin` tasks), flattened inside the model; every likelihood is Bernoulli.

Layers are numbered in generative order: layer 1 is sampled first.

``srvae`` (Apostolopoulou et al., ICLR 2021 submission, "self-reflective VAE"). The observed
vector is split into L raster blocks x_1..x_L. With a learned start code z_0, for l = 1..L:

    prior       p(eps_l | z_{l-1}) = N(mu_p(z_{l-1}), sigma_p(z_{l-1}))
    bijector    z_l = c(z_{l-1}) + (diag(d(z_{l-1})) + u(z_{l-1}) u(z_{l-1})^T) eps_l,
                0 < d < 2, |u|^2 < 1 (positive definite, so invertible)
    data layer  p(x_l | z_l, x_{l-1}) = Bernoulli(sigmoid(g_l(z_l) + R_l x_{l-1}))   (R_1 = 0;
                ``residual=false``: R_l = 0, p(x_l | z_l), an ablation)
    ``reflect=false`` (an ablation): q(z_l | z_{l-1}, x) is a Gaussian on z_l itself, not mapped
    through the bijector; log p(z_l | z_{l-1}) = log N(B^-1(z_l)) - log |det B| and the KL is sampled.
    posterior   q(eps_l | z_{l-1}, x) = N(mu_q([e(x), z_{l-1}]), sigma_q([e(x), z_{l-1}]))

with e(x) a deterministic encoding of the whole image. The posterior samples eps_l and maps it
through the *generative* bijector of layer l (self-reflective inference: q(z | x) factorizes as
prod_l q(z_l | z_{l-1}, x), the factorization of the exact posterior of this model). Since p and q
push eps_l through the same invertible map, KL(q(z_l) || p(z_l)) = KL(q(eps_l) || p(eps_l)),
in closed form, and the Jacobians cancel in the importance weights.

``ladder-vae`` (Sønderby et al. 2016): generative chain p(z_1) = N(0, I), p(z_l | z_{l-1}),
p(x | z_L); a deterministic bottom-up pass d_L = f(x), d_l = f_l(d_{l+1}) gives (mu_hat_l,
sigma_hat_l), and the top-down posterior combines them with the generative prior by precision
weighting (the prior networks are shared between inference and generation). KL in closed form.

``hvae``: the same generative chain with a stochastic bottom-up posterior q(z_L | x),
q(z_l | z_{l+1}) (as in IWAE's two-layer model and the DLGM the paper compares against); its
posterior does not factorize like the generative model, and its KL is a one-sample estimate.

Baselines built without an explicit ``hidden`` get the hidden width that gives them the parameter
count of ``srvae`` with the same layers and latents (`matched_hidden`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import check_range

LOG_2PI = math.log(2 * math.pi)
MIN_SIGMA = 1e-3


@dataclass(frozen=True)
class VaeParams:
    """``--model NAME:layers=10,latents=10,hidden=256``."""
    layers: int = 10            # stochastic layers L (srvae: also the number of observed blocks)
    latents: int = 10           # latent units per layer
    hidden: int | None = None   # hidden width of every MLP; None: 256 for srvae, else matched to srvae's count
    warmup: int = 0             # KL warm-up: the KL weight grows linearly 0 -> 1 over this many training passes
    residual: bool = True       # srvae only: p(x_l | z_l, x_{l-1}) reads the previous block; false: p(x_l | z_l)
    reflect: bool = True        # srvae only: the posterior samples eps_l and shares the generative bijector;
    #                             false: q(z_l | z_{l-1}, x) is a Gaussian on z_l itself (an ablation; KL sampled)

    def __post_init__(self) -> None:
        check_range("layers", self.layers, 1, 64, integer=True)
        check_range("latents", self.latents, 1, 1024, integer=True)
        check_range("warmup", self.warmup, 0, 10**9, integer=True)
        if self.hidden is not None:
            check_range("hidden", self.hidden, 1, 8192, integer=True)


SRVAE_HIDDEN = 256


class LayerTerms(NamedTuple):
    """One stochastic layer of one pass: posterior and prior parameters, the noise and the latent."""
    mu_q: torch.Tensor
    sigma_q: torch.Tensor
    eps: torch.Tensor      # the posterior sample (srvae: eps_l; baselines: z_l itself)
    z: torch.Tensor        # the latent passed on (srvae: bijector(eps_l))
    mu_p: torch.Tensor
    sigma_p: torch.Tensor
    #: None: q and p are densities of `eps`. Else (srvae:reflect=false) q is a density of `z`, p one of
    #: eps = bijector^-1(z), and this is log |det d bijector / d eps| (the change of variables).
    log_det: torch.Tensor | None = None


def gaussian_log_prob(x: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """log N(x; mu, diag(sigma^2)), summed over the last dimension."""
    return (-0.5 * ((x - mu) / sigma) ** 2 - torch.log(sigma) - 0.5 * LOG_2PI).sum(-1)


def gaussian_kl(mu_q, sigma_q, mu_p, sigma_p) -> torch.Tensor:
    """KL(N(mu_q, sigma_q) || N(mu_p, sigma_p)), diagonal, summed over the last dimension."""
    return (torch.log(sigma_p / sigma_q) + (sigma_q ** 2 + (mu_q - mu_p) ** 2) / (2 * sigma_p ** 2) - 0.5).sum(-1)


def bernoulli_log_prob(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """log Bernoulli(x; sigmoid(logits)) summed over the last dimension (x may be grey: a cross-entropy)."""
    return (x * logits - F.softplus(logits)).sum(-1)


def _mlp(n_in: int, hidden: int, n_out: int, depth: int = 1) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(n_in, hidden), nn.ELU()]
        n_in = hidden
    layers.append(nn.Linear(n_in, n_out))
    return nn.Sequential(*layers)


def _wide(t: torch.Tensor) -> torch.Tensor:
    """Half-precision outputs (under autocast) widened to float32 for the densities; float64 kept."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _gaussian(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mu, s = _wide(out).chunk(2, dim=-1)
    return mu, F.softplus(s) + MIN_SIGMA


def _noise(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)


class HierarchicalVAE(nn.Module):
    """The interface every haet generative model has (see the module's docstring)."""

    generative = True  # read by methods and tasks: the outputs are per-sample negative ELBOs, not logits
    kind = ""

    def __init__(self, input_shape: tuple[int, ...], params: VaeParams) -> None:
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.dim = math.prod(self.input_shape)
        self.params = params
        self.latents, self.num_layers = params.latents, params.layers
        # Training passes seen, for the KL warm-up (a buffer: checkpoints and saved models keep it).
        self.register_buffer("passes", torch.zeros((), dtype=torch.long))

    # -- the interface -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample negative ELBO (nats), with the model's KL estimator (closed form where it exists).

        With ``warmup = W`` a training pass (train mode, gradients on) returns
        ``-(log p(x | z) - beta KL)`` instead, beta = min(1, passes / W) (Sønderby et al. 2016's
        warm-up against inactive units); evaluation always reports the ELBO itself."""
        x = self._flat(x)
        terms = self.layers(x)
        rec, kl = self.log_likelihood(x, terms), sum(self.layer_kl(terms))
        if self.params.warmup and self.training and torch.is_grad_enabled():
            beta = min(1.0, float(self.passes) / self.params.warmup)
            if beta < 1:
                self.passes += 1
            return -(rec - beta * kl)
        return -(rec - kl)

    def layers(self, x: torch.Tensor, noise: list[torch.Tensor] | None = None,
               generator: torch.Generator | None = None) -> list[LayerTerms]:
        """One posterior pass in generative order; `noise` (standard normal, one (N, latents) per
        layer) fixes the samples, otherwise they are drawn (from `generator` when given)."""
        raise NotImplementedError

    def log_likelihood(self, x: torch.Tensor, terms: list[LayerTerms]) -> torch.Tensor:
        """log p(x | z) for the latents of `terms` (N,)."""
        raise NotImplementedError

    def log_weights(self, x: torch.Tensor, k: int = 1, generator: torch.Generator | None = None,
                    noise: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Importance log-weights log p(x, z^(i)) - log q(z^(i) | x) of `k` posterior samples, (k, N).

        With ``k = 1`` and the same noise, the mean over samples is the one-sample ELBO."""
        x = self._flat(x)
        n = len(x)
        xk = x.unsqueeze(0).expand(k, *x.shape).reshape(k * n, -1)
        terms = self.layers(xk, noise=noise, generator=generator)
        log_w = self.log_likelihood(xk, terms)
        for r in self.log_ratio(terms):
            log_w = log_w + r
        return log_w.view(k, n)

    def log_ratio(self, terms: list[LayerTerms]) -> list[torch.Tensor]:
        """Per layer, log p(z_l | parents) - log q(z_l | x, parents) at the sampled latents (N,) each."""
        out = []
        for t in terms:
            if t.log_det is None:
                out.append(gaussian_log_prob(t.eps, t.mu_p, t.sigma_p) - gaussian_log_prob(t.eps, t.mu_q, t.sigma_q))
            else:
                out.append(gaussian_log_prob(t.eps, t.mu_p, t.sigma_p) - t.log_det
                           - gaussian_log_prob(t.z, t.mu_q, t.sigma_q))
        return out

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, *, binary: bool = False) -> torch.Tensor:
        """`n` images from the generative model: pixel probabilities, or Bernoulli draws with ``binary``."""
        raise NotImplementedError

    # -- shared pieces ---------------------------------------------------------------------------
    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or math.prod(x.shape[1:]) != self.dim:
            raise ValueError(f"{self.kind} expects inputs of shape (N, {', '.join(map(str, self.input_shape))}), "
                             f"got {tuple(x.shape)}")
        x = x.reshape(len(x), self.dim)
        return x if x.dtype == torch.float64 else x.float()

    def layer_kl(self, terms: list[LayerTerms]) -> list[torch.Tensor]:
        """Per-layer KL terms (N,) each: closed form when q and p are Gaussians of the same variable
        given the same parents, else the one-sample estimate log q - log p."""
        if any(t.log_det is not None for t in terms):
            return [-r for r in self.log_ratio(terms)]
        return [gaussian_kl(t.mu_q, t.sigma_q, t.mu_p, t.sigma_p) for t in terms]

    def _noise_for(self, noise, l: int, like: torch.Tensor, generator) -> torch.Tensor:
        return noise[l] if noise is not None else _noise(like, generator)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class SRVAE(HierarchicalVAE):
    kind = "srvae"

    def __init__(self, input_shape: tuple[int, ...], params: VaeParams = VaeParams()) -> None:
        super().__init__(input_shape, params)
        h, m, L = params.hidden or SRVAE_HIDDEN, params.latents, params.layers
        if L > self.dim:
            raise ValueError(f"srvae: layers={L} exceeds the {self.dim} observed values to split into blocks")
        self.hidden = h
        self.blocks = [len(b) for b in torch.arange(self.dim).tensor_split(L)]
        self.z0 = nn.Parameter(torch.zeros(m))
        self.encoder = nn.Sequential(nn.Linear(self.dim, h), nn.ELU(), nn.Linear(h, h), nn.ELU())
        self.prior = nn.ModuleList(_mlp(m, h, 2 * m) for _ in range(L))
        self.bijector = nn.ModuleList(_mlp(m, h, 3 * m) for _ in range(L))
        self.posterior = nn.ModuleList(_mlp(h + m, h, 2 * m) for _ in range(L))
        self.data = nn.ModuleList(_mlp(m, h, s) for s in self.blocks)
        self.residual = nn.ModuleList(nn.Linear(self.blocks[l - 1], self.blocks[l], bias=False)
                                      for l in range(1, L)) if params.residual else None

    def bijection(self, l: int, z_prev: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """z_l = c + (diag(d) + u u^T) eps with (c, d, u) from z_{l-1}. d in (0, 2) and |u|^2 < 1
        keep the matrix positive definite (invertible) with eigenvalues below 3: unbounded, the
        scale of z would compound from layer to layer (u grows with z, and z with |u|^2)."""
        c, d, u = self._bijector_params(l, z_prev)
        return c + d * eps + u * (u * eps).sum(-1, keepdim=True)

    def _bijector_params(self, l: int, z_prev: torch.Tensor):
        c, d, u = _wide(self.bijector[l](z_prev)).chunk(3, dim=-1)
        return c, 2 * torch.sigmoid(d) + MIN_SIGMA, torch.tanh(u) / math.sqrt(self.latents)

    def inverse(self, l: int, z_prev: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps, log |det J|) with z = bijection(l, z_prev, eps): Sherman-Morrison for the inverse of
        diag(d) + u u^T and the matrix determinant lemma, det = prod(d) (1 + u^T diag(d)^-1 u)."""
        c, d, u = self._bijector_params(l, z_prev)
        a, w = (z - c) / d, u / d
        s = 1 + (u * w).sum(-1, keepdim=True)
        eps = a - w * (u * a).sum(-1, keepdim=True) / s
        return eps, torch.log(d).sum(-1) + torch.log(s).squeeze(-1)

    def layers(self, x, noise=None, generator=None):
        x = self._flat(x)
        e = self.encoder(x)
        z = self.z0.expand(len(x), -1)
        out = []
        for l in range(self.num_layers):
            mu_p, sigma_p = _gaussian(self.prior[l](z))
            mu_q, sigma_q = _gaussian(self.posterior[l](torch.cat([e, z.to(e.dtype)], dim=-1)))
            sample = mu_q + sigma_q * self._noise_for(noise, l, mu_q, generator)
            if self.params.reflect:  # q on eps_l, through the generative bijector
                z = self.bijection(l, z, sample)
                out.append(LayerTerms(mu_q, sigma_q, sample, z, mu_p, sigma_p))
            else:  # q on z_l directly; the prior's density at z_l needs the inverse and its Jacobian
                eps, log_det = self.inverse(l, z, sample)
                z = sample
                out.append(LayerTerms(mu_q, sigma_q, eps, z, mu_p, sigma_p, log_det))
        return out

    def block_logits(self, l: int, z: torch.Tensor, x_prev: torch.Tensor | None) -> torch.Tensor:
        logits = _wide(self.data[l](z))
        if l > 0 and self.residual is not None:
            logits = logits + _wide(self.residual[l - 1](x_prev))
        return logits

    def log_likelihood(self, x, terms):
        x = self._flat(x)
        xs = x.split(self.blocks, dim=-1)
        total = 0
        for l, t in enumerate(terms):
            total = total + bernoulli_log_prob(xs[l], self.block_logits(l, t.z, xs[l - 1] if l else None))
        return total

    @torch.no_grad()
    def sample(self, n, generator=None, *, binary=False):
        device = self.z0.device
        z = self.z0.expand(n, -1)
        x_prev, blocks = None, []
        for l in range(self.num_layers):
            mu_p, sigma_p = _gaussian(self.prior[l](z))
            z = self.bijection(l, z, mu_p + sigma_p * torch.randn(mu_p.shape, generator=generator, device=device))
            p = torch.sigmoid(self.block_logits(l, z, x_prev))
            # The next block conditions on this one as drawn (the model's ancestral sampling).
            x_prev = torch.bernoulli(p, generator=generator)
            blocks.append(x_prev if binary else p)
        return torch.cat(blocks, dim=-1).view(n, *self.input_shape)


class _ChainVAE(HierarchicalVAE):
    """The generative chain shared by ladder-vae and hvae: p(z_1) = N(0, I), p(z_l | z_{l-1}), p(x | z_L)."""

    def __init__(self, input_shape, params: VaeParams) -> None:
        if not params.residual or not params.reflect:
            raise ValueError(f"{type(self).kind}: residual and reflect apply to srvae only; drop "
                             f"{'residual' if not params.residual else 'reflect'}=false")
        super().__init__(input_shape, params)
        h = params.hidden or matched_hidden(type(self).kind, self.input_shape, params)
        m, L = params.latents, params.layers
        self.hidden = h
        self.prior = nn.ModuleList(_mlp(m, h, 2 * m) for _ in range(L - 1))  # p(z_l | z_{l-1}), l = 2..L
        self.decoder = _mlp(m, h, self.dim, depth=2)

    def _prior(self, l: int, z_prev: torch.Tensor | None, like: torch.Tensor):
        if l == 0:
            return torch.zeros_like(like), torch.ones_like(like)
        return _gaussian(self.prior[l - 1](z_prev))

    def log_likelihood(self, x, terms):
        return bernoulli_log_prob(self._flat(x), _wide(self.decoder(terms[-1].z)))

    @torch.no_grad()
    def sample(self, n, generator=None, *, binary=False):
        device = next(self.parameters()).device
        z = torch.randn(n, self.latents, generator=generator, device=device)
        for l in range(1, self.num_layers):
            mu, sigma = self._prior(l, z, z)
            z = mu + sigma * torch.randn(mu.shape, generator=generator, device=device)
        p = torch.sigmoid(_wide(self.decoder(z)))
        return (torch.bernoulli(p, generator=generator) if binary else p).view(n, *self.input_shape)


class LadderVAE(_ChainVAE):
    kind = "ladder-vae"

    def __init__(self, input_shape: tuple[int, ...], params: VaeParams = VaeParams()) -> None:
        super().__init__(input_shape, params)
        h, m, L = self.hidden, params.latents, params.layers
        # Bottom-up deterministic path: d_L from x, d_l from d_{l+1}; each gives (mu_hat_l, sigma_hat_l).
        self.up = nn.ModuleList([nn.Sequential(nn.Linear(self.dim, h), nn.ELU(), nn.Linear(h, h), nn.ELU())]
                                + [nn.Sequential(nn.Linear(h, h), nn.ELU()) for _ in range(L - 1)])
        self.up_head = nn.ModuleList(nn.Linear(h, 2 * m) for _ in range(L))

    def layers(self, x, noise=None, generator=None):
        x = self._flat(x)
        L = self.num_layers
        hats: list = [None] * L
        d = x
        for i in range(L):  # i-th bottom-up step belongs to generative layer L-1-i
            d = self.up[i](d)
            hats[L - 1 - i] = _gaussian(self.up_head[L - 1 - i](d))
        out, z = [], None
        for l in range(L):
            mu_hat, sigma_hat = hats[l]
            mu_p, sigma_p = self._prior(l, z, mu_hat)
            prec_hat, prec_p = sigma_hat ** -2, sigma_p ** -2
            var_q = 1.0 / (prec_hat + prec_p)
            mu_q = (mu_hat * prec_hat + mu_p * prec_p) * var_q
            sigma_q = var_q.sqrt()
            z = mu_q + sigma_q * self._noise_for(noise, l, mu_q, generator)
            out.append(LayerTerms(mu_q, sigma_q, z, z, mu_p, sigma_p))
        return out


class HVAE(_ChainVAE):
    kind = "hvae"

    def __init__(self, input_shape: tuple[int, ...], params: VaeParams = VaeParams()) -> None:
        super().__init__(input_shape, params)
        h, m, L = self.hidden, params.latents, params.layers
        # q(z_L | x), then q(z_l | z_{l+1}) for l = L-1..1 (stochastic bottom-up).
        self.q_bottom = _mlp(self.dim, h, 2 * m, depth=2)
        self.q_up = nn.ModuleList(_mlp(m, h, 2 * m) for _ in range(L - 1))

    def layers(self, x, noise=None, generator=None):
        x = self._flat(x)
        L = self.num_layers
        qs: list = [None] * L
        zs: list = [None] * L
        below = None
        for l in reversed(range(L)):
            mu_q, sigma_q = _gaussian(self.q_bottom(x) if l == L - 1 else self.q_up[l](below))
            below = mu_q + sigma_q * self._noise_for(noise, l, mu_q, generator)
            qs[l], zs[l] = (mu_q, sigma_q), below
        out = []
        for l in range(L):
            mu_p, sigma_p = self._prior(l, zs[l - 1] if l else None, zs[l])
            out.append(LayerTerms(qs[l][0], qs[l][1], zs[l], zs[l], mu_p, sigma_p))
        return out

    def layer_kl(self, terms):
        """One-sample estimates log q(z_l | z_{l+1}) - log p(z_l | z_{l-1}): q and p condition on
        different layers, so there is no closed form."""
        return [-r for r in self.log_ratio(terms)]


KINDS: dict[str, type[HierarchicalVAE]] = {"srvae": SRVAE, "ladder-vae": LadderVAE, "hvae": HVAE}


def count_parameters(kind: str, input_shape: tuple[int, ...], params: VaeParams) -> int:
    with torch.device("meta"):
        return KINDS[kind](input_shape, params).num_parameters()


@functools.lru_cache(maxsize=64)
def matched_hidden(kind: str, input_shape: tuple[int, ...], params: VaeParams) -> int:
    """The hidden width giving `kind` the parameter count of srvae with the same layers and latents
    (srvae at its own ``hidden``, 256 by default): the width whose count is nearest."""
    target = count_parameters("srvae", input_shape, VaeParams(params.layers, params.latents,
                                                                   params.hidden or SRVAE_HIDDEN))  # with residuals
    lo, hi = 1, 8192
    while lo < hi:  # the count grows with the width: the smallest width reaching the target
        mid = (lo + hi) // 2
        if count_parameters(kind, input_shape, VaeParams(params.layers, params.latents, mid)) < target:
            lo = mid + 1
        else:
            hi = mid
    below = count_parameters(kind, input_shape, VaeParams(params.layers, params.latents, max(lo - 1, 1)))
    above = count_parameters(kind, input_shape, VaeParams(params.layers, params.latents, lo))
    return lo if abs(above - target) <= abs(target - below) or lo == 1 else lo - 1


def build_vae(kind: str, input_shape: tuple[int, ...], params: VaeParams | None = None) -> HierarchicalVAE:
    return KINDS[kind](tuple(input_shape), params or VaeParams())
