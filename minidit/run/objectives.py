"""Training objectives: what the training loop minimises, and which samplers the network drives.

An objective is the plain-data recipe a checkpoint stores (`config()`): it turns a batch into
per-example losses with the time of each example (for the loss-by-t plot) by calling the
concept's own loss, and it binds the trained network to its process as a `Denoiser`:

    ddpm   L = w(SNR_t) ‖target − model(x_t, t, y)‖²   (`minidit.ddpm.GaussianDiffusion`)
           process: the table's `TableVP`, step t at time (t + 1)/T; network time T·t − 1
    sde    L = λ(t) ‖s_θ(x_t, t, y) + ε/σ(t)‖²        (`minidit.sde.dsm_loss`, VP / sub-VP / VE)
    flow   L = ‖v_θ(x_t, t, y) − (ε − x0)‖²            (`minidit.flow.flow_loss`)
           continuous-time networks read 1000·t, the range of DDPM's integer steps

Sampling is one table for every objective: a sampler name picks a function of
`minidit.samplers.SAMPLERS` and its default grid (`minidit.grids`); "edm" is Heun with churn
on `minidit.edm.EDMProcess` and the Karras grid. DDPM's own samplers ("ddpm", "ddim") walk
the table's steps and clip x̂0 to [−1, 1]; the flow's ODE samplers integrate to t = 0; the
stochastic ones are left out for the flow, whose SDE is singular at t = 1.
`objective_from_config` rebuilds an objective from its config, old checkpoints' names included.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from minidit import flow
from minidit.ddpm import GaussianDiffusion
from minidit.denoiser import Denoiser
from minidit.edm import EDMProcess
from minidit.grids import ddpm_grid, karras_grid, log_snr_grid, uniform_grid
from minidit.guidance import guided
from minidit.process import Process
from minidit.samplers import SAMPLERS
from minidit.schedules import make_schedule
from minidit.sde import dsm_loss, make_sde

NETWORK_TIME_SCALE = 1000.0  # continuous t in [0, 1] reaches a network as 1000·t
STOCHASTIC = ("ddpm", "euler_maruyama", "reverse_diffusion", "langevin", "pc")  # need a finite g at the start
GRID_KINDS = ("uniform", "ddpm", "karras", "log_snr")
ADAPTIVE = ("rk45",)  # choose their own number of steps
LEGACY_SAMPLERS = {"ode_euler": "euler", "ode_heun": "heun", "ode_rk45": "rk45"}  # names before 0.2


class Drawn(NamedTuple):
    """What a bound sampler returns: the samples and the network evaluations per sample."""

    x: Tensor
    nfe: float


@dataclass
class Sampler:
    """A sampler bound to one network: `sampler(shape, y, generator) -> Drawn`.

    Attributes:
        name, steps, grid, cfg_scale, cfg_interval: the resolved choice (steps None: adaptive).
        device: the network's device, where noise is drawn.
        run: the function that draws.
    """

    name: str
    steps: int | None
    grid: str
    cfg_scale: float
    device: torch.device
    run: Callable[..., Drawn] = dataclasses.field(repr=False)
    cfg_interval: tuple[float, float] | None = None

    def __call__(self, shape: tuple[int, ...], y: Tensor | None = None,
                 generator: torch.Generator | None = None) -> Drawn:
        return self.run(tuple(shape), y, generator)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


class DiffusionObjective:
    """What the three diffusion objectives share: their denoiser's sampling table.

    Subclasses set `kind`, `process` and the fields sampler, sample_steps, cfg_scale,
    null_label, cfg_interval (guide only where σ/α lies in (lo, hi]; None: at every step, see
    `minidit.guidance`), and define `loss` and `denoiser`.
    """

    kind: ClassVar[str]
    process: Process

    def config(self) -> dict:
        """Plain data that `objective_from_config` turns back into this objective."""
        return {"kind": self.kind, **dataclasses.asdict(self)}

    def sampler_names(self) -> tuple[str, ...]:
        """The samplers this objective's network can drive."""
        names = (*SAMPLERS, "edm")
        return tuple(n for n in names if n not in STOCHASTIC) if self.kind == "flow" else names

    def sampler_functions(self) -> dict[str, Callable[..., Tensor]]:
        """Name -> sampler function: `minidit.samplers.SAMPLERS` (few-step objectives add their own)."""
        return SAMPLERS

    def default_grid(self, name: str) -> str:
        if name in ("ddpm", "ddim") and self.kind == "ddpm":
            return "ddpm"
        return {"dpm_solver++": "log_snr", "dpm_solver++3m": "log_snr", "edm": "karras"}.get(name, "uniform")

    def grid(self, kind: str, steps: int | None, process: Process) -> Tensor:
        """The grid called `kind` with `steps` steps on `process` (see `minidit.grids`)."""
        if kind == "ddpm":
            return ddpm_grid(getattr(self, "T", 1000), steps)
        if kind == "karras":
            return karras_grid(process, steps, span=self.process)
        if kind == "log_snr":
            return log_snr_grid(process, steps)
        t_end = 0.0 if self.kind == "flow" else None  # the flow's ODE reaches the data itself
        return uniform_grid(process, steps, t_end=t_end)

    def make_sampler(self, model: nn.Module, name: str | None = None, steps: int | None = None,
                     cfg_scale: float | None = None, *, grid: str | None = None,
                     cfg_interval: tuple[float, float] | None | str = "default", **options) -> Sampler:
        """Bind the sampler `name` (default: the objective's) to `model`, trained with this objective.

        Args:
            model: the network (the EMA one, for samples worth looking at), in eval mode.
            name: one of `sampler_names()` ("-" may stand for "_").
            steps: number of steps (default: `sample_steps`; "ddpm" on a DDPM table: all T).
            cfg_scale: classifier-free guidance scale (default: the objective's; 1 without labels).
            cfg_interval: guide only where σ/α ∈ (lo, hi]; None: at every step; "default": the
                objective's.
            grid: "uniform", "ddpm", "karras" or "log_snr" (default: the sampler's own).
            options: passed to the sampler function (eta for DDIM, S_churn for Heun/EDM, ...).

        Raises:
            ValueError: the name, steps, grid or guidance scale do not fit this objective.
        """
        name = self.sampler if name is None else LEGACY_SAMPLERS.get(name.replace("-", "_"), name.replace("-", "_"))
        if name not in self.sampler_names():
            raise ValueError(f"a {self.kind!r} checkpoint cannot drive sampler {name!r}; "
                             f"valid samplers: {', '.join(self.sampler_names())}")
        grid = self.default_grid(name) if grid is None else grid
        if grid not in GRID_KINDS:
            raise ValueError(f"unknown grid {grid!r}; valid grids: {', '.join(GRID_KINDS)}")
        if name in ADAPTIVE and steps is not None:
            raise ValueError(f"sampler {name!r} chooses its own steps (adaptive; set rtol/atol); drop steps")
        if name not in ADAPTIVE and not (name == "ddpm" and grid == "ddpm" and steps is None):
            steps = self.sample_steps if steps is None else steps
            if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
                raise ValueError(f"steps must be a positive int, got {steps!r}")
        if cfg_scale is None:  # the objective's default; an unconditional model has nothing to guide
            cfg_scale = self.cfg_scale if self.null_label is not None else 1.0
        cfg_scale = float(cfg_scale)
        if not (math.isfinite(cfg_scale) and cfg_scale >= 0):
            raise ValueError(f"the guidance scale must be a finite number >= 0 (0: unconditional, 1: conditional), "
                             f"got {cfg_scale}")
        if cfg_scale != 1.0 and self.null_label is None:
            raise ValueError(f"cfg_scale={cfg_scale} needs a class-conditional checkpoint; use cfg_scale=1")
        if isinstance(cfg_interval, str):
            if cfg_interval != "default":
                raise ValueError(f"cfg_interval must be (lo, hi), None or 'default', got {cfg_interval!r}")
            cfg_interval = self.cfg_interval
        interval = None if cfg_interval is None or cfg_scale == 1.0 else tuple(float(v) for v in cfg_interval)
        den = self.denoiser(model, clip_x0=getattr(self, "clip_x0", False) and name in ("ddpm", "ddim"))
        if name == "edm":  # EDM's sampler: Heun on σ(t) = t [EDM, Alg. 2]
            den = den.on(EDMProcess())
        time_grid = self.grid(grid, self.sample_steps if name in ADAPTIVE else steps, den.process)
        sample_fn = self.sampler_functions()["heun" if name == "edm" else name]
        options = {"eta": self.eta, **options} if name == "ddim" and hasattr(self, "eta") else options

        def run(shape, y, generator):
            bound = guided(den, y, cfg_scale, self.null_label, interval)
            x = den.process.prior_noise(shape, float(time_grid[0]), generator, _device(model))
            x = sample_fn(bound, x, time_grid, generator=generator, **options)
            return Drawn(x, bound.nfe)

        if interval is not None:  # refuse a bad interval now, not at the first draw
            guided(den, torch.zeros(1, dtype=torch.long), cfg_scale, self.null_label, interval)
        return Sampler(name, steps, grid, cfg_scale, _device(model), run, interval)

    def sample(self, model: nn.Module, shape: tuple[int, ...], y: Tensor | None = None,
               generator: torch.Generator | None = None) -> Tensor:
        """Samples [B, ...] with the objective's own sampler (the training loop's grids)."""
        return self.make_sampler(model)(shape, y, generator).x


@dataclass
class DDPMObjective(DiffusionObjective):
    """Discrete-time Gaussian diffusion (`minidit.ddpm.GaussianDiffusion`).

    Args:
        schedule, T: the noise schedule ("linear", "cosine", "sigmoid") and its number of steps.
        prediction: the network's target, "eps", "x0" or "v".
        weighting, min_snr_gamma: loss weight per timestep ("none", "min_snr", "eps_equivalent").
        sampler, sample_steps, eta: the default sampler ("ddim" with η, "ddpm", or any other name).
        cfg_scale, null_label: classifier-free guidance when sampling (null_label is the "no
            label" class; the training loop sets it to the number of classes).
        clip_x0: the "ddpm" and "ddim" samplers clip x̂0 to the data range `[-1, 1]` [DDPM]; off
            for latents, which have no such range (a latent objective turns it off).
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
    cfg_interval: tuple[float, float] | None = None
    clip_x0: bool = True

    def __post_init__(self) -> None:
        self.diffusion = GaussianDiffusion(make_schedule(self.schedule, self.T), self.prediction,
                                           self.weighting, self.min_snr_gamma)
        self.process = self.diffusion.schedule.process
        _check_sampler(self)

    def loss(self, model, x0, y, generator):
        out = self.diffusion.training_losses(model, x0, y, generator=generator)
        return out["loss"], self.diffusion.schedule.time(out["t"]).to(x0.dtype)  # [B], t in (0, 1]

    def denoiser(self, model: nn.Module, clip_x0: bool = False) -> Denoiser:
        """The network on its table's process; step t sits at time (t + 1)/T."""
        return Denoiser(model, self.prediction, self.process, time_scale=self.T, time_shift=-1.0,
                        clip_x0=clip_x0, name=type(model).__name__)


@dataclass
class SDEObjective(DiffusionObjective):
    """Denoising score matching on a continuous SDE (`minidit.sde`), per example.

    Args:
        sde: "vp", "subvp" or "ve" (default parameters of `minidit.sde.make_sde`).
        prediction: the network predicts the "eps" (score = −ε̂/σ) or the "score" itself.
        weighting: λ(t) = σ² ("variance") or g² ("likelihood").
        t_eps: the smallest training time.
        sampler, sample_steps, cfg_scale, null_label: the default sampler and guidance.
    """

    kind: ClassVar[str] = "sde"
    sde: str = "vp"
    prediction: str = "eps"
    weighting: str = "variance"
    t_eps: float = 1e-5
    sampler: str = "heun"
    sample_steps: int = 50
    cfg_scale: float = 1.0
    null_label: int | None = None
    cfg_interval: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.prediction not in ("eps", "score") or self.weighting not in ("variance", "likelihood"):
            raise ValueError(f"prediction must be 'eps' or 'score' and weighting 'variance' or "
                             f"'likelihood', got {self.prediction!r}, {self.weighting!r}")
        self.process = make_sde(self.sde)
        _check_sampler(self)

    def loss(self, model, x0, y, generator):
        # t ~ U[t_eps, 1], then the score-matching residual weighted by λ(t)  [SDE, Eq. 7]
        t = self.t_eps + (1 - self.t_eps) * torch.rand(
            x0.shape[0], generator=generator, device=generator.device if generator is not None else x0.device,
            dtype=x0.dtype).to(x0.device)  # [B]
        loss = dsm_loss(self.denoiser(model).network_output, self.process, x0, y, prediction=self.prediction,
                        weighting=self.weighting, t=t, reduce="none", generator=generator)
        return loss, t

    def denoiser(self, model: nn.Module, clip_x0: bool = False) -> Denoiser:
        return Denoiser(model, self.prediction, self.process, time_scale=NETWORK_TIME_SCALE, clip_x0=clip_x0,
                        name=type(model).__name__)


@dataclass
class FlowObjective(DiffusionObjective):
    """Flow matching with the straight path of `minidit.flow`, per example.

    Args:
        t_sampling, loc, scale: t ~ U[0, 1] ("uniform") or sigmoid(loc + scale·n) ("logit_normal").
        sampler, sample_steps, cfg_scale, null_label: the default sampler and guidance.
    """

    kind: ClassVar[str] = "flow"
    t_sampling: str = "uniform"
    loc: float = 0.0
    scale: float = 1.0
    sampler: str = "euler"
    sample_steps: int = 50
    cfg_scale: float = 1.0
    null_label: int | None = None
    cfg_interval: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.t_sampling not in flow.T_SAMPLINGS:
            raise ValueError(f"t_sampling must be one of {flow.T_SAMPLINGS}, got {self.t_sampling!r}")
        self.process = flow.FlowProcess()
        _check_sampler(self)

    def loss(self, model, x0, y, generator):
        t = flow.sample_t(x0.shape[0], self.t_sampling, self.loc, self.scale, generator, x0.device, x0.dtype)
        loss = flow.flow_loss(self.denoiser(model).network_output, x0, y, t=t, reduce="none", generator=generator)
        return loss, t  # [B], [B]  [FM, Eq. 23]

    def denoiser(self, model: nn.Module, clip_x0: bool = False) -> Denoiser:
        return Denoiser(model, "velocity", self.process, time_scale=NETWORK_TIME_SCALE, clip_x0=clip_x0,
                        name=type(model).__name__)


def _check_sampler(objective: DiffusionObjective) -> None:
    objective.sampler = LEGACY_SAMPLERS.get(objective.sampler, objective.sampler)
    if objective.sampler not in objective.sampler_names():
        raise ValueError(f"sampler must be one of {list(objective.sampler_names())}, got {objective.sampler!r}")


DIFFUSION_OBJECTIVES = {"ddpm": DDPMObjective, "sde": SDEObjective, "flow": FlowObjective}


def objective_from_config(config: dict, registry: dict[str, type] = DIFFUSION_OBJECTIVES):
    """Build the objective that `config` (as `config()` returns it) describes.

    Args:
        config: {"kind": a key of `registry`, ...that class's fields}; missing fields keep their
            defaults. Written by an older minidit, a DDPM config may hold `p_uncond = 0`
            (label dropout now lives in the network's label embedder), which is dropped.
        registry: kind -> class (`minidit.run.build.OBJECTIVES` adds latent and autoencoder).
    """
    kind = config.get("kind")
    if kind not in registry:
        raise ValueError(f"objective kind must be one of {sorted(registry)}, got {kind!r}")
    values = {k: v for k, v in config.items() if k != "kind"}
    if kind == "ddpm" and values.get("p_uncond", 0.0) == 0.0:
        values.pop("p_uncond", None)
    cls = registry[kind]
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown fields {unknown} for objective {kind!r}; valid: {sorted(names)}")
    return cls(**values)
