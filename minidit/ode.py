"""The probability-flow ODE and its solvers: Euler, Heun, and adaptive Dormand-Prince RK45.

Every diffusion has a deterministic twin with the same marginals p_t [SDE, Eq. 13]:

    dx/dt = f(x, t) − ½ g(t)² ∇log p_t(x) = alpha'(t) x̂0 + sigma'(t) ε̂

Integrating it from t = 1 (prior noise) to t ≈ 0 draws samples; from 0 to 1 it encodes
data into the prior, invertibly. The solvers below integrate dy/dt = F(y, t) for a batch
y [B, ...] with one t per sample ([B]):

    Euler:  y ← y + h F(y, t)                                               (order 1)
    Heun:   ỹ = y + h F(y, t);  y ← y + h/2 (F(y, t) + F(ỹ, t + h))          (order 2)
    RK45:   Dormand-Prince 5(4), the 5th-order solution with the embedded 4th-order
            error estimate, err = ‖(y5 − y4) / (atol + rtol max(|y|, |y5|))‖_rms ≤ 1 to accept,
            h ← h · clip(0.9 err^(−1/5), 0.2, 10)         [Dormand, Prince 1980; Hairer I, II.4]

RK45 keeps one step size per sample by default (`per_sample_steps=True`): each sample has its
own t and h, accepts or rejects on its own error, and samples that arrived take zero
steps while the others finish; the batch is always evaluated whole, so labels stay
aligned (NFE counts batched calls). With `per_sample_steps=False` the batch shares one h and
the error norm is the largest over the batch.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from minidit.denoisers import Denoiser, SampleResult, as_denoiser, check_steps, initial_noise
from minidit.sde import SDE, per_sample

METHODS = ("euler", "heun", "rk45")

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

Field = Callable[[Tensor, Tensor], Tensor]  # F(y [B, ...], t [B]) -> dy/dt [B, ...]


def _t_like(t: Tensor, y: Tensor) -> Tensor:
    # times are kept in float64 on the CPU (MPS has no float64) and handed to F like y
    return t.to(device=y.device, dtype=y.dtype)


def check_tolerances(rtol: float, atol: float) -> None:
    """Raise ValueError unless 0 < rtol < 1 and 0 < atol < 1."""
    for name, tol in (("rtol", rtol), ("atol", atol)):
        if not 0 < tol < 1:
            raise ValueError(f"{name} must lie in (0, 1), got {tol!r}")


def fixed_step_solve(F: Field, y: Tensor, ts: Tensor, method: str = "heun",
                     callback: Callable[[int, Tensor], None] | None = None, progress: bool = True) -> Tensor:
    """Integrate from ts[0] to ts[-1] through the grid ts [N + 1] with Euler or Heun.

    `F(y, t)` gets t [B] on y's device and in y's dtype; `callback(i, y)` runs after step
    i. NFE: N for Euler, 2N for Heun.
    """
    B, ts = y.shape[0], ts.detach().cpu().double()
    for i in tqdm(range(len(ts) - 1), desc=f"ODE {method}", disable=not progress, leave=False):
        t, t_next = _t_like(ts[i].expand(B), y), _t_like(ts[i + 1].expand(B), y)  # [B]
        h = float(ts[i + 1] - ts[i])
        d = F(y, t)
        if method == "euler":
            y = y + h * d
        else:
            d_next = F(y + h * d, t_next)  # slope at the Euler guess
            y = y + 0.5 * h * (d + d_next)
        if callback is not None:
            callback(i, y)
    return y


def _rms(e: Tensor) -> Tensor:
    return e.flatten(1).pow(2).mean(1).sqrt().cpu().double()  # [B, ...] -> [B], float64 on the CPU


def rk45_solve(F: Field, y: Tensor, t0: float, t1: float, rtol: float = 1e-5, atol: float = 1e-5,
               per_sample_steps: bool = True, max_steps: int = 10_000,
               callback: Callable[[int, Tensor, Tensor], None] | None = None,
               progress: bool = True) -> tuple[Tensor, int]:
    """Adaptive Dormand-Prince 5(4) from t0 to t1 (either direction).

    Args:
        F: the vector field F(y, t), t [B] on y's device and in y's dtype.
        y: the state at t0 [B, ...].
        rtol, atol: tolerances, each in (0, 1).
        per_sample_steps: one step size per sample (else one for the batch).
        max_steps: raise RuntimeError past this many attempted steps.
        callback: `callback(step, y, t)` after every attempted step.

    Returns:
        The state at t1, and the number of attempted steps.
    """
    check_tolerances(rtol, atol)
    B, span = y.shape[0], abs(t1 - t0)
    direction = 1.0 if t1 >= t0 else -1.0
    # the bookkeeping (t, h, errors) is float64 on the CPU, one entry per sample
    traveled = torch.zeros(B, dtype=torch.float64)  # |t − t0|
    t = torch.full((B,), float(t0), dtype=torch.float64)

    # 1. the first slope and an initial step from its size [Hairer I, II.4]
    k1 = F(y, _t_like(t, y))
    scale = atol + rtol * y.abs()
    d0, d1 = _rms(y / scale), _rms(k1 / scale)
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1).clamp(max=span)
    k = F(y + per_sample(direction * h0, y).to(y) * k1, _t_like(t + direction * h0, y))
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
        hd = direction * h_eff  # signed step in t
        hx = per_sample(hd, y).to(y)
        # 2. the six stages; k7 = F(y5, t + h) is the next step's k1 (first same as last)
        ks = [k1]
        for i in range(1, 6):
            yi = y + hx * sum(a * kj for a, kj in zip(_A[i], ks))
            ks.append(F(yi, _t_like(t + _C[i] * hd, y)))
        y5 = y + hx * sum(b * kj for b, kj in zip(_B, ks))
        k7 = F(y5, _t_like(t + hd, y))
        ks.append(k7)
        # 3. the embedded error estimate, scaled by the tolerances
        err = hx * sum(e * kj for e, kj in zip(_E, ks))
        err_norm = _rms(err / (atol + rtol * torch.maximum(y.abs(), y5.abs())))  # [B]
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


def _check_ode_arguments(method: str, steps: int, rtol: float, atol: float, t_start: float, t_end: float) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown ODE method {method!r}; valid methods: {', '.join(METHODS)}")
    if method == "rk45":
        check_tolerances(rtol, atol)
    else:
        check_steps(steps)
    for name, value in (("t_start", t_start), ("t_end", t_end)):
        if not 0 <= value <= 1:
            raise ValueError(f"{name} must lie in [0, 1], got {value}")


def pf_ode_solve(model: Denoiser | Callable, process: SDE, x: Tensor, *, t_start: float, t_end: float,
                 method: str = "rk45", steps: int = 50, rtol: float = 1e-5, atol: float = 1e-5,
                 per_sample_steps: bool = True, y: Tensor | None = None, cfg_scale: float | None = None,
                 null_label: int | None = None, return_trajectory: bool = False,
                 progress: bool = True) -> SampleResult:
    """Carry x from t_start to t_end along the probability-flow ODE (either direction).

    Args:
        model: a `Denoiser`, or a plain `score_fn(x, t)`.
        process: the diffusion (an `SDE` or `minidit.flow.FlowProcess`).
        x: the state at t_start [B, ...].
        method: "euler", "heun" (uniform grid of `steps` steps) or "rk45" (adaptive).
        steps, rtol, atol, per_sample_steps: see `fixed_step_solve` and `rk45_solve`.
        y, cfg_scale, null_label: labels and classifier-free guidance.
        return_trajectory: keep x after every step (on the CPU).

    Returns:
        SampleResult with the state at t_end.
    """
    _check_ode_arguments(method, steps, rtol, atol, t_start, t_end)
    den = as_denoiser(model, process, y, cfg_scale, null_label)
    trajectory, times = ([x.cpu()], [float(t_start)]) if return_trajectory else (None, [])

    def F(xt: Tensor, t: Tensor) -> Tensor:
        return den.velocity(xt, t)

    def record(step: int, xt: Tensor, t: float) -> None:
        den.step = step + 1
        if trajectory is not None:
            trajectory.append(xt.cpu())
            times.append(t)

    with torch.no_grad():
        if method == "rk45":
            x = rk45_solve(F, x, t_start, t_end, rtol, atol, per_sample_steps,
                           callback=lambda i, xt, t: record(i - 1, xt, float(t.mean())), progress=progress)[0]
        else:
            ts = torch.linspace(t_start, t_end, steps + 1, dtype=torch.float64)
            x = fixed_step_solve(F, x, ts, method, lambda i, xt: record(i, xt, float(ts[i + 1])), progress)
    return SampleResult(x, den.nfe, trajectory, times)


def ode_sample(model: Denoiser | Callable, process: SDE, shape: tuple[int, ...] | None = None, *,
               method: str = "heun", steps: int = 50, rtol: float = 1e-5, atol: float = 1e-5,
               per_sample_steps: bool = True, t_start: float = 1.0, t_end: float | None = None,
               x_init: Tensor | None = None, y: Tensor | None = None, cfg_scale: float | None = None,
               null_label: int | None = None, generator: torch.Generator | None = None,
               device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
               return_trajectory: bool = False, progress: bool = True) -> SampleResult:
    """Sample by integrating the PF-ODE from prior noise at t_start to t_end (default process.t_eps).

    The prior is N(0, sigma(t_start)² I) of `shape` unless x_init is given; the other
    arguments are those of `pf_ode_solve`. Euler takes `steps` evaluations, Heun 2·steps.
    """
    t_end = process.t_eps if t_end is None else t_end
    _check_ode_arguments(method, steps, rtol, atol, t_start, t_end)  # before drawing any noise
    x = initial_noise(process, t_start, shape, x_init, generator, device, dtype)
    return pf_ode_solve(model, process, x, t_start=t_start, t_end=t_end, method=method, steps=steps,
                        rtol=rtol, atol=atol, per_sample_steps=per_sample_steps, y=y, cfg_scale=cfg_scale,
                        null_label=null_label, return_trajectory=return_trajectory, progress=progress)


def ode_euler(model, process, shape=None, **kwargs) -> SampleResult:
    """`ode_sample` with method="euler"."""
    return ode_sample(model, process, shape, method="euler", **kwargs)


def ode_heun(model, process, shape=None, **kwargs) -> SampleResult:
    """`ode_sample` with method="heun"."""
    return ode_sample(model, process, shape, method="heun", **kwargs)


def ode_rk45(model, process, shape=None, **kwargs) -> SampleResult:
    """`ode_sample` with method="rk45" (adaptive; `steps` is ignored)."""
    return ode_sample(model, process, shape, method="rk45", **kwargs)
