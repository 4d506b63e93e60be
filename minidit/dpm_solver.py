"""DPM-Solver++(2M): a multistep second-order solver of the PF-ODE in log-SNR time [DPM++, Alg. 2].

In the half log-SNR λ = log(alpha/sigma) the PF-ODE written with the data prediction
x̂0 is semi-linear, and its exact solution from s to t (h = λ_t − λ_s > 0) is

    x_t = (sigma_t/sigma_s) x_s + sigma_t ∫_{λ_s}^{λ_t} e^{λ} x̂0(λ) dλ        [DPM++, Eq. 9]

Holding x̂0 constant gives the first-order step (DDIM); a linear extrapolation of x̂0 from
the two latest evaluations gives the 2M step, one model call per step:

    x_t = (sigma_t/sigma_s) x_s − alpha_t (e^{−h} − 1) D,
    D   = (1 + 1/(2r)) x̂0_s − 1/(2r) x̂0_prev,   r = h_prev / h            [DPM++, Alg. 2]

The λ grid is uniform from λ(t_start) to λ(t_end). Like the reference code, the first
step is first order and, for fewer than 15 steps, so is the last (`lower_order_final`).
Where the process reaches pure noise (the flow, alpha(1) = 0, λ = −∞) we start at
sigma/alpha = 80 instead (EDM's sigma_max).

References: [DPM++] Lu, Zhou, Bao, Chen, Li, Zhu 2022.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from minidit.denoisers import Denoiser, SampleResult, as_denoiser, check_steps, initial_noise
from minidit.sde import SDE


def lambda_grid(process: SDE, steps: int, t_start: float, t_end: float) -> tuple[Tensor, Tensor]:
    """Times t_i [steps + 1] with uniformly spaced half log-SNR λ_i, and those λ_i (float64)."""
    bounds = 0.5 * process.log_snr(torch.tensor([t_start, t_end], dtype=torch.float64))
    lam_start = float(bounds[0]) if math.isfinite(float(bounds[0])) else -math.log(80.0)
    lam = torch.linspace(lam_start, float(bounds[1]), steps + 1, dtype=torch.float64)  # [steps + 1]
    return process.t_from_log_snr(2 * lam), lam


@torch.no_grad()
def dpm_solver_pp(model: Denoiser | Callable, process: SDE, shape: tuple[int, ...] | None = None, *,
                  steps: int = 20, t_start: float = 1.0, t_end: float | None = None,
                  lower_order_final: bool = True, x_init: Tensor | None = None, y: Tensor | None = None,
                  cfg_scale: float | None = None, null_label: int | None = None,
                  generator: torch.Generator | None = None, device: torch.device | str | None = None,
                  dtype: torch.dtype = torch.float32, return_trajectory: bool = False,
                  progress: bool = True) -> SampleResult:
    """DPM-Solver++(2M) in data-prediction form; NFE = steps.

    Args:
        model: a `Denoiser` or a plain `score_fn(x, t)` on `process`.
        process: any diffusion with alpha, sigma and `t_from_log_snr`.
        shape: the sample shape [B, ...] (or give x_init, the state at the first grid time).
        steps: the number of steps (and of model calls).
        t_start, t_end: the time span (t_end defaults to process.t_eps).
        lower_order_final: a first-order last step when steps < 15 (more stable).
        y, cfg_scale, null_label: labels and classifier-free guidance.

    Returns:
        SampleResult with x at t_end.
    """
    check_steps(steps)
    t_end = process.t_eps if t_end is None else t_end
    if not 0 <= t_end < t_start <= 1:
        raise ValueError(f"need 0 <= t_end < t_start <= 1, got t_start={t_start}, t_end={t_end}")
    if not math.isfinite(float(process.log_snr(torch.tensor(t_end, dtype=torch.float64)))):
        raise ValueError(f"the log-SNR is infinite at t_end={t_end}; stop at t_end > 0")
    den = as_denoiser(model, process, y, cfg_scale, null_label)
    ts, lam = lambda_grid(process, steps, t_start, t_end)
    alphas, sigmas = process.alpha(ts), process.sigma(ts)  # [steps + 1] float64
    x = initial_noise(process, float(ts[0]), shape, x_init, generator, device, dtype)
    B = x.shape[0]
    trajectory, times = ([x.cpu()], [float(ts[0])]) if return_trajectory else (None, [])
    x0_prev, h_prev = None, None
    for i in tqdm(range(1, steps + 1), desc="DPM-Solver++", disable=not progress, leave=False):
        den.step = i - 1
        # 1. the data prediction at the current point
        x0 = den.x0(x, ts[i - 1].to(x.device, dtype).expand(B))
        h = float(lam[i] - lam[i - 1])
        # 2. first order on the first (and, for few steps, the last) step; else 2M extrapolation
        first_order = x0_prev is None or (lower_order_final and steps < 15 and i == steps)
        if first_order:
            D = x0
        else:
            r = h_prev / h
            D = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
        # 3. the exponential-integrator update  [DPM++, Alg. 2]
        x = float(sigmas[i] / sigmas[i - 1]) * x - float(alphas[i] * math.expm1(-h)) * D
        x0_prev, h_prev = x0, h
        if trajectory is not None:
            trajectory.append(x.cpu())
            times.append(float(ts[i]))
    return SampleResult(x, den.nfe, trajectory, times)
