"""Noise schedules: DDPM's discrete table as T samples of a continuous VP process.

A variance-preserving schedule is one decreasing curve ᾱ(t), the signal fraction left after
noising (`minidit.sde`: linear, cosine, sigmoid). DDPM uses T samples of it:

    ᾱ_i = ∏_{j≤i} (1 − β_j) = ᾱ((i + 1)/T),   i = 0..T−1                    [DDPM, Eq. 4]
    x_i = sqrt(ᾱ_i) · x_0 + sqrt(1 − ᾱ_i) · ε,    SNR_i = ᾱ_i / (1 − ᾱ_i)

For cosine and sigmoid β_i = 1 − ᾱ((i+1)/T)/ᾱ(i/T), clipped at 0.999 [IDDPM, Sec. 3.2]; for
the linear schedule DDPM's own β_i = β(i/(T−1))/T (1e-4 ... 0.02 at T = 1000), which matches
the continuous curve to within 0.07 in log-SNR.

The table is itself a process, `TableVP`: ᾱ(t) interpolates log ᾱ linearly between the
samples, i.e. the VP SDE whose rate β(t) = −T log(1 − β_i) is constant on each step
[i/T, (i + 1)/T). A DDPM network trained at step i is that process at t = (i + 1)/T, so its
time input is T·t − 1, and every continuous-time sampler can drive it.

Time convention: integer i in 0..T−1 in the tables (i = 0 is the first noising step, x_0 is
data); continuous t in [0, 1] in `TableVP`. Tables are float64 on the CPU; `extract` casts
per-step values to the dtype and device of the tensor they multiply.

References: [DDPM] Ho et al. 2020; [IDDPM] Nichol & Dhariwal 2021.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from minidit.sde import VP, CosineVP, SigmoidVP, VPSDE

SCHEDULES = {"linear": VPSDE, "cosine": CosineVP, "sigmoid": SigmoidVP}  # name -> its continuous curve


def _check_name(name: str) -> str:
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule name {name!r}; valid names: {', '.join(SCHEDULES)}")
    return name


class TableVP(VP):
    """The VP process of a discrete table: log ᾱ linear in t between the knots t_i = i/T.

    Args:
        betas: the table's β_i, float64 [T]; ᾱ(i/T) = ∏_{j<i} (1 − β_j), ᾱ(0) = 1.
    """

    def __init__(self, betas: Tensor):
        betas = torch.as_tensor(betas, dtype=torch.float64).cpu()
        self.T = betas.numel()
        self.t_eps = 1.0 / self.T  # the table's first step
        self.trained_range = (1.0 / self.T, 1.0)  # the times of steps 0 and T − 1: what a DDPM network saw
        self.rates = -torch.log1p(-betas) * self.T  # β(t) on each step, [T]
        self.knots = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(-torch.log1p(-betas), 0)])  # B(i/T)

    def _table(self, values: Tensor, t: Tensor) -> Tensor:
        return values.to(device=t.device, dtype=t.dtype if t.dtype != torch.float16 else torch.float32)

    def _step(self, t: Tensor) -> Tensor:
        return (t * self.T).floor().long().clamp(0, self.T - 1)  # the step [i/T, (i+1)/T) holding t

    def B(self, t):
        t = torch.as_tensor(t, dtype=torch.float64) if not isinstance(t, Tensor) else t
        i = self._step(t)
        return self._table(self.knots, t)[i] + self._table(self.rates, t)[i] * (t - i.to(t.dtype) / self.T)

    def beta(self, t):
        t = torch.as_tensor(t, dtype=torch.float64) if not isinstance(t, Tensor) else t
        return self._table(self.rates, t)[self._step(t)]

    def t_from_B(self, B):
        B = torch.as_tensor(B, dtype=torch.float64)
        knots = self._table(self.knots, B)
        i = (torch.searchsorted(knots, B.contiguous(), right=True) - 1).clamp(0, self.T - 1)  # knot below B
        t = (i.to(B.dtype) + (B - knots[i]) / (knots[i + 1] - knots[i])) / self.T
        return t.clamp(0, 1)

    def __eq__(self, other) -> bool:
        return isinstance(other, TableVP) and torch.equal(self.knots, other.knots)

    def __hash__(self) -> int:
        return hash((self.T, float(self.knots[-1])))

    def __repr__(self) -> str:
        return f"TableVP(T={self.T})"


@dataclass
class DiscreteSchedule:
    """The tables of a T-step discrete schedule, all float64 [T] on the CPU.

    Build one with `make_schedule("cosine", T=1000)`, or from any betas with `DiscreteSchedule(betas)`.

    Attributes:
        betas: β_t, the one-step noise variances.
        alphas: α_t = 1 − β_t.
        alpha_bar: ᾱ_t = ∏_{s≤t} α_s.
        alpha_bar_prev: ᾱ_{t−1}, with ᾱ_{−1} = 1 (the data).
        sqrt_alpha_bar, sqrt_one_minus_alpha_bar: the scales of x_0 and ε in x_t.
        process: the table as a continuous process (`TableVP`), step t at time (t + 1)/T.
    """

    betas: Tensor
    name: str = "custom"
    alphas: Tensor = field(init=False, repr=False)
    alpha_bar: Tensor = field(init=False, repr=False)
    alpha_bar_prev: Tensor = field(init=False, repr=False)
    sqrt_alpha_bar: Tensor = field(init=False, repr=False)
    sqrt_one_minus_alpha_bar: Tensor = field(init=False, repr=False)
    process: TableVP = field(init=False, repr=False)

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
        self.process = TableVP(betas)

    @property
    def T(self) -> int:
        """Number of diffusion steps."""
        return self.betas.numel()

    def time(self, t: Tensor) -> Tensor:
        """The continuous time (t + 1)/T of integer steps t, in the table's process."""
        return (t.to(torch.float64) + 1) / self.T

    def check_t(self, t: Tensor, name: str = "t") -> Tensor:
        """Raise ValueError unless `t` is an integer tensor with values in 0..T-1."""
        if not isinstance(t, Tensor) or t.dtype.is_floating_point or t.dtype.is_complex:
            raise ValueError(f"{name} must be an integer (Long) tensor of timesteps, got {t!r}")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.T):
            lo, hi = int(t.min()), int(t.max())
            raise ValueError(f"{name} must lie in 0..{self.T - 1}, got range [{lo}, {hi}]")
        return t

    def snr(self, t: Tensor) -> Tensor:
        """SNR(t) = ᾱ_t / (1 − ᾱ_t), float64 of t's shape."""
        alpha_bar = self.alpha_bar[self.check_t(t).cpu()]
        return alpha_bar / (1.0 - alpha_bar)

    def log_snr(self, t: Tensor) -> Tensor:
        """λ_t = log ᾱ_t − log(1 − ᾱ_t), float64 of t's shape; decreasing in t."""
        alpha_bar = self.alpha_bar[self.check_t(t).cpu()]
        return torch.log(alpha_bar) - torch.log1p(-alpha_bar)


def make_schedule(name: str, T: int = 1000, max_beta: float = 0.999) -> DiscreteSchedule:
    """The T-step table of the named curve ("linear", "cosine", "sigmoid"; see `minidit.sde`)."""
    _check_name(name)
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"T must be a positive int, got {T!r}")
    if not 0.0 < max_beta < 1.0:
        raise ValueError(f"max_beta must lie in (0, 1), got {max_beta!r}")
    return DiscreteSchedule(SCHEDULES[name]().discrete_betas(T, max_beta), name=name)


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
