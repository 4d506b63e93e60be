"""DDIM with exact predictors: the law of its samples, its convergence to the data as the
number of steps grows, determinism, the η = 1 limit, inversion, and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from _exact_models import ExactGaussian, ExactMixture, moment_z_scores

from minidit.ddim import ddim_invert, sample_ddim
from minidit.ddpm import sample_ddpm
from minidit.denoiser import Denoiser
from minidit.grids import Trajectory, ddpm_grid, ddpm_timesteps
from minidit.schedules import make_schedule

MU = torch.tensor([0.5, -1.0], dtype=torch.float64)
COV = torch.tensor([[0.5, 0.3], [0.3, 0.4]], dtype=torch.float64)
EYE = torch.eye(2, dtype=torch.float64)


def denoiser(model, schedule, kind="eps"):
    return Denoiser(model, kind, schedule.process, time_scale=schedule.T, time_shift=-1.0)


def ddim(model, schedule, shape, steps=50, eta=0.0, kind="eps", x_T=None, generator=None, timesteps=None,
         callback=None):
    """DDIM on DDPM's spaced steps from x_T ~ N(0, I) (or the given x_T)."""
    g = generator or torch.Generator().manual_seed(0)
    x_T = torch.randn(shape, generator=g, dtype=torch.float64) if x_T is None else x_T
    grid = ddpm_grid(schedule.T, steps, timesteps=timesteps)
    return sample_ddim(denoiser(model, schedule, kind), x_T, grid, eta=eta, generator=g, callback=callback)


def _exact_law(schedule, taus: list[int], eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance of DDIM's output for N(MU, COV) data and the exact predictor.

    Each step is affine in x_t: with C = ᾱΣ + (1 − ᾱ)I, x̂0 − mu = sqrt(ᾱ)ΣC⁻¹(x_t − sqrt(ᾱ)mu)
    and ε̂ = sqrt(1 − ᾱ)C⁻¹(x_t − sqrt(ᾱ)mu), so x_t' − sqrt(ᾱ')mu = M(x_t − sqrt(ᾱ)mu) + σz with
    M = (sqrt(ᾱ'ᾱ)Σ + sqrt((1 − ᾱ' − σ²)(1 − ᾱ))I)C⁻¹; propagate N(0, I) through the steps.
    """
    m, P = torch.zeros(2, dtype=torch.float64), EYE.clone()
    for t, t_prev in zip(taus[::-1], [*taus[-2::-1], -1]):
        ab = schedule.alpha_bar[t]
        ab_prev = schedule.alpha_bar[t_prev] if t_prev >= 0 else torch.tensor(1.0, dtype=torch.float64)
        sigma2 = eta**2 * (1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)
        C = ab * COV + (1 - ab) * EYE
        A = (ab_prev * ab).sqrt() * COV + ((1 - ab_prev - sigma2) * (1 - ab)).sqrt() * EYE
        M = A @ torch.linalg.inv(C)
        m = ab_prev.sqrt() * MU + M @ (m - ab.sqrt() * MU)
        P = M @ P @ M.T + sigma2 * EYE
    return m, P


def test_timestep_helpers():
    assert ddpm_timesteps(1000, 10).tolist() == list(range(99, 1000, 100))
    assert ddpm_timesteps(1000, 1).tolist() == [999]
    assert torch.equal(ddpm_timesteps(50, 50, "quadratic"), torch.arange(50))
    for spacing in ("uniform", "quadratic"):
        for steps in (2, 7, 50, 400, 1000):
            taus = ddpm_timesteps(1000, steps, spacing)
            assert len(taus) == steps and taus[-1] == 999 and taus[0] >= 0
            assert bool((taus[1:] > taus[:-1]).all())
    gaps = ddpm_timesteps(1000, 20, "quadratic").diff()
    assert bool((gaps[1:] >= gaps[:-1]).all()) and gaps[0] < gaps[-1]  # denser near the data


@pytest.mark.parametrize("steps,eta,kind", [(10, 0.0, "eps"), (50, 0.0, "v"), (50, 0.5, "x0")])
def test_ddim_samples_follow_the_exact_finite_step_law(steps, eta, kind):
    s = make_schedule("linear", 1000)
    x = ddim(ExactGaussian(MU, COV, s.alpha_bar, kind), s, (4000, 2), steps=steps, eta=eta, kind=kind,
             generator=torch.Generator().manual_seed(0))
    m, P = _exact_law(s, ddpm_timesteps(1000, steps).tolist(), eta)
    z_mean, z_cov = moment_z_scores(x, m, P)
    assert z_mean.max() < 4 and z_cov.max() < 4


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_ddim_law_converges_to_the_data_at_first_order(name):
    # DDIM is an Euler step of the probability-flow ODE: each step shrinks the variance by
    # O(h²), so the covariance error is O(1/S) (10 steps: ~25-40 %, 1000 steps: < 1 %)
    s = make_schedule(name, 1000)
    err = {}
    for steps in (10, 50, 250, 1000):
        m, P = _exact_law(s, ddpm_timesteps(1000, steps).tolist(), 0.0)
        err[steps] = float(((P - COV).abs() / COV).max())
        assert (m - MU).abs().max() < 4e-3  # x_T ~ N(0, I) ignores sqrt(ᾱ_T)·mu ≈ 0.006·mu
    assert err[1000] < 0.01
    for coarse, fine in ((10, 50), (50, 250), (250, 1000)):
        assert 0.6 * coarse / fine < err[fine] / err[coarse] < 1.5 * coarse / fine


def test_eta_zero_is_deterministic():
    s = make_schedule("cosine", 1000)
    model = ExactGaussian(MU, COV, s.alpha_bar)
    x_T = torch.randn(16, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def run(seed, eta=0.0):
        return ddim(model, s, (16, 2), steps=20, x_T=x_T, eta=eta, generator=torch.Generator().manual_seed(seed))

    a, b, c = run(2), run(3), run(3, eta=0.3)
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_eta_one_on_every_step_is_ddpm_with_posterior_variance():
    # σ_t² = (1 − ᾱ_{t−1})/(1 − ᾱ_t)·β_t = β̃_t and the same mean: the same draws give the same path
    s = make_schedule("linear", 1000)
    model = ExactGaussian(MU, COV, s.alpha_bar)
    x_T = torch.randn(8, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = ddim(model, s, (8, 2), steps=1000, eta=1.0, x_T=x_T, generator=g1)
    b = sample_ddpm(denoiser(model, s), x_T, ddpm_grid(1000), variance="posterior", generator=g2)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_inversion_then_sampling_returns_the_start():
    s = make_schedule("cosine", 1000)
    model = ExactGaussian(MU, COV, s.alpha_bar)
    z = torch.randn(100, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    x0 = MU + z @ torch.linalg.cholesky(COV).T
    err = {}
    for steps in (50, 200, 1000):
        traj = Trajectory(x0)
        x_T = ddim_invert(denoiser(model, s), x0, ddpm_grid(1000, steps), callback=traj)
        assert len(traj.xs) == steps + 1 and torch.equal(traj.xs[0], x0) and torch.equal(traj.xs[-1], x_T)
        back = ddim(model, s, (100, 2), steps=steps, x_T=x_T)
        err[steps] = float((back - x0).abs().max())
    # first-order round-trip error: a quarter of the steps size gives about 4x the error
    assert err[1000] < 0.02 and err[200] < err[50] / 2.5 and err[1000] < err[200] / 2.5


@pytest.mark.parametrize("steps", [10, 50])
def test_ddim_recovers_mixture_weights(steps):
    s = make_schedule("cosine", 1000)
    means = torch.tensor([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]])
    weights = torch.tensor([0.5, 0.3, 0.2])
    model = ExactMixture(means, torch.tensor([0.3, 0.2, 0.4]), weights, s.alpha_bar)
    N = 4000
    traj = Trajectory()
    x = ddim(model, s, (N, 2), steps=steps, generator=torch.Generator().manual_seed(7), callback=traj)
    assert len(traj.xs) == steps and model.calls == steps
    freq = torch.bincount(torch.cdist(x, means.double()).argmin(1), minlength=3).double() / N
    assert ((freq - weights.double()).abs() < 4 * (weights * (1 - weights) / N).sqrt()).all()


def test_bad_input():
    s = make_schedule("linear", 100)
    model = ExactGaussian(MU, COV, s.alpha_bar)
    with pytest.raises(ValueError, match="eta must lie in"):
        ddim(model, s, (4, 2), eta=1.5)
    with pytest.raises(ValueError, match="strictly increasing"):
        ddim(model, s, (4, 2), timesteps=torch.tensor([0, 50, 50, 99]))
    with pytest.raises(ValueError, match=r"in 0..99"):
        ddim_invert(denoiser(model, s), torch.zeros(4, 2, dtype=torch.float64), ddpm_grid(100, timesteps=[0, 100]))
    with pytest.raises(ValueError, match="steps must be an int in 1..T=100"):
        ddpm_timesteps(100, 101)
    with pytest.raises(ValueError, match="spacing.*uniform, quadratic"):
        ddpm_timesteps(100, 10, "cubic")
    with pytest.raises(ValueError, match="shape"):
        ddim(lambda x, t: x.sum(1), s, (4, 2))
    assert math.isfinite(float(ddim(model, s, (4, 2), timesteps=[3, 40, 99]).sum()))
