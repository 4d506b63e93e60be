"""The probability-flow ODE and its solvers: Euler, Heun, and adaptive Dormand-Prince RK45.

Every diffusion has a deterministic twin with the same marginals p_t [SDE, Eq. 13]:

    dx/dt = f(x, t) − ½ g(t)² ∇log p_t(x) = alpha'(t) x̂0 + sigma'(t) ε̂     (`Denoiser.velocity`)

Integrating it from noise to t ≈ 0 draws samples; from 0 to 1 it encodes data into the
prior, invertibly. The steps integrate dy/dt = F(y, t) from t to t_next (h = t_next − t):

    Euler:  y ← y + h F(y, t)                                               (order 1)
    Heun:   ỹ = y + h F(y, t);  y ← y + h/2 (F(y, t) + F(ỹ, t_next))          (order 2) [EDM, Alg. 1]
    RK45:   Dormand-Prince 5(4), the 5th-order solution with the embedded 4th-order
            error estimate, err = ‖(y5 − y4) / (atol + rtol max(|y|, |y5|))‖_rms ≤ 1 to accept,
            h ← h · clip(0.9 err^(−1/5), 0.2, 10)         [Dormand, Prince 1980; Hairer I, II.4]

A step that ends where the slope is undefined (sigma = 0 for eps, x0 and score networks: the
last step to the data of EDM's and DDPM's grids) is an Euler step [EDM, Alg. 1, line 9].
`sample_heun` adds EDM's churn (`minidit.edm.churn_step`) when S_churn > 0. RK45 keeps one
step size per sample by default: each sample has its own t and h, accepts or rejects on its
own error, and samples that arrived take zero steps while the others finish (NFE counts
batched calls); it integrates from the grid's first time to its last, adaptively.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from minidit.denoiser import Denoiser
from minidit.edm import churn_step
from minidit.grids import Callback, check_grid, intervals, report
from minidit.process import per_sample

Field = Callable[[Tensor, Tensor], Tensor]  # F(y [B, ...], t) -> dy/dt [B, ...]

# Dormand-Prince 5(4): nodes c, stages A, 5th-order weights b, error weights e = b − b*
_C = [0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0]
_A = [
    [],
    [1 / 5],
    [3 / 40, 9 / 40],
    [44 / 45, -56 / 15, 32 / 9],
    [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729],
    [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656],
]
_B = [35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84]
_E = [71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40]


def euler_step(F: Field, y: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
    """One Euler step of dy/dt = F(y, t) from t to t_next (one time, or one per sample [B]; one evaluation)."""
    return y + per_sample(t_next - t, y) * F(y, t)


def heun_step(F: Field, y: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
    """One step of Heun's method (the trapezoid rule on an Euler guess), two evaluations [EDM, Alg. 1];
    t and t_next are one time, or one per sample [B]."""
    h = per_sample(t_next - t, y)
    d = F(y, t)
    d_next = F(y + h * d, t_next)  # the slope at the Euler guess
    return y + 0.5 * h * (d + d_next)


@torch.no_grad()
def sample_euler(den: Denoiser, x: Tensor, grid: Tensor, *, generator: torch.Generator | None = None,
                 callback: Callback | None = None) -> Tensor:
    """Euler's method on the PF-ODE through `grid`; NFE = N. (`generator` is unused: deterministic.)"""
    for i, t, t_next in intervals(den, grid):
        x = euler_step(den.velocity, x, t, t_next)
        x = report(callback, x, i, t, t_next, den, grid)
    return x


@torch.no_grad()
def sample_heun(den: Denoiser, x: Tensor, grid: Tensor, *, S_churn: float = 0.0, S_tmin: float = 0.0,
                S_tmax: float = math.inf, S_noise: float = 1.0, generator: torch.Generator | None = None,
                callback: Callback | None = None) -> Tensor:
    """Heun's method on the PF-ODE through `grid`, with EDM's optional churn [EDM, Alg. 1-2].

    NFE = 2N, or 2N − 1 when the grid ends where the slope is undefined. On `EDMProcess` with the
    Karras grid this is EDM's sampler (S_churn = 0: deterministic).

    Args:
        den: the denoiser; x: the start [B, ...] at grid[0]; grid: decreasing times.
        S_churn, S_tmin, S_tmax, S_noise: EDM's churn: γ = min(S_churn/N, √2 − 1) where the
            noise level sigma/alpha lies in [S_tmin, S_tmax].
        generator: for the churn noise; callback: see `minidit.grids.report`.
    """
    if S_churn < 0 or S_noise < 0:
        raise ValueError(f"S_churn and S_noise must be >= 0, got {S_churn}, {S_noise}")
    N = len(grid) - 1
    for i, t, t_next in intervals(den, grid):
        # 1. churn: raise the noise from t to t̂ [EDM, Alg. 2]
        level = math.exp(-0.5 * float(den.process.log_snr(t)))  # sigma/alpha
        gamma = min(S_churn / N, math.sqrt(2) - 1) if S_tmin <= level <= S_tmax else 0.0
        if gamma > 0:
            x, t = churn_step(den.process, x, t, gamma, S_noise, generator)
        # 2. Heun from t̂ to t_next; Euler onto a point where the slope is undefined
        step = heun_step if den.slope_defined_at(t_next) else euler_step
        x = step(den.velocity, x, t, t_next)
        x = report(callback, x, i, t, t_next, den, grid)
    return x


def check_tolerances(rtol: float, atol: float) -> None:
    """Raise ValueError unless 0 < rtol < 1 and 0 < atol < 1."""
    for name, tol in (("rtol", rtol), ("atol", atol)):
        if not 0 < tol < 1:
            raise ValueError(f"{name} must lie in (0, 1), got {tol!r}")


def _rms(e: Tensor) -> Tensor:
    return e.flatten(1).pow(2).mean(1).sqrt().cpu().double()  # [B, ...] -> [B], float64 on the CPU


def rk45_solve(F: Field, y: Tensor, t0: float, t1: float, rtol: float = 1e-5, atol: float = 1e-5,
               per_sample_steps: bool = True, max_steps: int = 10_000,
               callback: Callable[[int, Tensor, Tensor], None] | None = None,
               progress: bool = False) -> tuple[Tensor, int]:
    """Adaptive Dormand-Prince 5(4) from t0 to t1 (either direction).

    Args:
        F: the vector field F(y, t), t [B] on y's device and in y's dtype.
        y: the state at t0 [B, ...].
        rtol, atol: tolerances, each in (0, 1).
        per_sample_steps: one step size per sample (else one for the batch).
        max_steps: raise RuntimeError past this many attempted steps.
        callback: `callback(step, y, t)` after every attempted step.
        progress: a progress bar over |t − t0|.

    Returns:
        The state at t1, and the number of attempted steps.
    """
    check_tolerances(rtol, atol)
    B, span = y.shape[0], abs(t1 - t0)
    direction = 1.0 if t1 >= t0 else -1.0
    # the bookkeeping (t, h, errors) is float64 on the CPU, one entry per sample
    traveled = torch.zeros(B, dtype=torch.float64)  # |t − t0|
    t = torch.full((B,), float(t0), dtype=torch.float64)

    def at(t: Tensor) -> Tensor:
        return t.to(device=y.device, dtype=y.dtype)

    # 1. the first slope and an initial step from its size [Hairer I, II.4]
    k1 = F(y, at(t))
    scale = atol + rtol * y.abs()
    d0, d1 = _rms(y / scale), _rms(k1 / scale)
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1).clamp(max=span)
    k = F(y + per_sample(direction * h0, y).to(y) * k1, at(t + direction * h0))
    d2 = _rms((k - k1) / scale) / h0
    d12 = torch.maximum(d1, d2)
    h1 = torch.where(d12 <= 1e-15, (h0 * 1e-3).clamp(min=1e-6), (0.01 / d12) ** 0.2)
    h = torch.minimum(100 * h0, h1).clamp(max=span)
    if not per_sample_steps:
        h = h.min().expand(B).clone()

    step = 0
    bar = tqdm(total=100, desc="ODE rk45", disable=not progress, leave=False)
    while bool((traveled < span).any()):
        if step >= max_steps:
            raise RuntimeError(f"rk45_solve: more than max_steps={max_steps} steps "
                               f"(t reached {t.min().item():.4g}..{t.max().item():.4g}); loosen rtol/atol")
        remaining = span - traveled
        active = remaining > 0
        h_eff = torch.where(active, torch.minimum(h, remaining), torch.zeros_like(h))  # [B]
        hx = per_sample(direction * h_eff, y).to(y)
        # 2. the six stages; k7 = F(y5, t + h) is the next step's k1 (first same as last)
        ks = [k1]
        for c, a in zip(_C[1:], _A[1:]):
            y_stage = y + hx * sum(a_j * k_j for a_j, k_j in zip(a, ks))
            ks.append(F(y_stage, at(t + direction * c * h_eff)))
        y5 = y + hx * sum(b_j * k_j for b_j, k_j in zip(_B, ks))
        k7 = F(y5, at(t + direction * h_eff))
        # 3. the embedded error estimate, scaled by the tolerances
        err = hx * sum(e_j * k_j for e_j, k_j in zip(_E, [*ks, k7]))
        err_norm = _rms(err / (atol + rtol * torch.maximum(y.abs(), y5.abs())))
        if not per_sample_steps:
            err_norm = err_norm.max().expand(B)
        accept = (err_norm <= 1) & active
        # 4. move the accepted samples; land exactly on t1 when the step reaches it
        reaches = accept & (h >= remaining)
        traveled = torch.where(accept, traveled + h_eff, traveled)
        traveled = torch.where(reaches, torch.full_like(traveled, span), traveled)
        t = t0 + direction * traveled
        acc = per_sample(accept, y).to(y.device)
        y, k1 = torch.where(acc, y5, y), torch.where(acc, k7, k1)
        # 5. the next step size, h · 0.9 err^(−1/5), within [0.2, 10] times the last one
        factor = (0.9 * err_norm.clamp_min(1e-10) ** -0.2).clamp(0.2, 10.0)
        h = torch.where(active, h_eff * factor, h)
        step += 1
        if callback is not None:
            callback(step, y, t)
        bar.n = int(100 * float(traveled.min()) / max(span, 1e-12))
        bar.refresh()
    bar.close()
    return y, step


@torch.no_grad()
def sample_rk45(den: Denoiser, x: Tensor, grid: Tensor, *, rtol: float = 1e-5, atol: float = 1e-5,
                per_sample_steps: bool = True, generator: torch.Generator | None = None,
                callback: Callback | None = None) -> Tensor:
    """Adaptive RK45 on the PF-ODE from grid[0] to grid[-1] (the times between are not used);
    a last time where the slope is undefined is reached by one Euler step from grid[-2]."""
    check_tolerances(rtol, atol)
    grid = check_grid(grid)
    end = len(grid) - 1 if den.slope_defined_at(grid[-1]) else len(grid) - 2
    if end == 0:
        raise ValueError("rk45 needs a grid with a time after the first where the slope is defined")
    ends = grid[[0, end]]

    def record(step: int, y: Tensor, t: Tensor, t_next: float | Tensor, last: bool = False) -> Tensor | None:
        den.step = step
        if callback is not None:
            return callback({"i": step - 1, "x": y, "t": t, "t_next": t_next, "nfe": den.nfe, "last": last})

    x = rk45_solve(den.velocity, x, float(ends[0]), float(ends[1]), rtol, atol, per_sample_steps,
                   callback=lambda step, y, t: record(step, y, None, float(t.mean())))[0]
    if end < len(grid) - 1:  # the last step, onto a time where the slope is undefined
        x = euler_step(den.velocity, x, grid[-2], grid[-1])
        replaced = record(den.step + 1, x, grid[-2], grid[-1], last=True)
        x = x if replaced is None else replaced
    den.check_finite()
    return x
