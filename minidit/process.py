"""A Gaussian diffusion process: how much signal and noise x_t holds at each time t.

Every process in minidit (DDPM's table, the VP, sub-VP and VE SDEs, the flow path, EDM's
σ(t) = t) is one family of Gaussian marginals, fixed by two curves and their derivatives:

    x_t = alpha(t) x0 + sigma(t) eps,   eps ~ N(0, I)                     [SDE, Eq. 29; VDM, Eq. 1]
    log-SNR  λ(t) = log(alpha²/sigma²), decreasing in t                 [VDM, Eq. 2]

The SDE with these marginals, dx = f(t) x dt + g(t) dw, and its reverse-time twins follow:

    f = alpha'/alpha,    g² = d sigma²/dt − 2 f sigma²                   [VDM, App. A; EDM, Eq. 4]
    reverse SDE:  dx = [f x − g² ∇log p_t(x)] dt + g dw̄                 [SDE, Eq. 6]
    PF-ODE:       dx/dt = f x − ½ g² ∇log p_t(x)                         [SDE, Eq. 13]

and so do the exact transition from s to t > s and the posterior that undoes it:

    q(x_t | x_s)      = N(a x_s, s²_ts I),  a = alpha_t/alpha_s,  s²_ts = sigma_t² − a² sigma_s²
    q(x_s | x_t, x0)  = N(c_x0 x0 + c_xt x_t, s²_ts sigma_s²/sigma_t² I)              [DDPM, Eq. 6-7]
                        c_x0 = alpha_s s²_ts/sigma_t²,  c_xt = a sigma_s²/sigma_t²

Time convention: continuous t, t = 0 is the data; t runs over [0, 1] except for EDM's process,
whose time is its noise level. Coefficients come out in float64 for a float or a 0-d time
(one t for the whole batch: samplers) and in the tensor's dtype for a time per sample [B]
(training, likelihoods); `per_sample` broadcasts either against x [B, ...].

References: [SDE] Song et al. 2021; [VDM] Kingma et al. 2021; [DDPM] Ho et al. 2020; [EDM] Karras et al. 2022.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def as_time(t: Tensor | float) -> Tensor:
    """t as a floating-point tensor: a python number becomes a 0-d float64 tensor."""
    if not isinstance(t, Tensor):
        return torch.tensor(float(t), dtype=torch.float64)
    return t if t.is_floating_point() else t.to(torch.float64)


def per_sample(v: Tensor | float, x: Tensor) -> Tensor:
    """Broadcast a coefficient against x [B, ...]: a per-sample [B] becomes [B, 1, ..., 1]; a
    number or a 0-d tensor is returned as it is (it broadcasts already)."""
    if not isinstance(v, Tensor) or v.ndim == 0:
        return v
    return v.reshape(-1, *([1] * (x.ndim - 1)))  # [B] -> [B, 1, ..., 1]


def gaussian_noise(shape: tuple[int, ...], generator: torch.Generator | None = None,
                   device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard normal noise of `shape`, drawn on the generator's device and moved to `device`.

    Drawing where the generator lives keeps a seeded run the same wherever the result goes.
    """
    noise_device = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=noise_device, dtype=dtype).to(device)


def noise_like(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Standard normal noise shaped like x, on x's device and in x's dtype."""
    return gaussian_noise(x.shape, generator, x.device, x.dtype)


def posterior_coefficients(alpha_t, sigma_t, alpha_s, sigma_s):
    """(c_x0, c_xt, posterior variance, s²_ts) of q(x_s | x_t, x0) for s < t (see the module docstring).

    Works elementwise on numbers or tensors (e.g. DDPM's whole table at once).
    """
    a = alpha_t / alpha_s
    var_ts = sigma_t**2 - a**2 * sigma_s**2  # the variance of q(x_t | x_s); β_t for one DDPM step
    c_x0 = alpha_s * var_ts / sigma_t**2
    c_xt = a * sigma_s**2 / sigma_t**2
    return c_x0, c_xt, var_ts * sigma_s**2 / sigma_t**2, var_ts


class Process:
    """A Gaussian diffusion given by alpha(t), sigma(t) and their time derivatives.

    Subclasses define `alpha`, `sigma`, `d_alpha` and `d_sigma` for t of any shape; they may
    override `t_from_log_snr` (bisection here), `drift` and `diffusion` with closed forms.

    Attributes:
        t_eps: the earliest time samplers stop at by default (some processes are singular at 0).
        t_max: the time of pure noise, where samplers start.
    """

    t_eps: float = 1e-3
    t_max: float = 1.0

    # -- the marginal p_t(x | x0) = N(alpha x0, sigma² I) ------------------------------------
    def alpha(self, t: Tensor | float) -> Tensor:
        """The scale of the data in x_t."""
        raise NotImplementedError

    def sigma(self, t: Tensor | float) -> Tensor:
        """The scale of the noise in x_t."""
        raise NotImplementedError

    def d_alpha(self, t: Tensor | float) -> Tensor:
        """d alpha / dt."""
        raise NotImplementedError

    def d_sigma(self, t: Tensor | float) -> Tensor:
        """d sigma / dt."""
        raise NotImplementedError

    def log_snr(self, t: Tensor | float) -> Tensor:
        """λ(t) = log(alpha² / sigma²), decreasing in t (+inf at clean data)."""
        t = as_time(t)
        return 2 * (torch.log(self.alpha(t)) - torch.log(self.sigma(t)))

    def t_from_log_snr(self, log_snr: Tensor | float) -> Tensor:
        """The t in [0, t_max] with λ(t) = log_snr (float64), by bisection; values beyond the
        process's range clamp to its ends."""
        target = torch.as_tensor(log_snr, dtype=torch.float64)
        lo, hi = torch.zeros_like(target), torch.full_like(target, self.t_max)
        for _ in range(64):  # halves the bracket to below float64 resolution
            mid = (lo + hi) / 2
            right = self.log_snr(mid) > target  # λ decreases in t: the root lies to the right
            lo, hi = torch.where(right, mid, lo), torch.where(right, hi, mid)
        return (lo + hi) / 2

    def t_from_sigma(self, sigma_over_alpha: Tensor | float) -> Tensor:
        """The t at which sigma/alpha (EDM's noise level σ) equals the given value."""
        s = torch.as_tensor(sigma_over_alpha, dtype=torch.float64)
        return self.t_from_log_snr(-2 * torch.log(s))

    def marginal(self, x0: Tensor, t: Tensor | float) -> tuple[Tensor, Tensor]:
        """Mean alpha(t) x0 [B, ...] and std sigma(t) (broadcastable) of p_t(x | x0)."""
        return per_sample(self.alpha(t), x0) * x0, per_sample(self.sigma(t), x0)

    def perturb(self, x0: Tensor, t: Tensor | float, eps: Tensor) -> Tensor:
        """x_t = alpha(t) x0 + sigma(t) eps, shaped like x0."""
        mean, std = self.marginal(x0, t)
        return mean + std * eps

    # -- the SDE with these marginals ---------------------------------------------------------
    def drift(self, x: Tensor, t: Tensor | float) -> Tensor:
        """f(t) x with f = alpha'/alpha, shaped like x."""
        return per_sample(self.d_alpha(t) / self.alpha(t), x) * x

    def diffusion(self, t: Tensor | float) -> Tensor:
        """g(t) = sqrt(2 sigma sigma' − 2 (alpha'/alpha) sigma²)."""
        sigma = self.sigma(t)
        return torch.sqrt(2 * sigma * self.d_sigma(t) - 2 * self.d_alpha(t) / self.alpha(t) * sigma**2)

    def reverse_drift(self, x: Tensor, t: Tensor | float, score: Tensor) -> Tensor:
        """f x − g² score: the drift of the reverse SDE, in forward time [SDE, Eq. 6]."""
        return self.drift(x, t) - per_sample(self.diffusion(t) ** 2, x) * score

    def pf_ode_drift(self, x: Tensor, t: Tensor | float, score: Tensor) -> Tensor:
        """f x − ½ g² score: the probability-flow ODE's velocity dx/dt [SDE, Eq. 13]."""
        return self.drift(x, t) - 0.5 * per_sample(self.diffusion(t) ** 2, x) * score

    def transition(self, t: Tensor | float, s: Tensor | float) -> tuple[Tensor, Tensor]:
        """(a, s_ts) of the exact forward step q(x_t | x_s) = N(a x_s, s_ts² I), s < t."""
        a = self.alpha(t) / self.alpha(s)
        return a, (self.sigma(t) ** 2 - a**2 * self.sigma(s) ** 2).clamp_min(0).sqrt()

    # -- the prior: where samplers start ---------------------------------------------------------
    def prior_std(self, t: float | None = None) -> float:
        """The std of the noise samplers start from at t (default t_max): sigma(t), the marginal of
        a point mass at 0 (VE's N(0, σ_max²) [SDE, App. C], EDM's N(0, σ_max²) [EDM, Alg. 1]);
        variance-preserving processes use 1."""
        return float(self.sigma(torch.tensor(self.t_max if t is None else t, dtype=torch.float64)))

    def prior_noise(self, shape: tuple[int, ...], t: float | None = None, generator: torch.Generator | None = None,
                    device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        """x ~ N(0, prior_std(t)² I) of `shape`: where a sampler starting at t (default t_max) begins."""
        return self.prior_std(t) * gaussian_noise(shape, generator, device, dtype)

    def prior_log_prob(self, x: Tensor) -> Tensor:
        """log N(x; 0, prior_std()² I) summed over all but the batch dim, [B]."""
        s2 = self.prior_std() ** 2
        D = x[0].numel()
        return -0.5 * D * math.log(2 * math.pi * s2) - 0.5 * x.flatten(1).pow(2).sum(1) / s2

    def sigma_range(self) -> tuple[float, float]:
        """EDM's noise levels sigma/alpha at t_eps and at t_max (float; inf where alpha = 0)."""
        ends = torch.tensor([self.t_eps, self.t_max], dtype=torch.float64)
        lam = self.log_snr(ends)
        return math.exp(-0.5 * float(lam[0])), math.exp(-0.5 * float(lam[1]))
