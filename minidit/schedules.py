"""Noise schedules: how much signal survives at each step of the forward process.

A variance-preserving schedule is one decreasing curve ᾱ (alpha_bar), the signal
fraction left after noising; everything else follows from it:

    x_t = sqrt(ᾱ_t) · x_0 + sqrt(1 − ᾱ_t) · ε,   ᾱ_t = ∏_{s≤t} (1 − β_s)     [DDPM, Eq. 4]
    SNR(t) = ᾱ_t / (1 − ᾱ_t),   log-SNR λ(t) = log ᾱ_t − log(1 − ᾱ_t)       [VDM]

Discrete time (DDPM/DDIM): integer t in 0..T-1, t = 0 is the first noising step and
x_0 is data. Continuous time (SDEs): t in [0, 1], t = 0 is data, with
alpha(t) = sqrt(ᾱ(t)) and sigma(t) = sqrt(1 − ᾱ(t)). The two views agree:
ᾱ_discrete[i] ≈ ᾱ((i + 1) / T).

    linear   ᾱ(t) = exp(−β_min·t − (β_max − β_min)·t²/2),  β_min=0.1, β_max=20  [SDE, Eq. 33]
             discrete β_i = (β_min + (β_max − β_min)·i/(T−1)) / T  (1e-4..0.02 at T=1000) [DDPM]
    cosine   ᾱ(t) = f(t)/f(0),  f(t) = cos²((t + s)/(1 + s) · π/2),  s = 0.008  [IDDPM, Eq. 17]
    sigmoid  ᾱ(t) = (σ(e/τ) − σ((t(e − b) + b)/τ)) / (σ(e/τ) − σ(b/τ)),  b=−3, e=3, τ=1 [Chen 2023]

For cosine and sigmoid the discrete betas are β_i = 1 − ᾱ((i+1)/T)/ᾱ(i/T), clipped
at 0.999 [IDDPM, Sec. 3.2]. All tables are float64; `extract` casts per-step values
to the dtype and device of the tensor they multiply.

References: [DDPM] Ho et al. 2020; [IDDPM] Nichol & Dhariwal 2021; [SDE] Song et al.
2021; [VDM] Kingma et al. 2021; [Chen 2023] "On the importance of noise scheduling".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

SCHEDULES = ("linear", "cosine", "sigmoid")


def _check_name(name: str) -> str:
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule name {name!r}; valid names: {', '.join(SCHEDULES)}")
    return name


# ----------------------------------------------------------------------------------
# Continuous time: t in [0, 1], t = 0 is data
# ----------------------------------------------------------------------------------


def index_of_log_snr(alpha_bar: Tensor, log_snr: Tensor) -> Tensor:
    """The fractional index in [0, T-1] where a discrete table's log-SNR equals `log_snr`.

    log-SNR_i = log(ᾱ_i / (1 - ᾱ_i)) decreases with i, so the index is found by binary search
    and linear interpolation between the two neighbouring integer steps.

    Args:
        alpha_bar: ᾱ_i, a float64 table [T], decreasing.
        log_snr: target log(alpha²/sigma²) values, any shape.

    Returns:
        float64 indices of log_snr's shape, clamped to [0, T-1].
    """
    alpha_bar = torch.as_tensor(alpha_bar, dtype=torch.float64).cpu()
    neg_table = -(alpha_bar.log() - torch.log1p(-alpha_bar))  # [T], increasing in i
    target = -torch.as_tensor(log_snr, dtype=torch.float64).cpu()
    T = neg_table.numel()
    if T == 1:
        return torch.zeros_like(target)
    hi = torch.searchsorted(neg_table, target.contiguous()).clamp(1, T - 1)  # first entry >= target
    lo = hi - 1
    w = (target - neg_table[lo]) / (neg_table[hi] - neg_table[lo])
    return (lo + w).clamp(0, T - 1)


@dataclass(frozen=True)
class ContinuousSchedule:
    """ᾱ(t), alpha(t), sigma(t), log-SNR λ(t) and β(t) for continuous t in [0, 1].

    Every method takes a float tensor `t` of any shape and returns float64 of that
    shape. alpha(t)² + sigma(t)² = 1 (variance preserving). For cosine and sigmoid
    ᾱ(1) is 0 (λ = −inf, β = inf); use t ≤ 1 − 1e-3 where a finite value is needed.
    """

    name: str
    beta_min: float = 0.1  # linear: β(0)
    beta_max: float = 20.0  # linear: β(1)
    s: float = 0.008  # cosine offset
    start: float = -3.0  # sigmoid: left end of the sigmoid's input range
    end: float = 3.0  # sigmoid: right end
    tau: float = 1.0  # sigmoid temperature

    def __post_init__(self) -> None:
        _check_name(self.name)

    def alpha_bar(self, t: Tensor | float) -> Tensor:
        """Signal fraction ᾱ(t) = alpha(t)², float64, same shape as `t`."""
        t = torch.as_tensor(t, dtype=torch.float64)
        if self.name == "linear":  # ᾱ = exp(−∫_0^t β(s) ds) with β(s) linear
            return torch.exp(-self.beta_min * t - 0.5 * (self.beta_max - self.beta_min) * t**2)
        if self.name == "cosine":
            f = torch.cos((t + self.s) / (1 + self.s) * math.pi / 2) ** 2
            return f / math.cos(self.s / (1 + self.s) * math.pi / 2) ** 2
        v_start, v_end = _sigmoid(self.start / self.tau), _sigmoid(self.end / self.tau)
        v = torch.sigmoid((t * (self.end - self.start) + self.start) / self.tau)
        return ((v_end - v) / (v_end - v_start)).clamp(0.0, 1.0)

    def alpha(self, t: Tensor | float) -> Tensor:
        """Scale of the data in x_t: alpha(t) = sqrt(ᾱ(t))."""
        return self.alpha_bar(t).sqrt()

    def sigma(self, t: Tensor | float) -> Tensor:
        """Scale of the noise in x_t: sigma(t) = sqrt(1 − ᾱ(t))."""
        return (1.0 - self.alpha_bar(t)).clamp_min(0.0).sqrt()

    def log_snr(self, t: Tensor | float) -> Tensor:
        """λ(t) = log(alpha² / sigma²), decreasing from +inf at t = 0."""
        alpha_bar = self.alpha_bar(t)
        return torch.log(alpha_bar) - torch.log1p(-alpha_bar)

    def beta(self, t: Tensor | float) -> Tensor:
        """VP-SDE drift rate β(t) = −d log ᾱ(t) / dt  [SDE, Eq. 11]."""
        t = torch.as_tensor(t, dtype=torch.float64)
        if self.name == "linear":
            return self.beta_min + t * (self.beta_max - self.beta_min)
        if self.name == "cosine":
            phase = (t + self.s) / (1 + self.s) * math.pi / 2
            return math.pi / (1 + self.s) * torch.tan(phase)
        u = (t * (self.end - self.start) + self.start) / self.tau
        v_end = _sigmoid(self.end / self.tau)
        dv_dt = torch.sigmoid(u) * torch.sigmoid(-u) * (self.end - self.start) / self.tau
        return dv_dt / (v_end - torch.sigmoid(u))

    def t_from_log_snr(self, log_snr: Tensor) -> Tensor:
        """Inverse of `log_snr`: the t in [0, 1] with λ(t) = log_snr (closed forms)."""
        log_snr = torch.as_tensor(log_snr, dtype=torch.float64)
        alpha_bar = torch.sigmoid(log_snr)  # ᾱ = σ(λ)
        if self.name == "linear":  # solve β_min t + (β_max − β_min) t²/2 = −log ᾱ
            c, d = torch.nn.functional.softplus(-log_snr), self.beta_max - self.beta_min
            t = (torch.sqrt(self.beta_min**2 + 2 * d * c) - self.beta_min) / d
        elif self.name == "cosine":
            f0 = math.cos(self.s / (1 + self.s) * math.pi / 2) ** 2
            t = torch.arccos((alpha_bar * f0).sqrt()) * 2 / math.pi * (1 + self.s) - self.s
        else:
            v_start, v_end = _sigmoid(self.start / self.tau), _sigmoid(self.end / self.tau)
            v = v_end - alpha_bar * (v_end - v_start)
            t = (self.tau * torch.logit(v) - self.start) / (self.end - self.start)
        return t.clamp(0.0, 1.0)

    def discrete_betas(self, T: int, max_beta: float = 0.999) -> Tensor:
        """The T discrete betas (float64 [T]) whose ᾱ matches this curve at t = (i+1)/T."""
        if self.name == "linear":  # DDPM's linspace, scaled by 1/T so T·β spans [β_min, β_max]
            frac = torch.linspace(0.0, 1.0, T, dtype=torch.float64) if T > 1 else torch.zeros(1).double()
            betas = (self.beta_min + (self.beta_max - self.beta_min) * frac) / T
        else:
            alpha_bar = self.alpha_bar(torch.arange(T + 1, dtype=torch.float64) / T)  # [T+1]
            betas = 1.0 - alpha_bar[1:] / alpha_bar[:-1]
        return betas.clamp(0.0, max_beta)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# ----------------------------------------------------------------------------------
# Discrete time: integer t in 0..T-1
# ----------------------------------------------------------------------------------


@dataclass
class DiscreteSchedule:
    """The tables of a T-step discrete schedule, all float64 [T] on the CPU.

    Build one with `DiscreteSchedule.make("cosine", T=1000)` (or `make_schedule`), or
    from any betas with `DiscreteSchedule(betas)` (then `continuous` is None).

    Attributes:
        betas: β_t, the one-step noise variances.
        alphas: α_t = 1 − β_t.
        alpha_bar: ᾱ_t = ∏_{s≤t} α_s.
        alpha_bar_prev: ᾱ_{t−1}, with ᾱ_{−1} = 1 (the data).
        sqrt_alpha_bar, sqrt_one_minus_alpha_bar: the scales of x_0 and ε in x_t.
        continuous: the matching `ContinuousSchedule`, or None for custom betas.
    """

    betas: Tensor
    name: str = "custom"
    continuous: ContinuousSchedule | None = None
    alphas: Tensor = field(init=False, repr=False)
    alpha_bar: Tensor = field(init=False, repr=False)
    alpha_bar_prev: Tensor = field(init=False, repr=False)
    sqrt_alpha_bar: Tensor = field(init=False, repr=False)
    sqrt_one_minus_alpha_bar: Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        betas = torch.as_tensor(self.betas, dtype=torch.float64).detach().cpu()
        if betas.ndim != 1 or betas.numel() == 0:
            raise ValueError(f"betas must be a non-empty 1-D tensor, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas must lie strictly between 0 and 1")
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alpha_bar = torch.cumprod(self.alphas, dim=0)
        self.alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alpha_bar[:-1]])
        self.sqrt_alpha_bar = self.alpha_bar.sqrt()
        self.sqrt_one_minus_alpha_bar = (1.0 - self.alpha_bar).sqrt()

    @classmethod
    def make(cls, name: str, T: int = 1000, max_beta: float = 0.999) -> DiscreteSchedule:
        """Named schedule ("linear", "cosine", "sigmoid") with `T` steps."""
        _check_name(name)
        if not isinstance(T, int) or T < 1:
            raise ValueError(f"T must be a positive int, got {T!r}")
        if not 0.0 < max_beta < 1.0:
            raise ValueError(f"max_beta must lie in (0, 1), got {max_beta!r}")
        continuous = ContinuousSchedule(name)
        return cls(continuous.discrete_betas(T, max_beta), name=name, continuous=continuous)

    @property
    def T(self) -> int:
        """Number of diffusion steps."""
        return self.betas.numel()

    def check_t(self, t: Tensor, name: str = "t") -> Tensor:
        """Raise ValueError unless `t` is an integer tensor with values in 0..T-1."""
        if not isinstance(t, Tensor) or t.dtype.is_floating_point or t.dtype.is_complex:
            raise ValueError(f"{name} must be an integer (Long) tensor of timesteps, got {t!r}")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.T):
            lo, hi = int(t.min()), int(t.max())
            raise ValueError(f"{name} must lie in 0..{self.T - 1}, got range [{lo}, {hi}]")
        return t

    def snr(self, t: Tensor) -> Tensor:
        """SNR(t) = ᾱ_t / (1 − ᾱ_t), float64 of t's shape (t on the CPU or any device)."""
        alpha_bar = self.alpha_bar[self.check_t(t).cpu()]
        return alpha_bar / (1.0 - alpha_bar)

    def log_snr(self, t: Tensor) -> Tensor:
        """λ_t = log ᾱ_t − log(1 − ᾱ_t), float64 of t's shape; decreasing in t."""
        alpha_bar = self.alpha_bar[self.check_t(t).cpu()]
        return torch.log(alpha_bar) - torch.log1p(-alpha_bar)

    # -- continuous t  <->  fractional discrete index, through the log-SNR ---------

    def index_to_log_snr(self, index: Tensor) -> Tensor:
        """λ at a fractional index in [0, T-1], linear between the integer steps."""
        table = self.log_snr(torch.arange(self.T))  # [T], decreasing
        index = torch.as_tensor(index, dtype=torch.float64).clamp(0, self.T - 1)
        lo = index.floor().long().clamp(max=max(self.T - 2, 0))
        hi = (lo + 1).clamp(max=self.T - 1)
        w = index - lo
        return (1 - w) * table[lo] + w * table[hi]

    def log_snr_to_index(self, log_snr: Tensor) -> Tensor:
        """Inverse of `index_to_log_snr`: fractional index in [0, T-1] (clamped)."""
        return index_of_log_snr(self.alpha_bar, log_snr)

    def t_to_index(self, t: Tensor | float) -> Tensor:
        """Continuous t in [0, 1] -> fractional index with the same log-SNR (float64)."""
        return self.log_snr_to_index(self._require_continuous().log_snr(t))

    def index_to_t(self, index: Tensor | float) -> Tensor:
        """Fractional index -> continuous t in [0, 1] with the same log-SNR (float64)."""
        return self._require_continuous().t_from_log_snr(self.index_to_log_snr(index))

    def _require_continuous(self) -> ContinuousSchedule:
        if self.continuous is None:
            raise ValueError("this schedule was built from custom betas and has no continuous view")
        return self.continuous


def make_schedule(name: str, T: int = 1000, max_beta: float = 0.999) -> DiscreteSchedule:
    """Shorthand for `DiscreteSchedule.make(name, T, max_beta)`."""
    return DiscreteSchedule.make(name, T, max_beta)


def extract(coef: Tensor, t: Tensor, x: Tensor) -> Tensor:
    """Pick coef[t] per example and shape it to broadcast against `x`.

    Args:
        coef: a float64 table [T] (e.g. `schedule.alpha_bar`).
        t: timesteps [B] (integer).
        x: the tensor the result multiplies, [B, ...]; sets dtype and device.

    Returns:
        [B, 1, ..., 1] with x.ndim dims, in x's dtype and on x's device.
    """
    table = coef.to(dtype=x.dtype).to(x.device)  # cast on the CPU first: MPS has no float64
    out = table[t.to(x.device)]  # [B]
    return out.reshape(t.shape[0], *([1] * (x.ndim - 1)))  # [B, 1, ..., 1]
