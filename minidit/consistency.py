"""Consistency models: one network that maps any point of a PF-ODE trajectory to the trajectory's start.

A consistency function f(x_t, t) returns the point x_{t_min} where the probability-flow ODE
trajectory through x_t begins, so one evaluation at pure noise is a sample [CM, Sec. 3]. It is
built to be the identity at the boundary t_min, whatever the network F_θ outputs [CM, Eq. 5]:

    f_θ(x, t) = c_skip(t) x + c_out(t) F_θ(c_in(t) x, t),     c_skip(t_min) = 1,  c_out(t_min) = 0
      "edm":  c_skip = σ_d² / ((σ − σ_min)² + σ_d²),  c_out = σ_d (σ − σ_min) / sqrt(σ_d² + σ²),
              c_in = 1 / (alpha sqrt(σ² + σ_d²)), with σ = sigma(t)/alpha(t) EDM's noise level   [CM, App. C]
      "flow": c_skip = 1,  c_out = −(t − t_min),  c_in = 1: the flow's own x̂0 = x − t v moved to the
              boundary, so a velocity network (a flow teacher's weights) is a good start

It is trained to agree with itself at adjacent points t_n < t_{n+1} of a discretisation (EDM's
noise levels σ_1 < ... < σ_N, ρ = 7), against a stop-gradient copy θ⁻ = sg(θ) [iCT, Sec. 3.2]:

    L = E[ λ(σ_n) d(f_θ(x_{t_{n+1}}, t_{n+1}), f_θ⁻(x̂_{t_n}, t_n)) ],  λ(σ_n) = 1/(σ_{n+1} − σ_n)  [CM, Eq. 7, 10; iCT, Sec. 3.1]
      distillation (CD): x̂_{t_n} = one Euler or Heun step of a teacher's PF-ODE from x_{t_{n+1}}  [CM, Eq. 6]
      training (CT):     x̂_{t_n} = alpha(t_n) x0 + sigma(t_n) z, the same x0 and z as x_{t_{n+1}}   [CM, Eq. 10]
    d(x, y) = sqrt(‖x − y‖² + c²) − c,  c = 0.00054 sqrt(dim)                             [iCT, Sec. 3.3]
    N(k) = min(s0 · 2^⌊k/K'⌋, s1) + 1,  K' = ⌊K / (log2⌊s1/s0⌋ + 1)⌋   (k of K steps)       [iCT, Sec. 3.4]
    p(n) ∝ erf((log σ_{n+1} − P_mean)/(√2 P_std)) − erf((log σ_n − P_mean)/(√2 P_std))       [iCT, Sec. 3.5]

Sampling jumps to the data and re-noises to the next time of a grid [CM, Alg. 1]; a grid of one
step, [t_max, 0], is one network evaluation:

    x̂0 = f_θ(x, t_i),   x ← alpha(t_{i+1}) x̂0 + sigma(t_{i+1}) z

A consistency model is a denoiser of kind "x0" (`consistency_denoiser`), so classifier-free
guidance and the sampler contract of `minidit.samplers` apply as they are.

Time convention: continuous t of any `Process`, t = 0 the data; minidit trains consistency models on
the flow (`minidit.flow.FlowProcess`), where σ = t/(1 − t): t_min = σ_min/(1 + σ_min) ≈ 0.002.
References: [CM] Song, Dhariwal, Chen, Sutskever 2023; [iCT] Song, Dhariwal 2024; [EDM] Karras et al. 2022.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from minidit.denoiser import Denoiser
from minidit.grids import Callback, intervals, karras_sigmas, report
from minidit.ode import euler_step, heun_step
from minidit.process import Process, as_time, noise_like, per_sample

SIGMA_MIN, SIGMA_MAX, RHO, SIGMA_DATA = 0.002, 80.0, 7.0, 0.5  # EDM's noise range and data scale [CM, Sec. 6]
PARAMETERISATIONS = ("flow", "edm")
SOLVERS = {"euler": euler_step, "heun": heun_step}  # the teacher's step of consistency distillation

# ----------------------------------------------------------------------------------------
# The consistency function
# ----------------------------------------------------------------------------------------


def boundary_coefficients(process: Process, t: Tensor | float, t_min: float, parameterisation: str = "flow",
                          sigma_data: float = SIGMA_DATA) -> tuple[Tensor, Tensor, Tensor]:
    """(c_skip, c_out, c_in) at t (any shape; see the module docstring): exactly (1, 0, ·) at t_min.

    The distance to the boundary, t − t_min or σ(t) − σ(t_min), is computed by the same operations
    on t and on t_min in t's dtype, so it is exactly zero there.
    """
    if parameterisation not in PARAMETERISATIONS:
        raise ValueError(f"unknown parameterisation {parameterisation!r}; valid: {', '.join(PARAMETERISATIONS)}")
    t = as_time(t)
    t_lo = torch.full_like(t, t_min)  # the boundary in t's dtype
    if parameterisation == "flow":
        return torch.ones_like(t), -(t - t_lo), torch.ones_like(t)
    alpha, sigma = process.alpha(t), process.sigma(t)
    s, s_min = sigma / alpha, process.sigma(t_lo) / process.alpha(t_lo)  # EDM's σ(t) and σ_min
    c_skip = sigma_data**2 / ((s - s_min) ** 2 + sigma_data**2)
    c_out = sigma_data * (s - s_min) / torch.sqrt(sigma_data**2 + s**2)
    c_in = 1 / torch.sqrt(sigma**2 + (sigma_data * alpha) ** 2)  # EDM's c_in(σ) applied to x/alpha
    return c_skip, c_out, c_in


class ConsistencyFunction:
    """f_θ(x, t) = c_skip x + c_out F_θ(c_in x, τ) around a network F_θ(x, τ) or F_θ(x, τ, y).

    Args:
        network: the network F_θ, e.g. a DiT; it reads τ = time_scale·t [B].
        process: the process x_t lives on; t_min: the boundary time.
        parameterisation, sigma_data: see `boundary_coefficients`.

    Called as f(x, t) or f(x, t, y) with x [B, ...] and t one time or one per sample [B].
    """

    def __init__(self, network: Callable[..., Tensor], process: Process, t_min: float, parameterisation: str = "flow",
                 sigma_data: float = SIGMA_DATA, time_scale: float = 1000.0) -> None:
        if parameterisation not in PARAMETERISATIONS:
            raise ValueError(f"unknown parameterisation {parameterisation!r}; valid: {', '.join(PARAMETERISATIONS)}")
        self.network, self.process, self.t_min = network, process, float(t_min)
        self.parameterisation, self.sigma_data, self.time_scale = parameterisation, sigma_data, time_scale

    def __call__(self, x: Tensor, t: Tensor | float, y: Tensor | None = None) -> Tensor:
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t  # [B]
        c_skip, c_out, c_in = (per_sample(c, x) for c in boundary_coefficients(
            self.process, t, self.t_min, self.parameterisation, self.sigma_data))
        tau = self.time_scale * t  # the network's time input [B]
        out = self.network(c_in * x, tau) if y is None else self.network(c_in * x, tau, y)
        return c_skip * x + c_out * out


def consistency_denoiser(network: Callable[..., Tensor], process: Process, t_min: float,
                         parameterisation: str = "flow", sigma_data: float = SIGMA_DATA, time_scale: float = 1000.0,
                         name: str = "consistency model") -> Denoiser:
    """A consistency model as the `Denoiser` samplers call: `den(x, t).x0` is f_θ(x, t).

    The denoiser passes t itself (time_scale 1); the `ConsistencyFunction` maps it to the network's τ.
    """
    f = ConsistencyFunction(network, process, t_min, parameterisation, sigma_data, time_scale)
    return Denoiser(f, "x0", process, time_scale=1.0, name=name)


# ----------------------------------------------------------------------------------------
# Training: the discretisation, its curriculum, the pairs, the distance, the loss
# ----------------------------------------------------------------------------------------


def discretisation(process: Process, N: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
                   rho: float = RHO) -> tuple[Tensor, Tensor]:
    """The N increasing times t_1 < ... < t_N of `process` at EDM's noise levels σ_1 = σ_min < ... <
    σ_N = σ_max (ρ-spaced), and those σ: two float64 tensors `[N]` [CM, Sec. 5; EDM, Eq. 5]."""
    if isinstance(N, bool) or not isinstance(N, int) or N < 2:
        raise ValueError(f"a discretisation needs N >= 2 points, got {N!r}")
    sigmas = karras_sigmas(N, sigma_min, sigma_max, rho)[:-1].flip(0)  # [N], increasing
    sigmas[0] = sigma_min  # exactly the boundary (ρ-th powers round)
    t = process.t_from_sigma(sigmas)
    t[0] = boundary_time(process, sigma_min)  # the very number the consistency function calls t_min
    return t, sigmas


def boundary_time(process: Process, sigma: float) -> float:
    """The time of `process` at EDM's noise level σ = sigma/alpha (t_min at σ_min, t_max at σ_max)."""
    return float(process.t_from_sigma(torch.tensor(sigma, dtype=torch.float64)))


def curriculum_steps(progress: float, s0: int = 10, s1: int = 1280) -> int:
    """N at the fraction `progress` = k/K of training: N = min(s0 · 2^⌊progress · S⌋, s1) + 1 with
    S = log2⌊s1/s0⌋ + 1 doublings' stages, the paper's K' = K/S [iCT, Sec. 3.4]."""
    if not 0 < s0 <= s1:
        raise ValueError(f"need 0 < s0 <= s1, got s0={s0}, s1={s1}")
    stages = math.floor(math.log2(s1 // s0)) + 1
    return min(s0 * 2 ** math.floor(min(max(progress, 0.0), 1.0) * stages), s1) + 1


def pair_probabilities(sigmas: Tensor, p_mean: float = -1.1, p_std: float = 2.0) -> Tensor:
    """p(n) of the pair (σ_n, σ_{n+1}), n = 0..N−2: the mass that log σ ~ N(P_mean, P_std²) puts
    between them, normalised `[N − 1]` [iCT, Sec. 3.5]."""
    cdf = torch.erf((torch.log(sigmas.double()) - p_mean) / (math.sqrt(2) * p_std))  # [N]
    mass = cdf[1:] - cdf[:-1]  # [N − 1]
    return mass / mass.sum()


def sample_pairs(sigmas: Tensor, n: int, p_mean: float = -1.1, p_std: float = 2.0,
                 generator: torch.Generator | None = None, device: torch.device | str | None = None) -> Tensor:
    """n pair indices in 0..N−2 drawn from `pair_probabilities` (LongTensor [n] on `device`)."""
    draw_device = generator.device if generator is not None else device
    probs = pair_probabilities(sigmas, p_mean, p_std).to(draw_device)
    return torch.multinomial(probs, n, replacement=True, generator=generator).to(device)


def pseudo_huber(x: Tensor, y: Tensor, c: float | None = None) -> Tensor:
    """d(x, y) = sqrt(‖x − y‖² + c²) − c per example [B] for x, y [B, ...], c = 0.00054 sqrt(dim) by
    default [iCT, Sec. 3.3]: ‖x − y‖²/(2c) near zero, ‖x − y‖ − c far from it."""
    c = 0.00054 * math.sqrt(x[0].numel()) if c is None else c
    return torch.sqrt((x - y).pow(2).flatten(1).sum(1) + c**2) - c


def teacher_step(den: Denoiser, x: Tensor, t: Tensor, t_next: Tensor, solver: str = "heun") -> Tensor:
    """x̂ at t_next: one Euler or Heun step of the teacher's PF-ODE from x at t (one time or [B]) [CM, Eq. 6]."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; valid: {', '.join(SOLVERS)}")
    return SOLVERS[solver](den.velocity, x, t, t_next)


def consistency_loss(f: Callable[[Tensor, Tensor], Tensor], process: Process, x0: Tensor, t_n: Tensor,
                     t_next: Tensor, *, teacher: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None,
                     f_target: Callable[[Tensor, Tensor], Tensor] | None = None, weight: Tensor | None = None,
                     c: float | None = None, generator: torch.Generator | None = None) -> Tensor:
    """The per-example consistency loss λ d(f_θ(x_{t_{n+1}}, t_{n+1}), f_θ⁻(x̂_{t_n}, t_n)) `[B]`
    [CM, Eq. 7 (CD), Eq. 10 (CT)].

    Args:
        f: the consistency function f_θ(x, t), t [B] (labels bound).
        process: the process of x_t = alpha x0 + sigma z.
        x0: data [B, ...]; t_n < t_next: adjacent times of the discretisation [B].
        teacher: for distillation, `teacher(x, t, t_n)` -> x̂_{t_n} (e.g. `teacher_step`); None: CT.
        f_target: f_θ⁻; default f itself without gradients, θ⁻ = sg(θ) [iCT, Sec. 3.2] (an EMA copy's
            function gives the original θ⁻ ← sg(μ θ⁻ + (1 − μ) θ) [CM, Eq. 8]).
        weight: λ(σ_n) [B] (default 1); c: the pseudo-Huber constant (default 0.00054 sqrt(dim)).
        generator: for z.
    """
    z = noise_like(x0, generator)
    # 1. the later point of the pair: x_{t_{n+1}} = alpha x0 + sigma z
    x_next = process.perturb(x0, t_next, z)
    with torch.no_grad():
        # 2. the earlier point: the teacher's ODE step back (CD), or the same x0 and z (CT)
        x_n = teacher(x_next, t_next, t_n) if teacher is not None else process.perturb(x0, t_n, z)
        # 3. the target, from the stop-gradient network
        target = (f_target or f)(x_n, t_n)
    # 4. the distance of the online output from the target
    loss = pseudo_huber(f(x_next, t_next), target, c)
    return loss if weight is None else weight * loss


# ----------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------


def consistency_step(den: Denoiser, x: Tensor, t: Tensor, t_next: Tensor,
                     generator: torch.Generator | None = None) -> Tensor:
    """x̂0 = f(x, t), then fresh noise to t_next: alpha(t_next) x̂0 + sigma(t_next) z; x̂0 itself
    where sigma(t_next) = 0 [CM, Alg. 1] (the paper adds sqrt(τ² − σ_min²) z in EDM's variables)."""
    x0 = den.x0(x, t)
    if float(den.process.sigma(t_next)) == 0:  # one time of the grid, on the CPU: no device wait
        return x0
    return den.process.perturb(x0, t_next, noise_like(x0, generator))


@torch.no_grad()
def sample_consistency(den: Denoiser, x: Tensor, grid: Tensor, *, generator: torch.Generator | None = None,
                       callback: Callback | None = None) -> Tensor:
    """Multistep consistency sampling through `grid` [CM, Alg. 1]; NFE = N (one step: [t_max, 0]).

    Args:
        den: a consistency model's denoiser (`consistency_denoiser`), maybe guided.
        x: the start [B, ...] at grid[0]; grid: decreasing times ending at 0.
        generator: for the fresh noise; callback: see `minidit.grids.report`.
    """
    for i, t, t_next in intervals(den, grid):
        x = consistency_step(den, x, t, t_next, generator)
        x = report(callback, x, i, t, t_next, den, grid)
    return x
