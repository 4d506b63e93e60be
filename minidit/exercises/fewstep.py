"""Course exercises of tutorial 13 (one step): the two equations a one-step model stands on.

Each check runs the student's function and minidit's on seeded float64 inputs and raises an
`ExerciseError` that names the mistake:

    the consistency boundary   c_skip(σ) = σ_d² / ((σ − σ_min)² + σ_d²),
                               c_out(σ)  = σ_d (σ − σ_min) / sqrt(σ_d² + σ²),
                               so f_θ(x, σ_min) = x whatever the network outputs      [CM, Eq. 5, App. C]
    the MeanFlow target        u_tgt = v − (t − r) (v ∂_z u_θ + ∂_t u_θ), one JVP with tangent
                               (v, 0, 1) in (z, r, t), without gradient               [MeanFlow, Alg. 1]

References: [CM] Song et al. 2023; [MeanFlow] Geng et al. 2025.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from minidit.consistency import SIGMA_DATA, SIGMA_MIN, boundary_coefficients
from minidit.exercises.grading import F64, ExerciseError, call_student, expect_close
from minidit.flow import FlowProcess
from minidit.meanflow import meanflow_target as library_meanflow_target

K = 7  # noise levels checked
B, D = 4, 6  # examples and features of the MeanFlow check


def _sigmas() -> Tensor:
    """σ_min exactly, then six levels up to 80 (float64 [K])."""
    return torch.tensor([SIGMA_MIN, 0.01, 0.1, 0.5, 1.0, 5.0, 80.0], dtype=F64)


def _edm(sigma: Tensor, sigma_min: float, sigma_data: float, shift: bool = True, out_scale: bool = True,
         skip_square: bool = True) -> tuple[Tensor, Tensor]:
    """(c_skip, c_out) with the mistakes a student makes, for the hints."""
    s = sigma - sigma_min if shift else sigma
    c_skip = sigma_data**2 / ((s**2 if skip_square else s) + sigma_data**2)
    c_out = (sigma_data if out_scale else 1.0) * s / torch.sqrt(sigma_data**2 + sigma**2)
    return c_skip, c_out


def check_consistency_boundary(fn: Callable[[Tensor, float, float], tuple[Tensor, Tensor]]) -> None:
    """Check `fn(sigma [K], sigma_min, sigma_data) -> (c_skip [K], c_out [K])`: the coefficients of the
    consistency function f(x, σ) = c_skip(σ) x + c_out(σ) F(x, σ), exactly (1, 0) at σ = σ_min."""
    name = getattr(fn, "__name__", "consistency_boundary")
    sigma = _sigmas()
    got = call_student(name, fn, sigma.clone(), SIGMA_MIN, SIGMA_DATA)
    if not (isinstance(got, (tuple, list)) and len(got) == 2):
        raise ExerciseError(f"{name}: return a pair (c_skip, c_out), got {type(got).__name__}")
    c_skip, c_out = got
    # the library works in the flow's time, where σ = t / (1 − t)
    process = FlowProcess()
    t, t_min = sigma / (1 + sigma), SIGMA_MIN / (1 + SIGMA_MIN)
    want_skip, want_out, _ = boundary_coefficients(process, t, t_min, "edm", SIGMA_DATA)
    unshifted = _edm(sigma, SIGMA_MIN, SIGMA_DATA, shift=False)
    shape_hint = f"one coefficient per noise level: [K] = [{K}]"
    expect_close(name, "c_skip [K]", c_skip, want_skip, hints=(
        ("c_skip(σ_min) is not 1: measure the distance from the boundary, (σ − σ_min)², not σ²", unshifted[0]),
        ("the distance from the boundary is squared in c_skip: σ_d² / ((σ − σ_min)² + σ_d²)",
         _edm(sigma, SIGMA_MIN, SIGMA_DATA, skip_square=False)[0]),
        ("c_skip and c_out are swapped: c_skip multiplies x and is 1 at the boundary", want_out)),
        shape_hint=shape_hint)
    expect_close(name, "c_out [K]", c_out, want_out, hints=(
        ("c_out(σ_min) is not 0: the network's output must vanish at the boundary; use σ − σ_min, not σ",
         unshifted[1]),
        ("c_out lacks its factor σ_d: σ_d (σ − σ_min) / sqrt(σ_d² + σ²)",
         _edm(sigma, SIGMA_MIN, SIGMA_DATA, out_scale=False)[1]),
        ("the square root's σ is the noise level itself, not its distance from σ_min: sqrt(σ_d² + σ²)",
         SIGMA_DATA * (sigma - SIGMA_MIN) / torch.sqrt(SIGMA_DATA**2 + (sigma - SIGMA_MIN) ** 2))),
        shape_hint=shape_hint)
    # the boundary condition holds exactly, not to a tolerance: f(x, σ_min) = x bit for bit
    if not (float(c_skip[0]) == 1.0 and float(c_out[0]) == 0.0):
        raise ExerciseError(f"{name}: at σ = σ_min the coefficients are ({float(c_skip[0])!r}, {float(c_out[0])!r}), "
                            "not exactly (1, 0): compute σ − σ_min by a subtraction, so it is exactly zero there")
    print(f"{name}: correct ✓")


def _u_fn(seed: int) -> tuple[Callable[[Tensor, Tensor, Tensor], Tensor], Tensor]:
    """A seeded smooth average velocity u(z [B, D], r [B], t [B]) -> [B, D], whose weights W need gradients,
    so that a target that keeps its graph shows up."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(D, D, generator=g, dtype=F64).div(math.sqrt(D)).requires_grad_(True)
    a, b = torch.randn(D, generator=g, dtype=F64), torch.randn(D, generator=g, dtype=F64)

    def u(z: Tensor, r: Tensor, t: Tensor) -> Tensor:
        return torch.tanh(z @ W) * (1 + t[:, None] ** 2) + torch.sin(3 * r)[:, None] * a + (t - r)[:, None] * b * z

    return u, W


def _target(u_fn, z, r, t, v, tangent_z=True, tangent_r=0.0, sign=-1.0) -> Tensor:
    """u_tgt with the mistakes a student makes, for the hints."""
    _, du = torch.func.jvp(u_fn, (z, r, t), (v if tangent_z else torch.zeros_like(z),
                                              torch.full_like(r, tangent_r), torch.ones_like(t)))
    return (v + sign * (t - r)[:, None] * du).detach()


def check_meanflow_target(fn: Callable[..., tuple[Tensor, Tensor]]) -> None:
    """Check `fn(u_fn, z [B, D], r [B], t [B], v [B, D]) -> (u [B, D], u_tgt [B, D])`: the network's
    average velocity u_θ(z, r, t) and MeanFlow's target v − (t − r) d/dt u_θ, held without gradient."""
    name = getattr(fn, "__name__", "meanflow_target")
    u_fn, W = _u_fn(0)
    g = torch.Generator().manual_seed(1)
    z, v = torch.randn(B, D, generator=g, dtype=F64), torch.randn(B, D, generator=g, dtype=F64)
    t = torch.tensor([0.9, 0.6, 0.5, 0.3], dtype=F64)
    r = torch.tensor([0.1, 0.6, 0.2, 0.0], dtype=F64)  # one r = t: there the target is v itself
    got = call_student(name, fn, u_fn, z.clone(), r.clone(), t.clone(), v.clone())
    if not (isinstance(got, (tuple, list)) and len(got) == 2):
        raise ExerciseError(f"{name}: return a pair (u, u_tgt), got {type(got).__name__}")
    u, u_tgt = got
    want_u, want = library_meanflow_target(u_fn, z, r, t, v)
    _, du_dt = torch.func.jvp(u_fn, (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t)))
    shape = f"[B, D] = [{B}, {D}], like z"
    expect_close(name, "u, the network's average velocity u_θ(z, r, t)", u, want_u.detach(), shape_hint=shape)
    expect_close(name, "u_tgt", u_tgt, want, hints=(
        ("the tangent of z is zero: along the path z moves with dz/dt = v, so the JVP's tangent is (v, 0, 1) "
         "and d/dt u = v ∂_z u + ∂_t u", _target(u_fn, z, r, t, v, tangent_z=False)),
        ("the tangent of r is 1: r is the interval's fixed start, its tangent is 0 (only t moves)",
         _target(u_fn, z, r, t, v, tangent_r=1.0)),
        ("the sign: u = v − (t − r) d/dt u, so the target subtracts (t − r) d/dt u", _target(u_fn, z, r, t, v,
                                                                                            sign=1.0)),
        ("this is d/dt u itself: the target is v − (t − r) d/dt u", du_dt.detach()),
        ("this is v, the target of flow matching: it holds only where r = t", v)),
        shape_hint=shape)
    if isinstance(u_tgt, Tensor) and u_tgt.requires_grad:
        raise ExerciseError(f"{name}: u_tgt carries gradients to the network's weights: the target is "
                            "held fixed, sg(u_tgt) (detach it), as in Alg. 1; only u is trained")
    if isinstance(u, Tensor) and not u.requires_grad:
        raise ExerciseError(f"{name}: u has no gradient to the network's weights: return u_fn's output from the "
                            "JVP as it is (only the target is detached)")
    print(f"{name}: correct ✓")
