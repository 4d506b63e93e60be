"""Flow matching / rectified flow: regress the velocity of a straight path from data to noise.

The linear interpolant joins a data point x0 (t = 0) to a noise draw eps (t = 1):

    x_t = (1 − t) x0 + t eps,       v = dx_t/dt = eps − x0              [FM, Eq. 22; RF, Eq. 1]
    L   = E_{t, x0, eps} ‖v_θ(x_t, t) − (eps − x0)‖²                     [FM, Eq. 23]

t ~ U[0, 1] or logit-normal, t = sigmoid(m + s n), n ~ N(0, 1), which puts more weight
on the middle of the path [SD3, Eq. 19]. Sampling integrates dx/dt = v_θ from t = 1 down
to t = 0 (Euler, Heun, or any solver of `minidit.ode`).

The interpolant is a diffusion process like the SDEs, with alpha = 1 − t and sigma = t, so
the learned v_θ = E[eps − x0 | x_t] converts to every other prediction:

    x̂0 = x − t v,   ε̂ = x + (1 − t) v,   score = −ε̂ / t
    f(x, t) = −x / (1 − t),   g(t)² = 2t / (1 − t)   (the SDE with these marginals)

and `FlowProcess` lets a flow model use EDM, DPM-Solver++ and the ODE samplers (as a
`Denoiser` of kind "velocity", whose PF-ODE drift is v itself).

Time convention: continuous t in [0, 1], t = 0 is the data.
References: [FM] Lipman et al. 2023; [RF] Liu, Gong, Liu 2023; [SD3] Esser et al. 2024.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from minidit.denoisers import Denoiser, SampleResult
from minidit.ode import ode_sample
from minidit.sde import SDE, as_time, per_sample

T_SAMPLINGS = ("uniform", "logit_normal")


@dataclass(frozen=True)
class FlowProcess(SDE):
    """The linear interpolant as a process: alpha(t) = 1 − t, sigma(t) = t.

    Its SDE form is singular at t = 1 (alpha = 0): start stochastic samplers at t < 1.
    """

    t_eps: float = 1e-3

    def alpha(self, t):
        return 1 - as_time(t)

    def sigma(self, t):
        return as_time(t).clone()

    def d_alpha(self, t):
        return -torch.ones_like(as_time(t))

    def d_sigma(self, t):
        return torch.ones_like(as_time(t))

    def drift(self, x, t):
        return -x / per_sample(1 - t, x)

    def diffusion(self, t):
        t = as_time(t)
        return torch.sqrt(2 * t / (1 - t))

    def t_from_log_snr(self, log_snr):
        # alpha²/sigma² = ((1 − t)/t)²  =>  t = sigmoid(−λ/2)
        return torch.sigmoid(-0.5 * torch.as_tensor(log_snr, dtype=torch.float64))


# -- the interpolant and the training target ----------------------------------------------


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
    noise_device = generator.device if generator is not None else device
    if t_sampling == "uniform":
        t = torch.rand(n, generator=generator, device=noise_device, dtype=dtype)
    else:
        t = torch.sigmoid(loc + scale * torch.randn(n, generator=generator, device=noise_device, dtype=dtype))
    return t.to(device)


def flow_loss(model: Callable[[Tensor, Tensor], Tensor], x0: Tensor, *, t_sampling: str = "uniform",
              loc: float = 0.0, scale: float = 1.0, t: Tensor | None = None,
              generator: torch.Generator | None = None) -> Tensor:
    """The flow matching loss, mean of ‖v_θ(x_t, t) − (eps − x0)‖² over all elements [FM, Eq. 23].

    Args:
        model: `model(x_t, t)` -> predicted velocity [B, ...] (t [B] in [0, 1]).
        x0: data [B, ...].
        t_sampling, loc, scale: how t is drawn (see `sample_t`), unless `t` [B] is given.
        generator: for t and eps.
    """
    B = x0.shape[0]
    if t is None:
        t = sample_t(B, t_sampling, loc, scale, generator, x0.device, x0.dtype)
    noise_device = generator.device if generator is not None else x0.device
    eps = torch.randn(x0.shape, generator=generator, device=noise_device, dtype=x0.dtype).to(x0.device)
    v_pred = model(interpolate(x0, eps, t), t)
    return (v_pred - velocity_target(x0, eps)).pow(2).mean()


# -- conversions (alpha = 1 − t, sigma = t; all of x's shape) ------------------------------


def x0_from_velocity(v: Tensor, xt: Tensor, t: Tensor) -> Tensor:
    """x̂0 = x_t − t v."""
    return xt - per_sample(t, xt) * v


def eps_from_velocity(v: Tensor, xt: Tensor, t: Tensor) -> Tensor:
    """ε̂ = x_t + (1 − t) v."""
    return xt + per_sample(1 - t, xt) * v


def score_from_velocity(v: Tensor, xt: Tensor, t: Tensor) -> Tensor:
    """∇log p_t = −ε̂ / t = −(x_t + (1 − t) v) / t (t > 0)."""
    return -eps_from_velocity(v, xt, t) / per_sample(t, xt)


def velocity_from_eps(eps: Tensor, xt: Tensor, t: Tensor) -> Tensor:
    """v = (ε̂ − x_t) / (1 − t) (t < 1)."""
    return (eps - xt) / per_sample(1 - t, xt)


def velocity_from_x0(x0: Tensor, xt: Tensor, t: Tensor) -> Tensor:
    """v = (x_t − x̂0) / t (t > 0)."""
    return (xt - x0) / per_sample(t, xt)


# -- sampling -----------------------------------------------------------------------------


def flow_sample(model: Denoiser | Callable[..., Tensor], shape: tuple[int, ...] | None = None, *,
                steps: int = 50, method: str = "euler", **options) -> SampleResult:
    """Integrate dx/dt = v(x, t) from noise at t = 1 to data at t = 0; NFE: Euler N, Heun 2N.

    Args:
        model: a velocity function `v(x, t[, y])`, or a `Denoiser` on `FlowProcess()`.
        shape: sample shape [B, ...] (or give x_init in options).
        steps: number of uniform steps in t.
        method: "euler", "heun" or "rk45" (adaptive, rtol/atol in options).
        options: the remaining options of `minidit.ode.ode_sample` (x_init, y, cfg_scale,
            null_label, generator, device, dtype, return_trajectory, progress, ...), including
            t_start (default 1, pure noise) and t_end (default 0, the data).
    """
    if not isinstance(model, Denoiser):
        model = Denoiser(model, "velocity", name="velocity_fn")
    return ode_sample(model, FlowProcess(), shape, method=method, steps=steps,
                      t_start=options.pop("t_start", 1.0), t_end=options.pop("t_end", 0.0), **options)
