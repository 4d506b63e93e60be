"""EDM's view of diffusion: the process σ(t) = t, Heun's method on it, and "churn" [EDM, Alg. 1-2].

Karras et al. write every diffusion as x = x0 + σ n and take the noise level itself as time,
alpha(t) = 1, sigma(t) = t [EDM, Table 1], where the probability-flow ODE is simply

    dx/dσ = (x − D(x; σ)) / σ = ε̂(x; σ),      D(x; σ) ≈ E[x0 | x]             [EDM, Eq. 3]

Any process x = alpha x0 + sigma eps is this one after dividing by alpha (x̃ = x/alpha, σ =
sigma/alpha), so any network can be run on it (`Denoiser.on(EDMProcess())`). EDM's samplers
are then `minidit.ode.sample_heun` on the Karras grid σ_i (`minidit.grids.karras_grid`,
[EDM, Eq. 5]) with an Euler step to σ = 0 at the end (NFE = 2N − 1) [EDM, Alg. 1], and,
for the stochastic sampler, a "churn" before each step that adds noise to go up from σ_i to
σ̂ = (1 + γ) σ_i, γ = min(S_churn/N, √2 − 1) for `σ_i in [S_tmin, S_tmax]` [EDM, Alg. 2]:

    x̂ = x + sqrt(σ̂² − σ_i²) S_noise z

`churn_step` does this on any process through the exact forward transition from t to t̂.

References: [EDM] Karras, Aittala, Aila, Laine 2022.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from minidit.process import Process, as_time, noise_like, per_sample


@dataclass(frozen=True)
class EDMProcess(Process):
    """alpha(t) = 1, sigma(t) = t: time is the noise level σ, in `[0, sigma_max]` [EDM, Table 1]."""

    sigma_max: float = 80.0
    t_eps: float = 0.002

    @property
    def t_max(self) -> float:
        return self.sigma_max

    def alpha(self, t):
        return torch.ones_like(as_time(t))

    def sigma(self, t):
        return as_time(t).clone()

    def d_alpha(self, t):
        return torch.zeros_like(as_time(t))

    def d_sigma(self, t):
        return torch.ones_like(as_time(t))

    def t_from_log_snr(self, log_snr):
        return torch.exp(-0.5 * torch.as_tensor(log_snr, dtype=torch.float64))  # λ = −2 log σ


def churn_step(process: Process, x: Tensor, t: Tensor, gamma: float, S_noise: float = 1.0,
               generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Raise the noise level from t to t̂ with sigma/alpha scaled by (1 + γ) [EDM, Alg. 2, lines 4-6].

    Returns:
        x̂ ~ q(x_t̂ | x_t), the exact forward transition (noise scaled by S_noise), and t̂.
    """
    t_hat = process.t_from_sigma((1 + gamma) * math.exp(-0.5 * float(process.log_snr(t))))
    a, s = process.transition(t_hat, t)
    return per_sample(a, x) * x + per_sample(s, x) * S_noise * noise_like(x, generator), t_hat
