"""Exact (Bayes-optimal) denoisers for data whose density we know, for the sampler tests.

For x_t = sqrt(ab)·x0 + sqrt(1 − ab)·ε the optimal predictions are posterior means.
Gaussian data N(mu, Sigma): with C = ab·Sigma + (1 − ab)·I,
    E[ε | x_t]  = sqrt(1 − ab) · C⁻¹ (x_t − sqrt(ab)·mu)
    E[x0 | x_t] = mu + sqrt(ab) · Sigma C⁻¹ (x_t − sqrt(ab)·mu)
Isotropic Gaussian mixture Σ_k w_k N(mu_k, s_k² I): the same per component, mixed by the
responsibilities r_k(x_t) ∝ w_k N(x_t; sqrt(ab)·mu_k, (ab·s_k² + 1 − ab) I).
v = sqrt(ab)·ε − sqrt(1 − ab)·x0 by definition. Written independently of minidit.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def steps(t: Tensor) -> Tensor:
    """Integer steps from the time input a DDPM network gets (minidit passes T·t − 1 as floats,
    exactly integral on DDPM's grids; anything else is a bug of the time map)."""
    if t.is_floating_point():
        assert bool(((t - t.round()).abs() < 1e-6).all()), f"DDPM steps must be integers, got {t}"
        return t.round().long()
    return t


def _out(kind: str, eps: Tensor, x0: Tensor, ab: Tensor) -> Tensor:
    if kind == "eps":
        return eps
    if kind == "x0":
        return x0
    return ab.sqrt() * eps - (1 - ab).sqrt() * x0  # v


class ExactGaussian(nn.Module):
    """Optimal predictor for N(mu, cov) data in D dims; float64; input [B, D]."""

    def __init__(self, mu: Tensor, cov: Tensor, alpha_bar: Tensor, kind: str = "eps"):
        super().__init__()
        self.register_buffer("mu", mu.double())
        self.register_buffer("cov", cov.double())
        self.register_buffer("alpha_bar", alpha_bar.double())
        self.kind = kind
        self.calls = 0

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        self.calls += 1
        ab = self.alpha_bar[steps(t)].unsqueeze(-1)  # [B, 1]
        lam, U = torch.linalg.eigh(self.cov)  # cov = U diag(lam) Uᵀ, so C⁻¹ = U diag(1/(ab·lam + 1 − ab)) Uᵀ
        z = (x - ab.sqrt() * self.mu) @ U  # [B, D] in the eigenbasis
        r = (z / (ab * lam + 1 - ab)) @ U.T  # C⁻¹(x − √ab·mu), [B, D]
        eps = (1 - ab).sqrt() * r
        x0 = self.mu + ab.sqrt() * (r @ self.cov)  # cov symmetric: Sigma r = r Sigma
        return _out(self.kind, eps, x0, ab)


class ExactMixture(nn.Module):
    """Optimal predictor for an isotropic Gaussian mixture; class y = component y.

    Called as model(x, t) or model(x, t, y); label K (= number of components) is the
    null label and gives the whole mixture.
    """

    def __init__(self, means: Tensor, stds: Tensor, weights: Tensor, alpha_bar: Tensor, kind: str = "eps"):
        super().__init__()
        self.register_buffer("means", means.double())  # [K, D]
        self.register_buffer("stds", stds.double())  # [K]
        self.register_buffer("log_w", weights.double().log())  # [K]
        self.register_buffer("alpha_bar", alpha_bar.double())
        self.kind = kind
        self.calls = 0

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        self.calls += 1
        K, D = self.means.shape
        ab = self.alpha_bar[steps(t)].reshape(-1, 1, 1)  # [B, 1, 1]
        c = ab * self.stds.reshape(1, K, 1) ** 2 + (1 - ab)  # [B, K, 1] marginal variance per component
        diff = x.unsqueeze(1) - ab.sqrt() * self.means.unsqueeze(0)  # [B, K, D]
        c_k = c.squeeze(-1)  # [B, K]
        log_p = self.log_w - 0.5 * (diff**2).sum(-1) / c_k - 0.5 * D * torch.log(2 * math.pi * c_k)  # [B, K]
        if y is not None:  # conditional rows keep only their own component
            own = torch.arange(K).unsqueeze(0) == y.unsqueeze(1)  # [B, K]
            log_p = torch.where((y < K).unsqueeze(1) & ~own, torch.full_like(log_p, -math.inf), log_p)
        r = torch.softmax(log_p, dim=1).unsqueeze(-1)  # [B, K, 1]
        eps = (r * (1 - ab).sqrt() * diff / c).sum(1)  # [B, D]
        x0 = (r * (self.means.unsqueeze(0) + ab.sqrt() * self.stds.reshape(1, K, 1) ** 2 * diff / c)).sum(1)
        return _out(self.kind, eps, x0, ab.squeeze(-1))

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """n data points [n, D] and their components [n]."""
        k = torch.multinomial(self.log_w.exp(), n, replacement=True, generator=generator)
        z = torch.randn(n, self.means.shape[1], generator=generator, dtype=torch.float64)
        return self.means[k] + self.stds[k].unsqueeze(1) * z, k


def moment_z_scores(x: Tensor, mu: Tensor, cov: Tensor) -> tuple[Tensor, Tensor]:
    """|sample mean − mu| and |sample cov − cov| in units of their standard errors.

    SE(mean_i) = sqrt(cov_ii / n); SE(cov_ij) = sqrt((cov_ii cov_jj + cov_ij²) / n)
    (Gaussian fourth moments).
    """
    n = x.shape[0]
    mean = x.mean(0)
    S = torch.cov(x.T)
    se_mean = (cov.diagonal() / n).sqrt()
    se_cov = ((cov.diagonal().unsqueeze(0) * cov.diagonal().unsqueeze(1) + cov**2) / n).sqrt()
    return (mean - mu).abs() / se_mean, (S - cov).abs() / se_cov
