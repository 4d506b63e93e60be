"""The denoiser: a trained network seen through a process, the one object every sampler calls.

A network predicts one of five quantities at x = alpha x0 + sigma eps; given alpha(t),
sigma(t) and their derivatives each fixes the others. This module's `convert` is the table:

    eps       the noise                                                   [DDPM, Eq. 12]
    x0        (x − sigma eps)/alpha; from the score (x + sigma² score)/alpha [Tweedie]
    v         alpha eps − sigma x0                                         [Salimans & Ho 2022, Sec. 4]
    score     ∇log p_t(x) = −eps/sigma                                     [SDE, Eq. 7]
    velocity  dx/dt = alpha' x0 + sigma' eps, the PF-ODE drift              [SDE, Eq. 13; FM; RF]
              back: x0 = (sigma' x − sigma u)/det, eps = (alpha u − alpha' x)/det,
              det = alpha sigma' − sigma alpha'

A `Denoiser` owns the scalings between a process and its network, as EDM's preconditioning
does [EDM, Table 1]: the network reads c_in x and the time input τ(t) = time_scale·t + time_shift
(1000 t for minidit's continuous-time networks, T t − 1 for DDPM's step t, t itself for a
closed form). On a process other than its own (`on`), t maps to the native time with the
same log-SNR and c_in = alpha_native/alpha, since x0 and eps do not change:

    t_native = λ_native⁻¹(λ(t)),   network input (c_in x, τ(t_native))

One evaluation, `den(x, t)`, is a `Prediction` that reads as any kind (`.x0`, `.eps`,
`.score`, `.velocity`, `.v`) without calling the network again. The denoiser counts its
evaluations (NFE) and remembers, on the device, the first sampler step whose output was not
finite; samplers call `check_finite` once at the end, so no step waits for the device.
Labels and classifier-free guidance are bound by `minidit.guidance.guided`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from minidit.process import Process, per_sample

KINDS = ("eps", "x0", "v", "score", "velocity")


def check_kind(kind: str, what: str = "prediction kind", valid: tuple[str, ...] = KINDS) -> str:
    """Raise ValueError naming `what` unless `kind` is one of `valid`."""
    if kind not in valid:
        raise ValueError(f"unknown {what} {kind!r}; valid kinds: {', '.join(valid)}")
    return kind


def convert(pred: Tensor, src: str, dst: str, x: Tensor, t: Tensor | float, process: Process) -> Tensor:
    """Re-express a prediction of kind `src` at (x [B, ...], t) as kind `dst` (see KINDS).

    t is one time for the batch (a float or 0-d tensor) or one per sample [B].
    """
    check_kind(src, "src kind")
    check_kind(dst, "dst kind")
    if src == dst:
        return pred
    alpha, sigma = per_sample(process.alpha(t), x), per_sample(process.sigma(t), x)
    # 1. the prediction as x0 and eps, each computed only when needed
    if src == "velocity":
        d_alpha, d_sigma = per_sample(process.d_alpha(t), x), per_sample(process.d_sigma(t), x)
        det = alpha * d_sigma - sigma * d_alpha
        x0 = lambda: (d_sigma * x - sigma * pred) / det  # noqa: E731
        eps = lambda: (alpha * pred - d_alpha * x) / det  # noqa: E731
    elif src == "eps":
        x0, eps = (lambda: (x - sigma * pred) / alpha), (lambda: pred)
    elif src == "x0":
        x0, eps = (lambda: pred), (lambda: (x - alpha * pred) / sigma)
    elif src == "v":  # alpha x − sigma v = (alpha² + sigma²) x0 and sigma x + alpha v = (alpha² + sigma²) eps
        norm = alpha**2 + sigma**2
        x0, eps = (lambda: (alpha * x - sigma * pred) / norm), (lambda: (sigma * x + alpha * pred) / norm)
    else:  # score
        x0, eps = (lambda: (x + sigma**2 * pred) / alpha), (lambda: -sigma * pred)
    # 2. the kind asked for
    if dst == "x0":
        return x0()
    if dst == "eps":
        return eps()
    if dst == "score":
        return -eps() / sigma
    if dst == "v":
        return alpha * eps() - sigma * x0()
    return per_sample(process.d_alpha(t), x) * x0() + per_sample(process.d_sigma(t), x) * eps()


def _snap(tau):
    """τ, or the integer within float64 round-off of it (1e-9 relative): DDPM's step t sits at time
    (t + 1)/T, and T·t − 1 must give the network the integer step back, not t ± 1e-13."""
    tau = torch.as_tensor(tau)
    nearest = tau.round()
    return torch.where((tau - nearest).abs() <= 1e-9 * nearest.abs().clamp_min(1.0), nearest, tau)


@dataclass
class Prediction:
    """One evaluation of a denoiser at (x, t), readable as any kind."""

    value: Tensor
    kind: str
    x: Tensor
    t: Tensor | float
    process: Process
    source: Denoiser | None = None  # told of non-finite conversions

    def as_kind(self, kind: str) -> Tensor:
        """The prediction re-expressed as `kind` (no new network evaluation)."""
        out = convert(self.value, self.kind, kind, self.x, self.t, self.process)
        if self.source is not None and kind != self.kind:
            self.source._remember_nonfinite(out, converted=True)
        return out

    x0 = property(lambda self: self.as_kind("x0"), doc="E[x0 | x_t = x], the denoised sample")
    eps = property(lambda self: self.as_kind("eps"), doc="E[eps | x_t = x]")
    v = property(lambda self: self.as_kind("v"), doc="alpha eps − sigma x0")
    score = property(lambda self: self.as_kind("score"), doc="∇log p_t(x)")
    velocity = property(lambda self: self.as_kind("velocity"), doc="the PF-ODE drift dx/dt")


@dataclass(eq=False)
class Denoiser:
    """A network (or closed form) that predicts `prediction` on `process`, with its scalings.

    Args:
        network: `network(x, τ)` or, with labels, `network(x, τ, y)` -> [B, C, ...] (or
            [B, 2C, ...] with `learned_sigma`); τ is a tensor [B] (see the module docstring).
        prediction: what it predicts, one of KINDS.
        process: the process samplers run it on (and, unless `native` is set, trained on).
        time_scale, time_shift: τ(t) = time_scale·t + time_shift.
        learned_sigma: keep the first C output channels (a learned variance [IDDPM] follows).
        clip_x0: clip x̂0 to [−1, 1] and derive every other kind from the clipped x̂0.
        native: the process the network was trained on when it differs from `process`
            (set by `on`).
        name: how error messages call the network.

    Attributes:
        nfe: network evaluations so far (a classifier-free-guided pair counts once).
        step: the sampler step now running (set by the samplers).
    """

    network: Callable[..., Tensor]
    prediction: str
    process: Process
    time_scale: float = 1.0
    time_shift: float = 0.0
    learned_sigma: bool = False
    clip_x0: bool = False
    native: Process | None = None
    name: str = "model"
    nfe: int = field(default=0, init=False)
    step: int = field(default=0, init=False)
    _first_bad: Tensor | None = field(default=None, init=False, repr=False)  # [step of the network, of a conversion]

    def __post_init__(self) -> None:
        check_kind(self.prediction)
        if not callable(self.network):
            raise TypeError(f"{self.name} must be callable, got {type(self.network).__name__}")
        if not self.time_scale > 0:
            raise ValueError(f"time_scale must be positive, got {self.time_scale}")

    def on(self, process: Process) -> Denoiser:
        """The same network on `process`, matched in log-SNR (a fresh copy, nfe = 0)."""
        native = self.native or self.process
        return dataclasses.replace(self, process=process, native=None if process == native else native)

    def network_output(self, x: Tensor, t: Tensor | float, y: Tensor | None = None) -> Tensor:
        """The network's own output (kind `prediction`, on the native process) at (x [B, ...], t).

        This is what training losses regress; t is one time or [B] in the process's time.
        """
        c_in, t = (1.0, t) if self.native is None else self._native_time(t)
        tau = _snap(self.time_scale * t + self.time_shift)
        if not isinstance(tau, Tensor) or tau.ndim == 0:  # one time for the batch: a fill, no sync
            tau = torch.full((x.shape[0],), float(tau), dtype=x.dtype, device=x.device)
        x_in = x if self.native is None else per_sample(c_in, x) * x
        out = self.network(x_in, tau) if y is None else self.network(x_in, tau, y)
        if self.learned_sigma:
            out = out[:, : x.shape[1]]  # [B, 2C, ...] -> the C prediction channels
        if not isinstance(out, Tensor) or out.shape != x.shape:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"{self.name} ({self.prediction}) returned shape {got} for input "
                             f"{tuple(x.shape)} at step {self.step}; it must match the input")
        return out

    def _native_time(self, t: Tensor | float) -> tuple[Tensor, Tensor]:
        """(c_in, t_native) for a time t of `process` (see the module docstring).

        A native process with a `trained_range` (a DDPM table: steps 0..T−1) refuses a time whose
        log-SNR lies outside it, instead of clamping to the table's end.
        """
        lam = self.process.log_snr(t)
        if getattr(self.native, "trained_range", None) is not None:
            self._check_trained(lam)
        t_native = self.native.t_from_log_snr(lam)
        if isinstance(t, Tensor) and t.ndim:
            t_native = t_native.to(t)
        return self.native.alpha(t_native) / self.process.alpha(t), t_native

    def _check_trained(self, lam: Tensor) -> None:
        first, last = self.native.trained_range
        lam_hi, lam_lo = float(self.native.log_snr(first)), float(self.native.log_snr(last))
        tol = 1e-9 * max(1.0, abs(lam_hi), abs(lam_lo))  # float64 round-off of the grid
        lam = torch.as_tensor(lam, dtype=torch.float64)
        if bool(((lam > lam_hi + tol) | (lam < lam_lo - tol)).any()):  # per-sample times: one read
            worst = float(lam.max()) if float(lam.max()) > lam_hi + tol else float(lam.min())
            raise ValueError(f"{self.name} was trained on {self.native!r}, log-SNR in [{lam_lo:.4g}, {lam_hi:.4g}], "
                             f"and cannot be asked for log-SNR {worst:.4g} on {self.process!r}; keep the grid "
                             f"inside (a later t_end, or the DDPM table's own process)")

    def __call__(self, x: Tensor, t: Tensor | float) -> Prediction:
        """One evaluation at (x [B, ...], t): a `Prediction` on `process`."""
        out = self.network_output(x, t)
        self.nfe += 1
        self._remember_nonfinite(out)
        value, kind = out, self.prediction
        if self.native is not None:  # eps is the same on both processes; carry it across
            c_in, t_native = self._native_time(t)
            value, kind = convert(out, kind, "eps", per_sample(c_in, x) * x, t_native, self.native), "eps"
        if self.clip_x0:
            value, kind = convert(value, kind, "x0", x, t, self.process).clamp(-1.0, 1.0), "x0"
        return Prediction(value, kind, x, t, self.process, self)

    # one-kind shortcuts, each one evaluation
    def x0(self, x: Tensor, t: Tensor | float) -> Tensor:
        return self(x, t).x0

    def eps(self, x: Tensor, t: Tensor | float) -> Tensor:
        return self(x, t).eps

    def score(self, x: Tensor, t: Tensor | float) -> Tensor:
        return self(x, t).score

    def velocity(self, x: Tensor, t: Tensor | float) -> Tensor:
        return self(x, t).velocity

    def slope_defined_at(self, t: Tensor | float) -> bool:
        """Whether the PF-ODE velocity can be evaluated at t: everywhere for a velocity network
        on its own process, elsewhere only where sigma(t) > 0 (eps, x0 and the score divide by it)."""
        native_velocity = self.prediction == "velocity" and self.native is None and not self.clip_x0
        return native_velocity or float(self.process.sigma(torch.as_tensor(t, dtype=torch.float64))) > 0

    # -- validation without waiting for the device ----------------------------------------------
    def _remember_nonfinite(self, out: Tensor, converted: bool = False) -> None:
        bad = ~torch.isfinite(out).all()  # stays on the device
        if self._first_bad is None:
            self._first_bad = torch.full((2,), -1, dtype=torch.long, device=out.device)
        which = torch.arange(2, device=out.device) == int(converted)
        self._first_bad = torch.where(which & bad & (self._first_bad < 0), self.step, self._first_bad)

    def check_finite(self) -> None:
        """Raise ValueError if any evaluation so far returned NaN or inf, or converted to it (one
        read of the device), naming the first sampler step where it happened."""
        if self._first_bad is None:
            return
        network, conversion = self._first_bad.tolist()
        if network >= 0 and (conversion < 0 or network <= conversion):
            raise ValueError(f"{self.name} ({self.prediction}) returned NaN or inf at step {network} of the sampler")
        if conversion >= 0:
            raise ValueError(f"a prediction converted from {self.name}'s {self.prediction} is NaN or inf at step "
                             f"{conversion} of the sampler: the conversion divides by alpha or sigma, which vanish "
                             f"at the ends of the process; keep the grid inside them")
