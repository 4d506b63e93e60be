"""Flow matching: the interpolant, its conversions, t sampling, the loss and the samplers."""

from __future__ import annotations

import math

import pytest
import torch

from minidit.denoiser import Denoiser, convert
from minidit.dpm_solver import sample_dpm_solver_2m
from minidit.edm import EDMProcess
from minidit.flow import FlowProcess, flow_loss, interpolate, sample_t, velocity_target
from minidit.grids import karras_grid, log_snr_grid, uniform_grid
from minidit.ode import sample_euler, sample_heun, sample_rk45
from minidit.toy import GaussianMixture, mixture_denoiser


MIX64 = GaussianMixture(torch.tensor([0.4, 0.6]), torch.tensor([[-1.5, 0.5], [1.0, -1.0]]),
                        torch.tensor([0.4, 0.6])).to(dtype=torch.float64)


def test_interpolant_and_target():
    x0, eps = torch.randn(5, 3), torch.randn(5, 3)
    torch.testing.assert_close(interpolate(x0, eps, torch.zeros(5)), x0)
    torch.testing.assert_close(interpolate(x0, eps, torch.ones(5)), eps)
    t = torch.rand(5)
    # the derivative of the path in t is the target
    h = 1e-3
    slope = (interpolate(x0, eps, t + h) - interpolate(x0, eps, t - h)) / (2 * h)
    torch.testing.assert_close(slope, velocity_target(x0, eps), atol=1e-3, rtol=1e-3)


def test_conversions_agree_with_the_exact_predictions():
    process = FlowProcess()
    x = torch.randn(40, 2, dtype=torch.float64)
    t = torch.rand(40, dtype=torch.float64) * 0.9 + 0.05
    exact = {k: mixture_denoiser(MIX64, process, k).network(x, t) for k in ("velocity", "eps", "x0", "score")}
    v, tt = exact["velocity"], t[:, None]
    # the flow's own closed forms: x̂0 = x − t v, ε̂ = x + (1 − t) v, score = −ε̂/t, and back
    torch.testing.assert_close(convert(v, "velocity", "x0", x, t, process), x - tt * v)
    torch.testing.assert_close(convert(v, "velocity", "eps", x, t, process), x + (1 - tt) * v)
    torch.testing.assert_close(convert(v, "velocity", "score", x, t, process), -(x + (1 - tt) * v) / tt)
    torch.testing.assert_close(convert(exact["eps"], "eps", "velocity", x, t, process), (exact["eps"] - x) / (1 - tt))
    torch.testing.assert_close(convert(exact["x0"], "x0", "velocity", x, t, process), (x - exact["x0"]) / tt)
    for kind in ("x0", "eps", "score"):
        torch.testing.assert_close(convert(v, "velocity", kind, x, t, process), exact[kind])
    # the velocity is E[eps − x0 | x_t], which the generic kinds also state
    torch.testing.assert_close(v, exact["eps"] - exact["x0"])


def test_flow_sde_has_the_interpolant_marginal():
    # Euler-Maruyama of dx = −x/(1−t) dt + sqrt(2t/(1−t)) dw from a point: mean (1−t) x0, std t
    process, gen = FlowProcess(), torch.Generator().manual_seed(0)
    n, steps, t_end = 10000, 400, 0.6
    x0 = torch.tensor([2.0, -1.0], dtype=torch.float64)
    x, dt = x0.repeat(n, 1), t_end / steps
    for i in range(steps):
        t = torch.full((n,), i * dt, dtype=torch.float64)
        noise = torch.randn(n, 2, generator=gen, dtype=torch.float64)
        x = x + process.drift(x, t) * dt + process.diffusion(t)[:, None] * math.sqrt(dt) * noise
    torch.testing.assert_close(x.mean(0), (1 - t_end) * x0, atol=5 * t_end / math.sqrt(n) + 0.01, rtol=0)
    torch.testing.assert_close(x.std(0), torch.full((2,), t_end, dtype=torch.float64),
                               atol=5 * t_end / math.sqrt(2 * n) + 0.02 * t_end, rtol=0)


def test_t_sampling_moments():
    n, gen = 100000, torch.Generator().manual_seed(0)
    t = sample_t(n, "uniform", generator=gen)
    assert t.min() >= 0 and t.max() <= 1 and abs(t.mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / n)
    loc, scale = 0.5, 0.8
    t = sample_t(n, "logit_normal", loc, scale, generator=gen, dtype=torch.float64)
    logit = torch.log(t) - torch.log1p(-t)
    assert abs(logit.mean().item() - loc) < 5 * scale / math.sqrt(n)
    assert abs(logit.std().item() - scale) < 5 * scale / math.sqrt(2 * n)
    with pytest.raises(ValueError, match="uniform, logit_normal"):
        sample_t(4, "beta")
    with pytest.raises(ValueError, match="scale"):
        sample_t(4, "logit_normal", scale=0.0)


def test_flow_loss_with_the_exact_velocity_of_gaussian_data():
    # data N(0, s²): E[eps − x0 | x_t] = c x_t, c = (t − (1−t) s²)/((1−t)² s² + t²), and the loss is
    # the conditional variance 1 + s² − (t − (1−t) s²)² / ((1−t)² s² + t²) per dimension
    s, t0, n = 0.6, 0.35, 200000
    var_t = (1 - t0) ** 2 * s**2 + t0**2
    c = (t0 - (1 - t0) * s**2) / var_t
    x0 = s * torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = torch.full((n,), t0, dtype=torch.float64)
    loss = flow_loss(lambda x, t: c * x, x0, t=t, generator=torch.Generator().manual_seed(1)).item()
    expected = 1 + s**2 - (t0 - (1 - t0) * s**2) ** 2 / var_t
    assert abs(loss - expected) < 5 * math.sqrt(2 / n) * expected
    # and a model off by a constant pays its square on top (same noise draws)
    shifted = flow_loss(lambda x, t: c * x + 0.3, x0, t=t, generator=torch.Generator().manual_seed(1)).item()
    assert abs(shifted - (loss + 0.09)) < 0.01


def test_flow_loss_draws_t_in_range():
    seen = []
    flow_loss(lambda x, t: seen.append(t) or torch.zeros_like(x), torch.randn(64, 2), t_sampling="logit_normal",
              generator=torch.Generator().manual_seed(0))
    assert seen[0].shape == (64,) and 0 < seen[0].min() and seen[0].max() < 1


def _exact(den, x, t_start, t_end):
    return sample_rk45(den, x, torch.tensor([t_start, t_end], dtype=torch.float64), rtol=1e-9, atol=1e-9)


def test_flow_sampler_matches_the_adaptive_solution_and_checks_its_input():
    process = FlowProcess()
    den = mixture_denoiser(MIX64, process, "velocity")
    x1 = torch.randn(100, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = _exact(den, x1, 1.0, 0.0)
    grid = uniform_grid(process, 50, t_end=0.0)  # the flow's ODE reaches the data itself
    errors = {m: (f(den, x1, grid) - exact).norm(dim=1).mean().item()
              for m, f in (("euler", sample_euler), ("heun", sample_heun))}
    assert errors["heun"] < errors["euler"] / 10 and errors["heun"] < 1e-3
    # a plain velocity function works too, and Heun keeps its correction onto t = 0 (a velocity is defined there)
    plain = Denoiser(lambda x, t: den.network(x, t), "velocity", process)
    assert (sample_heun(plain, x1, grid) - exact).norm(dim=1).mean().item() < 1e-3 and plain.nfe == 100
    with pytest.raises(ValueError, match="steps"):
        uniform_grid(process, 0)


def test_flow_model_drives_edm_and_dpm_solver():
    # EDM and DPM-Solver++ start at sigma/alpha = 80, i.e. t0 = 80/81 for the flow
    process = FlowProcess()
    den = mixture_denoiser(MIX64, process, "velocity")
    t0 = 80 / 81
    x_start = t0 * torch.randn(100, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    edm = den.on(EDMProcess())
    grid = karras_grid(edm.process, 400, sigma_min=1e-3, span=process)
    x_edm = sample_heun(edm, x_start / float(process.alpha(torch.tensor(t0))), grid)  # EDM's x is x/alpha
    assert (x_edm - _exact(den, x_start, t0, 0.0)).norm(dim=1).mean() < 5e-4
    dpm = sample_dpm_solver_2m(den, x_start, log_snr_grid(process, 400))
    assert (dpm - _exact(den, x_start, t0, process.t_eps)).norm(dim=1).mean() < 5e-4


def test_score_model_on_the_flow_needs_t_below_one():
    process = FlowProcess()
    den = Denoiser(mixture_denoiser(MIX64, process, "score").network, "score", process)
    with pytest.raises(ValueError, match="NaN or inf at step 0 .*keep the grid inside"):
        sample_euler(den, torch.randn(4, 2, dtype=torch.float64), uniform_grid(process, 4, 1.0, 0.5))


def test_flow_sampler_starts_at_any_time_on_the_exact_linear_flow():
    # Data N(0, s²I): x_t = (1 − t) x0 + t ε has variance (1 − t)² s² + t², the exact velocity is linear in
    # x_t and its flow map is the rescaling x_0 = x_t · s / sqrt((1 − t)² s² + t²), so a run from t = 0.5
    # must land there, not at the end of a run from t = 1.
    s, t0 = 0.3, 0.5

    def velocity(x, t):
        t = t.to(x).reshape(-1, *[1] * (x.ndim - 1))  # [B] -> [B, 1]
        var = (1 - t) ** 2 * s**2 + t**2
        return x * (t - (1 - t) * s**2) / var  # E[ε − x0 | x_t] for Gaussian data

    xt = torch.randn(256, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    den = Denoiser(velocity, "velocity", FlowProcess())
    x0 = sample_heun(den, xt, uniform_grid(den.process, 200, t_start=t0, t_end=0.0))
    torch.testing.assert_close(x0, xt * s / math.sqrt((1 - t0) ** 2 * s**2 + t0**2), rtol=1e-5, atol=1e-6)
