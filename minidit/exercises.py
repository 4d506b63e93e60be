"""Course exercises: the graded checks of the tutorials.

Tutorials mark student code with nbgrader's `### BEGIN SOLUTION` / `### END SOLUTION` and
grade it with a check, e.g. `check_q_sample(q_sample)`: student and library run on seeded
float64 inputs, and an `ExerciseError` (an AssertionError) names the wrong shape, term or
timesteps. Terms are told apart by probing: of x_t = sqrt(ᾱ_t)·x_0 + sqrt(1 − ᾱ_t)·ε
[DDPM, Eq. 4] only the signal term survives ε = 0, only the noise term survives x_0 = 0.

This module holds the shared helpers and the checks of tutorials 01-02 (discrete diffusion);
`minidit.exercises_continuous` those of 03 and 07 (SDEs, flow matching) and
`minidit.exercises_transformers` those of 04 and 05 (ViT, DiT). The student notebooks
themselves are written by `minidit.notebooks`
(`minidit exercises generate tutorials/ --out tutorials/student/`).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from minidit.ddim import ddim_sample
from minidit.ddpm import GaussianDiffusion
from minidit.schedules import DiscreteSchedule, make_schedule

F64 = torch.float64


class ExerciseError(AssertionError):
    """The student's function disagrees with minidit; the message says where."""


# ----------------------------------------------------------------------------------------
# Helpers of the checks


def _call(name: str, fn: Callable, *args, on_error: str = "", pair: bool = False):
    """Call the student's function; turn 'not implemented', broadcasting errors and non-pairs into advice."""
    try:
        out = fn(*args)
        if pair and not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise ExerciseError(f"{name}: return a pair (mean, variance), got {type(out).__name__}")
        return out
    except NotImplementedError:
        raise ExerciseError(f"{name}: not implemented yet (replace `raise NotImplementedError()`)") from None
    except RuntimeError as err:
        if on_error and "size of tensor" in str(err):
            raise ExerciseError(f"{name} raised `{err}`: {on_error}") from err
        raise


def _shape(name: str, what: str, got, shape: torch.Size, hint: str = "") -> None:
    """Raise ExerciseError unless `got` is a tensor of `shape`."""
    if not isinstance(got, Tensor):
        raise ExerciseError(f"{name}: {what} must be a torch.Tensor, got {type(got).__name__}")
    if got.shape != shape:
        msg = f"{name}: {what} has shape {tuple(got.shape)}, expected {tuple(shape)}"
        raise ExerciseError(msg + (f"; {hint}" if hint else ""))


def _expect(name: str, what: str, got, want: Tensor, t: Tensor | None = None,
            hints: tuple = (), shape_hint: str = "") -> None:
    """Raise ExerciseError unless got ≈ want, naming the shape, a known mistake or the wrong t."""
    _shape(name, what, got, want.shape, shape_hint)
    got = got.detach().to("cpu", F64)
    if not bool(torch.isfinite(got).all()):
        raise ExerciseError(f"{name}: {what} contains NaN or inf")
    close = torch.isclose(got, want, rtol=1e-5, atol=1e-6)
    if bool(close.all()):
        return
    for hint, candidate in hints:  # known mistakes, tried in order
        if candidate.shape == got.shape and torch.allclose(got, candidate, rtol=1e-5, atol=1e-6):
            raise ExerciseError(f"{name}: {what} is wrong: {hint}")
    msg = f"{name}: {what} is wrong"
    if t is not None:
        bad = ~close.reshape(close.shape[0], -1).all(dim=1)  # [B] examples with an error
        wrong, right = (", ".join(map(str, sorted(set(t[m].tolist()))[:8])) for m in (bad, ~bad))
        msg += f" at t = {wrong}" + (f" (right at t = {right}, ...)" if right else "")
    raise ExerciseError(msg + f"; largest error {float((got - want).abs().max()):.3g}")


def _bcast(values: Tensor, x: Tensor) -> Tensor:
    return values.reshape(-1, *([1] * (x.ndim - 1)))  # [B] -> [B, 1, ..., 1]


def _prev(table: Tensor, t: Tensor, wrap: bool = False) -> Tensor:
    """table[t − 1] with 1 at t = 0 (the data), or wrapping to table[T − 1] as the classic bug does."""
    return table[t - 1] if wrap else torch.where(t > 0, table[(t - 1).clamp_min(0)], torch.ones((), dtype=F64))


def _setup(shape: tuple[int, ...], schedule: str = "linear", T: int = 100):
    """Schedule, diffusion, timesteps [B] with 0, 1 and T − 1 among them, two normal tensors of `shape`."""
    g = torch.Generator().manual_seed(0)
    s = make_schedule(schedule, T)
    t = torch.cat([torch.tensor([0, 1, T - 1]), torch.randint(0, T, (shape[0] - 3,), generator=g)])
    return s, GaussianDiffusion(s), t, *(torch.randn(shape, generator=g, dtype=F64) for _ in range(2))


class _Probe(nn.Module):
    """A fixed smooth stand-in for a trained ε-network that records its inputs."""

    def __init__(self, kind: str = "smooth", schedule: DiscreteSchedule | None = None):
        super().__init__()
        self.register_buffer("dtype_anchor", torch.zeros((), dtype=F64))  # samplers read dtype here
        self.kind, self.schedule, self.calls = kind, schedule, []

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        self.calls.append((x.detach().clone(), t.detach().clone()))
        if self.kind == "zero":  # ε̂ = 0: x̂_0 = x_t / sqrt(ᾱ_t)
            return torch.zeros_like(x)
        if self.kind == "pure_noise":  # ε̂ = x_t / sqrt(1 − ᾱ_t): x̂_0 = 0
            return x / _bcast(self.schedule.sqrt_one_minus_alpha_bar[t], x)
        return 0.8 * torch.sin(3 * x + 0.01 * _bcast(t.to(F64), x))


# ----------------------------------------------------------------------------------------
# Tutorial 01: the forward process


def check_alpha_bar(fn: Callable[[Tensor], Tensor]) -> None:
    """Check `fn(betas [T]) -> alpha_bar [T]`, ᾱ_t = ∏_{s≤t} (1 − β_s)  [DDPM, Eq. 4]."""
    name = getattr(fn, "__name__", "alpha_bar")
    betas = 1e-3 + 0.1 * torch.rand(40, generator=torch.Generator().manual_seed(0), dtype=F64)
    want = DiscreteSchedule(betas).alpha_bar
    hints = (("it is ᾱ_{t−1}: ᾱ_t includes its own factor (1 − β_t), so ᾱ_0 = 1 − β_0",
              torch.cat([torch.ones(1, dtype=F64), want[:-1]])),
             ("it is α_t = 1 − β_t; ᾱ_t is the running product of the α's (torch.cumprod)", 1 - betas),
             ("it is the running product of the β's; multiply the α's = 1 − β", torch.cumprod(betas, 0)))
    _expect(name, "alpha_bar", _call(name, fn, betas.clone()), want, torch.arange(40), hints)
    print(f"{name}: correct ✓")


def check_q_sample(fn: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]) -> None:
    """Check `fn(x0, t, eps, alpha_bar) -> x_t = sqrt(ᾱ_t)·x_0 + sqrt(1 − ᾱ_t)·ε`  [DDPM, Eq. 4]."""
    name = getattr(fn, "__name__", "q_sample")
    for shape in [(16, 1, 4, 4), (16, 2)]:  # images and 2-D toy points
        s, diffusion, t, x0, eps = _setup(shape)
        ab, ab_prev, zero = _bcast(s.alpha_bar[t], x0), _bcast(_prev(s.alpha_bar, t), x0), torch.zeros_like(x0)
        advice = f"t is [B]; reshape ᾱ_t to [B, 1, ..., 1] with x0.ndim = {x0.ndim} dims so it broadcasts"
        run = lambda a, e: _call(name, fn, a, t, e, s.alpha_bar.clone(), on_error=advice)  # noqa: E731
        _shape(name, f"x_t for x0 of shape {list(shape)}", run(x0, eps), x0.shape, advice)
        _expect(name, "the signal term sqrt(ᾱ_t)·x_0 (tried with ε = 0)", run(x0, zero),
                diffusion.q_sample(x0, t, zero), t,
                (("you scaled x_0 by ᾱ_t; the mean is sqrt(ᾱ_t)·x_0", ab * x0),
                 ("you used ᾱ_{t−1}; index ᾱ at t", ab_prev.sqrt() * x0),
                 ("x_0 got the noise coefficient sqrt(1 − ᾱ_t): swapped", (1 - ab).sqrt() * x0)))
        _expect(name, "the noise term sqrt(1 − ᾱ_t)·ε (tried with x_0 = 0)", run(zero, eps),
                diffusion.q_sample(zero, t, eps), t,
                (("you scaled ε by the variance 1 − ᾱ_t; use the std sqrt(1 − ᾱ_t)", (1 - ab) * eps),
                 ("ε got the signal coefficient sqrt(ᾱ_t): swapped", ab.sqrt() * eps)))
        _expect(name, "x_t", run(x0, eps), diffusion.q_sample(x0, t, eps), t)
    print(f"{name}: correct ✓")


def check_posterior(fn: Callable[..., tuple[Tensor, Tensor]]) -> None:
    """Check `fn(x0, xt, t, betas, alpha_bar) -> (mean μ̃_t, variance β̃_t)`  [DDPM, Eq. 6-7]."""
    name = getattr(fn, "__name__", "posterior_mean_variance")
    s, diffusion, t, x0, xt = _setup((16, 1, 4, 4), "cosine")
    beta, ab, zero = _bcast(s.betas[t], x0), _bcast(s.alpha_bar[t], x0), torch.zeros_like(x0)
    ab_prev, ab_wrap = _bcast(_prev(s.alpha_bar, t), x0), _bcast(_prev(s.alpha_bar, t, wrap=True), x0)
    wrap = "at t = 0 you read ᾱ[t − 1] = ᾱ[−1], which wraps around to ᾱ_{T−1}; use ᾱ_{−1} = 1 (the data)"
    run = lambda a, b: _call(name, fn, a, b, t, s.betas.clone(), s.alpha_bar.clone(), pair=True)  # noqa: E731
    (mean, var), (want_mean, want_var, _) = run(x0, xt), diffusion.q_posterior_mean_variance(x0, xt, t)
    _shape(name, "the mean", mean, x0.shape, "the mean has x_t's shape [B, C, H, W]")
    _expect(name, "the x_0 term β_t·sqrt(ᾱ_{t−1})/(1 − ᾱ_t)·x_0 (tried with x_t = 0)", run(x0, zero)[0],
            diffusion.q_posterior_mean_variance(x0, zero, t)[0], t,
            ((wrap, beta * ab_wrap.sqrt() / (1 - ab) * x0),
             ("take the square root of ᾱ_{t−1}", beta * ab_prev / (1 - ab) * x0)))
    _expect(name, "the x_t term (1 − ᾱ_{t−1})·sqrt(α_t)/(1 − ᾱ_t)·x_t (tried with x_0 = 0)", run(zero, xt)[0],
            diffusion.q_posterior_mean_variance(zero, xt, t)[0], t,
            ((wrap, (1 - ab_wrap) * (1 - beta).sqrt() / (1 - ab) * xt),
             ("take the square root of α_t", (1 - ab_prev) * (1 - beta) / (1 - ab) * xt),
             ("α_t is 1 − β_t, not ᾱ_t", (1 - ab_prev) * ab.sqrt() / (1 - ab) * xt)))
    if not isinstance(var, Tensor) or var.shape not in (x0.shape, beta.shape):
        got = tuple(var.shape) if isinstance(var, Tensor) else type(var).__name__
        raise ExerciseError(f"{name}: the variance has shape {got}; return [B, 1, ..., 1] (or x_0's shape)")
    full = x0.shape
    _expect(name, "the variance β̃_t", var.expand(full), want_var.expand(full), t,
            ((wrap, ((1 - ab_wrap) / (1 - ab) * beta).expand(full)),
             ("that is β_t, the forward variance; β̃_t = (1 − ᾱ_{t−1})/(1 − ᾱ_t)·β_t", beta.expand(full)),
             ("that is the standard deviation sqrt(β̃_t); return the variance", want_var.sqrt().expand(full))))
    _expect(name, "the mean", mean, want_mean, t)
    print(f"{name}: correct ✓")


# ----------------------------------------------------------------------------------------
# Tutorial 02: training and sampling


def check_ddpm_loss(fn: Callable[..., Tensor]) -> None:
    """Check `fn(model, x0, t, eps, alpha_bar) -> [B]`, per-example mean of (ε − ε_θ(x_t, t))² [DDPM, Eq. 14]."""
    name = getattr(fn, "__name__", "ddpm_loss")
    for shape in [(16, 2), (16, 1, 4, 4)]:
        s, diffusion, t, x0, eps = _setup(shape)
        model = _Probe()
        got = _call(name, fn, model, x0, t, eps, s.alpha_bar.clone())
        if not model.calls:
            raise ExerciseError(f"{name}: never called the model; the loss compares ε with model(x_t, t)")
        xt_seen, t_seen = model.calls[0]
        _expect(name, "the x_t given to the model", xt_seen, diffusion.q_sample(x0, t, eps), t,
                (("you passed x_0; the model must see the noised x_t", x0),))
        if t_seen.shape != t.shape or t_seen.dtype.is_floating_point or not torch.equal(t_seen, t):
            raise ExerciseError(f"{name}: call the model with the integer timesteps t as given, got {t_seen}")
        error = lambda target: (model(xt_seen, t) - target).pow(2).flatten(1)  # noqa: E731
        _expect(name, "the loss", got, diffusion.training_losses(model, x0, t=t, eps=eps)["mse"], t,
                (("you regressed x_0; the target is the noise ε", error(x0).mean(1)),
                 ("you summed over the pixels; average them", error(eps).sum(1))),
                shape_hint="return one loss per example, shape [B]: average over every dim but the batch")
    print(f"{name}: correct ✓")


def check_p_sample(fn: Callable[..., Tensor]) -> None:
    """Check `fn(model, xt, t, z, betas, alpha_bar) -> x_{t−1}`, an ancestral step, σ_t² = β_t [DDPM, Alg. 2]."""
    name = getattr(fn, "__name__", "p_sample_step")
    s, diffusion, t, xt, z = _setup((16, 1, 4, 4))
    model = _Probe()
    run = lambda z_: _call(name, fn, model, xt, t, z_, s.betas.clone(), s.alpha_bar.clone())  # noqa: E731
    p = diffusion.p_mean_variance(model, xt, t, variance="beta")
    beta, ab, eps_hat = _bcast(s.betas[t], xt), _bcast(s.alpha_bar[t], xt), model(xt, t)
    zero, noisy = torch.zeros_like(xt), _bcast((t > 0).to(F64), xt)  # no noise on the last step
    _shape(name, "x_{t−1}", run(z), xt.shape, "return x_{t−1} with x_t's shape")
    step = lambda sign, coef, scale: (xt + sign * coef * eps_hat) / scale  # noqa: E731
    _expect(name, "the mean (tried with z = 0)", run(zero), p["mean"], t,
            (("this is x̂_0; the mean is (x_t − β_t/sqrt(1 − ᾱ_t)·ε̂)/sqrt(α_t)", p["x0"]),
             ("divide by sqrt(α_t) = sqrt(1 − β_t), not sqrt(ᾱ_t)", step(-1, beta / (1 - ab).sqrt(), ab.sqrt())),
             ("the coefficient of ε̂ is β_t/sqrt(1 − ᾱ_t)", step(-1, beta / (1 - ab), (1 - beta).sqrt())),
             ("subtract the noise, do not add it", step(1, beta / (1 - ab).sqrt(), (1 - beta).sqrt()))))
    post_std = _bcast(diffusion.posterior_variance[t], xt).sqrt()
    _expect(name, "the noise term σ_t·z", run(z) - run(zero), noisy * beta.sqrt() * z, t,
            (("add no noise on the last step (t = 0): x_0 is the output", beta.sqrt() * z),
             ("σ_t is the standard deviation sqrt(β_t); you used the variance β_t", noisy * beta * z),
             ("this exercise uses σ_t² = β_t, not the posterior variance β̃_t", noisy * post_std * z)))
    _expect(name, "x_{t−1}", run(z), p["mean"] + noisy * p["variance"].sqrt() * z, t)
    print(f"{name}: correct ✓")


def check_ddim_step(fn: Callable[..., Tensor]) -> None:
    """Check `fn(model, xt, t, t_prev, alpha_bar) -> x_{t_prev}`, an η = 0 step [DDIM, Eq. 12]; −1 is the data."""
    name = getattr(fn, "__name__", "ddim_step")
    s, diffusion, _, x, _ = _setup((4, 8, 1, 4, 4))
    for xt, (t_now, t_prev) in zip(x, [(99, 74), (40, 12), (3, -1), (0, -1)]):
        taus = torch.tensor([t_prev, t_now] if t_prev >= 0 else [t_now])  # the library steps t_now -> t_prev first
        ab, ab_prev = float(s.alpha_bar[t_now]), 1.0 if t_prev < 0 else float(s.alpha_bar[t_prev])
        for kind, term in [("smooth", "x_{t'}"), ("zero", "the x̂_0 term sqrt(ᾱ_t')·x̂_0 (tried with ε̂ = 0)"),
                           ("pure_noise", "the direction term sqrt(1 − ᾱ_t')·ε̂ (tried with x̂_0 = 0)")]:
            model = _Probe(kind, s)
            got = _call(name, fn, model, xt, t_now, t_prev, s.alpha_bar.clone())
            want = ddim_sample(diffusion, model, xt.shape, timesteps=taus, x_T=xt, return_trajectory=True,
                               progress=False)[1][1]  # [S + 1, B, ...]: the state after one step
            x0_hat, eps_hat = diffusion.predict_x0_eps(model, xt, torch.full((8,), t_now))
            hints = [("the direction term uses sqrt(1 − ᾱ_t') of the level you step to, not sqrt(1 − ᾱ_t)",
                      want + ((1 - ab) ** 0.5 - (1 - ab_prev) ** 0.5) * eps_hat)]
            if t_prev < 0:  # alpha_bar[-1] wraps around to the last level
                hints.insert(0, ("t' = −1 means the data, ᾱ_{−1} = 1; ᾱ[−1] wraps around to ᾱ_{T−1}",
                                 s.sqrt_alpha_bar[-1] * x0_hat + s.sqrt_one_minus_alpha_bar[-1] * eps_hat))
            _expect(name, f"{term} for the step t = {t_now} → t' = {t_prev}", got, want, hints=tuple(hints),
                    shape_hint="return x_{t'} with x_t's shape")
    print(f"{name}: correct ✓")
