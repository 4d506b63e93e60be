"""DDIM: a deterministic (or partly stochastic) sampler on any sub-sequence of noise levels.

One step from time t to an earlier t' < t of any process x_t = alpha x0 + sigma eps, with the
denoiser's predictions x̂0 and ε̂ at (x_t, t):

    x̂0    = (x_t − sigma·ε̂) / alpha                                             [DDIM, Eq. 12]
    s²    = η² · (sigma'²/sigma²) · (sigma² − (alpha/alpha')² sigma'²)           [DDIM, Eq. 16]
    x_t'  = alpha'·x̂0 + sqrt(sigma'² − s²)·ε̂ + s·z                              [DDIM, Eq. 12]

On DDPM's table (alpha² = ᾱ) s is σ_t = η sqrt((1 − ᾱ')/(1 − ᾱ)) sqrt(1 − ᾱ/ᾱ'); η = 0 is
deterministic (an Euler step of the probability-flow ODE in x/alpha and sigma/alpha), and
η = 1 on every step is DDPM with σ_t² = β̃_t. Its grid is usually DDPM's steps, spaced
(`minidit.grids.ddpm_grid(T, steps)`), but any grid will do.

Running the η = 0 update upwards maps data to noise (DDIM inversion, [DDIM, Sec. 4.3]);
each upward step t → t' uses ε̂(x_t, t'), the model at the level it arrives at, which is the
same ε̂ that the downward step t' → t uses, up to O(step) error.
"""

from __future__ import annotations

import torch
from torch import Tensor

from minidit.denoiser import Denoiser
from minidit.grids import Callback, check_grid, intervals, report
from minidit.process import noise_like, per_sample, posterior_coefficients


def ddim_step(den: Denoiser, x: Tensor, t: Tensor, t_next: Tensor, *, eta: float = 0.0,
              generator: torch.Generator | None = None, noise: Tensor | None = None) -> Tensor:
    """One DDIM update x_t -> x_{t_next}, t_next < t (see the module docstring); t, t_next: one
    time or one per sample [B]; `noise` is z (default: drawn from `generator` when η > 0)."""
    process = den.process
    alpha_next, sigma_next = process.alpha(t_next), process.sigma(t_next)
    # 1. the predicted noise ε̂ and 2. the predicted x0, from one evaluation [DDIM, Eq. 12]
    pred = den(x, t)
    x0, eps = pred.x0, pred.eps
    # 3. the std of the fresh noise: η times the posterior's [DDIM, Eq. 16]
    _, _, posterior_var, _ = posterior_coefficients(process.alpha(t), process.sigma(t), alpha_next, sigma_next)
    s = eta * posterior_var.clamp_min(0).sqrt()
    # 4. the direction pointing to x_t' and 5. x_t' = alpha'·x̂0 + direction + s·z [DDIM, Eq. 12]
    direction = per_sample((sigma_next**2 - s**2).clamp_min(0).sqrt(), x) * eps
    x = per_sample(alpha_next, x) * x0 + direction
    if noise is None and s.ndim == 0 and float(s) == 0:  # η = 0, or the step onto the data
        return x
    return x + per_sample(s, x) * (noise_like(x, generator) if noise is None else noise)


@torch.no_grad()
def sample_ddim(den: Denoiser, x: Tensor, grid: Tensor, *, eta: float = 0.0,
                generator: torch.Generator | None = None, callback: Callback | None = None) -> Tensor:
    """DDIM through `grid`, one evaluation per step; η in [0, 1] (0: deterministic).

    Args:
        den: the denoiser; x: the start [B, ...] at grid[0].
        grid: decreasing times of den.process (DDPM's: `minidit.grids.ddpm_grid(T, steps)`).
        eta: the stochasticity η; generator: its noise; callback: see `minidit.grids.report`.
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must lie in [0, 1], got {eta!r}")
    for i, t, t_next in intervals(den, grid):
        x = ddim_step(den, x, t, t_next, eta=eta, generator=generator)
        x = report(callback, x, i, t, t_next, den, grid)
    return x


@torch.no_grad()
def ddim_invert(den: Denoiser, x0: Tensor, grid: Tensor, *, callback: Callback | None = None) -> Tensor:
    """Map data to noise with the η = 0 update run upwards through `grid`  [DDIM, Sec. 4.3].

    `sample_ddim(den, ddim_invert(den, x0, grid), grid)` returns the starting x0 up to O(1/steps).

    Args:
        den: the denoiser; x0: data [B, ...] at grid[-1].
        grid: the sampling grid (decreasing); it is walked from its end to its start.
        callback: called after every step, as by the samplers ("t_next" is the level reached).

    Returns:
        x at grid[0].
    """
    grid = check_grid(grid)
    process, x = den.process, x0
    upward = grid.flip(0)  # from the data to the noise
    for i in range(len(upward) - 1):
        den.step = i
        t, t_next = upward[i], upward[i + 1]
        # 1. ε̂ from the model at the level we step to (x_t ≈ x_t' for small steps)
        eps = den(x, t_next).eps
        # 2. x̂0 from the current point at its own level [DDIM, Eq. 12]
        x0_hat = (x - process.sigma(t) * eps) / process.alpha(t)
        # 3. re-noise to the next level along ε̂ (η = 0) [DDIM, Eq. 12]
        x = process.alpha(t_next) * x0_hat + process.sigma(t_next) * eps
        x = report(callback, x, i, t, t_next, den, upward)
    den.check_finite()
    return x
