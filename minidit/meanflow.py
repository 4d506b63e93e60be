"""MeanFlow: learn the average velocity of a flow over an interval, and cross the interval in one jump.

On the straight path of `minidit.flow`, z_t = (1 − t) x0 + t ε (t = 0 the data, t = 1 the noise:
the paper's z_t = (1 − t) x + t ε, the same convention), the average velocity over [r, t] is

    u(z_t, r, t) = 1/(t − r) ∫_r^t v(z_τ, τ) dτ,    so that   z_r = z_t − (t − r) u(z_t, r, t)   [MeanFlow, Sec. 4.1]

Differentiating (t − r) u = ∫_r^t v dτ in t gives the MeanFlow identity; its right side needs only v
and the derivative of u along the path, a Jacobian-vector product with tangent (v, 0, 1) in (z, r, t):

    u(z_t, r, t) = v(z_t, t) − (t − r) d/dt u(z_t, r, t),    d/dt u = v ∂_z u + ∂_t u       [MeanFlow, Sec. 4.1]
    u_tgt = v_t − (t − r) (v_t ∂_z u_θ + ∂_t u_θ),    L = E ‖u_θ(z_t, r, t) − sg(u_tgt)‖²      [MeanFlow, Alg. 1]

with v_t = ε − x0, the conditional velocity of flow matching (or a teacher's v(z_t, t): distillation).
At r = t the target is v_t and the loss is flow matching's. (t, r) are two logit-normal draws, the
larger one t, with r = t for most of the batch; each example's squared error is weighted adaptively
by w = 1/(‖Δ‖² + c)^p, held constant [MeanFlow, Sec. 4.3]. Guidance is trained in, from the
network's own velocity u(z_t, t, t) with and without the label [MeanFlow, Sec. 4.2]:

    ṽ_t = ω v_t + κ u_θ(z_t, t, t | y) + (1 − ω − κ) u_θ(z_t, t, t | ∅)       (ω' = ω/(1 − κ) the scale)

Sampling crosses each interval of a grid in one evaluation; one step is z_0 = z_1 − u(z_1, 0, 1)
[MeanFlow, Alg. 2]. The network reads the time pair (t, r) [B, 2] (`minidit.dit.DiT` with
`second_time`), so a `Denoiser` of kind "velocity" holds it: given one time t it is u(z, t, t) = v,
a flow model for every ODE sampler; `average_velocity` asks it for a pair.

Time convention: continuous t in [0, 1], t = 0 is the data; r <= t.
References: [MeanFlow] Geng, Deng, Bai, Kolter, He 2025; [FM] Lipman et al. 2023.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from minidit.denoiser import Denoiser
from minidit.flow import interpolate, sample_t, velocity_target
from minidit.grids import Callback, intervals, report
from minidit.process import noise_like, per_sample

AverageVelocity = Callable[[Tensor, Tensor, Tensor], Tensor]  # u(z [B, ...], r [B], t [B]) -> [B, ...]


def pair_time(t: Tensor, r: Tensor) -> Tensor:
    """The network's time input for an interval: the pairs (t, r), [B] and [B] -> [B, 2]."""
    return torch.stack([t, r], dim=-1)  # [B, 2]


def sample_t_r(n: int, r_neq_t: float = 0.25, loc: float = -0.4, scale: float = 1.0,
               generator: torch.Generator | None = None, device: torch.device | str | None = None,
               dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """(t, r) [n] each: two draws of sigmoid(loc + scale n), t the larger; r = t except for a fraction
    `r_neq_t` of the examples (25% and logit-normal(−0.4, 1.0): the best of [MeanFlow, Tab. 1])."""
    if not 0 <= r_neq_t <= 1:
        raise ValueError(f"r_neq_t must lie in [0, 1], got {r_neq_t}")
    a = sample_t(n, "logit_normal", loc, scale, generator, device, dtype)
    b = sample_t(n, "logit_normal", loc, scale, generator, device, dtype)
    t, r = torch.maximum(a, b), torch.minimum(a, b)
    keep = sample_t(n, "uniform", generator=generator, device=device, dtype=dtype) < r_neq_t  # [n]
    return t, torch.where(keep, r, t)


def meanflow_target(u_fn: AverageVelocity, z: Tensor, r: Tensor, t: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """u_θ(z, r, t) and the target u_tgt = v − (t − r)(v ∂_z u_θ + ∂_t u_θ) (no gradient), from one
    forward-mode pass of `torch.func.jvp` with tangent (v, 0, 1) [MeanFlow, Alg. 1].

    Args:
        u_fn: `u_fn(z, r, t)`; z [B, ...], r and t [B]; v: the velocity dz/dt along the path [B, ...].
    """
    u, du_dt = torch.func.jvp(u_fn, (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t)))
    return u, (v - per_sample(t - r, z) * du_dt).detach()


def adaptive_weight(err2: Tensor, p: float = 1.0, c: float = 1e-3) -> Tensor:
    """w = 1/(‖Δ‖² + c)^p per example, without gradient; w ‖Δ‖² is the loss ‖Δ‖^{2(1−p)} in value
    and slope (p = 0: squared error, p = ½: like the pseudo-Huber loss) [MeanFlow, Sec. 4.3]."""
    return (err2.detach() + c).pow(-p)


def meanflow_loss(u_fn: AverageVelocity, x0: Tensor, t: Tensor, r: Tensor, *,
                  v_fn: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None, p: float = 1.0, c: float = 1e-3,
                  generator: torch.Generator | None = None) -> Tensor:
    """The MeanFlow loss per example [B]: w ‖u_θ(z_t, r, t) − sg(u_tgt)‖², ‖·‖² averaged over elements.

    Args:
        u_fn: the average velocity `u_fn(z, r, t)` (labels bound); x0: data [B, ...]; t, r: [B], r <= t.
        v_fn: `v_fn(z, t, v_cond)` -> the velocity to use (guided, or a teacher's), called without
            gradients; default v_cond = ε − x0 itself.
        p, c: the adaptive weighting (p = 0: the plain squared error).
        generator: for ε.
    """
    eps = noise_like(x0, generator)
    # 1. a point of the straight path and its conditional velocity [FM]
    z = interpolate(x0, eps, t)
    v = velocity_target(x0, eps)
    if v_fn is not None:
        with torch.no_grad():
            v = v_fn(z, t, v)
    # 2. the network and the target from the MeanFlow identity, in one JVP
    u, u_tgt = meanflow_target(u_fn, z, r, t, v)
    # 3. the adaptively weighted squared error
    err2 = (u - u_tgt).pow(2).flatten(1).mean(1)  # [B]
    return adaptive_weight(err2, p, c) * err2


def guided_velocity(v: Tensor, u_cond: Tensor, u_uncond: Tensor, omega: float, kappa: float = 0.0) -> Tensor:
    """ṽ = ω v + κ u(z, t, t | y) + (1 − ω − κ) u(z, t, t | ∅): the trained-in guidance [MeanFlow, Sec. 4.2]."""
    return omega * v + kappa * u_cond + (1 - omega - kappa) * u_uncond


# ----------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------


def average_velocity(den: Denoiser, z: Tensor, r: Tensor | float, t: Tensor | float) -> Tensor:
    """u_θ(z, r, t) for one r and one t of the whole batch: one evaluation of `den` on the pairs (t, r)."""
    B = z.shape[0]
    pairs = pair_time(torch.full((B,), float(t), dtype=z.dtype, device=z.device),
                      torch.full((B,), float(r), dtype=z.dtype, device=z.device))  # [B, 2]
    return den(z, pairs).velocity  # the network's own kind: no conversion, so no use of the time


def meanflow_step(den: Denoiser, z: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
    """z_r = z_t − (t − r) u_θ(z_t, r, t) with r = t_next: one jump over `[t_next, t]` [MeanFlow, Alg. 2]."""
    return z - (t - t_next) * average_velocity(den, z, t_next, t)


@torch.no_grad()
def sample_meanflow(den: Denoiser, x: Tensor, grid: Tensor, *, generator: torch.Generator | None = None,
                    callback: Callback | None = None) -> Tensor:
    """Jump across each interval of `grid` with the average velocity; NFE = N (one step: [1, 0]).

    Args:
        den: a denoiser whose network reads time pairs (a DiT with `second_time`), maybe guided.
        x: the start [B, ...] at grid[0]; grid: decreasing times. (`generator` is unused: deterministic.)
        callback: see `minidit.grids.report`.
    """
    for i, t, t_next in intervals(den, grid):
        x = meanflow_step(den, x, t, t_next)
        x = report(callback, x, i, t, t_next, den, grid)
    return x
