"""Score-based SDEs: the VP, sub-VP and VE diffusions as drift, diffusion and Gaussian marginal.

A forward SDE dx = f(x, t) dt + g(t) dw carries data (t = 0) to noise (t = 1). With a
linear drift f(x, t) = f(t) x the law of x_t given x_0 stays Gaussian, which every class
here states as a mean coefficient alpha(t) and a standard deviation sigma(t):

    x_t = alpha(t) x_0 + sigma(t) eps,   eps ~ N(0, I)
    f(t) = alpha'/alpha,   g(t)² = d sigma²/dt − 2 (alpha'/alpha) sigma²
    reverse SDE:  dx = [f(x, t) − g(t)² ∇log p_t(x)] dt + g(t) dw̄        [SDE, Eq. 6]
    PF-ODE:       dx/dt = f(x, t) − ½ g(t)² ∇log p_t(x)                     [SDE, Eq. 13]

    VP:     dx = −½ β(t) x dt + sqrt(β(t)) dw,   β(t) = β_min + t (β_max − β_min)   [SDE, Eq. 11]
            alpha = exp(−½ B(t)),  sigma² = 1 − exp(−B(t)),  B(t) = ∫₀ᵗ β
    sub-VP: same drift, g² = β(t) (1 − exp(−2 B(t))),  sigma = 1 − exp(−B(t))        [SDE, Eq. 12]
    VE:     dx = sqrt(d sigma²/dt) dw,  sigma(t) = σ_min (σ_max/σ_min)^t,  alpha = 1  [SDE, Eq. 9]

Time convention: continuous t in [0, 1], t = 0 is the data. For VE the marginal std is
sigma(t) itself (not sqrt(sigma(t)² − σ_min²)), as in the paper's code: the "data" of the
VE process is the data seen through N(0, σ_min²) noise, which is then consistent with the
SDE. The prior of every process is N(0, sigma(1)² I) (the marginal of a point mass at 0).
Denoising score matching trains s(x, t) ≈ ∇log p_t(x) with weight λ(t):

    L = E_t E_{x0, eps} λ(t) ‖s(alpha x0 + sigma eps, t) + eps/sigma‖²      [SDE, Eq. 7]

λ = sigma² ("variance", DDPM's ε-MSE) or λ = g² (likelihood weighting [Song et al. 2021b]).

References: [SDE] Song et al. 2021; Song, Durkan, Murray, Ermon 2021 (likelihood weighting).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

WEIGHTINGS = ("variance", "likelihood")
DSM_PREDICTIONS = ("score", "eps")


def per_sample(v: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-sample value [B] to [B, 1, ..., 1] so it broadcasts against x [B, ...]."""
    return v.reshape(-1, *([1] * (x.ndim - 1)))  # [B] -> [B, 1, ..., 1]


def as_time(t: Tensor | float) -> Tensor:
    """t as a floating-point tensor (a python float becomes a 0-d tensor)."""
    t = torch.as_tensor(t)
    return t if t.is_floating_point() else t.to(torch.get_default_dtype())


class SDE:
    """Shared behaviour of a linear diffusion given alpha(t), sigma(t) and their derivatives.

    Subclasses define `alpha`, `sigma`, `d_alpha`, `d_sigma` (time derivatives) and the
    closed forms `drift` and `diffusion`; every method takes t of any shape (a float or
    a tensor [B]) and returns a tensor of t's shape, except where x is involved: then t
    is [B] and the result is shaped like x [B, ...].

    Attributes:
        t_eps: where samplers stop (the process is singular at t = 0 for VP).
    """

    t_eps: float = 1e-3

    # -- the Gaussian marginal p_t(x | x0) = N(alpha x0, sigma² I) ----------------------
    def alpha(self, t: Tensor | float) -> Tensor:
        """The mean coefficient alpha(t)."""
        raise NotImplementedError

    def sigma(self, t: Tensor | float) -> Tensor:
        """The standard deviation sigma(t)."""
        raise NotImplementedError

    def d_alpha(self, t: Tensor | float) -> Tensor:
        """d alpha / dt."""
        raise NotImplementedError

    def d_sigma(self, t: Tensor | float) -> Tensor:
        """d sigma / dt."""
        raise NotImplementedError

    def drift(self, x: Tensor, t: Tensor) -> Tensor:
        """f(x, t), shaped like x."""
        raise NotImplementedError

    def diffusion(self, t: Tensor | float) -> Tensor:
        """g(t), t's shape."""
        raise NotImplementedError

    def marginal(self, x0: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean alpha(t) x0 [B, ...] and std sigma(t) [B, 1, ...] of p_t(x | x0)."""
        return per_sample(self.alpha(t), x0) * x0, per_sample(self.sigma(t), x0)

    def perturb(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x_t = alpha(t) x0 + sigma(t) eps, shaped like x0."""
        mean, std = self.marginal(x0, t)
        return mean + std * eps

    def log_snr(self, t: Tensor | float) -> Tensor:
        """log(alpha² / sigma²), decreasing in t (the convention of `minidit.schedules`)."""
        t = as_time(t)
        return 2 * (torch.log(self.alpha(t)) - torch.log(self.sigma(t)))

    def t_from_log_snr(self, log_snr: Tensor | float) -> Tensor:
        """The t in [0, 1] with log_snr(t) = log_snr, float64, by bisection (subclasses may
        override with a closed form). Values beyond the process's range clamp to t = 0 or 1.
        """
        target = torch.as_tensor(log_snr, dtype=torch.float64)
        lo, hi = torch.zeros_like(target), torch.ones_like(target)
        for _ in range(60):  # 2^-60: far below float64 resolution of t
            mid = (lo + hi) / 2
            above = self.log_snr(mid) > target  # log-SNR decreases in t: go right
            lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
        return (lo + hi) / 2  # float64

    # -- the prior p_1 = N(0, sigma(1)² I) ----------------------------------------------
    def prior_std(self) -> float:
        """sigma(1), the std of the prior."""
        return float(self.sigma(torch.tensor(1.0, dtype=torch.float64)))

    def prior_sample(self, shape: tuple[int, ...], generator: torch.Generator | None = None,
                     device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        """Draw x_1 ~ N(0, sigma(1)² I) of `shape` (noise drawn on the generator's device)."""
        noise_device = generator.device if generator is not None else device
        z = torch.randn(shape, generator=generator, device=noise_device, dtype=dtype)
        return self.prior_std() * z.to(device)

    def prior_log_prob(self, x: Tensor) -> Tensor:
        """log N(x; 0, sigma(1)² I) summed over all but the batch dim, [B]."""
        s2 = self.prior_std() ** 2
        D = x[0].numel()
        return -0.5 * D * math.log(2 * math.pi * s2) - 0.5 * x.flatten(1).pow(2).sum(1) / s2

    # -- reverse-time dynamics given a score ---------------------------------------------
    def reverse_drift(self, x: Tensor, t: Tensor, score: Tensor) -> Tensor:
        """f(x, t) − g(t)² score: the drift of the reverse SDE in forward time [SDE, Eq. 6]."""
        g = per_sample(self.diffusion(t), x)
        return self.drift(x, t) - g**2 * score

    def pf_ode_drift(self, x: Tensor, t: Tensor, score: Tensor) -> Tensor:
        """f(x, t) − ½ g(t)² score: the probability-flow ODE's velocity dx/dt [SDE, Eq. 13]."""
        g = per_sample(self.diffusion(t), x)
        return self.drift(x, t) - 0.5 * g**2 * score

    def discretize(self, x: Tensor, t: Tensor, dt: Tensor | float) -> tuple[Tensor, Tensor]:
        """The exact forward step from s = t − dt to t: x_t = x_s + f_s + G z [SDE, Eq. 46-47].

        With a = alpha(t)/alpha(s): f_s = (a − 1) x_s and G = sqrt(sigma(t)² − a² sigma(s)²),
        the transition of a linear SDE (VP: G² = 1 − a² = β_i; VE: G² = sigma_t² − sigma_s²).

        Returns:
            f_s shaped like x, and G [B, 1, ...].
        """
        s = t - dt
        a = self.alpha(t) / self.alpha(s)  # [B]
        G2 = (self.sigma(t) ** 2 - a**2 * self.sigma(s) ** 2).clamp_min(0)  # [B]
        return (per_sample(a, x) - 1) * x, per_sample(G2.sqrt(), x)


# ----------------------------------------------------------------------------------------
# The three SDEs of the paper
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VPSDE(SDE):
    """The variance-preserving SDE, the continuous limit of DDPM [SDE, Eq. 11].

    At T = 1000 its Euler discretisation is DDPM's linear schedule β_i ∈ [1e-4, 0.02].
    """

    beta_min: float = 0.1
    beta_max: float = 20.0
    t_eps: float = 1e-3

    def __post_init__(self) -> None:
        if not 0 < self.beta_min <= self.beta_max:
            raise ValueError(f"need 0 < beta_min <= beta_max, got {self.beta_min}, {self.beta_max}")

    def beta(self, t: Tensor | float) -> Tensor:
        return self.beta_min + as_time(t) * (self.beta_max - self.beta_min)

    def B(self, t: Tensor | float) -> Tensor:
        """∫₀ᵗ β(s) ds."""
        t = as_time(t)
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2

    def alpha(self, t):
        return torch.exp(-0.5 * self.B(t))

    def sigma(self, t):
        return torch.sqrt(-torch.expm1(-self.B(t)))  # sqrt(1 − e^{−B}) without cancellation

    def d_alpha(self, t):
        return -0.5 * self.beta(t) * self.alpha(t)

    def d_sigma(self, t):
        return 0.5 * self.beta(t) * torch.exp(-self.B(t)) / self.sigma(t)

    def drift(self, x, t):
        return -0.5 * per_sample(self.beta(t), x) * x

    def diffusion(self, t):
        return self.beta(t).sqrt()

    def t_from_log_snr(self, log_snr):
        # alpha²/sigma² = 1/(e^B − 1)  =>  B = log(1 + e^{−λ}); then solve the quadratic B(t) = B
        B = torch.nn.functional.softplus(-torch.as_tensor(log_snr, dtype=torch.float64))
        d = self.beta_max - self.beta_min
        t = 2 * B / (self.beta_min + torch.sqrt(self.beta_min**2 + 2 * d * B))  # stable root
        return torch.where(torch.isinf(B), torch.ones_like(t), t).clamp(0, 1)  # λ = −inf: pure noise


@dataclass(frozen=True)
class SubVPSDE(VPSDE):
    """The sub-VP SDE: VP's drift with less noise, sigma = 1 − exp(−B) [SDE, Eq. 12]."""

    def sigma(self, t):
        return -torch.expm1(-self.B(t))

    def d_sigma(self, t):
        return self.beta(t) * torch.exp(-self.B(t))

    def diffusion(self, t):
        return torch.sqrt(self.beta(t) * -torch.expm1(-2 * self.B(t)))

    t_from_log_snr = SDE.t_from_log_snr  # no closed form: bisection


@dataclass(frozen=True)
class VESDE(SDE):
    """The variance-exploding SDE of NCSN: no drift, sigma grows geometrically [SDE, Eq. 9]."""

    sigma_min: float = 0.01
    sigma_max: float = 50.0
    t_eps: float = 1e-5

    def __post_init__(self) -> None:
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}")

    @property
    def log_ratio(self) -> float:
        return math.log(self.sigma_max / self.sigma_min)

    def alpha(self, t):
        return torch.ones_like(as_time(t))

    def sigma(self, t):
        return self.sigma_min * torch.exp(as_time(t) * self.log_ratio)

    def d_alpha(self, t):
        return torch.zeros_like(as_time(t))

    def d_sigma(self, t):
        return self.sigma(t) * self.log_ratio

    def drift(self, x, t):
        return torch.zeros_like(x)

    def diffusion(self, t):
        return self.sigma(t) * math.sqrt(2 * self.log_ratio)  # sqrt(d sigma²/dt)

    def t_from_log_snr(self, log_snr):
        log_sigma = -0.5 * torch.as_tensor(log_snr, dtype=torch.float64)  # λ = −2 log sigma
        return ((log_sigma - math.log(self.sigma_min)) / self.log_ratio).clamp(0, 1)


SDES = {"vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE}


def make_sde(name: str, **kwargs) -> SDE:
    """Build the SDE called `name` ("vp", "subvp", "ve") with its dataclass fields as kwargs."""
    if name not in SDES:
        raise ValueError(f"unknown SDE name {name!r}; valid names: {', '.join(SDES)}")
    return SDES[name](**kwargs)


# ----------------------------------------------------------------------------------------
# Denoising score matching
# ----------------------------------------------------------------------------------------


def dsm_loss(
    model: Callable[[Tensor, Tensor], Tensor],
    sde: SDE,
    x0: Tensor,
    *,
    prediction: str = "score",
    weighting: str = "variance",
    t_eps: float = 1e-5,
    t: Tensor | None = None,
    reduce: str = "mean",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Denoising score matching loss, t ~ U[t_eps, 1]; see [SDE, Eq. 7].

    Args:
        model: `model(x_t, t)` -> [B, ...], a score (prediction="score") or a noise
            prediction eps_pred (prediction="eps", read as score = −eps_pred / sigma).
        sde: the forward process.
        x0: data [B, ...].
        weighting: "variance" (λ = sigma², ‖sigma s + eps‖², the ε-MSE for an eps-model)
            or "likelihood" (λ = g², which makes the loss bound −log p [Song et al. 2021b]).
        t_eps: the smallest t sampled (the VP process is singular at 0).
        t: optional fixed times [B] instead of uniform draws (for loss-by-t plots, tests).
        reduce: "mean" or "sum" over the non-batch dims, before the batch mean.
        generator: for t and eps.

    Returns:
        The scalar loss.
    """
    if prediction not in DSM_PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; valid choices: {', '.join(DSM_PREDICTIONS)}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; valid choices: {', '.join(WEIGHTINGS)}")
    if reduce not in ("mean", "sum"):
        raise ValueError(f"unknown reduce {reduce!r}; valid choices: mean, sum")
    if not 0 <= t_eps < 1:
        raise ValueError(f"t_eps must lie in [0, 1), got {t_eps}")
    B = x0.shape[0]
    gen_device = generator.device if generator is not None else x0.device
    # 1. t ~ U[t_eps, 1], eps ~ N(0, I), x_t = alpha x0 + sigma eps
    if t is None:
        u = torch.rand(B, generator=generator, device=gen_device, dtype=x0.dtype).to(x0.device)
        t = t_eps + (1 - t_eps) * u  # [B]
    eps = torch.randn(x0.shape, generator=generator, device=gen_device, dtype=x0.dtype).to(x0.device)
    xt = sde.perturb(x0, t, eps)
    sigma = per_sample(sde.sigma(t), x0)  # [B, 1, ...]
    out = model(xt, t)
    # 2. the residual of the score, s + eps/sigma, and the weight λ(t)
    score = out if prediction == "score" else -out / sigma
    lam = sigma**2 if weighting == "variance" else per_sample(sde.diffusion(t), x0) ** 2
    per_elem = lam * (score + eps / sigma) ** 2
    per_example = per_elem.flatten(1).mean(1) if reduce == "mean" else per_elem.flatten(1).sum(1)  # [B]
    return per_example.mean()
