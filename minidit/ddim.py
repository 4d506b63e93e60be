"""DDIM: sampling a DDPM-trained model on a short sub-sequence of its timesteps.

Time is the integer t in 0..T-1 of `ddpm`; a DDIM run visits an increasing
sub-sequence τ_0 < τ_1 < ... < τ_{S−1} backwards, then steps to the data (level −1,
ᾱ_{−1} = 1). One step from level t to level t' < t, with ε̂ = ε_θ(x_t, t):

    x̂_0    = (x_t − sqrt(1 − ᾱ_t)·ε̂) / sqrt(ᾱ_t)                              [DDIM, Eq. 12]
    σ_t    = η · sqrt((1 − ᾱ_t')/(1 − ᾱ_t)) · sqrt(1 − ᾱ_t/ᾱ_t')               [DDIM, Eq. 16]
    x_t'   = sqrt(ᾱ_t')·x̂_0 + sqrt(1 − ᾱ_t' − σ_t²)·ε̂ + σ_t·z                  [DDIM, Eq. 12]

η = 0 is deterministic (an Euler step of the probability-flow ODE in the variables
x/sqrt(ᾱ) and sqrt(1/ᾱ − 1)); η = 1 with the full sequence is DDPM with σ_t² = β̃_t.
Running the η = 0 update upwards maps data to noise (DDIM inversion, [DDIM, Sec. 4.3]);
each upward step t → t' uses ε_θ(x_t, t'), the model at the level it arrives at,
which is the same ε that the downward step t' → t uses, up to O(step) error.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from minidit.ddpm import GaussianDiffusion, initial_noise, model_device_dtype, gaussian_noise
from minidit.guidance import Inpainting

SPACINGS = ("uniform", "quadratic")


def ddim_timesteps(T: int, steps: int, spacing: str = "uniform") -> Tensor:
    """An increasing sub-sequence of 0..T-1 with `steps` entries, ending at T − 1.

    "uniform": τ_i = round((i + 1)·T/S) − 1; "quadratic": τ_i = round(((i + 1)/S)²·T) − 1
    (denser near the data, [DDIM, App. D.2]), pushed up where rounding would repeat
    a step. Both end at T − 1 so sampling starts from pure noise.

    Returns:
        LongTensor [steps].
    """
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; valid choices: {', '.join(SPACINGS)}")
    if not isinstance(steps, int) or not 1 <= steps <= T:
        raise ValueError(f"steps must be an int in 1..T={T}, got {steps!r}")
    frac = [(i + 1) / steps for i in range(steps)]
    raw = [round(f * T) - 1 for f in frac] if spacing == "uniform" else [round(f * f * T) - 1 for f in frac]
    taus: list[int] = []
    for tau in raw:  # strictly increasing and >= 0: the quadratic grid crowds near 0
        taus.append(max(tau, taus[-1] + 1 if taus else 0))
    if taus[-1] != T - 1:  # the push-ups overflowed (only when steps is close to T)
        taus = list(range(T - steps, T))
    return torch.tensor(taus, dtype=torch.long)


def _check_timesteps(timesteps: Tensor | list[int], T: int) -> Tensor:
    timesteps = torch.as_tensor(timesteps, dtype=torch.long).cpu()
    if timesteps.ndim != 1 or timesteps.numel() == 0:
        raise ValueError(f"timesteps must be a non-empty 1-D sequence, got shape {tuple(timesteps.shape)}")
    if int(timesteps.min()) < 0 or int(timesteps.max()) >= T:
        lo, hi = int(timesteps.min()), int(timesteps.max())
        raise ValueError(f"timesteps must lie in 0..{T - 1}, got range [{lo}, {hi}]")
    if timesteps.numel() > 1 and not bool((timesteps[1:] > timesteps[:-1]).all()):
        raise ValueError("timesteps must be strictly increasing (the sampler runs them backwards)")
    return timesteps


def _resolve(diffusion: GaussianDiffusion, steps: int, spacing: str, timesteps: Tensor | None) -> Tensor:
    if timesteps is None:
        return ddim_timesteps(diffusion.T, steps, spacing)
    return _check_timesteps(timesteps, diffusion.T)


def _alpha_bar_at(diffusion: GaussianDiffusion, level: int) -> float:
    return 1.0 if level < 0 else float(diffusion.schedule.alpha_bar[level])  # ᾱ_{−1} = 1: data


@torch.no_grad()
def ddim_sample(
    diffusion: GaussianDiffusion,
    model: nn.Module,
    shape: tuple[int, ...],
    steps: int = 50,
    eta: float = 0.0,
    spacing: str = "uniform",
    timesteps: Tensor | None = None,
    y: Tensor | None = None,
    cfg_scale: float = 1.0,
    null_label: int | None = None,
    clip_x0: bool = False,
    x_T: Tensor | None = None,
    generator: torch.Generator | None = None,
    inpainting: Inpainting | None = None,
    return_trajectory: bool = False,
    progress: bool = True,
) -> Tensor | tuple[Tensor, Tensor]:
    """Sample with DDIM on a sub-sequence of the T training steps.

    Args:
        diffusion: the `GaussianDiffusion` the model was trained with.
        model: the denoiser; its first parameter sets device and dtype.
        shape: sample shape [B, ...].
        steps, spacing: build the sub-sequence with `ddim_timesteps` ...
        timesteps: ... or pass any strictly increasing sequence in 0..T-1.
        eta: η in [0, 1]; 0 is deterministic, 1 is ancestral-like.
        y, cfg_scale, null_label: labels and classifier-free guidance.
        clip_x0: clip x̂0 to [−1, 1] (for data in [−1, 1]).
        x_T: start from this noise; generator: the source of noise.
        inpainting: keep known pixels (see `guidance.Inpainting`).
        return_trajectory: also return [S + 1, B, ...], x_T first.

    Returns:
        x_0 [B, ...], and the trajectory when asked.
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must lie in [0, 1], got {eta!r}")
    taus = _resolve(diffusion, steps, spacing, timesteps).tolist()
    device, dtype = model_device_dtype(model)
    x = initial_noise(shape, device, dtype, generator, x_T)
    y = y.to(device) if y is not None else None
    trajectory = [x.cpu()] if return_trajectory else None
    levels = list(zip(taus[::-1], [*taus[-2::-1], -1]))  # (t, t') pairs, from noise to data
    for t_now, t_prev in tqdm(levels, disable=not progress, desc="DDIM"):
        t = torch.full((x.shape[0],), t_now, dtype=torch.long, device=device)
        ab, ab_prev = _alpha_bar_at(diffusion, t_now), _alpha_bar_at(diffusion, t_prev)
        # 1. predicted noise ε̂ and 2. predicted x0 [DDIM, Eq. 12]
        x0, eps = diffusion.predict_x0_eps(model, x, t, y, clip_x0, cfg_scale, null_label)
        # 3. the noise level of the fresh noise [DDIM, Eq. 16]
        sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
        # 4. direction pointing to x_t' [DDIM, Eq. 12]
        direction = math.sqrt(max(1 - ab_prev - sigma**2, 0.0)) * eps
        # 5. x_t' = sqrt(ᾱ_t')·x̂0 + direction + σ_t·z [DDIM, Eq. 12]
        x = math.sqrt(ab_prev) * x0 + direction
        if sigma > 0:
            x = x + sigma * gaussian_noise(x.shape, device, dtype, generator)
        if inpainting is not None:
            x = inpainting(diffusion, x, t_prev, generator)
        if trajectory is not None:
            trajectory.append(x.cpu())
    return (x, torch.stack(trajectory)) if trajectory is not None else x


@torch.no_grad()
def ddim_invert(
    diffusion: GaussianDiffusion,
    model: nn.Module,
    x0: Tensor,
    steps: int = 50,
    spacing: str = "uniform",
    timesteps: Tensor | None = None,
    y: Tensor | None = None,
    cfg_scale: float = 1.0,
    null_label: int | None = None,
    return_trajectory: bool = False,
    progress: bool = True,
) -> Tensor | tuple[Tensor, Tensor]:
    """Map data to noise with the η = 0 update run upwards  [DDIM, Sec. 4.3].

    `ddim_sample(..., x_T=ddim_invert(...), eta=0)` with the same timesteps returns
    (approximately, O(1/steps)) the starting x0.

    Args:
        diffusion, model, steps, spacing, timesteps, y, cfg_scale, null_label: as in
            `ddim_sample`.
        x0: data [B, ...].
        return_trajectory: also return [S + 1, B, ...], x0 first.

    Returns:
        x_T [B, ...] (at level τ_{S−1}), and the trajectory when asked.
    """
    taus = _resolve(diffusion, steps, spacing, timesteps).tolist()
    x = x0
    trajectory = [x.cpu()] if return_trajectory else None
    levels = list(zip([-1, *taus[:-1]], taus))  # (t, t') pairs, from data to noise
    for t_now, t_next in tqdm(levels, disable=not progress, desc="DDIM inversion"):
        t = torch.full((x.shape[0],), t_next, dtype=torch.long, device=x.device)
        ab, ab_next = _alpha_bar_at(diffusion, t_now), _alpha_bar_at(diffusion, t_next)
        # 1. ε̂ from the model at the level we step to (x_t ≈ x_t' for small steps)
        _, eps = diffusion.predict_x0_eps(model, x, t, y, False, cfg_scale, null_label)
        # 2. x̂0 from the current point at its own level [DDIM, Eq. 12]
        x0_hat = (x - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
        # 3. re-noise to the next level along ε̂ (η = 0) [DDIM, Eq. 12]
        x = math.sqrt(ab_next) * x0_hat + math.sqrt(1 - ab_next) * eps
        if trajectory is not None:
            trajectory.append(x.cpu())
    return (x, torch.stack(trajectory)) if trajectory is not None else x
