"""Graded checks of tutorials 01 (the forward process) and 02 (DDPM from scratch).

Tutorials mark student code with nbgrader's `### BEGIN SOLUTION` / `### END SOLUTION` and
grade it with a check, e.g. `check_q_sample(q_sample)`: student and library run on seeded
float64 inputs, and an `ExerciseError` (an AssertionError) names the wrong shape, term or
timesteps. Terms are told apart by probing: of x_t = sqrt(ᾱ_t)·x_0 + sqrt(1 − ᾱ_t)·ε
[DDPM, Eq. 4] only the signal term survives ε = 0, only the noise term survives x_0 = 0.
The sampling steps are graded against the library's own steps (`minidit.ddpm.p_sample_step`,
`minidit.ddim.ddim_step`) on the table's process, where step t sits at time (t + 1)/T.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from minidit.ddim import ddim_step
from minidit.ddpm import GaussianDiffusion, p_sample_step
from minidit.denoiser import Denoiser
from minidit.exercises.grading import F64, ExerciseError, call_student, expect_close, expect_shape, per_example
from minidit.schedules import DiscreteSchedule, make_schedule


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
        self.kind, self.schedule, self.calls = kind, schedule, []

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        self.calls.append((x.detach().clone(), t.detach().clone()))
        t = t.round().long() if t.is_floating_point() else t  # the library passes steps as floats
        if self.kind == "zero":  # ε̂ = 0: x̂_0 = x_t / sqrt(ᾱ_t)
            return torch.zeros_like(x)
        if self.kind == "pure_noise":  # ε̂ = x_t / sqrt(1 − ᾱ_t): x̂_0 = 0
            return x / per_example(self.schedule.sqrt_one_minus_alpha_bar[t], x)
        return 0.8 * torch.sin(3 * x + 0.01 * per_example(t.to(F64), x))


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
    expect_close(name, "alpha_bar", call_student(name, fn, betas.clone()), want, torch.arange(40), hints)
    print(f"{name}: correct ✓")


def check_q_sample(fn: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]) -> None:
    """Check `fn(x0, t, eps, alpha_bar) -> x_t = sqrt(ᾱ_t)·x_0 + sqrt(1 − ᾱ_t)·ε`  [DDPM, Eq. 4]."""
    name = getattr(fn, "__name__", "q_sample")
    for shape in [(16, 1, 4, 4), (16, 2)]:  # images and 2-D toy points
        s, diffusion, t, x0, eps = _setup(shape)
        ab, ab_prev, zero = per_example(s.alpha_bar[t], x0), per_example(_prev(s.alpha_bar, t), x0), torch.zeros_like(x0)
        advice = f"t is [B]; reshape ᾱ_t to [B, 1, ..., 1] with x0.ndim = {x0.ndim} dims so it broadcasts"
        run = lambda a, e: call_student(name, fn, a, t, e, s.alpha_bar.clone(), on_error=advice)  # noqa: E731
        expect_shape(name, f"x_t for x0 of shape {list(shape)}", run(x0, eps), x0.shape, advice)
        expect_close(name, "the signal term sqrt(ᾱ_t)·x_0 (tried with ε = 0)", run(x0, zero),
                diffusion.q_sample(x0, t, zero), t,
                (("you scaled x_0 by ᾱ_t; the mean is sqrt(ᾱ_t)·x_0", ab * x0),
                 ("you used ᾱ_{t−1}; index ᾱ at t", ab_prev.sqrt() * x0),
                 ("x_0 got the noise coefficient sqrt(1 − ᾱ_t): swapped", (1 - ab).sqrt() * x0)))
        expect_close(name, "the noise term sqrt(1 − ᾱ_t)·ε (tried with x_0 = 0)", run(zero, eps),
                diffusion.q_sample(zero, t, eps), t,
                (("you scaled ε by the variance 1 − ᾱ_t; use the std sqrt(1 − ᾱ_t)", (1 - ab) * eps),
                 ("ε got the signal coefficient sqrt(ᾱ_t): swapped", ab.sqrt() * eps)))
        expect_close(name, "x_t", run(x0, eps), diffusion.q_sample(x0, t, eps), t)
    print(f"{name}: correct ✓")


def check_posterior(fn: Callable[..., tuple[Tensor, Tensor]]) -> None:
    """Check `fn(x0, xt, t, betas, alpha_bar) -> (mean μ̃_t, variance β̃_t)`  [DDPM, Eq. 6-7]."""
    name = getattr(fn, "__name__", "posterior_mean_variance")
    s, diffusion, t, x0, xt = _setup((16, 1, 4, 4), "cosine")
    beta, ab, zero = per_example(s.betas[t], x0), per_example(s.alpha_bar[t], x0), torch.zeros_like(x0)
    ab_prev, ab_wrap = per_example(_prev(s.alpha_bar, t), x0), per_example(_prev(s.alpha_bar, t, wrap=True), x0)
    wrap = "at t = 0 you read ᾱ[t − 1] = ᾱ[−1], which wraps around to ᾱ_{T−1}; use ᾱ_{−1} = 1 (the data)"
    run = lambda a, b: call_student(name, fn, a, b, t, s.betas.clone(), s.alpha_bar.clone(), pair=True)  # noqa: E731
    (mean, var), (want_mean, want_var, _) = run(x0, xt), diffusion.q_posterior_mean_variance(x0, xt, t)
    expect_shape(name, "the mean", mean, x0.shape, "the mean has x_t's shape [B, C, H, W]")
    expect_close(name, "the x_0 term β_t·sqrt(ᾱ_{t−1})/(1 − ᾱ_t)·x_0 (tried with x_t = 0)", run(x0, zero)[0],
            diffusion.q_posterior_mean_variance(x0, zero, t)[0], t,
            ((wrap, beta * ab_wrap.sqrt() / (1 - ab) * x0),
             ("take the square root of ᾱ_{t−1}", beta * ab_prev / (1 - ab) * x0)))
    expect_close(name, "the x_t term (1 − ᾱ_{t−1})·sqrt(α_t)/(1 − ᾱ_t)·x_t (tried with x_0 = 0)", run(zero, xt)[0],
            diffusion.q_posterior_mean_variance(zero, xt, t)[0], t,
            ((wrap, (1 - ab_wrap) * (1 - beta).sqrt() / (1 - ab) * xt),
             ("take the square root of α_t", (1 - ab_prev) * (1 - beta) / (1 - ab) * xt),
             ("α_t is 1 − β_t, not ᾱ_t", (1 - ab_prev) * ab.sqrt() / (1 - ab) * xt)))
    if not isinstance(var, Tensor) or var.shape not in (x0.shape, beta.shape):
        got = tuple(var.shape) if isinstance(var, Tensor) else type(var).__name__
        raise ExerciseError(f"{name}: the variance has shape {got}; return [B, 1, ..., 1] (or x_0's shape)")
    full = x0.shape
    expect_close(name, "the variance β̃_t", var.expand(full), want_var.expand(full), t,
            ((wrap, ((1 - ab_wrap) / (1 - ab) * beta).expand(full)),
             ("that is β_t, the forward variance; β̃_t = (1 − ᾱ_{t−1})/(1 − ᾱ_t)·β_t", beta.expand(full)),
             ("that is the standard deviation sqrt(β̃_t); return the variance", want_var.sqrt().expand(full))))
    expect_close(name, "the mean", mean, want_mean, t)
    print(f"{name}: correct ✓")


# ----------------------------------------------------------------------------------------
# Tutorial 02: training and sampling


def check_ddpm_loss(fn: Callable[..., Tensor]) -> None:
    """Check `fn(model, x0, t, eps, alpha_bar) -> [B]`, per-example mean of (ε − ε_θ(x_t, t))² [DDPM, Eq. 14]."""
    name = getattr(fn, "__name__", "ddpm_loss")
    for shape in [(16, 2), (16, 1, 4, 4)]:
        s, diffusion, t, x0, eps = _setup(shape)
        model = _Probe()
        got = call_student(name, fn, model, x0, t, eps, s.alpha_bar.clone())
        if not model.calls:
            raise ExerciseError(f"{name}: never called the model; the loss compares ε with model(x_t, t)")
        xt_seen, t_seen = model.calls[0]
        expect_close(name, "the x_t given to the model", xt_seen, diffusion.q_sample(x0, t, eps), t,
                (("you passed x_0; the model must see the noised x_t", x0),))
        if t_seen.shape != t.shape or t_seen.dtype.is_floating_point or not torch.equal(t_seen, t):
            raise ExerciseError(f"{name}: call the model with the integer timesteps t as given, got {t_seen}")
        error = lambda target: (model(xt_seen, t) - target).pow(2).flatten(1)  # noqa: E731
        expect_close(name, "the loss", got, diffusion.training_losses(model, x0, t=t, eps=eps)["mse"], t,
                (("you regressed x_0; the target is the noise ε", error(x0).mean(1)),
                 ("you summed over the pixels; average them", error(eps).sum(1))),
                shape_hint="return one loss per example, shape [B]: average over every dim but the batch")
    print(f"{name}: correct ✓")


def _denoiser(model: nn.Module, s: DiscreteSchedule) -> Denoiser:
    """An ε-network on the table's process: step t at time (t + 1)/T, network time T·t − 1."""
    return Denoiser(model, "eps", s.process, time_scale=s.T, time_shift=-1.0)


def check_p_sample(fn: Callable[..., Tensor]) -> None:
    """Check `fn(model, xt, t, z, betas, alpha_bar) -> x_{t−1}`, an ancestral step, σ_t² = β_t [DDPM, Alg. 2]."""
    name = getattr(fn, "__name__", "p_sample_step")
    s, _, t, xt, z = _setup((16, 1, 4, 4))
    model = _Probe()
    den, time = _denoiser(model, s), s.time(t)  # [B] times of the steps
    run = lambda z_: call_student(name, fn, model, xt, t, z_, s.betas.clone(), s.alpha_bar.clone())  # noqa: E731
    step = lambda z_, variance="beta": p_sample_step(den, xt, time, time - 1 / s.T, variance=variance,  # noqa: E731
                                                     noise=z_)
    beta, ab, eps_hat = per_example(s.betas[t], xt), per_example(s.alpha_bar[t], xt), model(xt, t)
    zero, noisy = torch.zeros_like(xt), per_example((t > 0).to(F64), xt)  # no noise on the last step
    mean = step(zero)
    expect_shape(name, "x_{t−1}", run(z), xt.shape, "return x_{t−1} with x_t's shape")
    by_hand = lambda sign, coef, scale: (xt + sign * coef * eps_hat) / scale  # noqa: E731
    expect_close(name, "the mean (tried with z = 0)", run(zero), mean, t,
                 (("this is x̂_0; the mean is (x_t − β_t/sqrt(1 − ᾱ_t)·ε̂)/sqrt(α_t)", den(xt, time).x0),
                  ("divide by sqrt(α_t) = sqrt(1 − β_t), not sqrt(ᾱ_t)", by_hand(-1, beta / (1 - ab).sqrt(), ab.sqrt())),
                  ("the coefficient of ε̂ is β_t/sqrt(1 − ᾱ_t)", by_hand(-1, beta / (1 - ab), (1 - beta).sqrt())),
                  ("subtract the noise, do not add it", by_hand(1, beta / (1 - ab).sqrt(), (1 - beta).sqrt()))))
    expect_close(name, "the noise term σ_t·z", run(z) - run(zero), step(z) - mean, t,
                 (("add no noise on the last step (t = 0): x_0 is the output", beta.sqrt() * z),
                  ("σ_t is the standard deviation sqrt(β_t); you used the variance β_t", noisy * beta * z),
                  ("this exercise uses σ_t² = β_t, not the posterior variance β̃_t",
                   step(z, "posterior") - mean)))
    expect_close(name, "x_{t−1}", run(z), step(z), t)
    print(f"{name}: correct ✓")


def check_ddim_step(fn: Callable[..., Tensor]) -> None:
    """Check `fn(model, xt, t, t_prev, alpha_bar) -> x_{t_prev}`, an η = 0 step [DDIM, Eq. 12]; −1 is the data."""
    name = getattr(fn, "__name__", "ddim_step")
    s, _, _, x, _ = _setup((4, 8, 1, 4, 4))
    for xt, (t_now, t_prev) in zip(x, [(99, 74), (40, 12), (3, -1), (0, -1)]):
        ab, ab_prev = float(s.alpha_bar[t_now]), 1.0 if t_prev < 0 else float(s.alpha_bar[t_prev])
        time, time_prev = torch.tensor((t_now + 1) / s.T, dtype=F64), torch.tensor((t_prev + 1) / s.T, dtype=F64)
        for kind, term in [("smooth", "x_{t'}"), ("zero", "the x̂_0 term sqrt(ᾱ_t')·x̂_0 (tried with ε̂ = 0)"),
                           ("pure_noise", "the direction term sqrt(1 − ᾱ_t')·ε̂ (tried with x̂_0 = 0)")]:
            model = _Probe(kind, s)
            den = _denoiser(model, s)
            got = call_student(name, fn, model, xt, t_now, t_prev, s.alpha_bar.clone())
            want = ddim_step(den, xt, time, time_prev)
            pred = den(xt, time)
            x0_hat, eps_hat = pred.x0, pred.eps
            hints = [("the direction term uses sqrt(1 − ᾱ_t') of the level you step to, not sqrt(1 − ᾱ_t)",
                      want + ((1 - ab) ** 0.5 - (1 - ab_prev) ** 0.5) * eps_hat)]
            if t_prev < 0:  # alpha_bar[-1] wraps around to the last level
                hints.insert(0, ("t' = −1 means the data, ᾱ_{−1} = 1; ᾱ[−1] wraps around to ᾱ_{T−1}",
                                 s.sqrt_alpha_bar[-1] * x0_hat + s.sqrt_one_minus_alpha_bar[-1] * eps_hat))
            expect_close(name, f"{term} for the step t = {t_now} → t' = {t_prev}", got, want, hints=tuple(hints),
                         shape_hint="return x_{t'} with x_t's shape")
    print(f"{name}: correct ✓")
