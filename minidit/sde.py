"""Score-based SDEs: the VP (linear, cosine, sigmoid), sub-VP and VE diffusions, and score matching.

Each is a `minidit.process.Process`: alpha(t), sigma(t) and their derivatives, from which the
drift f, the diffusion g, the reverse SDE and the probability-flow ODE follow. With
B(t) = −log ᾱ(t) = ∫₀ᵗ β, a variance-preserving process has

    VP:     alpha = exp(−B/2),  sigma = sqrt(1 − e^{−B}),  f = −β/2,  g = sqrt(β)      [SDE, Eq. 11]
            linear   B = β_min t + (β_max − β_min) t²/2,  β_min = 0.1, β_max = 20       [SDE, Eq. 33]
            cosine   ᾱ = cos²(φ(t))/cos²(φ(0)),  φ(t) = (t + s)/(1 + s) · π/2, s = 0.008  [IDDPM, Eq. 17]
            sigmoid  ᾱ = (σ(e/τ) − σ((t(e − b) + b)/τ)) / (σ(e/τ) − σ(b/τ)), b = −3, e = 3   [Chen 2023]
    sub-VP: VP's drift with sigma = 1 − e^{−B},  g² = β (1 − e^{−2B})                    [SDE, Eq. 12]
    VE:     alpha = 1,  sigma = σ_min (σ_max/σ_min)^t,  g = sigma sqrt(2 log(σ_max/σ_min))  [SDE, Eq. 9]

For VE the marginal std is sigma(t) itself (not sqrt(sigma² − σ_min²)), as in the paper's code:
its "data" is the data seen through N(0, σ_min²) noise. Denoising score matching trains
s(x, t) ≈ ∇log p_t(x) with a weight λ(t):

    L = E_t E_{x0, eps} λ(t) ‖s(alpha x0 + sigma eps, t) + eps/sigma‖²          [SDE, Eq. 7]

λ = sigma² ("variance", DDPM's ε-MSE) or λ = g² (likelihood weighting [Song et al. 2021b]).
Time convention: continuous t in [0, 1], t = 0 is the data.

References: [SDE] Song et al. 2021; [IDDPM] Nichol & Dhariwal 2021; [Chen 2023] "On the importance
of noise scheduling"; Song, Durkan, Murray, Ermon 2021 (likelihood weighting).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from minidit.denoiser import convert
from minidit.process import Process, as_time, gaussian_noise, per_sample

WEIGHTINGS = ("variance", "likelihood")
REDUCTIONS = ("mean", "sum", "none")


class VP(Process):
    """A variance-preserving process given by B(t) = −log ᾱ(t), its rate β = B' and its inverse."""

    def B(self, t: Tensor | float) -> Tensor:
        """−log ᾱ(t) = ∫₀ᵗ β(s) ds."""
        raise NotImplementedError

    def beta(self, t: Tensor | float) -> Tensor:
        """β(t) = dB/dt, the rate of the forward SDE."""
        raise NotImplementedError

    def t_from_B(self, B: Tensor) -> Tensor:
        """Inverse of B (float64), clamped to [0, 1]."""
        raise NotImplementedError

    def alpha_bar(self, t: Tensor | float) -> Tensor:
        """ᾱ(t) = alpha(t)², the signal fraction."""
        return torch.exp(-self.B(t))

    def alpha(self, t):
        return torch.exp(-0.5 * self.B(t))

    def sigma(self, t):
        return torch.sqrt((-torch.expm1(-self.B(t))).clamp_min(0))  # sqrt(1 − e^{−B}) without cancellation

    def d_alpha(self, t):
        return -0.5 * self.beta(t) * self.alpha(t)

    def d_sigma(self, t):
        return 0.5 * self.beta(t) * torch.exp(-self.B(t)) / self.sigma(t)

    def drift(self, x, t):
        return -0.5 * per_sample(self.beta(t), x) * x

    def diffusion(self, t):
        return self.beta(t).sqrt()

    def prior_std(self, t: float | None = None) -> float:
        """1: alpha² + sigma² = 1, so unit-variance data stays N(0, I), the VP SDE's stationary law
        and DDPM's x_T [DDPM, Alg. 2; SDE, App. C]."""
        return 1.0

    def t_from_log_snr(self, log_snr):
        # alpha²/sigma² = 1/(e^B − 1), so B = log(1 + e^{−λ})
        return self.t_from_B(torch.nn.functional.softplus(-torch.as_tensor(log_snr, dtype=torch.float64)))

    def discrete_betas(self, T: int, max_beta: float = 0.999) -> Tensor:
        """T discrete betas (float64 [T]) whose ᾱ_i = ∏(1 − β) is this curve at t = (i + 1)/T,
        each clipped at `max_beta` [IDDPM, Sec. 3.2]."""
        alpha_bar = self.alpha_bar(torch.arange(T + 1, dtype=torch.float64) / T)  # [T + 1]
        return (1.0 - alpha_bar[1:] / alpha_bar[:-1]).clamp(0.0, max_beta)


@dataclass(frozen=True)
class VPSDE(VP):
    """The linear VP SDE, the continuous limit of DDPM [SDE, Eq. 11, 33]."""

    beta_min: float = 0.1
    beta_max: float = 20.0
    t_eps: float = 1e-3

    def __post_init__(self) -> None:
        if not 0 < self.beta_min <= self.beta_max:
            raise ValueError(f"need 0 < beta_min <= beta_max, got {self.beta_min}, {self.beta_max}")

    def B(self, t):
        t = as_time(t)
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2

    def beta(self, t):
        return self.beta_min + as_time(t) * (self.beta_max - self.beta_min)

    def t_from_B(self, B):
        d = self.beta_max - self.beta_min  # the stable root of β_min t + d t²/2 = B
        t = 2 * B / (self.beta_min + torch.sqrt(self.beta_min**2 + 2 * d * B))
        return torch.where(torch.isinf(B), torch.ones_like(t), t).clamp(0, 1)

    def discrete_betas(self, T: int, max_beta: float = 0.999) -> Tensor:
        """DDPM's betas, β_i = β(i/(T − 1))/T: 1e-4 ... 0.02 at T = 1000 [DDPM, Sec. 4]."""
        frac = torch.linspace(0.0, 1.0, T, dtype=torch.float64) if T > 1 else torch.zeros(1, dtype=torch.float64)
        return ((self.beta_min + (self.beta_max - self.beta_min) * frac) / T).clamp(0.0, max_beta)


@dataclass(frozen=True)
class CosineVP(VP):
    """The cosine schedule of Nichol & Dhariwal [IDDPM, Eq. 17]; ᾱ(1) = 0, so samplers start below t = 1."""

    s: float = 0.008
    t_eps: float = 1e-3

    def _phase(self, t):
        return (as_time(t) + self.s) / (1 + self.s) * math.pi / 2

    def B(self, t):
        return (-2 * (torch.log(torch.cos(self._phase(t))) - math.log(math.cos(self._phase(0.0))))).clamp_min(0)

    def beta(self, t):
        return math.pi / (1 + self.s) * torch.tan(self._phase(t))

    def t_from_B(self, B):
        cos_phase = torch.exp(-0.5 * B) * math.cos(float(self._phase(0.0)))
        return (torch.arccos(cos_phase) * 2 / math.pi * (1 + self.s) - self.s).clamp(0, 1)


@dataclass(frozen=True)
class SigmoidVP(VP):
    """The sigmoid schedule of Chen 2023; ᾱ(1) = 0."""

    start: float = -3.0
    end: float = 3.0
    tau: float = 1.0
    t_eps: float = 1e-3

    def _ends(self) -> tuple[float, float]:
        return 1 / (1 + math.exp(-self.start / self.tau)), 1 / (1 + math.exp(-self.end / self.tau))

    def B(self, t):
        v_start, v_end = self._ends()
        v = torch.sigmoid((as_time(t) * (self.end - self.start) + self.start) / self.tau)
        return -torch.log(((v_end - v) / (v_end - v_start)).clamp(0.0, 1.0))

    def beta(self, t):
        u = (as_time(t) * (self.end - self.start) + self.start) / self.tau
        dv_dt = torch.sigmoid(u) * torch.sigmoid(-u) * (self.end - self.start) / self.tau
        return dv_dt / (self._ends()[1] - torch.sigmoid(u))

    def t_from_B(self, B):
        v_start, v_end = self._ends()
        v = v_end - torch.exp(-B) * (v_end - v_start)
        return ((self.tau * torch.logit(v) - self.start) / (self.end - self.start)).clamp(0, 1)


@dataclass(frozen=True)
class SubVPSDE(VPSDE):
    """The sub-VP SDE: VP's drift with less noise, sigma = 1 − exp(−B) [SDE, Eq. 12]."""

    def sigma(self, t):
        return -torch.expm1(-self.B(t))

    def d_sigma(self, t):
        return self.beta(t) * torch.exp(-self.B(t))

    def diffusion(self, t):
        return torch.sqrt(self.beta(t) * -torch.expm1(-2 * self.B(t)))

    t_from_log_snr = Process.t_from_log_snr  # no closed form: bisection


@dataclass(frozen=True)
class VESDE(Process):
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


def make_sde(name: str, **kwargs) -> Process:
    """Build the SDE called `name` ("vp", "subvp", "ve") with its dataclass fields as kwargs."""
    if name not in SDES:
        raise ValueError(f"unknown SDE name {name!r}; valid names: {', '.join(SDES)}")
    return SDES[name](**kwargs)


# ----------------------------------------------------------------------------------------
# Denoising score matching
# ----------------------------------------------------------------------------------------


def dsm_loss(model: Callable[..., Tensor], sde: Process, x0: Tensor, y: Tensor | None = None, *,
             prediction: str = "score", weighting: str = "variance", t_eps: float = 1e-5,
             t: Tensor | None = None, reduce: str = "mean", generator: torch.Generator | None = None) -> Tensor:
    """Denoising score matching, `t ~ U[t_eps, 1]` [SDE, Eq. 7].

    Args:
        model: `model(x_t, t)` (or `model(x_t, t, y)`) -> [B, ...], a score (prediction="score")
            or a noise prediction (prediction="eps", read as score = −eps / sigma).
        sde: the forward process.
        x0: data [B, ...]; y: labels [B] passed to the model, or None.
        weighting: λ(t) = sigma² ("variance", the ε-MSE for an eps-model) or g² ("likelihood").
        t_eps: the smallest t drawn (the VP process is singular at 0).
        t: fixed times [B] instead of uniform draws (for loss-by-t plots and tests).
        reduce: over the non-batch dims "mean" or "sum", then the batch mean; "none" returns the
            per-example means [B].
        generator: for t and eps.

    Returns:
        The scalar loss, or [B] with reduce="none".
    """
    if prediction not in ("score", "eps"):
        raise ValueError(f"unknown prediction {prediction!r}; valid choices: score, eps")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; valid choices: {', '.join(WEIGHTINGS)}")
    if reduce not in REDUCTIONS:
        raise ValueError(f"unknown reduce {reduce!r}; valid choices: {', '.join(REDUCTIONS)}")
    if not 0 <= t_eps < 1:
        raise ValueError(f"t_eps must lie in [0, 1), got {t_eps}")
    # 1. t ~ U[t_eps, 1], eps ~ N(0, I), x_t = alpha x0 + sigma eps
    if t is None:
        t = t_eps + (1 - t_eps) * torch.rand(x0.shape[0], generator=generator, device=(
            generator.device if generator is not None else x0.device), dtype=x0.dtype).to(x0.device)  # [B]
    eps = gaussian_noise(x0.shape, generator, x0.device, x0.dtype)
    xt = sde.perturb(x0, t, eps)
    out = model(xt, t) if y is None else model(xt, t, y)
    # 2. the residual of the score, s + eps/sigma, and the weight λ(t)
    sigma = per_sample(sde.sigma(t), x0)  # [B, 1, ...]
    score = convert(out, prediction, "score", xt, t, sde)
    lam = sigma**2 if weighting == "variance" else per_sample(sde.diffusion(t), x0) ** 2
    per_elem = lam * (score + eps / sigma) ** 2
    if reduce == "sum":
        return per_elem.flatten(1).sum(1).mean()
    per_example = per_elem.flatten(1).mean(1)  # [B]
    return per_example if reduce == "none" else per_example.mean()
