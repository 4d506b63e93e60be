"""Few-step students as training objectives: consistency models, MeanFlow and progressive distillation.

Three objectives beside those of `minidit.run.objectives`, all on the flow process (t = 0 the data):

    consistency   CT or CD (`minidit.consistency`): the iCT loss between adjacent noise levels; sampler
                  "consistency" [CM, Alg. 1]
    meanflow      the MeanFlow loss (`minidit.meanflow`) on a DiT with `second_time`; sampler "meanflow"
                  [MeanFlow, Alg. 2], and, since u(z, t, t) = v, every ODE sampler of the flow
    progressive   one round of progressive distillation: a velocity network whose one Euler step from
                  t = i/N matches two Euler steps of its teacher (DDIM, on the flow's straight path) [PD, Alg. 2]

        x'' = two teacher steps t → t − 1/(2N) → t − 1/N,   v_tgt = N (x_t − x''),   L = ‖v_θ(x_t, t) − v_tgt‖²

A student names its teacher by the checkpoint of a trained run (`teacher`, e.g. runs/mnist-cpu/latest.pt):
`minidit.run.build.make_objective` hands it the function that loads a run, and the teacher is read at
the first training step (or by `init_model`), never to sample the student. The teacher is guided with
its run's own scale (or `teacher_cfg`), so the student learns the guided flow and samples with scale 1.
With `init_from_teacher` the student starts from the teacher's EMA weights (a DiT's new interval
embedder starts at zero, so a MeanFlow student starts as its teacher). The objectives drop labels
themselves, so that every evaluation a loss compares (online and target, student and teacher) sees
the same label; a network with its own label dropout (a DiT) is told which (`force_drop_ids`).

References: [CM] Song et al. 2023; [iCT] Song, Dhariwal 2024; [MeanFlow] Geng et al. 2025;
[PD] Salimans, Ho 2022.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from minidit.consistency import (PARAMETERISATIONS, SOLVERS, ConsistencyFunction, boundary_time,
                                 consistency_denoiser, consistency_loss, curriculum_steps, discretisation,
                                 sample_consistency, sample_pairs, teacher_step)
from minidit.denoiser import Denoiser
from minidit.flow import FlowProcess, interpolate
from minidit.grids import uniform_grid
from minidit.guidance import drop_labels, guided
from minidit.meanflow import guided_velocity, meanflow_loss, pair_time, sample_meanflow, sample_t_r
from minidit.ode import euler_step
from minidit.process import Process, noise_like
from minidit.run.objectives import NETWORK_TIME_SCALE, STOCHASTIC, DiffusionObjective, Sampler
from minidit.samplers import SAMPLERS

FLOW_SAMPLERS = tuple(n for n in (*SAMPLERS, "edm") if n not in STOCHASTIC)  # what a velocity network drives


def takes_drop_ids(net: Callable) -> bool:
    """Whether `net` (maybe wrapped by DDP or torch.compile) accepts `force_drop_ids`, as a DiT does."""
    inner = getattr(net, "module", net)  # DistributedDataParallel
    inner = getattr(inner, "_orig_mod", inner)  # torch.compile
    return "force_drop_ids" in inspect.signature(inner.forward if isinstance(inner, nn.Module) else inner).parameters


def bind_labels(net: Callable, y: Tensor | None, dropped: Tensor | None) -> Callable[[Tensor, Tensor], Tensor]:
    """`net(x, τ)` with labels y [B] bound; a network with its own label dropout drops exactly `dropped`."""
    if y is None:
        return net
    if takes_drop_ids(net):
        return lambda x, tau: net(x, tau, y, force_drop_ids=dropped)
    return lambda x, tau: net(x, tau, y)


@dataclass
class StudentObjective(DiffusionObjective):
    """What the few-step objectives share (see the module docstring).

    Args:
        teacher: the checkpoint of a trained diffusion run (flow, DDPM, SDE, or another student).
        teacher_cfg: the teacher's guidance scale (None: its run's own `cfg_scale`).
        init_from_teacher: start the student from the teacher's EMA weights.
        label_dropout: the probability of training on the null label (classifier-free guidance).
        sampler, sample_steps, cfg_scale, null_label, cfg_interval: the default sampler and guidance.
    """

    teacher: str | None = None
    teacher_cfg: float | None = None
    init_from_teacher: bool = False
    label_dropout: float = 0.1
    sampler: str = "euler"
    sample_steps: int = 1
    cfg_scale: float = 1.0
    null_label: int | None = None
    cfg_interval: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.label_dropout < 1:
            raise ValueError(f"label_dropout must lie in [0, 1), got {self.label_dropout!r}")
        if self.init_from_teacher and not self.teacher:
            raise ValueError("init_from_teacher needs teacher=PATH, the checkpoint of a trained run")
        self.process: Process = FlowProcess()
        self.load_run: Callable | None = None  # set by minidit.run.build.make_objective (load_checkpoint)
        self._teacher: tuple[nn.Module, object] | None = None
        if self.sampler not in self.sampler_names():
            raise ValueError(f"sampler must be one of {list(self.sampler_names())}, got {self.sampler!r}")

    # -- the teacher -----------------------------------------------------------------------------
    def set_teacher(self, network: nn.Module, objective) -> None:
        """Use this trained network (frozen) and its objective as the teacher instead of loading `teacher`."""
        if not hasattr(objective, "denoiser"):
            raise ValueError(f"a teacher must be a pixel-space diffusion run, not a {objective.kind!r} one")
        self._teacher = (network.eval().requires_grad_(False), objective)

    def teacher_run(self, device: torch.device | str = "cpu") -> tuple[nn.Module, object]:
        """(network, objective) of the teacher, loaded from `teacher` at the first call."""
        if self._teacher is None:
            if not self.teacher:
                raise ValueError(f"the {self.kind} objective needs teacher=PATH, the checkpoint of a trained run")
            if self.load_run is None:
                raise ValueError("no way to load the teacher: build the objective with minidit.run.build."
                                 "make_objective, or give it one with set_teacher(network, objective)")
            _, network, objective, _ = self.load_run(self.teacher, device)
            self.set_teacher(network, objective)
        network, objective = self._teacher
        return network.to(device), objective

    def teacher_denoiser(self, device: torch.device | str, y: Tensor | None) -> Denoiser:
        """The teacher on the flow process, with labels y [B] bound and its guidance."""
        network, objective = self.teacher_run(device)
        den = objective.denoiser(network)
        den = den if den.process == self.process else den.on(self.process)
        if y is None or objective.null_label is None:  # an unconditional teacher or student
            return guided(den, None)
        scale = objective.cfg_scale if self.teacher_cfg is None else self.teacher_cfg
        return guided(den, y, scale, objective.null_label, getattr(objective, "cfg_interval", None))

    def init_model(self, model: nn.Module) -> None:
        """With `init_from_teacher`, copy the teacher's EMA weights into `model` (before its EMA copy is
        made); the weights only a student has (a DiT's `dt_embedder`) keep their initialisation."""
        if not self.init_from_teacher:
            return
        network, _ = self.teacher_run("cpu")
        try:
            missing, unexpected = model.load_state_dict(network.state_dict(), strict=False)
        except RuntimeError as err:
            raise ValueError(f"the student's network does not fit its teacher {self.teacher}: {err}") from err
        if unexpected or [k for k in missing if not k.startswith("dt_embedder.")]:
            raise ValueError(f"the student's network does not fit its teacher {self.teacher}: missing "
                             f"{missing}, unexpected {unexpected}")

    # -- labels and sampling ---------------------------------------------------------------------
    def drop(self, y: Tensor | None, generator: torch.Generator | None) -> tuple[Tensor | None, Tensor | None]:
        """Labels with the null label where dropped (probability `label_dropout`), and that mask [B]."""
        if y is None or self.null_label is None:
            return y, None
        y = drop_labels(y, self.label_dropout, self.null_label, generator)
        return y, y == self.null_label

    def sampler_functions(self) -> dict[str, Callable[..., Tensor]]:
        return {**SAMPLERS, "consistency": sample_consistency, "meanflow": sample_meanflow}

    def grid(self, kind: str, steps: int | None, process: Process) -> Tensor:
        """"uniform": `steps` equal steps from `t_start` down to t = 0; other kinds as the base class."""
        if kind == "uniform":
            return uniform_grid(process, steps, t_start=self.t_start, t_end=0.0)
        return super().grid(kind, steps, process)

    t_start = property(lambda self: self.process.t_max, doc="where sampling starts: t = 1, pure noise")

    def denoiser(self, model: nn.Module, clip_x0: bool = False) -> Denoiser:
        """A velocity network on the flow, read as 1000·t (the flow objective's denoiser)."""
        return Denoiser(model, "velocity", self.process, time_scale=NETWORK_TIME_SCALE, clip_x0=clip_x0,
                        name=type(model).__name__)


@dataclass
class ConsistencyObjective(StudentObjective):
    """Consistency training or distillation with the improved recipe of iCT (`minidit.consistency`).

    Args:
        mode: "ct" (consistency training: pairs from the same data and noise) or "cd" (distillation:
            the earlier point is one `solver` step of the teacher's PF-ODE).
        parameterisation: "flow" or "edm" (`minidit.consistency.boundary_coefficients`).
        N: a fixed number of discretisation points (Song et al. use 18 for CD); None: iCT's curriculum
            from s0 + 1 to s1 + 1 over the run.
        sigma_min, sigma_max, rho, sigma_data: EDM's noise levels and data scale.
        p_mean, p_std: the lognormal over noise levels that picks the pairs.
        huber_c: the pseudo-Huber constant (None: 0.00054 sqrt(dim)).
        solver: the teacher's step in CD, "euler" or "heun".
    """

    kind: ClassVar[str] = "consistency"
    mode: str = "ct"
    parameterisation: str = "flow"
    N: int | None = None
    s0: int = 10
    s1: int = 1280
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    sigma_data: float = 0.5
    p_mean: float = -1.1
    p_std: float = 2.0
    huber_c: float | None = None
    solver: str = "heun"
    sampler: str = "consistency"

    def __post_init__(self) -> None:
        if self.mode not in ("ct", "cd") or self.parameterisation not in PARAMETERISATIONS or self.solver not in SOLVERS:
            raise ValueError(f"need mode 'ct' or 'cd', parameterisation one of {PARAMETERISATIONS} and solver one "
                             f"of {tuple(SOLVERS)}; got {self.mode!r}, {self.parameterisation!r}, {self.solver!r}")
        if self.mode == "cd" and not self.teacher:
            raise ValueError("consistency distillation (mode='cd') needs teacher=PATH, the checkpoint of a trained run")
        if self.N is not None and self.N < 2 or not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"need N >= 2 (or None) and 0 < sigma_min < sigma_max, got N={self.N}, "
                             f"sigma_min={self.sigma_min}, sigma_max={self.sigma_max}")
        curriculum_steps(0.0, self.s0, self.s1)  # checks s0, s1
        super().__post_init__()
        self.t_min = boundary_time(self.process, self.sigma_min)
        self.t_max = boundary_time(self.process, self.sigma_max)
        self.progress = 0.0  # k/K, told by the training engine before each step (`set_progress`)

    def set_progress(self, fraction: float) -> None:
        """The fraction of the training budget used so far: it sets iCT's discretisation N."""
        self.progress = float(fraction)

    def sampler_names(self) -> tuple[str, ...]:
        return ("consistency",)

    t_start = property(lambda self: self.t_max, doc="where sampling starts: σ = sigma_max (EDM's prior)")

    def consistency_function(self, net: Callable) -> ConsistencyFunction:
        return ConsistencyFunction(net, self.process, self.t_min, self.parameterisation, self.sigma_data,
                                   NETWORK_TIME_SCALE)

    def loss(self, model, x0, y, generator):
        y, dropped = self.drop(y, generator)
        f = self.consistency_function(bind_labels(model, y, dropped))
        # 1. the discretisation at this point of training, and one pair (t_n, t_{n+1}) per example
        N = self.N or curriculum_steps(self.progress, self.s0, self.s1)
        t_grid, sigmas = discretisation(self.process, N, self.sigma_min, self.sigma_max, self.rho)
        n = sample_pairs(sigmas, x0.shape[0], self.p_mean, self.p_std, generator, x0.device)  # [B]
        t_n, t_next = t_grid.to(x0)[n], t_grid.to(x0)[n + 1]  # [B] each
        weight = (1 / (sigmas[1:] - sigmas[:-1])).to(x0)[n]  # λ(σ_n) = 1/(σ_{n+1} − σ_n) [iCT, Sec. 3.1]
        # 2. CD: the teacher's ODE step back to t_n; CT: none
        teacher = None
        if self.mode == "cd":
            den = self.teacher_denoiser(x0.device, y)
            teacher = lambda x, t, t_back: teacher_step(den, x, t, t_back, self.solver)  # noqa: E731
        loss = consistency_loss(f, self.process, x0, t_n, t_next, teacher=teacher, weight=weight, c=self.huber_c,
                                generator=generator)
        return loss, t_next  # [B], [B]

    def denoiser(self, model: nn.Module, clip_x0: bool = False) -> Denoiser:
        """The consistency function as a denoiser of kind "x0" (`minidit.consistency.consistency_denoiser`)."""
        return consistency_denoiser(model, self.process, self.t_min, self.parameterisation, self.sigma_data,
                                    NETWORK_TIME_SCALE, name=type(model).__name__)


@dataclass
class MeanFlowObjective(StudentObjective):
    """The MeanFlow loss (`minidit.meanflow`); the network must read time pairs (a DiT with `second_time`).

    Args:
        mode: "train" (v = ε − x0, the paper's) or "distill" (v = the teacher's guided velocity at z_t).
        r_neq_t, loc, scale: the (t, r) sampling (`minidit.meanflow.sample_t_r`).
        p, c: the adaptive loss weighting.
        omega, kappa: the guidance trained in ("train" mode; ω = 1, κ = 0: none).
    """

    kind: ClassVar[str] = "meanflow"
    mode: str = "train"
    r_neq_t: float = 0.25
    loc: float = -0.4
    scale: float = 1.0
    p: float = 1.0
    c: float = 1e-3
    omega: float = 1.0
    kappa: float = 0.0
    sampler: str = "meanflow"

    def __post_init__(self) -> None:
        if self.mode not in ("train", "distill"):
            raise ValueError(f"mode must be 'train' or 'distill', got {self.mode!r}")
        if self.mode == "distill" and not self.teacher:
            raise ValueError("MeanFlow distillation (mode='distill') needs teacher=PATH, the checkpoint of a trained run")
        if self.scale <= 0 or self.c <= 0 or self.p < 0 or not 0 <= self.kappa < 1:
            raise ValueError(f"need scale > 0, c > 0, p >= 0 and kappa in [0, 1), got scale={self.scale}, "
                             f"c={self.c}, p={self.p}, kappa={self.kappa}")
        super().__post_init__()

    def sampler_names(self) -> tuple[str, ...]:
        return ("meanflow", *FLOW_SAMPLERS)

    def make_sampler(self, model: nn.Module, name: str | None = None, *args, **kwargs) -> Sampler:
        """As the base class; the "meanflow" sampler guides at every step (no `cfg_interval`)."""
        chosen = self.sampler if name is None else name.replace("-", "_")
        interval = kwargs.get("cfg_interval", "default")
        if chosen == "meanflow" and (self.cfg_interval if interval == "default" else interval) is not None:
            raise ValueError("the meanflow sampler guides at every step; drop cfg_interval")
        return super().make_sampler(model, name, *args, **kwargs)

    def loss(self, model, x0, y, generator):
        y, dropped = self.drop(y, generator)
        net = bind_labels(model, y, dropped)
        u_fn = lambda z, r, t: net(z, NETWORK_TIME_SCALE * pair_time(t, r))  # noqa: E731
        t, r = sample_t_r(x0.shape[0], self.r_neq_t, self.loc, self.scale, generator, x0.device, x0.dtype)
        # the velocity along the path: the conditional one, guided, or the teacher's
        v_fn = None
        if self.mode == "distill":
            den = self.teacher_denoiser(x0.device, y)
            v_fn = lambda z, t, v: den.velocity(z, t)  # noqa: E731
        elif (self.omega != 1 or self.kappa != 0) and y is not None:
            v_fn = self._guided_velocity(model, net, y, dropped)
        with sdpa_kernel(SDPBackend.MATH):  # the fused attention kernels have no forward-mode derivative
            loss = meanflow_loss(u_fn, x0, t, r, v_fn=v_fn, p=self.p, c=self.c, generator=generator)
        return loss, t  # [B], [B]

    def _guided_velocity(self, model, net, y, dropped) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
        uncond = bind_labels(model, torch.full_like(y, self.null_label), torch.ones_like(dropped))

        def v_fn(z, t, v):  # ṽ where the label was kept, v where it was dropped [MeanFlow, Sec. 4.2]
            tau = NETWORK_TIME_SCALE * pair_time(t, t)  # u(z, t, t) = v(z, t)
            u_cond = net(z, tau) if self.kappa else 0.0
            v_tilde = guided_velocity(v, u_cond, uncond(z, tau), self.omega, self.kappa)
            return torch.where(dropped.reshape(-1, *([1] * (z.ndim - 1))), v, v_tilde)

        return v_fn


@dataclass
class ProgressiveObjective(StudentObjective):
    """One round of progressive distillation [PD, Alg. 2] on the flow: the student's one Euler step of
    1/N matches two of the teacher's, N = teacher_steps / 2 (see the module docstring).

    Args:
        teacher_steps: the Euler steps on the teacher's uniform grid (even); the student learns half.
    """

    kind: ClassVar[str] = "progressive"
    teacher_steps: int = 8
    init_from_teacher: bool = True
    sample_steps: int = 4

    def __post_init__(self) -> None:
        if isinstance(self.teacher_steps, bool) or not isinstance(self.teacher_steps, int) or \
                self.teacher_steps < 2 or self.teacher_steps % 2:
            raise ValueError(f"teacher_steps must be an even int >= 2, got {self.teacher_steps!r}")
        if not self.teacher:
            raise ValueError("progressive distillation needs teacher=PATH, the checkpoint of a trained run")
        super().__post_init__()

    def sampler_names(self) -> tuple[str, ...]:
        return FLOW_SAMPLERS

    def loss(self, model, x0, y, generator):
        y, dropped = self.drop(y, generator)
        N = self.teacher_steps // 2  # the student's steps
        # 1. a time of the student's grid, t = i/N, i = 1..N, and x_t on the straight path
        draw_device = generator.device if generator is not None else x0.device
        i = torch.randint(1, N + 1, (x0.shape[0],), generator=generator, device=draw_device).to(x0.device)
        t = i.to(x0.dtype) / N  # [B]
        x_t = interpolate(x0, noise_like(x0, generator), t)
        # 2. two Euler (DDIM) steps of the teacher, t → t − 1/(2N) → t − 1/N
        den = self.teacher_denoiser(x0.device, y)
        with torch.no_grad():
            x_mid = euler_step(den.velocity, x_t, t, t - 1 / (2 * N))
            x_end = euler_step(den.velocity, x_mid, t - 1 / (2 * N), t - 1 / N)
        # 3. the velocity whose single step of 1/N lands there, and the student's error
        v_tgt = N * (x_t - x_end)
        v_pred = bind_labels(model, y, dropped)(x_t, NETWORK_TIME_SCALE * t)
        return (v_pred - v_tgt).pow(2).flatten(1).mean(1), t  # [B], [B]


FEWSTEP_OBJECTIVES = {"consistency": ConsistencyObjective, "meanflow": MeanFlowObjective,
                      "progressive": ProgressiveObjective}
