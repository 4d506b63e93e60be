"""DPM-Solver++(2M) and (3M): multistep solvers of the PF-ODE in log-SNR time [DPM++, Alg. 2].

Written with the data prediction x̂0 and the half log-SNR ℓ = λ/2 = log(alpha/sigma) (the
paper's λ), the PF-ODE is semi-linear and its exact solution from s to t (h = ℓ_t − ℓ_s > 0) is

    x_t = (sigma_t/sigma_s) x_s + sigma_t ∫_{ℓ_s}^{ℓ_t} e^{ℓ} x̂0(ℓ) dℓ        [DPM++, Eq. 9]

Holding x̂0 constant gives the first-order step (DDIM); a linear extrapolation of x̂0 from
the two latest evaluations gives the 2M step, one evaluation per step:

    x_t = (sigma_t/sigma_s) x_s − alpha_t (e^{−h} − 1) D,
    D   = (1 + 1/(2r)) x̂0_s − 1/(2r) x̂0_prev,   r = h_prev / h            [DPM++, Alg. 2]

The 3M step extrapolates x̂0 quadratically from three evaluations, with the divided differences
(r0 = h_0/h, r1 = h_1/h for the two earlier steps h_0, h_1)

    D1_0 = (x̂0_s − x̂0_1)/r0,  D1_1 = (x̂0_1 − x̂0_2)/r1
    D1 = D1_0 + r0/(r0 + r1) (D1_0 − D1_1) ≈ h x̂0',    D2 = (D1_0 − D1_1)/(r0 + r1) ≈ h² x̂0''/2

and integrates the Taylor terms exactly, ∫₀ʰ e^{−(h−u)} (u, u²/2) du = (h − 1 + e^{−h}, h²/2 − h + 1 − e^{−h}):

    x_t = (sigma_t/sigma_s) x_s − alpha_t (e^{−h} − 1) x̂0_s + alpha_t (1 + (e^{−h} − 1)/h) D1
          + alpha_t (1 − 2 (h − 1 + e^{−h})/h²) D2

which is exact when x̂0 is a quadratic in ℓ. A past point enters only while its step is at least
half of the new one (r >= ½), so a grid whose steps grow fast (uniform t near the data) falls back to
lower order there. (The reference code and diffusers weight D2 by
(h − 1 + e^{−h})/h² − ½ instead, half of this: exact only for linear x̂0, so second order.)

Its natural grid is uniform in log-SNR (`minidit.grids.log_snr_grid`), but any grid works. As
in the reference code the first step is first order and, for fewer than 15 steps, so is the
last (`lower_order_final`); a step from pure noise or onto the data (h = ∞) is first order,
and the latter returns x̂0.

References: [DPM++] Lu, Zhou, Bao, Chen, Li, Zhu 2022; [DPM] Lu et al. 2022 (the Taylor expansion in ℓ).
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


def dpm_solver_3m_step(den: Denoiser, x: Tensor, t: Tensor, t_next: Tensor,
                       history: list[tuple[Tensor, float]] = ()) -> tuple[Tensor, tuple[Tensor, float]]:
    """One DPM-Solver++(3M) step x_t -> x_{t_next} (one evaluation; see the module docstring).

    Args:
        history: (x̂0, ℓ) of the earlier steps, the newest last: with none the step is first order
            (DDIM), with one second order, with two or more third order.

    Returns:
        x_{t_next}, and (x̂0, ℓ) of this step for the next ones.
    """
    process = den.process
    ell, ell_next = (0.5 * float(process.log_snr(s)) for s in (t, t_next))  # ℓ = log(alpha/sigma)
    h = ell_next - ell
    # 1. the data prediction at the current point
    x0 = den(x, t).x0
    # 2. the divided differences of x̂0 in ℓ from the last one or two steps: none across an infinite step,
    #    and a past point only while its step is at least half of this one (r >= 1/2; extrapolating far
    #    beyond the points fitted makes variable-step multistep methods unstable [Hairer I, III.5])
    past, newer = [], ell
    if math.isfinite(h) and math.isfinite(ell):
        for m, e in reversed(history[-2:]):
            if not math.isfinite(e) or (newer - e) / h < 0.5:
                break
            past, newer = [(m, e), *past], e
    D1 = D2 = 0.0
    if past:
        r0 = (ell - past[-1][1]) / h
        D1_0 = (x0 - past[-1][0]) / r0
        D1 = D1_0
        if len(past) == 2:
            r1 = (past[-1][1] - past[-2][1]) / h
            D1_1 = (past[-1][0] - past[-2][0]) / r1
            D1 = D1_0 + r0 / (r0 + r1) * (D1_0 - D1_1)
            D2 = (D1_0 - D1_1) / (r0 + r1)
    # 3. the exponential integrator of the quadratic through them; onto the data it is x̂0
    alpha_next, phi = process.alpha(t_next), math.expm1(-h)
    x = process.sigma(t_next) / process.sigma(t) * x - alpha_next * phi * x0
    if past:
        x = x + alpha_next * (1 + phi / h) * D1 + alpha_next * (1 - 2 * (h + phi) / h**2) * D2
    return x, (x0, ell)


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


@torch.no_grad()
def sample_dpm_solver_3m(den: Denoiser, x: Tensor, grid: Tensor, *, lower_order_final: bool = True,
                         generator: torch.Generator | None = None, callback: Callback | None = None) -> Tensor:
    """DPM-Solver++(3M) through `grid`; NFE = N: first and second order while history builds up,
    and, for N < 15 with `lower_order_final`, on the last two steps (as the reference code does)."""
    N, history = len(grid) - 1, []
    for i, t, t_next in intervals(den, grid):
        order = min(3, N - i) if lower_order_final and N < 15 else 3
        x, entry = dpm_solver_3m_step(den, x, t, t_next, history[len(history) - order + 1:] if order > 1 else [])
        history = [*history[-1:], entry]
        x = report(callback, x, i, t, t_next, den, grid)
    return x
