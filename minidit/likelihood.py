"""Log-likelihoods and bits/dim through the probability-flow ODE.

Along the PF-ODE dx/dt = v(x, t) the log-density obeys the instantaneous change of
variables, so integrating data x(t_eps) = x up to the prior at t = 1 gives its density:

    d/dt log p_t(x(t)) = −∇·v(x(t), t)                               [SDE, Eq. 39; FFJORD]
    log p_0(x) = log p_1(x(1)) + ∫_{t_eps}^1 ∇·v(x(t), t) dt

We integrate the joint state [x, ∫∇·v] with RK45 (or fixed-step Heun). The divergence is
exact (one autograd pass per dimension, for low-dimensional data) or Hutchinson's
estimate ∇·v ≈ εᵀ (∂v/∂x) ε with E[ε εᵀ] = I, Rademacher or Gaussian probes, one probe per
sample fixed for the whole solve, which makes log p unbiased.

Bits/dim of 8-bit images under uniform dequantisation: a pixel k ∈ {0, …, 255} becomes
x = (k + u)/128 − 1 ∈ [−1, 1), u ~ U[0, 1). The dequantised variable w = k + u has density
p_w(w) = p_x(x) · 128^(−D) (the Jacobian of x = w/128 − 1), and by Jensen the discrete
model satisfies log P(k) ≥ E_u log p_w(k + u). Hence

    bits/dim ≤ (−log p_x(x)/D + log 128) / log 2,     in general log(n_bins/2) for n_bins levels.

References: [SDE] Song et al. 2021, App. D.2; Grathwohl et al. 2019 (FFJORD); Hutchinson
1989; Theis, van den Oord, Bethge 2016 (dequantisation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from minidit.denoiser import Denoiser
from minidit.grids import check_steps
from minidit.ode import check_tolerances, heun_step, rk45_solve
from minidit.process import noise_like

DIVERGENCES = ("exact", "hutchinson")
PROBES = ("rademacher", "gaussian")


@dataclass
class LikelihoodResult:
    """log p of each sample (nats) and the pieces it was made of.

    Attributes:
        logp: log p_{t_eps}(x) [B] = prior_logp + delta_logp.
        prior_logp: log p_1(z) [B].
        delta_logp: ∫ ∇·v dt along the path [B].
        z: the encoded point at t = 1 [B, ...].
        nfe: model evaluations (each with its autograd divergence).
    """

    logp: Tensor
    prior_logp: Tensor
    delta_logp: Tensor
    z: Tensor
    nfe: int

    def bits_per_dim(self, n_bins: int | None = 256) -> Tensor:
        """Bits/dim of each sample (see `bits_per_dim`)."""
        return bits_per_dim(self.logp, self.z[0].numel(), n_bins)


def bits_per_dim(logp: Tensor, dim: int, n_bins: int | None = 256) -> Tensor:
    """Bits per dimension, (−logp/D + log(n_bins/2)) / log 2, for data x = 2(k + u)/n_bins − 1.

    With n_bins=None (continuous data, no dequantisation) it is −logp / (D log 2).
    """
    shift = 0.0 if n_bins is None else math.log(n_bins / 2)
    return (-logp / dim + shift) / math.log(2)


def dequantize(images: Tensor, generator: torch.Generator | None = None, n_bins: int = 256) -> Tensor:
    """Integer pixels k in [0, n_bins) -> x = 2(k + u)/n_bins − 1 in [−1, 1), u ~ U[0, 1)."""
    if images.is_floating_point():
        raise ValueError("dequantize expects integer pixel values (e.g. uint8), got a float tensor")
    if images.numel() and (int(images.min()) < 0 or int(images.max()) >= n_bins):
        raise ValueError(f"pixels must lie in [0, {n_bins}), got [{int(images.min())}, {int(images.max())}]")
    k = images.float()
    noise_device = generator.device if generator is not None else k.device
    u = torch.rand(k.shape, generator=generator, device=noise_device).to(k.device)  # U[0, 1)
    return 2 * (k + u) / n_bins - 1


def divergence(v: Tensor, x: Tensor, probe: Tensor | None = None) -> Tensor:
    """∇·v [B] for v = v(x) computed with x.requires_grad: exact (probe None) or Hutchinson."""
    if probe is not None:
        (jvp,) = torch.autograd.grad(v, x, probe, retain_graph=True)  # εᵀ ∂v/∂x
        return (jvp * probe).flatten(1).sum(1)
    div = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    v_flat = v.flatten(1)  # [B, D]
    for i in range(v_flat.shape[1]):  # one backward pass per dimension
        (g,) = torch.autograd.grad(v_flat[:, i].sum(), x, retain_graph=True)
        div = div + g.flatten(1)[:, i]
    return div


def ode_log_likelihood(den: Denoiser, x: Tensor, *, method: str = "rk45", steps: int = 100, rtol: float = 1e-5,
                       atol: float = 1e-5, divergence_method: str = "exact", probe: str = "rademacher",
                       t_eps: float = 1e-5, generator: torch.Generator | None = None,
                       progress: bool = True) -> LikelihoodResult:
    """log p(x) by the instantaneous change of variables along the PF-ODE, t_eps -> 1.

    Args:
        den: the denoiser (differentiable in x); its process's prior gives log p_1. Bind labels
            with `minidit.guidance.guided` first.
        x: data [B, ...] (read as a draw of p_{t_eps}).
        method: "rk45" (adaptive, rtol/atol) or "heun" (`steps` uniform steps).
        divergence_method: "exact" (D backward passes per evaluation) or "hutchinson".
        probe: "rademacher" or "gaussian" for Hutchinson.
        t_eps: where the integral starts (the paper uses 1e-5).
        generator: for the Hutchinson probes.

    Returns:
        LikelihoodResult; `.bits_per_dim()` for images.
    """
    if method not in ("rk45", "heun"):
        raise ValueError(f"unknown method {method!r}; valid methods: rk45, heun")
    if divergence_method not in DIVERGENCES:
        raise ValueError(f"unknown divergence_method {divergence_method!r}; valid: {', '.join(DIVERGENCES)}")
    if probe not in PROBES:
        raise ValueError(f"unknown probe {probe!r}; valid probes: {', '.join(PROBES)}")
    if method == "rk45":
        check_tolerances(rtol, atol)
    else:
        check_steps(steps)
    if not 0 < t_eps < 1:
        raise ValueError(f"t_eps must lie in (0, 1), got {t_eps}")
    B, shape = x.shape[0], x.shape
    eps = None
    if divergence_method == "hutchinson":  # one probe per sample for the whole solve
        eps = noise_like(x, generator)
        if probe == "rademacher":
            eps = eps.sign()

    def F(state: Tensor, t: Tensor) -> Tensor:
        # the joint field d/dt [x, ∫∇·v] = [v, ∇·v] on the packed state [B, D + 1]
        with torch.enable_grad():
            xt = state[:, :-1].reshape(shape).detach().requires_grad_(True)  # [B, D] -> [B, ...]
            v = den.velocity(xt, t)
            div = divergence(v, xt, eps)
        return torch.cat([v.detach().flatten(1), div.detach()[:, None]], dim=1)  # [B, D + 1]

    state = torch.cat([x.flatten(1), x.new_zeros(B, 1)], dim=1)  # [B, D + 1]
    if method == "rk45":
        state, _ = rk45_solve(F, state, t_eps, 1.0, rtol, atol,
                              callback=lambda i, s, t: setattr(den, "step", i), progress=progress)
    else:
        ts = torch.linspace(t_eps, 1.0, steps + 1, dtype=torch.float64)
        for i in range(steps):
            den.step = i
            state = heun_step(F, state, ts[i], ts[i + 1])
    den.check_finite()
    z = state[:, :-1].reshape(shape)  # [B, D] -> [B, ...]
    prior_logp = den.process.prior_log_prob(z)
    delta = state[:, -1]
    return LikelihoodResult(prior_logp + delta, prior_logp, delta, z, den.nfe)
