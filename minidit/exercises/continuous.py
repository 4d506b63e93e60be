"""Course exercises of the continuous-time tutorials: 03 (score matching, SDEs) and 07 (flow matching).

Each check runs the student's function and minidit's on seeded float64 inputs and raises an
`ExerciseError` that names the wrong shape, term or time (`minidit.exercises.grading`):

    L_DSM = E ‖s_θ(x_t, t) + ε / σ(t)‖²,  x_t = α(t) x_0 + σ(t) ε           [SDE, Eq. 7]
    x_{t−Δt} = x_t − [f(x_t, t) − g(t)² s_θ(x_t, t)] Δt + g(t) √Δt z        [SDE, Eq. 6], Euler-Maruyama
    L_FM = E ‖v_θ(x_t, t) − (ε − x_0)‖²,  x_t = (1 − t) x_0 + t ε            [FM, Eq. 23]
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from minidit import flow
from minidit.denoiser import Denoiser
from minidit.exercises.grading import F64, ExerciseError, call_student, expect_close, expect_shape, per_example
from minidit.ode import euler_step
from minidit.process import Process
from minidit.samplers import euler_maruyama_step
from minidit.sde import VESDE, VPSDE, dsm_loss


# ----------------------------------------------------------------------------------------
# Tutorial 03: score matching and SDEs


def _score_probe(sde: Process) -> Callable[[Tensor, Tensor], Tensor]:
    """A fixed smooth stand-in for a trained score network s(x, t) on `sde` that records its inputs."""
    calls = []

    def score(x: Tensor, t: Tensor) -> Tensor:
        calls.append((x.detach().clone(), t.detach().clone()))
        sigma = per_example(sde.sigma(t).to(x), x)  # [B, 1, ...]
        return -(x + 0.3 * torch.sin(2 * x + per_example(t.to(x), x))) / (sigma**2 + 0.5)

    score.calls = calls
    return score


def _times(B: int, gen: torch.Generator) -> Tensor:
    """B float64 times in [0.01, 1] with both ends among them, rounded to 2 decimals for messages."""
    t = torch.cat([torch.tensor([0.01, 1.0]), 0.01 + 0.99 * torch.rand(B - 2, generator=gen)])
    return t.to(F64).mul(100).round().div(100)


def check_dsm_loss(fn: Callable[..., Tensor]) -> None:
    """Check `fn(score_model, sde, x0, t, eps, weighting) -> [B]`: λ·mean ‖s(x_t, t) + ε/σ‖² [SDE, Eq. 7]."""
    name = getattr(fn, "__name__", "dsm_loss")
    for shape, sde in [((12, 2), VPSDE()), ((12, 1, 4, 4), VESDE())]:
        gen = torch.Generator().manual_seed(3)
        x0, t = torch.randn(shape, generator=gen, dtype=F64), _times(shape[0], gen)
        seeds = range(100, 100 + shape[0])  # library dsm_loss draws ε from its generator: one seed per example
        eps = torch.cat([torch.randn((1, *shape[1:]), generator=torch.Generator().manual_seed(s), dtype=F64)
                         for s in seeds])
        sigma, g = per_example(sde.sigma(t), x0), per_example(sde.diffusion(t), x0)
        what = f"the loss on {type(sde).__name__}, x0 of shape {list(shape)}"
        for weighting in ("variance", "likelihood"):
            score = _score_probe(sde)
            got = call_student(name, fn, score, sde, x0, t, eps, weighting,
                        on_error=f"t is [B]; reshape σ(t) to [B, 1, ..., 1] (x0.ndim = {x0.ndim}) to broadcast")
            if not score.calls:
                raise ExerciseError(f"{name}: never called the score model; the loss compares s(x_t, t) with −ε/σ")
            xt = sde.perturb(x0, t, eps)
            expect_close(name, "the x_t given to the score model", score.calls[0][0], xt, t,
                    (("you passed x_0; the model must see x_t = α(t)·x_0 + σ(t)·ε", x0),
                     ("x_t = α(t)·x_0 + σ(t)·ε: you used the variance σ² for the noise",
                      sde.perturb(x0, t, sigma * eps)),))
            if not torch.equal(score.calls[0][1].to(F64), t):
                raise ExerciseError(f"{name}: call the score model with the times t as given, got {score.calls[0][1]}")
            want = torch.stack([dsm_loss(score, sde, x0[i:i + 1], t=t[i:i + 1], weighting=weighting,
                                         generator=torch.Generator().manual_seed(s)) for i, s in enumerate(seeds)])
            s = score(xt, t)
            lam = sigma**2 if weighting == "variance" else g**2
            other = g**2 if weighting == "variance" else sigma**2
            per = lambda w, r: (w * r**2).flatten(1).mean(1)  # noqa: E731
            hints = (("you left out the weight λ(t)", per(1, s + eps / sigma)),
                     (f"λ(t) is {'σ(t)²' if weighting == 'variance' else 'g(t)²'}, you used its square root",
                      per(lam.sqrt(), s + eps / sigma)),
                     (f"weighting={weighting!r} means λ = {'σ²' if weighting == 'variance' else 'g²'}; "
                      f"you used {'g²' if weighting == 'variance' else 'σ²'}", per(other, s + eps / sigma)),
                     ("the target score of p(x_t | x_0) is −ε/σ(t): mind the sign", per(lam, s - eps / sigma)),
                     ("the target score is −ε/σ(t), not −ε", per(lam, s + eps)),
                     ("you summed over the dimensions; average them", (lam * (s + eps / sigma) ** 2).flatten(1).sum(1)))
            expect_close(name, f"{what}, weighting={weighting!r}", got, want, t, hints,
                    shape_hint="return one loss per example, shape [B]: average over every dim but the batch")
    print(f"{name}: correct ✓")


def check_euler_maruyama_step(fn: Callable[..., Tensor]) -> None:
    """Check `fn(score_fn, sde, x, t, dt, z) -> x_{t−Δt}`, x − [f − g²·s]·Δt + g·√Δt·z  [SDE, Eq. 6]."""
    name = getattr(fn, "__name__", "euler_maruyama_step")
    for shape, sde in [((12, 2), VPSDE()), ((12, 1, 4, 4), VESDE())]:
        gen = torch.Generator().manual_seed(4)
        x, t, dt = torch.randn(shape, generator=gen, dtype=F64), _times(shape[0], gen).clamp_min(0.02), 0.01
        z = torch.randn(shape, generator=torch.Generator().manual_seed(5), dtype=F64)  # the library's draw
        score = _score_probe(sde)
        run = lambda z_, t_=t: call_student(name, fn, score, sde, x, t_, dt, z_,  # noqa: E731
                                     on_error=f"t is [B]; reshape g(t) to [B, 1, ..., 1] (x.ndim = {x.ndim})")
        where = f"on {type(sde).__name__}, x of shape {list(shape)}"
        expect_shape(name, f"the new x {where}", run(z), x.shape, "return x at t − Δt with x's shape")
        want, mean = euler_maruyama_step(Denoiser(score, "score", sde), x, t, t - dt,
                                         torch.Generator().manual_seed(5))
        f, g, s = sde.drift(x, t), per_example(sde.diffusion(t), x), score(x, t)
        f_late, g_late = sde.drift(x, t - dt), per_example(sde.diffusion(t - dt), x)
        expect_close(name, f"the drift part x − [f − g²·s]·Δt {where} (tried with z = 0)", run(torch.zeros_like(x)),
                mean, t,
                (("you stepped forward in time; reverse time goes t → t − Δt: subtract [f − g²·s]·Δt",
                  x + (f - g**2 * s) * dt),
                 ("that is the probability-flow ODE's drift f − ½g²·s; the reverse SDE has the full g²·s",
                  x - (f - 0.5 * g**2 * s) * dt),
                 ("the score enters the reverse drift as f − g²·s: mind the sign", x - (f + g**2 * s) * dt),
                 ("the score is multiplied by g(t)², the square of the diffusion", x - (f - g * s) * dt),
                 ("you left out the forward drift f(x, t) (−½β(t)·x for VP)", x + g**2 * s * dt),
                 ("evaluate f, g and the score at the current time t, the start of the step",
                  x - (f_late - g_late**2 * score(x, t - dt)) * dt)))
        expect_close(name, f"the noise term g(t)·√Δt·z {where}", run(z) - run(torch.zeros_like(x)), want - mean, t,
                (("the noise scales with √Δt (Brownian increments), not Δt", g * dt * z),
                 ("the noise is g(t)·√Δt·z; you used g(t)²", g**2 * dt**0.5 * z),
                 ("the noise is g(t)·√Δt·z; you left out g(t)", dt**0.5 * z)))
        expect_close(name, f"the new x {where}", run(z), want, t)
    print(f"{name}: correct ✓")


# ----------------------------------------------------------------------------------------
# Tutorial 07: flow matching


class _VelocityProbe(nn.Module):
    """A fixed smooth stand-in for a trained velocity network v(x, t), t [B] in [0, 1]; records its inputs."""

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        if not isinstance(t, Tensor) or t.shape != x.shape[:1]:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ExerciseError(f"call the model as model(x, t) with t a tensor of shape [B] = [{x.shape[0]}], "
                                f"one time per example; got t of shape {got}")
        self.calls = [*getattr(self, "calls", []), (x.detach().clone(), t.detach().clone())]
        return 0.8 * torch.sin(3 * x + 2 * per_example(t.to(x), x)) + per_example(t.to(x), x)


def check_flow_loss(fn: Callable[..., Tensor]) -> None:
    """Check `fn(model, x0, t, eps) -> [B]`, the per-example mean of (v_θ(x_t, t) − (ε − x_0))²,
    x_t = (1 − t)·x_0 + t·ε  [FM, Eq. 22-23]; its batch mean is `minidit.flow.flow_loss`."""
    name = getattr(fn, "__name__", "flow_matching_loss")
    for shape in [(16, 2), (16, 1, 4, 4)]:
        g = torch.Generator().manual_seed(0)
        x0 = torch.randn(shape, generator=g, dtype=F64)
        t = torch.cat([torch.tensor([0.0, 1.0, 0.5], dtype=F64), torch.rand(shape[0] - 3, generator=g, dtype=F64)])
        eps = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=F64)  # flow_loss's draw
        model = _VelocityProbe()
        got = call_student(name, fn, model, x0, t, eps, on_error="t is [B]; reshape it to [B, 1, ..., 1] to broadcast")
        if not getattr(model, "calls", None):
            raise ExerciseError(f"{name}: never called the model; the loss compares model(x_t, t) with ε − x_0")
        xt_seen, t_seen = model.calls[0]
        xt, tb = flow.interpolate(x0, eps, t), per_example(t, x0)
        expect_close(name, "the x_t given to the model", xt_seen, xt, None,
                (("time runs backwards: x_t = (1 − t)·x_0 + t·ε is the data at t = 0 and noise at t = 1",
                  tb * x0 + (1 - tb) * eps),
                 ("you passed x_0; the model must see the point x_t on the path", x0),
                 ("you passed ε; the model must see the point x_t on the path", eps)))
        expect_close(name, "the time given to the model", t_seen, t, None,
                (("you passed 1 − t; pass t itself (t = 0 is the data)", 1 - t),))
        target = flow.velocity_target(x0, eps)
        error = lambda want: (model(xt, t) - want).pow(2).flatten(1)  # noqa: E731
        want = error(target).mean(1)  # [B]
        lib = flow.flow_loss(model, x0, t=t, generator=torch.Generator().manual_seed(1))
        assert torch.allclose(want.mean(), lib), "the check disagrees with minidit.flow.flow_loss"
        expect_close(name, "the loss", got, want, None,
                (("the target has the wrong sign: the velocity dx_t/dt is ε − x_0, not x_0 − ε",
                  error(-target).mean(1)),
                 ("you regressed the noise ε (that is DDPM's target); the flow's target is the velocity ε − x_0",
                  error(eps).mean(1)),
                 ("you regressed x_0; the flow's target is the velocity ε − x_0", error(x0).mean(1)),
                 ("you summed over the dimensions; average them", error(target).sum(1))),
                shape_hint="return one loss per example, shape [B]: average over every dim but the batch")
    print(f"{name}: correct ✓")


def check_euler_flow_step(fn: Callable[..., Tensor]) -> None:
    """Check `fn(model, x, t, t_next) -> x + (t_next − t)·v(x, t)`, one Euler step of dx/dt = v from t to
    t_next < t (floats): `minidit.ode.euler_step` on the velocity, as `minidit.ode.sample_euler` takes it
    on its way from noise (t = 1) to data (t = 0)."""
    name = getattr(fn, "__name__", "euler_flow_step")
    x = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(2), dtype=F64)
    for t_now, t_next in [(1.0, 0.75), (0.6, 0.2), (0.1, 0.0)]:
        model = _VelocityProbe()
        got = call_student(name, fn, model, x.clone(), t_now, t_next)
        den = Denoiser(model, "velocity", flow.FlowProcess())
        want = euler_step(den.velocity, x, torch.tensor(t_now, dtype=F64), torch.tensor(t_next, dtype=F64))
        at = lambda s: model(x, torch.full((8,), s, dtype=F64))  # noqa: E731
        h = t_next - t_now
        expect_close(name, f"x after the step t = {t_now} → {t_next}", got, want, None,
                (("the step goes the wrong way: t decreases, so add (t_next − t)·v, a negative multiple",
                  x - h * at(t_now)),
                 ("evaluate the velocity where you are, at t, not at t_next (that is the implicit Euler step)",
                  x + h * at(t_next)),
                 ("you evaluated the model at 1 − t: in minidit t = 1 is the noise and t = 0 the data",
                  x + h * at(1 - t_now)),
                 ("scale the velocity by the step size t_next − t", x - at(t_now))),
                shape_hint="return the new x with the input's shape")
    print(f"{name}: correct ✓")
