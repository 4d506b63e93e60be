"""Flow matching / rectified flow: regress the velocity of a straight path from data to noise.

The linear interpolant joins a data point x0 (t = 0) to a noise draw eps (t = 1):

    x_t = (1 − t) x0 + t eps,       v = dx_t/dt = eps − x0              [FM, Eq. 22; RF, Eq. 1]
    L   = E_{t, x0, eps} ‖v_θ(x_t, t) − (eps − x0)‖²                     [FM, Eq. 23]

t ~ U[0, 1] or logit-normal, t = sigmoid(m + s n), n ~ N(0, 1), which puts more weight
on the middle of the path [SD3, Eq. 19]. Sampling integrates dx/dt = v_θ from t = 1 down
to t = 0 with any ODE solver of `minidit.ode` (Euler, Heun, RK45) or `minidit.dpm_solver`.

The interpolant is a Gaussian process like the SDEs, alpha = 1 − t and sigma = t (`FlowProcess`),
so a velocity network is a `minidit.denoiser.Denoiser` of kind "velocity" whose predictions
convert to every other kind (x̂0 = x − t v, ε̂ = x + (1 − t) v), and whose SDE form
f = −1/(1 − t), g² = 2t/(1 − t) has the same marginals (singular at t = 1).

Time convention: continuous t in [0, 1], t = 0 is the data.
References: [FM] Lipman et al. 2023; [RF] Liu, Gong, Liu 2023; [SD3] Esser et al. 2024.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from minidit.process import Process, as_time, gaussian_noise, per_sample

T_SAMPLINGS = ("uniform", "logit_normal")


@dataclass(frozen=True)
class FlowProcess(Process):
    """The linear interpolant as a process: alpha(t) = 1 − t, sigma(t) = t."""

    t_eps: float = 1e-3

    def alpha(self, t):
        return 1 - as_time(t)

    def sigma(self, t):
        return as_time(t).clone()

    def d_alpha(self, t):
        return -torch.ones_like(as_time(t))

    def d_sigma(self, t):
        return torch.ones_like(as_time(t))

    def t_from_log_snr(self, log_snr):
        # alpha²/sigma² = ((1 − t)/t)²  =>  t = sigmoid(−λ/2)
        return torch.sigmoid(-0.5 * torch.as_tensor(log_snr, dtype=torch.float64))


def interpolate(x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    """x_t = (1 − t) x0 + t eps for x0, eps [B, ...] and t [B]."""
    t = per_sample(t, x0)  # [B, 1, ...]
    return (1 - t) * x0 + t * eps


def velocity_target(x0: Tensor, eps: Tensor) -> Tensor:
    """v = eps − x0, the velocity of the straight path."""
    return eps - x0


def sample_t(n: int, t_sampling: str = "uniform", loc: float = 0.0, scale: float = 1.0,
             generator: torch.Generator | None = None, device: torch.device | str | None = None,
             dtype: torch.dtype = torch.float32) -> Tensor:
    """n training times [n]: U[0, 1], or logit-normal sigmoid(loc + scale n) [SD3, Eq. 19]."""
    if t_sampling not in T_SAMPLINGS:
        raise ValueError(f"unknown t_sampling {t_sampling!r}; valid choices: {', '.join(T_SAMPLINGS)}")
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    if t_sampling == "uniform":
        noise_device = generator.device if generator is not None else device
        return torch.rand(n, generator=generator, device=noise_device, dtype=dtype).to(device)
    return torch.sigmoid(loc + scale * gaussian_noise((n,), generator, device, dtype))


def flow_loss(model: Callable[..., Tensor], x0: Tensor, y: Tensor | None = None, *, t_sampling: str = "uniform",
              loc: float = 0.0, scale: float = 1.0, t: Tensor | None = None, reduce: str = "mean",
              generator: torch.Generator | None = None) -> Tensor:
    """The flow matching loss ‖v_θ(x_t, t) − (eps − x0)‖², averaged over elements [FM, Eq. 23].

    Args:
        model: `model(x_t, t)` (or `model(x_t, t, y)`) -> predicted velocity [B, ...], t [B] in [0, 1].
        x0: data [B, ...]; y: labels [B] passed to the model, or None.
        t_sampling, loc, scale: how t is drawn (see `sample_t`), unless `t` [B] is given.
        reduce: "mean" (a scalar) or "none" (the per-example means [B]).
        generator: for t and eps.
    """
    if reduce not in ("mean", "none"):
        raise ValueError(f"unknown reduce {reduce!r}; valid choices: mean, none")
    if t is None:
        t = sample_t(x0.shape[0], t_sampling, loc, scale, generator, x0.device, x0.dtype)
    eps = gaussian_noise(x0.shape, generator, x0.device, x0.dtype)
    xt = interpolate(x0, eps, t)
    v_pred = model(xt, t) if y is None else model(xt, t, y)
    per_example = (v_pred - velocity_target(x0, eps)).pow(2).flatten(1).mean(1)  # [B]
    return per_example if reduce == "none" else per_example.mean()
