"""Samplers of the reverse SDE (Euler-Maruyama, reverse diffusion, Langevin, predictor-corrector),
and `SAMPLERS`, every sampler of minidit by name.

Reverse time runs through a grid t_0 > t_1 > ... > t_N (Δt = t_i − t_{i+1}). At each level the
corrector first runs Langevin MCMC on p_t, then the predictor steps down the reverse SDE
(the order of the paper's code):

    Euler-Maruyama:     x ← x − [f(x, t) − g² s(x, t)] Δt + g √Δt z            [SDE, Eq. 6]
    reverse diffusion:  x ← x − (a − 1) x + G² s(x, t) + G z                     [SDE, Eq. 46]
                        (a, G: the exact forward step from t_{i+1} to t_i, `Process.transition`)
    Langevin:           ε = 2 a² (r ‖z‖ / ‖s‖)²,  x ← x + ε s(x, t) + √(2ε) z   [SDE, Alg. 4/5]
                        (r = snr, a² = (alpha(t_i)/alpha(t_{i+1}))² = 1 − β_i for VP, 1 for VE;
                        ‖·‖ averaged over the batch, as in the paper's code)

The last update adds no noise (`denoise=True`, the paper's final "noise removal").

Every sampler here and in `ddpm`, `ddim`, `ode` and `dpm_solver` has one signature,
`sampler(denoiser, x_init, grid, *, ..., generator=None, callback=None) -> Tensor`, with the
grid built apart (`minidit.grids`). EDM's sampler is `sample_heun` on `minidit.edm.EDMProcess`.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from minidit.ddim import sample_ddim
from minidit.ddpm import sample_ddpm
from minidit.denoiser import Denoiser
from minidit.dpm_solver import sample_dpm_solver_2m, sample_dpm_solver_3m
from minidit.grids import Callback, check_steps, intervals, report
from minidit.ode import sample_euler, sample_heun, sample_rk45
from minidit.process import noise_like, per_sample

PREDICTORS = ("euler_maruyama", "reverse_diffusion", None)
CORRECTORS = ("langevin", None)


def euler_maruyama_step(den: Denoiser, x: Tensor, t: Tensor, t_next: Tensor,
                        generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """One Euler-Maruyama step of the reverse SDE from t to t_next < t (one time, or one per
    sample [B]); returns (x, its mean)."""
    process, dt = den.process, per_sample(t - t_next, x)
    drift = process.reverse_drift(x, t, den.score(x, t))
    x_mean = x - drift * dt
    return x_mean + per_sample(process.diffusion(t), x) * dt.sqrt() * noise_like(x, generator), x_mean


def reverse_diffusion_step(den: Denoiser, x: Tensor, t: Tensor, t_next: Tensor,
                           generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """One reverse-diffusion predictor step from t to t_next < t; returns (x, its mean)."""
    a, G = (per_sample(c, x) for c in den.process.transition(t, t_next))  # the exact forward step t_next -> t
    x_mean = x - (a - 1) * x + G**2 * den.score(x, t)
    return x_mean + G * noise_like(x, generator), x_mean


def langevin_step(den: Denoiser, x: Tensor, t: Tensor, t_next: Tensor, snr: float = 0.16,
                  generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """One Langevin corrector step at level t with the signal-to-noise step rule; returns (x, its mean)."""
    score = den.score(x, t)
    z = noise_like(x, generator)
    a = per_sample((den.process.alpha(t) / den.process.alpha(t_next)) ** 2, x)  # 1 − β_i for VP
    # norms averaged over the batch: per-sample ratios blow up where the score vanishes
    ratio = z.flatten(1).norm(dim=1).mean() / score.flatten(1).norm(dim=1).mean().clamp_min(1e-12)
    step = 2 * a * (snr * ratio) ** 2
    x_mean = x + step * score
    return x_mean + (2 * step).sqrt() * z, x_mean


@torch.no_grad()
def sample_pc(den: Denoiser, x: Tensor, grid: Tensor, *, predictor: str | None = "reverse_diffusion",
              corrector: str | None = "langevin", n_corrector_steps: int = 1, snr: float = 0.16,
              denoise: bool = True, generator: torch.Generator | None = None,
              callback: Callback | None = None) -> Tensor:
    """Predictor-corrector sampling of the reverse SDE [SDE, Alg. 1-3].

    Args:
        den: the denoiser; x: the start [B, ...] at grid[0]; grid: decreasing times.
        predictor: "euler_maruyama", "reverse_diffusion" or None.
        corrector: "langevin" or None; n_corrector_steps per level, step rule `snr`.
            NFE = N (1 + n_corrector_steps) (without a predictor, N·n).
        denoise: return the noise-free mean of the last update.
        generator: for every noise draw; callback: see `minidit.grids.report`.
    """
    if predictor not in PREDICTORS:
        raise ValueError(f"unknown predictor {predictor!r}; valid choices: {PREDICTORS}")
    if corrector not in CORRECTORS:
        raise ValueError(f"unknown corrector {corrector!r}; valid choices: {CORRECTORS}")
    if predictor is None and corrector is None:
        raise ValueError("need a predictor, a corrector or both")
    if corrector is not None:
        check_steps(n_corrector_steps, "n_corrector_steps")
        if snr <= 0:
            raise ValueError(f"snr must be positive, got {snr}")
    predict = euler_maruyama_step if predictor == "euler_maruyama" else reverse_diffusion_step
    N = len(grid) - 1
    for i, t, t_next in intervals(den, grid):
        # 1. corrector: Langevin MCMC at level t
        for _ in range(n_corrector_steps if corrector else 0):
            x, x_mean = langevin_step(den, x, t, t_next, snr, generator)
        # 2. predictor: one step down to t_next
        if predictor is not None:
            x, x_mean = predict(den, x, t, t_next, generator)
        x = x_mean if denoise and i == N - 1 else x
        x = report(callback, x, i, t, t_next, den, grid)
    return x


def sample_euler_maruyama(den: Denoiser, x: Tensor, grid: Tensor, **options) -> Tensor:
    """`sample_pc` with the Euler-Maruyama predictor and no corrector; NFE = N."""
    return sample_pc(den, x, grid, predictor="euler_maruyama", corrector=None, **options)


def sample_reverse_diffusion(den: Denoiser, x: Tensor, grid: Tensor, **options) -> Tensor:
    """`sample_pc` with the reverse-diffusion predictor and no corrector; NFE = N."""
    return sample_pc(den, x, grid, predictor="reverse_diffusion", corrector=None, **options)


def sample_langevin(den: Denoiser, x: Tensor, grid: Tensor, **options) -> Tensor:
    """Annealed Langevin dynamics: the corrector alone, n_corrector_steps per level."""
    return sample_pc(den, x, grid, predictor=None, corrector="langevin", **options)


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "euler": sample_euler,
    "heun": sample_heun,
    "rk45": sample_rk45,
    "dpm_solver++": sample_dpm_solver_2m,
    "dpm_solver++3m": sample_dpm_solver_3m,
    "euler_maruyama": sample_euler_maruyama,
    "reverse_diffusion": sample_reverse_diffusion,
    "langevin": sample_langevin,
    "pc": sample_pc,
}
