"""Toy 2-D distributions: a Gaussian mixture with exact density and score, and samplers.

A Gaussian mixture is the one non-trivial distribution whose density and score stay in
closed form at every noise level, so samplers can be checked against the exact score:

    p(x)          = sum_k w_k N(x; mu_k, diag(s_k^2))
    score(x)      = grad_x log p(x) = sum_k r_k(x) (mu_k - x) / s_k^2,
                    r_k(x) = w_k N(x; mu_k, s_k^2) / p(x)      (responsibilities, a softmax)
    x_t           = alpha x0 + sigma eps,  x0 ~ p,  eps ~ N(0, I)          [DDPM, Eq. 4]
        ==>  x_t ~ sum_k w_k N(alpha mu_k, alpha^2 s_k^2 + sigma^2)       (`diffused`)

Given x_t and the component k, x0 and eps are jointly Gaussian, so with v_k = alpha² s_k² + sigma²
and the responsibilities r_k(x_t) of the diffused mixture, every prediction is exact
(`mixture_denoiser`):

    score = Σ r_k (alpha mu_k − x)/v_k,   E[eps | x] = Σ r_k sigma (x − alpha mu_k)/v_k,
    E[x0 | x] = Σ r_k (mu_k + alpha s_k² (x − alpha mu_k)/v_k)

The samplers (two moons, swiss roll, checkerboard, a ring of Gaussians) are the usual
2-D test beds of diffusion and flow papers; they have no closed-form score.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from minidit.denoiser import KINDS, Denoiser, check_kind
from minidit.process import Process


class GaussianMixture:
    """A mixture of K Gaussians in D dimensions with diagonal (or isotropic) covariances.

    Args:
        weights: [K] non-negative mixture weights (normalised here).
        means: [K, D] component means.
        std: component standard deviations: a float (shared, isotropic), [K]
            (isotropic per component) or [K, D] (diagonal).
    """

    def __init__(self, weights: Tensor, means: Tensor, std: float | Tensor):
        means = torch.as_tensor(means)
        if not means.is_floating_point():
            means = means.float()
        weights = torch.as_tensor(weights, dtype=means.dtype, device=means.device)
        std = torch.as_tensor(std, dtype=means.dtype, device=means.device)
        if means.ndim != 2:
            raise ValueError(f"means must have shape [K, D], got {tuple(means.shape)}")
        K, D = means.shape
        if weights.shape != (K,) or bool((weights < 0).any()) or float(weights.sum()) <= 0:
            raise ValueError(f"weights must be [K]={K} non-negative numbers with a positive sum")
        if std.ndim < 2:
            std = std.reshape(-1, 1)  # a float -> [1, 1]; [K] -> [K, 1], isotropic per component
        if std.ndim != 2 or std.shape[0] not in (1, K) or std.shape[1] not in (1, D):
            raise ValueError(f"std must be a float, [K]={K} or [K, D]={K, D}, got {tuple(std.shape)}")
        if bool((std <= 0).any()):
            raise ValueError("std must be positive")
        self.weights = weights / weights.sum()  # [K]
        self.means = means  # [K, D]
        self.var = (std**2).expand(K, D).clone()  # [K, D] variances s_k^2

    @property
    def dim(self) -> int:
        """The dimension D of the space."""
        return self.means.shape[1]

    def to(self, device=None, dtype=None) -> GaussianMixture:
        """The same mixture with its parameters on `device` / in `dtype`."""
        return GaussianMixture(self.weights.to(device, dtype), self.means.to(device, dtype),
                               self.var.to(device, dtype).sqrt())

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Draw n exact samples, [n, D] (the generator must live on the mixture's device)."""
        # 1. a component per sample, k ~ Categorical(w); 2. x = mu_k + s_k * eps
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)  # [n]
        eps = torch.randn(n, self.dim, generator=generator, dtype=self.means.dtype,
                          device=self.means.device)  # [n, D]
        return self.means[k] + self.var[k].sqrt() * eps

    def _joint_log_prob(self, x: Tensor) -> Tensor:
        """log(w_k N(x; mu_k, s_k^2)) for every sample and component, [N, K]."""
        diff = x[:, None, :] - self.means  # [N, 1, D] - [K, D] -> [N, K, D]
        log_normal = -0.5 * ((diff**2 / self.var) + torch.log(2 * math.pi * self.var)).sum(-1)  # [N, K]
        return self.weights.log() + log_normal

    def log_prob(self, x: Tensor) -> Tensor:
        """log p(x) for x of shape [N, D]; returns [N]."""
        return torch.logsumexp(self._joint_log_prob(x), dim=-1)

    def score(self, x: Tensor) -> Tensor:
        """The exact score grad_x log p(x) for x of shape [N, D]; returns [N, D]."""
        r = torch.softmax(self._joint_log_prob(x), dim=-1)  # [N, K] responsibilities r_k(x)
        return (r[:, :, None] * (self.means - x[:, None, :]) / self.var).sum(1)  # [N, K, D] -> [N, D]

    def diffused(self, alpha: float | Tensor, sigma: float | Tensor) -> GaussianMixture:
        """The law of x_t = alpha x0 + sigma eps with x0 from this mixture and eps ~ N(0, I).

        Each component stays Gaussian: mean alpha mu_k, variance alpha^2 s_k^2 + sigma^2,
        weights unchanged. `alpha` and `sigma` are scalars (floats or 0-d tensors), one
        noise level for the whole batch, as in a sampler step.
        """
        alpha = torch.as_tensor(alpha, dtype=self.means.dtype, device=self.means.device)
        sigma = torch.as_tensor(sigma, dtype=self.means.dtype, device=self.means.device)
        if alpha.ndim != 0 or sigma.ndim != 0:
            raise ValueError("alpha and sigma must be scalars (one noise level for the batch)")
        std_t = (alpha**2 * self.var + sigma**2).sqrt()  # [K, D]
        return GaussianMixture(self.weights, alpha * self.means, std_t)

    def mean(self) -> Tensor:
        """E[x] = sum_k w_k mu_k, [D]."""
        return self.weights @ self.means

    def covariance(self) -> Tensor:
        """Cov[x] = sum_k w_k (diag(s_k^2) + mu_k mu_k^T) - E[x] E[x]^T, [D, D]."""
        second = torch.einsum("k,ki,kj->ij", self.weights, self.means, self.means)  # [D, D]
        m = self.mean()
        return torch.diag(self.weights @ self.var) + second - torch.outer(m, m)

    def __repr__(self) -> str:
        return f"GaussianMixture(K={len(self.weights)}, D={self.dim})"


def ring_of_gaussians(k: int = 8, radius: float = 2.0, std: float = 0.1) -> GaussianMixture:
    """k equal-weight isotropic Gaussians evenly spaced on a circle (the "8 Gaussians" toy)."""
    angle = torch.arange(k, dtype=torch.float32) * (2 * math.pi / k)  # [k]
    means = radius * torch.stack([angle.cos(), angle.sin()], dim=1)  # [k, 2]
    return GaussianMixture(torch.ones(k), means, std)


def mixture_denoiser(mixture: GaussianMixture, process: Process, kind: str = "score") -> Denoiser:
    """The exact denoiser of data from `mixture` on `process`, predicting `kind` natively.

    Each kind is computed in closed form (see the module docstring), not converted, so it is
    finite wherever v_k > 0 (alpha = 0 or sigma = 0 included) and checks the conversion table.
    The network reads the process time itself (time_scale = 1).
    """
    check_kind(kind, "prediction kind", KINDS)

    def fn(x: Tensor, t: Tensor) -> Tensor:
        w, mu, s2 = (p.to(x) for p in (mixture.weights, mixture.means, mixture.var))  # [K], [K, D], [K, D]
        alpha, sigma = process.alpha(t).to(x)[:, None, None], process.sigma(t).to(x)[:, None, None]  # [B, 1, 1]
        v = alpha**2 * s2 + sigma**2  # [B, K, D]
        diff = x[:, None, :] - alpha * mu  # [B, K, D]
        log_joint = w.log() - 0.5 * (diff**2 / v + torch.log(2 * torch.pi * v)).sum(-1)  # [B, K]
        r = torch.softmax(log_joint, dim=-1)[:, :, None]  # [B, K, 1]
        if kind == "score":
            return (r * -diff / v).sum(1)
        eps = (r * sigma * diff / v).sum(1)  # [B, D]
        x0 = (r * (mu + alpha * s2 * diff / v)).sum(1)  # [B, D]
        if kind in ("eps", "x0"):
            return eps if kind == "eps" else x0
        if kind == "v":
            return alpha[:, 0] * eps - sigma[:, 0] * x0
        d_alpha, d_sigma = process.d_alpha(t).to(x)[:, None], process.d_sigma(t).to(x)[:, None]  # [B, 1]
        return d_alpha * x0 + d_sigma * eps

    return Denoiser(fn, kind, process, name=f"exact {kind} of the mixture")


# ----------------------------------------------------------------------------------------
# Samplers without closed-form density. Each takes (n, generator) and returns [n, 2].


def two_moons(n: int, generator: torch.Generator | None = None, noise: float = 0.05) -> Tensor:
    """Two interleaved half circles of radius 1 (upper one at the origin), centred at 0."""
    upper = torch.rand(n, generator=generator) < 0.5  # [n] which moon
    theta = math.pi * torch.rand(n, generator=generator)  # [n] angle along the arc
    x = torch.where(upper, theta.cos(), 1 - theta.cos())
    y = torch.where(upper, theta.sin(), 0.5 - theta.sin())
    points = torch.stack([x - 0.5, y - 0.25], dim=1)  # [n, 2], centred
    return points + noise * torch.randn(n, 2, generator=generator)


def swiss_roll(n: int, generator: torch.Generator | None = None, noise: float = 0.05) -> Tensor:
    """The 2-D swiss roll: the spiral r = theta / 5 for theta in [1.5 pi, 4.5 pi]."""
    theta = math.pi * (1.5 + 3 * torch.rand(n, generator=generator))  # [n]
    points = torch.stack([theta * theta.cos(), theta * theta.sin()], dim=1) / 5  # [n, 2]
    return points + noise * torch.randn(n, 2, generator=generator)


def checkerboard(n: int, generator: torch.Generator | None = None) -> Tensor:
    """Uniform on the 8 dark squares of a 4x4 checkerboard covering [-2, 2]^2."""
    # 1. a uniform point in the first column of every row pair, 2. shift by an odd/even column
    x = 4 * torch.rand(n, generator=generator) - 2  # [n] in [-2, 2)
    y = torch.rand(n, generator=generator) - torch.randint(0, 2, (n,), generator=generator) * 2.0
    y = y + torch.floor(x) % 2  # dark squares: floor(x) + floor(y) even
    return torch.stack([x, y], dim=1)


def _eight_gaussians(n: int, generator: torch.Generator | None = None) -> Tensor:
    return ring_of_gaussians().sample(n, generator)


TOY_SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "two_moons": two_moons,
    "swiss_roll": swiss_roll,
    "checkerboard": checkerboard,
    "eight_gaussians": _eight_gaussians,
}


def sample_toy(name: str, n: int, seed: int = 0) -> Tensor:
    """Draw n points of the named 2-D toy distribution, [n, 2] float32, seeded by `seed`."""
    if name not in TOY_SAMPLERS:
        raise ValueError(f"unknown toy distribution {name!r}; valid names: {sorted(TOY_SAMPLERS)}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    return TOY_SAMPLERS[name](n, torch.Generator().manual_seed(seed))
