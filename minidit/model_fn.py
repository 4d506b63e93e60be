"""A trained network as a continuous-time prediction function that every sampler can drive.

Continuous-time models (trained with `minidit.sde.dsm_loss` or `minidit.flow.flow_loss`)
read t in [0, 1] scaled by `time_scale` = 1000, so a DiT's sinusoidal timestep embedder
sees the range of DDPM's integer steps 0..999:

    fn(x, t, y) = model(x, 1000 t, y)

A discrete DDPM eps-model knows only its table ᾱ_i. To sample it with a continuous
process (alpha(t), sigma(t)) we look for the fractional index i whose log-SNR matches,
interpolating the table's log-SNR linearly in i, and rescale the input to the variance
preserving form the model was trained on (x / sqrt(alpha² + sigma²) has signal and noise
fractions ᾱ_i and 1 − ᾱ_i):

    λ(t) = log(alpha²/sigma²),  λ_i = log(ᾱ_i/(1 − ᾱ_i)),  i(t) = λ⁻¹(λ(t))   (piecewise linear)
    eps(x, t) = model(x / sqrt(alpha² + sigma²), i(t), y)

The noise eps (and x0) is the same in both coordinates, so one DDPM checkpoint drives the
VP/VE SDE samplers, EDM and DPM-Solver++ alike. Time convention: continuous t, t = 0 is data;
the discrete index i runs over 0..T-1 (ᾱ_0 = 1 − β_1).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from minidit.denoisers import Denoiser
from minidit.schedules import index_of_log_snr
from minidit.sde import SDE, per_sample


def _keep_eps_channels(out: Tensor, x: Tensor, learned_sigma: bool) -> Tensor:
    # a model with a learned variance [IDDPM] returns [B, 2C, ...]: the first C are eps
    return out[:, : x.shape[1]] if learned_sigma else out


def network_fn(model: nn.Module, time_scale: float = 1000.0,
               learned_sigma: bool = False) -> Callable[..., Tensor]:
    """`fn(x, t, y=None) = model(x, time_scale t[, y])` for a continuous-time network.

    Args:
        model: called as `model(x, t)` or `model(x, t, y)`, returning [B, C, ...]
            (or [B, 2C, ...] with learned_sigma).
        time_scale: the factor between t in [0, 1] and the model's time input.
        learned_sigma: keep only the first C output channels.
    """
    if time_scale <= 0:
        raise ValueError(f"time_scale must be positive, got {time_scale}")

    def fn(x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        out = model(x, t * time_scale) if y is None else model(x, t * time_scale, y)
        return _keep_eps_channels(out, x, learned_sigma)

    return fn


def discrete_index(alpha_bar: Tensor, log_snr: Tensor) -> Tensor:
    """The fractional DDPM index whose log-SNR equals `log_snr` (see `schedules.index_of_log_snr`)."""
    return index_of_log_snr(alpha_bar, log_snr)


def ddpm_network_fn(model: nn.Module, alpha_bar: Tensor, process: SDE, learned_sigma: bool = False,
                    prediction: str = "eps") -> Callable[..., Tensor]:
    """A discrete DDPM network as a continuous-time prediction on `process`.

    Args:
        model: `model(x, i[, y])` with float timesteps i in [0, T-1] -> [B, C, ...].
        alpha_bar: the model's float64 table ᾱ [T] (any object's `.alpha_bar` will do).
        process: the continuous process the sampler runs (VP, sub-VP, VE, flow, ...).
        learned_sigma: keep only the first C output channels.
        prediction: what the model predicts, "eps", "x0" or "v"; eps and x0 are the same in
            both coordinates, v = alpha eps − sigma x0 scales by sqrt(alpha² + sigma²).
    """
    alpha_bar = torch.as_tensor(getattr(alpha_bar, "alpha_bar", alpha_bar), dtype=torch.float64)
    if alpha_bar.ndim != 1 or not bool(((alpha_bar > 0) & (alpha_bar < 1)).all()):
        raise ValueError("alpha_bar must be a 1-D table with values in (0, 1)")
    if prediction not in ("eps", "x0", "v"):
        raise ValueError(f"unknown prediction {prediction!r}; valid choices: eps, x0, v")

    def fn(x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        # 1. the fractional discrete step with the same log-SNR
        index = discrete_index(alpha_bar, process.log_snr(t.detach().cpu().double())).to(x)  # [B]
        # 2. rescale x = alpha x0 + sigma eps to the variance preserving x_i
        scale = (process.alpha(t) ** 2 + process.sigma(t) ** 2).rsqrt().to(x)  # [B]
        x_vp = per_sample(scale, x) * x
        out = _keep_eps_channels(model(x_vp, index) if y is None else model(x_vp, index, y), x, learned_sigma)
        # 3. a v-prediction back to the process's scale (alpha_vp = alpha · scale, sigma_vp = sigma · scale)
        return out / per_sample(scale, x) if prediction == "v" else out

    return fn


def ddpm_denoiser(model: nn.Module, alpha_bar: Tensor, process: SDE, learned_sigma: bool = False,
                  prediction: str = "eps") -> Denoiser:
    """`Denoiser(ddpm_network_fn(...), kind=prediction, process=process)`, ready for any sampler."""
    return Denoiser(ddpm_network_fn(model, alpha_bar, process, learned_sigma, prediction), prediction, process,
                    name=type(model).__name__)


def network_denoiser(model: nn.Module, process: SDE, kind: str = "eps", time_scale: float = 1000.0,
                     learned_sigma: bool = False) -> Denoiser:
    """A continuous-time network that predicts `kind` ("eps", "score", "x0", "v", "velocity")."""
    return Denoiser(network_fn(model, time_scale, learned_sigma), kind, process,
                    name=type(model).__name__)
