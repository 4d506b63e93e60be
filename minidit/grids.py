"""Time grids, built apart from the solvers, and the few lines every sampling loop shares.

A grid is a decreasing float64 tensor t_0 > t_1 > ... > t_N of times of a process; a sampler
steps from t_i to t_{i+1} (N steps), so any grid drives any solver:

    uniform   t_i = t_start + i/N (t_end − t_start)                          [SDE, App. C; FM]
    ddpm      DDPM's steps τ (all T, or a spaced sub-sequence) at t = (τ + 1)/T,
              then t = 0, the data                                            [DDPM, Alg. 2; DDIM, Sec. 4.2]
    karras    sigma/alpha = (σ_max^{1/ρ} + i/(N−1) (σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, ρ = 7,
              then sigma/alpha = 0                                            [EDM, Eq. 5]
    log_snr   log-SNR λ uniform from λ(t_start) to λ(t_end)                   [DPM++, Sec. 6]

A sampling loop is `for i, t, t_next in intervals(den, grid)`, one step, and
`x = report(callback, ...)`. The callback gets a dict {"i", "x", "t", "t_next", "nfe", "last"}
after every step (trajectories, progress bars, NFE counts) and may return a replacement for x
(inpainting's replacement trick, `minidit.guidance.Inpainting`).
"""

from __future__ import annotations

import math
from typing import Callable, Iterator

import torch
from torch import Tensor

from minidit.denoiser import Denoiser
from minidit.process import Process

SPACINGS = ("uniform", "quadratic")
Callback = Callable[[dict], "Tensor | None"]


def check_steps(steps: int, name: str = "steps") -> int:
    """Raise ValueError unless `steps` is a positive int."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{name} must be a positive int, got {steps!r}")
    return steps


def check_grid(grid: Tensor) -> Tensor:
    """The grid as float64 on the CPU, after checking it is 1-D, finite and strictly decreasing."""
    grid = torch.as_tensor(grid, dtype=torch.float64).detach().cpu()
    if grid.ndim != 1 or grid.numel() < 2:
        raise ValueError(f"a grid needs at least two times (one step), got shape {tuple(grid.shape)}")
    if not bool(torch.isfinite(grid).all()) or not bool((grid[1:] < grid[:-1]).all()):
        raise ValueError(f"a grid must be finite and strictly decreasing (noise to data), got {grid.tolist()[:6]}...")
    return grid


def uniform_grid(process: Process, steps: int, t_start: float | None = None, t_end: float | None = None) -> Tensor:
    """`steps` equal steps from t_start (default t_max) to t_end (default t_eps), float64 [steps + 1]."""
    check_steps(steps)
    t_start = process.t_max if t_start is None else t_start
    t_end = process.t_eps if t_end is None else t_end
    if not 0 <= t_end < t_start <= process.t_max:
        raise ValueError(f"need 0 <= t_end < t_start <= {process.t_max:g}, got t_start={t_start}, t_end={t_end}")
    return torch.linspace(t_start, t_end, steps + 1, dtype=torch.float64)


def ddpm_timesteps(T: int, steps: int, spacing: str = "uniform") -> Tensor:
    """An increasing sub-sequence of 0..T-1 with `steps` entries, ending at T − 1 (LongTensor).

    "uniform": τ_i = round((i + 1)·T/S) − 1; "quadratic": τ_i = round(((i + 1)/S)²·T) − 1 (denser
    near the data, [DDIM, App. D.2]), pushed up where rounding would repeat a step.
    """
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; valid choices: {', '.join(SPACINGS)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= T:
        raise ValueError(f"steps must be an int in 1..T={T}, got {steps!r}")
    frac = [(i + 1) / steps for i in range(steps)]
    raw = [round(f * T) - 1 for f in frac] if spacing == "uniform" else [round(f * f * T) - 1 for f in frac]
    taus: list[int] = []
    for tau in raw:  # strictly increasing and >= 0: the quadratic grid crowds near 0
        taus.append(max(tau, taus[-1] + 1 if taus else 0))
    if taus[-1] != T - 1:  # the push-ups overflowed (only when steps is close to T)
        taus = list(range(T - steps, T))
    return torch.tensor(taus, dtype=torch.long)


def ddpm_grid(T: int, steps: int | None = None, spacing: str = "uniform",
              timesteps: Tensor | list[int] | None = None) -> Tensor:
    """DDPM's steps as times (τ + 1)/T, from noise down, then 0 (the data): float64 [S + 1].

    Args:
        T: the number of training steps.
        steps: how many of them (None: all T, the ancestral sampler's grid).
        spacing: "uniform" or "quadratic" (see `ddpm_timesteps`) ...
        timesteps: ... or any strictly increasing steps in 0..T-1.
    """
    if timesteps is None:
        taus = ddpm_timesteps(T, T if steps is None else steps, spacing)
    else:
        taus = torch.as_tensor(timesteps, dtype=torch.long).cpu()
        if taus.ndim != 1 or taus.numel() == 0 or int(taus.min()) < 0 or int(taus.max()) >= T:
            raise ValueError(f"timesteps must be a non-empty 1-D sequence in 0..{T - 1}, got {taus.tolist()}")
        if not bool((taus[1:] > taus[:-1]).all()):
            raise ValueError("timesteps must be strictly increasing (the sampler runs them backwards)")
    t = (taus.flip(0).to(torch.float64) + 1) / T
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)])


def karras_sigmas(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> Tensor:
    """σ_0 > ... > σ_{N−1} = sigma_min, then σ_N = 0: float64 [steps + 1]; see [EDM, Eq. 5]."""
    check_steps(steps)
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    if rho <= 0:
        raise ValueError(f"rho must be positive, got {rho}")
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)  # [steps] (just [0] for one step)
    inv_max, inv_min = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return torch.cat([(inv_max + ramp * (inv_min - inv_max)) ** rho, torch.zeros(1, dtype=torch.float64)])


def karras_grid(process: Process, steps: int, sigma_min: float | None = None, sigma_max: float | None = None,
                rho: float = 7.0, span: Process | None = None) -> Tensor:
    """The times of `process` at Karras' noise levels sigma/alpha, then t = 0: float64 [steps + 1].

    sigma_min, sigma_max default to EDM's 0.002 and 80, narrowed to what `span` (default:
    `process`; the network's own process when it runs on EDM's) covers on [t_eps, t_max]
    (e.g. VE: [0.01, 50]); levels outside that range are refused.
    """
    span = span or process
    lo, hi = span.sigma_range()
    sigma_min = max(0.002, lo) if sigma_min is None else sigma_min
    sigma_max = min(80.0, hi) if sigma_max is None else sigma_max
    floor = math.exp(-0.5 * float(span.log_snr(torch.tensor(0.0, dtype=torch.float64))))  # sigma/alpha at t = 0
    if sigma_max > hi * (1 + 1e-9) or sigma_min <= floor:
        raise ValueError(f"Karras noise levels [{sigma_min:.4g}, {sigma_max:.4g}] leave the range "
                         f"({floor:.4g}, {hi:.4g}] that {type(span).__name__} spans")
    sigmas = karras_sigmas(steps, sigma_min, sigma_max, rho)
    return torch.cat([process.t_from_sigma(sigmas[:-1]), torch.zeros(1, dtype=torch.float64)])


def log_snr_grid(process: Process, steps: int, t_start: float | None = None, t_end: float | None = None) -> Tensor:
    """Times with uniformly spaced log-SNR from t_start to t_end: float64 [steps + 1].

    Where the process reaches pure noise at t_start (alpha = 0, λ = −inf: the flow, the cosine
    VP) the grid starts at sigma/alpha = 80 instead, EDM's sigma_max.
    """
    grid = uniform_grid(process, steps, t_start, t_end)  # checks steps and the span
    lam_start, lam_end = (float(v) for v in process.log_snr(grid[[0, -1]]))
    if not math.isfinite(lam_end):
        raise ValueError(f"the log-SNR is infinite at t_end={float(grid[-1])}; stop at t_end > 0")
    lam_start = lam_start if math.isfinite(lam_start) else -2 * math.log(80.0)
    return process.t_from_log_snr(torch.linspace(lam_start, lam_end, steps + 1, dtype=torch.float64))


GRIDS = {"uniform": uniform_grid, "karras": karras_grid, "log_snr": log_snr_grid}  # (process, steps) -> grid


# ----------------------------------------------------------------------------------------
# The loop around a step
# ----------------------------------------------------------------------------------------


def intervals(den: Denoiser, grid: Tensor) -> Iterator[tuple[int, Tensor, Tensor]]:
    """(i, t_i, t_{i+1}) for each step of the grid (0-d float64 times), keeping `den.step`.

    When the loop ends it checks, once, that the denoiser never returned NaN or inf.
    """
    grid = check_grid(grid)
    for i in range(len(grid) - 1):
        den.step = i
        yield i, grid[i], grid[i + 1]
    den.check_finite()


def report(callback: Callback | None, x: Tensor, i: int, t: Tensor, t_next: Tensor, den: Denoiser,
           grid: Tensor) -> Tensor:
    """Call `callback` after step i of `grid`; a tensor it returns replaces x."""
    if callback is None:
        return x
    last = i == len(grid) - 2
    out = callback({"i": i, "x": x, "t": t, "t_next": t_next, "nfe": den.nfe, "last": last})
    return x if out is None else out


class Trajectory:
    """A callback that keeps x (on the CPU) after every step, with its time: `.xs`, `.times`.

    Args:
        x_init, t_init: the starting point, recorded first when given.
    """

    def __init__(self, x_init: Tensor | None = None, t_init: float | None = None) -> None:
        self.xs = [] if x_init is None else [x_init.detach().cpu()]
        self.times = [] if t_init is None else [float(t_init)]
        self.nfe = 0

    def __call__(self, info: dict) -> None:
        self.xs.append(info["x"].detach().cpu())
        self.times.append(float(info["t_next"]))
        self.nfe = info["nfe"]
