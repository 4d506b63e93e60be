"""What samplers evaluate and what they return: a prediction seen through a diffusion process.

A network (or a closed form) predicts one of five quantities at x_t = alpha x0 + sigma eps;
given the process's alpha(t), sigma(t) and their time derivatives each fixes the others:

    score     ∇log p_t(x) = −eps/sigma                                   [SDE, Eq. 7]
    eps, x0   x0 = (x − sigma eps)/alpha                                  [DDPM, Eq. 12]
    v         alpha eps − sigma x0 (v-prediction)                         [Salimans & Ho 2022]
    velocity  dx/dt = alpha' x0 + sigma' eps, the PF-ODE drift            [SDE, Eq. 13; FM; RF]
              (for the flow interpolant alpha = 1 − t, sigma = t it is eps − x0)
    inverse:  x0 = (sigma' x − sigma u)/det,  eps = (alpha u − alpha' x)/det,
              det = alpha sigma' − sigma alpha'

Classifier-free guidance combines the conditional and the null-label predictions of one
batched call, u + s (c − u) [CFG, Eq. 6]; at fixed (x, t) every map above is affine in the
prediction, so guiding any of the five kinds gives the same sampler.

A `Denoiser` counts its evaluations (NFE) and checks each one: the output must have x's
shape and be finite, else a ValueError names the sampler step where it went wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from minidit import parameterization
from minidit.guidance import cfg_predict
from minidit.sde import SDE, per_sample

KINDS = ("score", "eps", "x0", "v", "velocity")


def convert(pred: Tensor, src: str, dst: str, x: Tensor, t: Tensor, process: SDE) -> Tensor:
    """Re-express a prediction of kind `src` at (x [B, ...], t [B]) as kind `dst` (see KINDS)."""
    for arg, kind in (("src", src), ("dst", dst)):
        if kind not in KINDS:
            raise ValueError(f"unknown {arg} kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    if src == dst:
        return pred
    alpha, sigma = per_sample(process.alpha(t), x), per_sample(process.sigma(t), x)  # [B, 1, ...]
    if src == "velocity":
        d_alpha, d_sigma = per_sample(process.d_alpha(t), x), per_sample(process.d_sigma(t), x)
        det = alpha * d_sigma - sigma * d_alpha
        if dst == "x0":
            return (d_sigma * x - sigma * pred) / det
        pred, src = (alpha * pred - d_alpha * x) / det, "eps"  # through eps, finite at alpha = 0
        if dst == "eps":
            return pred
    if dst == "velocity":
        d_alpha, d_sigma = per_sample(process.d_alpha(t), x), per_sample(process.d_sigma(t), x)
        x0 = parameterization.convert(pred, src, "x0", x, alpha, sigma)
        eps = parameterization.convert(pred, src, "eps", x, alpha, sigma)
        return d_alpha * x0 + d_sigma * eps
    return parameterization.convert(pred, src, dst, x, alpha, sigma)


def guided(fn: Callable[..., Tensor], y: Tensor | None = None, cfg_scale: float = 1.0,
           null_label: int | None = None) -> Callable[[Tensor, Tensor], Tensor]:
    """Turn `fn(x, t, y)` into `f(x, t)`: conditional on y, guided when cfg_scale != 1 [CFG, Eq. 6].

    Args:
        fn: `fn(x, t)` (when y is None) or `fn(x, t, y)`.
        y: labels [B] or None.
        cfg_scale: guidance scale s; 1 is the plain conditional model.
        null_label: the label the model reads as "no label"; needed when cfg_scale != 1.
    """
    if y is None:
        if cfg_scale != 1.0:
            raise ValueError(f"cfg_scale={cfg_scale} needs class labels y (and null_label)")
        return fn
    if cfg_scale == 1.0:
        return lambda x, t: fn(x, t, y)
    if null_label is None:
        raise ValueError(f"cfg_scale={cfg_scale} needs null_label, the id of the 'no label' class")

    return lambda x, t: cfg_predict(fn, x, t, y, cfg_scale, null_label)  # one call on [2B, ...]


class Denoiser:
    """A prediction function of one kind, bound to a process, checked and counted.

    Args:
        fn: `fn(x, t)` -> [B, ...] for x [B, ...] and t [B] (continuous time), or
            `fn(x, t, y)` when labels are given.
        kind: what fn predicts, one of KINDS.
        process: the diffusion it lives in (an `SDE` or `minidit.flow.FlowProcess`); the
            samplers bind theirs when it is None.
        y, cfg_scale, null_label: labels and classifier-free guidance (see `guided`).
        name: how error messages call fn.

    Attributes:
        nfe: evaluations of fn so far (a guided evaluation counts once).
        step: the sampler step now running, for error messages.
    """

    def __init__(self, fn: Callable[..., Tensor], kind: str = "score", process: SDE | None = None, *,
                 y: Tensor | None = None, cfg_scale: float = 1.0, null_label: int | None = None,
                 name: str = "model") -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown prediction kind {kind!r}; valid kinds: {', '.join(KINDS)}")
        if not callable(fn):
            raise TypeError(f"{name} must be callable, got {type(fn).__name__}")
        self.fn, self.kind, self.process, self.name = fn, kind, process, name
        self.y, self.cfg_scale, self.null_label = y, cfg_scale, null_label
        self._call = guided(fn, y, cfg_scale, null_label)
        self.nfe, self.step = 0, 0

    def bind(self, process: SDE, y: Tensor | None = None, cfg_scale: float | None = None,
             null_label: int | None = None) -> Denoiser:
        """A fresh copy (nfe = 0) on `process`, with labels/guidance replaced where given."""
        if self.process is not None and self.process != process:
            raise ValueError(f"{self.name} was built for {self.process} but the sampler got {process}")
        return Denoiser(self.fn, self.kind, process, name=self.name,
                        y=self.y if y is None else y,
                        cfg_scale=self.cfg_scale if cfg_scale is None else cfg_scale,
                        null_label=self.null_label if null_label is None else null_label)

    def predict(self, x: Tensor, t: Tensor) -> Tensor:
        """fn's own output at (x [B, ...], t [B]), after checking its shape and values."""
        if t.ndim == 0:
            t = t.expand(x.shape[0])  # [] -> [B]
        out = self._call(x, t)
        self.nfe += 1
        if not isinstance(out, Tensor) or out.shape != x.shape:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"{self.name} ({self.kind}) returned shape {got} for input {tuple(x.shape)} "
                             f"{self._where(t)}; it must match the input")
        if not bool(torch.isfinite(out).all()):  # one cheap reduction per evaluation
            raise ValueError(f"{self.name} ({self.kind}) returned NaN or inf {self._where(t)}")
        return out

    def _where(self, t: Tensor) -> str:
        return f"at step {self.step} (t={float(t.max()):.4g})"

    def get(self, kind: str, x: Tensor, t: Tensor) -> Tensor:
        """The prediction as `kind` (one evaluation of fn)."""
        if self.process is None:
            raise ValueError(f"{self.name} has no process; call bind(process) first")
        if t.ndim == 0:
            t = t.expand(x.shape[0])  # [] -> [B]
        out = convert(self.predict(x, t), self.kind, kind, x, t, self.process)
        if kind != self.kind and not bool(torch.isfinite(out).all()):
            raise ValueError(f"the {kind} converted from {self.name}'s {self.kind} is NaN or inf "
                             f"{self._where(t)}: the conversion divides by alpha or sigma, which vanish "
                             f"at the ends of this process; keep t inside (0, 1)")
        return out

    def score(self, x: Tensor, t: Tensor) -> Tensor:
        """∇log p_t(x)."""
        return self.get("score", x, t)

    def eps(self, x: Tensor, t: Tensor) -> Tensor:
        """E[eps | x_t = x]."""
        return self.get("eps", x, t)

    def x0(self, x: Tensor, t: Tensor) -> Tensor:
        """E[x0 | x_t = x], the denoised sample."""
        return self.get("x0", x, t)

    def velocity(self, x: Tensor, t: Tensor) -> Tensor:
        """The probability-flow ODE drift dx/dt."""
        return self.get("velocity", x, t)


def as_denoiser(model: Denoiser | Callable[..., Tensor], process: SDE, y: Tensor | None = None,
                cfg_scale: float | None = None, null_label: int | None = None) -> Denoiser:
    """What every sampler does first: a fresh Denoiser on `process`; a plain callable is a score."""
    if not isinstance(model, Denoiser):
        model = Denoiser(model, "score", name="score_fn")
    return model.bind(process, y, cfg_scale, null_label)


@dataclass
class SampleResult:
    """What a sampler returns.

    Attributes:
        x: the samples [B, ...].
        nfe: network evaluations used (a CFG pair counts once).
        trajectory: x after every step ([B, ...] each, on the CPU) when asked for, else None.
        times: the t (or sigma, for EDM) of each trajectory entry.
    """

    x: Tensor
    nfe: int
    trajectory: list[Tensor] | None = None
    times: list[float] = field(default_factory=list)


def check_steps(steps: int, name: str = "steps") -> int:
    """Raise ValueError unless `steps` is a positive int."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{name} must be a positive int, got {steps!r}")
    return steps


def initial_noise(process: SDE, t_start: float, shape: tuple[int, ...] | None, x_init: Tensor | None,
                  generator: torch.Generator | None, device, dtype) -> Tensor:
    """x_init, else N(0, sigma(t_start)² I) of `shape` (the marginal of a point mass at 0)."""
    if x_init is not None:
        return x_init.to(device=device or x_init.device, dtype=dtype)
    if shape is None:
        raise ValueError("give either shape or x_init")
    noise_device = generator.device if generator is not None else device
    z = torch.randn(tuple(shape), generator=generator, device=noise_device, dtype=dtype).to(device)
    return float(process.sigma(torch.tensor(t_start, dtype=torch.float64))) * z


def randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise shaped like x, drawn on the generator's device."""
    noise_device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=noise_device, dtype=x.dtype).to(x.device)


# ----------------------------------------------------------------------------------------
# The exact denoiser of a Gaussian mixture (for tests, tutorials and benchmarks)
# ----------------------------------------------------------------------------------------


def mixture_denoiser(mixture, process: SDE, kind: str = "score") -> Denoiser:
    """The closed-form prediction of `kind` for data from a Gaussian mixture, at any t.

    With x_t = alpha x0 + sigma eps, component k of the mixture (weight w_k, mean mu_k,
    variances s_k²) diffuses to N(alpha mu_k, v_k), v_k = alpha² s_k² + sigma²; given
    x_t and k, x0 and eps are jointly Gaussian, so with responsibilities r_k(x_t):

        score = Σ r_k (alpha mu_k − x)/v_k,   E[eps | x] = Σ r_k sigma (x − alpha mu_k)/v_k
        E[x0 | x] = Σ r_k (mu_k + alpha s_k² (x − alpha mu_k)/v_k)

    every one finite wherever v_k > 0 (including alpha = 0 or sigma = 0).

    Args:
        mixture: any object with `weights` [K], `means` [K, D] and `var` [K, D]
            (e.g. `minidit.toy.GaussianMixture`).
        process: the diffusion.
        kind: which of KINDS the returned Denoiser computes natively.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown prediction kind {kind!r}; valid kinds: {', '.join(KINDS)}")

    def fn(x: Tensor, t: Tensor) -> Tensor:
        w, mu, s2 = (p.to(x) for p in (mixture.weights, mixture.means, mixture.var))  # [K], [K, D], [K, D]
        alpha, sigma = process.alpha(t).to(x)[:, None, None], process.sigma(t).to(x)[:, None, None]  # [B, 1, 1]
        v = alpha**2 * s2 + sigma**2  # [B, K, D]
        diff = x[:, None, :] - alpha * mu  # [B, K, D]
        log_joint = w.log() - 0.5 * (diff**2 / v + torch.log(2 * torch.pi * v)).sum(-1)  # [B, K]
        r = torch.softmax(log_joint, dim=-1)[:, :, None]  # [B, K, 1]
        eps = (r * sigma * diff / v).sum(1)  # [B, D]
        x0 = (r * (mu + alpha * s2 * diff / v)).sum(1)  # [B, D]
        if kind == "score":
            return (r * -diff / v).sum(1)
        if kind in ("eps", "x0"):
            return eps if kind == "eps" else x0
        if kind == "v":
            return alpha[:, 0] * eps - sigma[:, 0] * x0
        d_alpha, d_sigma = process.d_alpha(t).to(x)[:, None], process.d_sigma(t).to(x)[:, None]  # [B, 1]
        return d_alpha * x0 + d_sigma * eps

    return Denoiser(fn, kind, process, name=f"exact {kind} of the mixture")
