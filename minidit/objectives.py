"""Training objectives: what the training loop minimises and how the trained model samples.

An objective turns a batch of data into per-example losses and says at which time each
example was noised, so that the loop can plot the loss by timestep; it also knows how to
sample its model. Each one is a thin adapter over the module that implements the idea:

    ddpm   L = w(SNR_t) · ‖target − model(x_t, t, y)‖²,  t ~ U{0..T−1}   [DDPM, Eq. 14; MinSNR]
           (minidit.ddpm; target ε, x0 or v; samples with DDIM or ancestral sampling)
    sde    L = λ(t) · ‖s_θ(x_t, t, y) + ε/σ(t)‖²,  t ~ U[t_eps, 1]            [SDE, Eq. 7]
           (minidit.sde VP / sub-VP / VE; samples with any sampler of minidit.samplers)
    flow   L = ‖v_θ(x_t, t, y) − (ε − x0)‖²,  x_t = (1 − t) x0 + t ε          [FM, Eq. 23]
           (minidit.flow; samples by integrating dx/dt = v_θ from t = 1 to 0)
    latent any of the above on z0 = s · E(x0), a frozen autoencoder's latents  [LDM]
           (minidit.latent; samples latents, then decodes them)
    autoencoder  the autoencoder itself: (‖x0 − D(z)‖² + β KL) / D, t = 0   (minidit.autoencoder)

Continuous-time networks read 1000·t (`minidit.model_fn.network_fn`), the range of
DDPM's integer steps. Time reported for the plots is t ∈ [0, 1] (0 = data), and
(t + ½)/T for a discrete step t. `objective_from_config` rebuilds an objective from the plain dict `config()`
returns, which is how a checkpoint stores it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from minidit import flow, samplers
from minidit.autoencoder import AutoencoderObjective
from minidit.ddim import ddim_sample
from minidit.ddpm import GaussianDiffusion
from minidit.latent import LatentObjective
from minidit.model_fn import network_denoiser, network_fn
from minidit.schedules import make_schedule
from minidit.sde import make_sde, per_sample


@runtime_checkable
class Objective(Protocol):
    """What `minidit.train` needs from an objective."""

    kind: str

    def config(self) -> dict:
        """Plain data that `objective_from_config` turns back into this objective."""

    def loss(self, model: nn.Module, x0: Tensor, y: Tensor | None,
             generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """Per-example loss [B] and time t [B] in [0, 1] for data x0 [B, C, H, W], labels y [B]."""

    def sample(self, model: nn.Module, shape: tuple[int, ...], y: Tensor | None = None,
               generator: torch.Generator | None = None) -> Tensor:
        """Samples [B, C, H, W] from `model` (labels y [B] or None), noise from `generator`."""


def _config(objective) -> dict:
    """{"kind": ..., every dataclass field} of an objective dataclass."""
    return {"kind": objective.kind, **dataclasses.asdict(objective)}


@dataclass
class DDPMObjective:
    """Discrete-time Gaussian diffusion (minidit.ddpm.GaussianDiffusion).

    Args:
        schedule, T: the noise schedule ("linear", "cosine", "sigmoid") and its number of steps.
        prediction: the network's target, "eps", "x0" or "v".
        weighting, min_snr_gamma: loss weight per timestep ("none", "min_snr", "eps_equivalent").
        sampler: "ddim" (`sample_steps` steps, stochasticity `eta`) or "ddpm" (all T steps).
        cfg_scale, null_label: classifier-free guidance when sampling (null_label is the
            "no label" class; the training loop sets it to the number of classes).
        p_uncond: drop labels to null_label with this probability in training; leave it 0
            for networks that drop labels themselves, like minidit's DiT.
    """

    kind: ClassVar[str] = "ddpm"
    schedule: str = "linear"
    T: int = 1000
    prediction: str = "eps"
    weighting: str = "none"
    min_snr_gamma: float = 5.0
    sampler: str = "ddim"
    sample_steps: int = 50
    eta: float = 0.0
    cfg_scale: float = 1.0
    null_label: int | None = None
    p_uncond: float = 0.0

    def __post_init__(self) -> None:
        if self.sampler not in ("ddim", "ddpm"):
            raise ValueError(f"sampler must be 'ddim' or 'ddpm', got {self.sampler!r}")
        self.diffusion = GaussianDiffusion(make_schedule(self.schedule, self.T), self.prediction,
                                           self.weighting, self.min_snr_gamma)

    def config(self) -> dict:
        return _config(self)

    def loss(self, model, x0, y, generator):
        out = self.diffusion.training_losses(model, x0, y, generator=generator,
                                             null_label=self.null_label, p_uncond=self.p_uncond)
        return out["loss"], (out["t"].to(x0.dtype) + 0.5) / self.T  # [B], [B] in (0, 1)

    def sample(self, model, shape, y=None, generator=None):
        guidance = {"cfg_scale": self.cfg_scale, "null_label": self.null_label}
        if self.sampler == "ddpm":
            return self.diffusion.sample(model, shape, y, clip_x0=True, progress=False,
                                         generator=generator, **guidance)
        return ddim_sample(self.diffusion, model, shape, steps=self.sample_steps, eta=self.eta, y=y,
                           clip_x0=True, generator=generator, progress=False, **guidance)


def _noise(x0: Tensor, generator: torch.Generator | None, n: int | None = None) -> Tensor:
    """ε ~ N(0, I) shaped like x0 (or u ~ U[0, 1] of shape [n]), drawn on the generator's device."""
    device = generator.device if generator is not None else x0.device
    if n is not None:
        return torch.rand(n, generator=generator, device=device, dtype=x0.dtype).to(x0.device)
    return torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype).to(x0.device)


@dataclass
class SDEObjective:
    """Denoising score matching on a continuous SDE (minidit.sde), per example.

    Args:
        sde: "vp", "subvp" or "ve" (default parameters of `minidit.sde.make_sde`).
        prediction: the network predicts the "eps" (score = −ε̂/σ) or the "score" itself.
        weighting: λ(t) = σ² ("variance") or g² ("likelihood").
        t_eps: the smallest training time.
        sampler: a name of `minidit.samplers.SAMPLERS`, run for `sample_steps` steps.
        cfg_scale, null_label: classifier-free guidance when sampling.
    """

    kind: ClassVar[str] = "sde"
    sde: str = "vp"
    prediction: str = "eps"
    weighting: str = "variance"
    t_eps: float = 1e-5
    sampler: str = "ode_heun"
    sample_steps: int = 50
    cfg_scale: float = 1.0
    null_label: int | None = None

    def __post_init__(self) -> None:
        if self.prediction not in ("eps", "score") or self.weighting not in ("variance", "likelihood"):
            raise ValueError(f"prediction must be 'eps' or 'score' and weighting 'variance' or "
                             f"'likelihood', got {self.prediction!r}, {self.weighting!r}")
        if self.sampler not in samplers.SAMPLERS:
            raise ValueError(f"sampler must be one of {list(samplers.SAMPLERS)}, got {self.sampler!r}")
        self.process = make_sde(self.sde)

    def config(self) -> dict:
        return _config(self)

    def loss(self, model, x0, y, generator):
        # 1. t ~ U[t_eps, 1], ε ~ N(0, I), x_t = alpha(t) x0 + sigma(t) ε (the draws of sde.dsm_loss)
        t = self.t_eps + (1 - self.t_eps) * _noise(x0, generator, x0.shape[0])  # [B]
        eps = _noise(x0, generator)
        xt = self.process.perturb(x0, t, eps)
        sigma = per_sample(self.process.sigma(t), x0)  # [B, 1, 1, 1]
        # 2. the score residual s + ε/σ, weighted by λ(t), averaged per example  [SDE, Eq. 7]
        out = network_fn(model)(xt, t, y)
        score = out if self.prediction == "score" else -out / sigma
        lam = sigma**2 if self.weighting == "variance" else per_sample(self.process.diffusion(t), x0) ** 2
        return (lam * (score + eps / sigma) ** 2).flatten(1).mean(1), t  # [B], [B]

    def sample(self, model, shape, y=None, generator=None):
        den = network_denoiser(model, self.process, kind=self.prediction)
        return samplers.sample(self.sampler, den, self.process, shape, steps=self.sample_steps, y=y,
                               cfg_scale=self.cfg_scale, null_label=self.null_label, generator=generator,
                               device=next(model.parameters()).device, progress=False).x


@dataclass
class FlowObjective:
    """Flow matching with the straight path of minidit.flow, per example.

    Args:
        t_sampling, loc, scale: t ~ U[0, 1] ("uniform") or sigmoid(loc + scale·n) ("logit_normal").
        sampler: "euler", "heun" or "rk45", with `sample_steps` steps.
        cfg_scale, null_label: classifier-free guidance when sampling.
    """

    kind: ClassVar[str] = "flow"
    t_sampling: str = "uniform"
    loc: float = 0.0
    scale: float = 1.0
    sampler: str = "euler"
    sample_steps: int = 50
    cfg_scale: float = 1.0
    null_label: int | None = None

    def __post_init__(self) -> None:
        if self.t_sampling not in flow.T_SAMPLINGS or self.sampler not in ("euler", "heun", "rk45"):
            raise ValueError(f"t_sampling must be one of {flow.T_SAMPLINGS} and sampler one of "
                             f"('euler', 'heun', 'rk45'), got {self.t_sampling!r}, {self.sampler!r}")

    def config(self) -> dict:
        return _config(self)

    def loss(self, model, x0, y, generator):
        # 1. t, ε and the point x_t = (1 − t) x0 + t ε on the straight path (the draws of flow_loss)
        t = flow.sample_t(x0.shape[0], self.t_sampling, self.loc, self.scale, generator, x0.device, x0.dtype)
        eps = _noise(x0, generator)
        v_pred = network_fn(model)(flow.interpolate(x0, eps, t), t, y)
        # 2. regress the velocity ε − x0, averaged per example  [FM, Eq. 23]
        return (v_pred - flow.velocity_target(x0, eps)).pow(2).flatten(1).mean(1), t  # [B], [B]

    def sample(self, model, shape, y=None, generator=None):
        return flow.flow_sample(network_fn(model), shape, steps=self.sample_steps, method=self.sampler,
                                y=y, cfg_scale=self.cfg_scale, null_label=self.null_label,
                                generator=generator, device=next(model.parameters()).device,
                                progress=False).x


OBJECTIVES = {"ddpm": DDPMObjective, "sde": SDEObjective, "flow": FlowObjective,
              "latent": LatentObjective, "autoencoder": AutoencoderObjective}


def objective_from_config(config: dict) -> Objective:
    """Build the objective that `config` (as returned by `Objective.config()`) describes.

    Args:
        config: {"kind": one of `OBJECTIVES`, ...that class's fields}; missing fields keep
            their defaults.
    """
    kind = config.get("kind")
    if kind not in OBJECTIVES:
        raise ValueError(f"objective kind must be one of {sorted(OBJECTIVES)}, got {kind!r}")
    cls = OBJECTIVES[kind]
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(config) - names - {"kind"})
    if unknown:
        raise ValueError(f"unknown fields {unknown} for objective {kind!r}; valid: {sorted(names)}")
    return cls(**{k: v for k, v in config.items() if k != "kind"})
