"""DPM-Solver++(2M): a multistep second-order solver of the PF-ODE in log-SNR time [DPM++, Alg. 2].

Written with the data prediction x̂0 and the half log-SNR ℓ = λ/2 = log(alpha/sigma) (the
paper's λ), the PF-ODE is semi-linear and its exact solution from s to t (h = ℓ_t − ℓ_s > 0) is

    x_t = (sigma_t/sigma_s) x_s + sigma_t ∫_{ℓ_s}^{ℓ_t} e^{ℓ} x̂0(ℓ) dℓ        [DPM++, Eq. 9]

Holding x̂0 constant gives the first-order step (DDIM); a linear extrapolation of x̂0 from
the two latest evaluations gives the 2M step, one evaluation per step:

    x_t = (sigma_t/sigma_s) x_s − alpha_t (e^{−h} − 1) D,
    D   = (1 + 1/(2r)) x̂0_s − 1/(2r) x̂0_prev,   r = h_prev / h            [DPM++, Alg. 2]

Its natural grid is uniform in log-SNR (`minidit.grids.log_snr_grid`), but any grid works. As
in the reference code the first step is first order and, for fewer than 15 steps, so is the
last (`lower_order_final`); a step from pure noise or onto the data (h = ∞) is first order,
and the latter returns x̂0.

References: [DPM++] Lu, Zhou, Bao, Chen, Li, Zhu 2022.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from minidit.denoiser import Denoiser
from minidit.grids import Callback, intervals, report


def dpm_solver_2m_step(den: Denoiser, x: Tensor, t: Tensor, t_next: Tensor,
                       previous: tuple[Tensor, float] | None = None) -> tuple[Tensor, tuple[Tensor, float]]:
    """One DPM-Solver++(2M) step x_t -> x_{t_next} (one evaluation).

    Args:
        previous: (x̂0, h) of the step before, or None for a first-order (DDIM) step.

    Returns:
        x_{t_next}, and (x̂0, h) of this step for the next one.
    """
    process = den.process
    ell, ell_next = (0.5 * float(process.log_snr(s)) for s in (t, t_next))  # ℓ = log(alpha/sigma)
    h = ell_next - ell
    # 1. the data prediction at the current point
    x0 = den(x, t).x0
    # 2. first order without history or where a step is infinite (from pure noise, onto the
    #    data); else the 2M extrapolation of x̂0
    if previous is None or math.isinf(h) or math.isinf(previous[1]):
        D = x0
    else:
        r = previous[1] / h
        D = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * previous[0]
    # 3. the exponential-integrator update  [DPM++, Alg. 2]; onto the data (sigma_next = 0) it is D
    x = process.sigma(t_next) / process.sigma(t) * x - process.alpha(t_next) * math.expm1(-h) * D
    return x, (x0, h)


@torch.no_grad()
def sample_dpm_solver_2m(den: Denoiser, x: Tensor, grid: Tensor, *, lower_order_final: bool = True,
                         generator: torch.Generator | None = None, callback: Callback | None = None) -> Tensor:
    """DPM-Solver++(2M) through `grid`; NFE = N. (`generator` is unused: deterministic.)

    Args:
        den: the denoiser; x: the start [B, ...] at grid[0]; grid: decreasing times.
        lower_order_final: a first-order last step when N < 15 (more stable at few steps).
        callback: see `minidit.grids.report`.
    """
    N, previous = len(grid) - 1, None
    for i, t, t_next in intervals(den, grid):
        first_order = lower_order_final and N < 15 and i == N - 1
        x, previous = dpm_solver_2m_step(den, x, t, t_next, None if first_order else previous)
        x = report(callback, x, i, t, t_next, den, grid)
    return x
