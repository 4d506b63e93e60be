"""Samplers for score-based SDEs: Euler-Maruyama, reverse diffusion, Langevin, predictor-corrector.

Reverse time runs t from 1 to t_eps in N equal steps of size Δt. At each level the
corrector first runs Langevin MCMC on p_t, then the predictor steps down the reverse SDE
(the order of the paper's code):

    Euler-Maruyama:     x ← x − [f(x, t) − g² s(x, t)] Δt + g √Δt z            [SDE, Eq. 6]
    reverse diffusion:  x ← x − f_i(x) + G_i² s(x, t) + G_i z                    [SDE, Eq. 46]
                        (f_i, G_i: the exact forward step, `SDE.discretize`)
    Langevin:           ε = 2 a_i (r ‖z‖ / ‖s‖)²,  x ← x + ε s(x, t) + √(2ε) z   [SDE, Alg. 4/5]
                        (r = snr, a_i = (alpha(t)/alpha(t − Δt))² = 1 − β_i for VP, 1 for VE;
                        ‖·‖ averaged over the batch, as in the paper's code)

The last step adds no noise (`denoise=True`, the paper's final "noise removal"). For
inpainting the known pixels are replaced after every update by a fresh draw of
p_t(x | x0_known) = N(alpha x0_known, sigma² I) [SDE, App. I.2], and by x0_known at the end;
this replacement is approximate: it is exact only when the unknown part depends on the
known one weakly at high noise.

This module also holds the front door of all samplers: `SAMPLERS` (name -> function, all
with the signature `f(model, process, shape, **options) -> SampleResult`) and `sample`.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from minidit.denoisers import Denoiser, SampleResult, as_denoiser, check_steps, initial_noise, randn_like
from minidit.dpm_solver import dpm_solver_pp
from minidit.edm import edm_sample
from minidit.ode import ode_euler, ode_heun, ode_rk45
from minidit.sde import SDE, per_sample

PREDICTORS = ("euler_maruyama", "reverse_diffusion", None)
CORRECTORS = ("langevin", None)


def euler_maruyama_step(den: Denoiser, process: SDE, x: Tensor, t: Tensor, dt: float,
                        generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """One Euler-Maruyama step of the reverse SDE from t [B] to t − dt; returns (x, its mean)."""
    drift = process.reverse_drift(x, t, den.score(x, t))
    g = per_sample(process.diffusion(t), x)
    x_mean = x - drift * dt
    return x_mean + g * dt**0.5 * randn_like(x, generator), x_mean


def reverse_diffusion_step(den: Denoiser, process: SDE, x: Tensor, t: Tensor, dt: float,
                           generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """One reverse-diffusion predictor step from t [B] to t − dt; returns (x, its mean)."""
    f, G = process.discretize(x, t, dt)
    x_mean = x - f + G**2 * den.score(x, t)
    return x_mean + G * randn_like(x, generator), x_mean


def langevin_step(den: Denoiser, process: SDE, x: Tensor, t: Tensor, dt: float, snr: float,
                  generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """One Langevin corrector step at level t [B] with the signal-to-noise step rule."""
    score = den.score(x, t)
    z = randn_like(x, generator)
    a = (process.alpha(t) / process.alpha(t - dt)) ** 2  # [B], 1 − β_i for VP
    # norms averaged over the batch: per-sample ratios blow up where the score vanishes
    ratio = z.flatten(1).norm(dim=1).mean() / score.flatten(1).norm(dim=1).mean().clamp_min(1e-12)
    step = per_sample(2 * a * (snr * ratio) ** 2, x)
    x_mean = x + step * score
    return x_mean + (2 * step).sqrt() * z, x_mean


def _check_inpainting(x0_known: Tensor | None, mask: Tensor | None, shape: tuple[int, ...]) -> None:
    if (x0_known is None) != (mask is None):
        raise ValueError("inpainting needs both x0_known and mask (1 = known), or neither")
    if x0_known is not None:
        if tuple(x0_known.shape) != tuple(shape):
            raise ValueError(f"x0_known {tuple(x0_known.shape)} must have the sample shape {tuple(shape)}")
        try:
            torch.broadcast_shapes(mask.shape, x0_known.shape)
        except RuntimeError as err:
            raise ValueError(f"mask {tuple(mask.shape)} must broadcast to {tuple(x0_known.shape)}") from err


@torch.no_grad()
def predictor_corrector(model: Denoiser | Callable, process: SDE, shape: tuple[int, ...] | None = None, *,
                        steps: int = 500, predictor: str | None = "reverse_diffusion",
                        corrector: str | None = "langevin", n_corrector_steps: int = 1, snr: float = 0.16,
                        denoise: bool = True, t_start: float = 1.0, t_end: float | None = None,
                        x_init: Tensor | None = None, x0_known: Tensor | None = None,
                        mask: Tensor | None = None, y: Tensor | None = None, cfg_scale: float | None = None,
                        null_label: int | None = None, generator: torch.Generator | None = None,
                        device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                        return_trajectory: bool = False, progress: bool = True) -> SampleResult:
    """Predictor-corrector sampling of the reverse SDE [SDE, Alg. 1-3].

    Args:
        model: a `Denoiser`, or a plain `score_fn(x, t)` with t [B].
        process: the SDE (its `t_eps` is the default end time).
        shape: sample shape [B, ...] (or give x_init, the state at t_start).
        steps: N reverse steps; NFE = N (1 + n_corrector_steps) (without a predictor, N·n).
        predictor: "euler_maruyama", "reverse_diffusion" or None.
        corrector: "langevin" or None; n_corrector_steps per level, step rule `snr`.
        denoise: return the noise-free mean of the last update.
        x0_known, mask: inpaint: keep x0_known [B, ...] where mask (broadcastable) is 1.
        y, cfg_scale, null_label: labels and classifier-free guidance.
        generator: for the prior and every noise draw.
        return_trajectory: keep x after every step (on the CPU).
    """
    # 1. check everything before computing anything
    check_steps(steps)
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
    t_end = process.t_eps if t_end is None else t_end
    if not 0 <= t_end < t_start <= 1:
        raise ValueError(f"need 0 <= t_end < t_start <= 1, got t_start={t_start}, t_end={t_end}")
    den = as_denoiser(model, process, y, cfg_scale, null_label)
    x = initial_noise(process, t_start, shape, x_init, generator, device, dtype)
    _check_inpainting(x0_known, mask, x.shape)

    def impute(x: Tensor, t: Tensor) -> Tensor:
        if x0_known is None:
            return x
        known = process.perturb(x0_known.to(x), t, randn_like(x, generator))
        return mask.to(x) * known + (1 - mask.to(x)) * x

    ts = torch.linspace(t_start, t_end, steps + 1, dtype=torch.float64)
    dt = (t_start - t_end) / steps
    B = x.shape[0]
    x = impute(x, ts[0].to(x).expand(B))
    x_mean = x
    trajectory, times = ([x.cpu()], [t_start]) if return_trajectory else (None, [])
    for i in tqdm(range(steps), desc="PC sampler", disable=not progress, leave=False):
        den.step = i
        t = ts[i].to(device=x.device, dtype=x.dtype).expand(B)  # [B]
        # 2. corrector: Langevin MCMC at level t
        for _ in range(n_corrector_steps if corrector else 0):
            x, x_mean = langevin_step(den, process, x, t, dt, snr, generator)
            x = impute(x, t)
        # 3. predictor: one step down to t − Δt
        if predictor is not None:
            step_fn = euler_maruyama_step if predictor == "euler_maruyama" else reverse_diffusion_step
            x, x_mean = step_fn(den, process, x, t, dt, generator)
            x = impute(x, t - dt)
        if trajectory is not None:
            trajectory.append(x.cpu())
            times.append(float(ts[i + 1]))
    x = x_mean if denoise else x
    if x0_known is not None:  # 4. the known pixels exactly
        x = mask.to(x) * x0_known.to(x) + (1 - mask.to(x)) * x
    return SampleResult(x, den.nfe, trajectory, times)


def euler_maruyama(model, process, shape=None, **kwargs) -> SampleResult:
    """`predictor_corrector` with the Euler-Maruyama predictor and no corrector."""
    return predictor_corrector(model, process, shape, predictor="euler_maruyama", corrector=None, **kwargs)


def reverse_diffusion(model, process, shape=None, **kwargs) -> SampleResult:
    """`predictor_corrector` with the reverse-diffusion predictor and no corrector."""
    return predictor_corrector(model, process, shape, predictor="reverse_diffusion", corrector=None, **kwargs)


def langevin(model, process, shape=None, **kwargs) -> SampleResult:
    """Annealed Langevin dynamics: the corrector alone, n_corrector_steps per level."""
    return predictor_corrector(model, process, shape, predictor=None, corrector="langevin", **kwargs)


# ----------------------------------------------------------------------------------------
# One entry point for every sampler
# ----------------------------------------------------------------------------------------

SAMPLERS: dict[str, Callable[..., SampleResult]] = {
    "euler_maruyama": euler_maruyama,
    "reverse_diffusion": reverse_diffusion,
    "langevin": langevin,
    "pc": predictor_corrector,
    "ode_euler": ode_euler,
    "ode_heun": ode_heun,
    "ode_rk45": ode_rk45,
    "edm": edm_sample,
    "dpm_solver++": dpm_solver_pp,
}


def sample(name: str, model: Denoiser | Callable, process: SDE, shape: tuple[int, ...] | None = None,
           **options) -> SampleResult:
    """Run the sampler called `name` (a key of SAMPLERS) with its keyword options.

    Example: `sample("edm", den, VPSDE(), (16, 1, 28, 28), steps=18, y=labels, cfg_scale=4.0,
    null_label=10)`.
    """
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid names: {', '.join(SAMPLERS)}")
    return SAMPLERS[name](model, process, shape, **options)
