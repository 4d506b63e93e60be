"""The EDM sampler: Heun's method on the PF-ODE in sigma space, with optional churn [EDM, Alg. 2].

Karras et al. write every diffusion as x = x0 + sigma n, where the ODE is simply

    dx/dσ = (x − D(x; σ)) / σ,      D(x; σ) ≈ E[x0 | x]                   [EDM, Eq. 3]

and choose the noise levels σ_i = (σ_max^{1/ρ} + i/(N−1) (σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ,
ρ = 7, σ_N = 0 [EDM, Eq. 5]. Each step may first add noise ("churn") to go up from σ_i to
σ̂ = (1 + γ) σ_i, γ = min(S_churn/N, √2 − 1) for σ_i in [S_tmin, S_tmax], then take a Heun
step from σ̂ down to σ_{i+1} (an Euler step on the last one, to σ = 0): NFE = 2N − 1.

Any process x_t = alpha x0 + sigma eps is this form after dividing by alpha: x̃ = x/alpha
has noise level σ = sigma/alpha, i.e. log-SNR −2 log σ. So from a VP, VE, DDPM or flow
model we get EDM's denoiser by evaluating it at the t with that log-SNR:

    D(x̃; σ) = x̂0(alpha(t_σ) x̃, t_σ),   t_σ = λ⁻¹(−2 log σ)

References: [EDM] Karras, Aittala, Aila, Laine 2022.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from minidit.denoisers import Denoiser, SampleResult, as_denoiser, check_steps, randn_like
from minidit.sde import SDE, per_sample


def edm_sigmas(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> Tensor:
    """σ_0 > ... > σ_{N−1} = sigma_min, then σ_N = 0: float64 [steps + 1]; see [EDM, Eq. 5]."""
    check_steps(steps)
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    if rho <= 0:
        raise ValueError(f"rho must be positive, got {rho}")
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)  # [steps] (just [0] for one step)
    inv_max, inv_min = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    sigmas = (inv_max + ramp * (inv_min - inv_max)) ** rho  # [steps]
    return torch.cat([sigmas, sigmas.new_zeros(1)])  # [steps + 1]


def sigma_range(process: SDE) -> tuple[float, float]:
    """The EDM noise levels sigma/alpha that `process` spans over [t_eps, 1]."""
    lam = process.log_snr(torch.tensor([process.t_eps, 1.0], dtype=torch.float64))
    return math.exp(-0.5 * float(lam[0])), math.exp(-0.5 * float(lam[1]))


def edm_denoiser(den: Denoiser, process: SDE) -> Callable[[Tensor, Tensor], Tensor]:
    """EDM's D(x̃ [B, ...], σ [B]) from a denoiser bound to `process` (see the module docstring)."""

    def D(x_tilde: Tensor, sigma: Tensor) -> Tensor:
        t = process.t_from_log_snr(-2 * torch.log(sigma.detach().cpu().double()))  # [B], float64
        alpha = process.alpha(t).to(x_tilde)  # [B]
        return den.x0(per_sample(alpha, x_tilde) * x_tilde, t.to(x_tilde))

    return D


@torch.no_grad()
def edm_sample(model: Denoiser | Callable, process: SDE, shape: tuple[int, ...] | None = None, *,
               steps: int = 18, sigma_min: float | None = None, sigma_max: float | None = None,
               rho: float = 7.0, S_churn: float = 0.0, S_tmin: float = 0.0, S_tmax: float = float("inf"),
               S_noise: float = 1.0, x_init: Tensor | None = None, y: Tensor | None = None,
               cfg_scale: float | None = None, null_label: int | None = None,
               generator: torch.Generator | None = None, device: torch.device | str | None = None,
               dtype: torch.dtype = torch.float32, return_trajectory: bool = False,
               progress: bool = True) -> SampleResult:
    """EDM's stochastic (S_churn > 0) or deterministic (S_churn = 0) Heun sampler [EDM, Alg. 2].

    Args:
        model: a `Denoiser` or a plain `score_fn(x, t)` on `process`.
        process: any diffusion with alpha, sigma and `t_from_log_snr`.
        shape: the sample shape [B, ...] (or give x_init).
        steps: N, the number of noise levels; NFE = 2N − 1.
        sigma_min, sigma_max: the noise range; by default EDM's 0.002 and 80, narrowed
            to what the process spans on [t_eps, 1] (e.g. VE: [0.01, 50]).
        rho, S_churn, S_tmin, S_tmax, S_noise: EDM's schedule and churn parameters.
        x_init: starting noise in the process's own coordinates at the t of sigma_max
            (default: x̃ = sigma_max · n in EDM coordinates).

    Returns:
        SampleResult with x at σ = 0 (data), and `times` holding the σ of each step.
    """
    lo, hi = sigma_range(process)
    sigma_min = max(0.002, lo) if sigma_min is None else sigma_min
    sigma_max = min(80.0, hi) if sigma_max is None else sigma_max
    sigmas = edm_sigmas(steps, sigma_min, sigma_max, rho)  # validates steps and the range
    floor = math.exp(-0.5 * float(process.log_snr(torch.tensor(0.0, dtype=torch.float64))))  # sigma/alpha at t=0
    if sigma_max > hi * (1 + 1e-9) or sigma_min < floor * (1 - 1e-9):
        raise ValueError(f"EDM noise levels [{sigma_min:.4g}, {sigma_max:.4g}] leave the range "
                         f"[{floor:.4g}, {hi:.4g}] that {type(process).__name__} spans")
    if S_churn < 0 or S_noise < 0:
        raise ValueError(f"S_churn and S_noise must be >= 0, got {S_churn}, {S_noise}")
    den = as_denoiser(model, process, y, cfg_scale, null_label)
    D = edm_denoiser(den, process)
    # 1. x̃_0 = sigma_max n (or the given start, divided by alpha)
    if x_init is not None:
        t0 = process.t_from_log_snr(torch.tensor(-2 * math.log(sigma_max), dtype=torch.float64))
        x = x_init.to(device=device or x_init.device, dtype=dtype) / float(process.alpha(t0))
    else:
        if shape is None:
            raise ValueError("give either shape or x_init")
        noise_device = generator.device if generator is not None else device
        n = torch.randn(tuple(shape), generator=generator, device=noise_device, dtype=dtype)
        x = sigma_max * n.to(device)
    B = x.shape[0]
    trajectory, times = ([x.cpu()], [float(sigmas[0])]) if return_trajectory else (None, [])

    def level(sigma: float) -> Tensor:
        return torch.full((B,), sigma, dtype=torch.float64)  # [B], on the CPU like the schedule

    for i in tqdm(range(steps), desc="EDM", disable=not progress, leave=False):
        den.step = i
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        # 2. churn: raise the noise from σ_i to σ̂ = (1 + γ) σ_i
        gamma = min(S_churn / steps, math.sqrt(2) - 1) if S_tmin <= sigma <= S_tmax else 0.0
        sigma_hat = sigma * (1 + gamma)
        if gamma > 0:
            x = x + math.sqrt(sigma_hat**2 - sigma**2) * S_noise * randn_like(x, generator)
        # 3. Euler step from σ̂ to σ_{i+1}
        d = (x - D(x, level(sigma_hat))) / sigma_hat
        x_next = x + (sigma_next - sigma_hat) * d
        # 4. second-order correction, except on the last step to σ = 0
        if sigma_next > 0:
            d_next = (x_next - D(x_next, level(sigma_next))) / sigma_next
            x_next = x + (sigma_next - sigma_hat) * 0.5 * (d + d_next)
        x = x_next
        if trajectory is not None:
            trajectory.append(x.cpu())
            times.append(sigma_next)
    return SampleResult(x, den.nfe, trajectory, times)
