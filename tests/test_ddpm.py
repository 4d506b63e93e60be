"""DDPM against its mathematics: the closed-form forward process against iteration, the
posterior against Bayes' rule, samplers driven by exact predictors, and the variational
bound against its expected value and the entropy of the data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _exact_models import ExactGaussian, ExactMixture, moment_z_scores

from minidit.ddpm import GaussianDiffusion, p_sample_step, sample_ddpm
from minidit.denoiser import Denoiser
from minidit.grids import Trajectory, ddpm_grid
from minidit.schedules import make_schedule


def denoiser(model, schedule, kind="eps"):
    """A DDPM network on its table's process: step t at time (t + 1)/T, network time T·t − 1."""
    return Denoiser(model, kind, schedule.process, time_scale=schedule.T, time_shift=-1.0)


def ancestral(model, schedule, shape, kind="eps", seed=0, **options):
    """DDPM's Algorithm 2 over all T steps from x_T ~ N(0, I)."""
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return sample_ddpm(denoiser(model, schedule, kind), x_T, ddpm_grid(schedule.T),
                       generator=torch.Generator().manual_seed(seed + 1), **options)

MU = torch.tensor([0.5, -1.0], dtype=torch.float64)
COV = torch.tensor([[0.5, 0.3], [0.3, 0.4]], dtype=torch.float64)


def test_q_sample_matches_iterating_the_one_step_kernel():
    # x_s = sqrt(α_s)·x_{s−1} + sqrt(β_s)·z, iterated; moments within 4 standard errors of
    # the closed form N(sqrt(ᾱ_t)·x0, 1 − ᾱ_t) and of q_sample's own draws
    d = GaussianDiffusion(make_schedule("linear", 1000))
    s, g, N = d.schedule, torch.Generator().manual_seed(0), 8000
    x0 = torch.tensor([-1.0, 0.3, 2.0], dtype=torch.float64).repeat(N, 1)  # [N, 3]
    x, checks = x0.clone(), {0: None, 9: None, 99: None, 999: None}
    for step in range(1000):
        z = torch.randn(x.shape, generator=g, dtype=torch.float64)
        x = s.alphas[step].sqrt() * x + s.betas[step].sqrt() * z
        if step in checks:
            checks[step] = x.clone()
    for step, x_iter in checks.items():
        t = torch.full((N,), step)
        mean, var, log_var = d.q_mean_variance(x0, t)
        torch.testing.assert_close(var[0, 0], 1 - s.alpha_bar[step])
        torch.testing.assert_close(log_var.exp(), var)
        for draws in (x_iter, d.q_sample(x0, t, generator=g)):
            se_mean = (var[0, 0] / N).sqrt()
            se_var = var[0, 0] * math.sqrt(2 / (N - 1))
            assert ((draws.mean(0) - mean[0]).abs() < 4 * se_mean).all()
            assert ((draws.var(0) - var[0, 0]).abs() < 4 * se_var).all()


def test_posterior_is_bayes_rule_for_gaussians():
    # joint of (x_{t−1}, x_t) given x0: x_{t−1} ~ N(sqrt(ᾱ_{t−1}) x0, P),
    # x_t = sqrt(α_t) x_{t−1} + sqrt(β_t) z;
    # condition the joint Gaussian: mean += Cov/Var·(x_t − E x_t), var = P − Cov²/Var
    for name in ("linear", "cosine"):
        d = GaussianDiffusion(make_schedule(name, 1000))
        s, T = d.schedule, 1000
        g = torch.Generator().manual_seed(1)
        x0 = torch.randn(T, 5, generator=g, dtype=torch.float64)
        xt = torch.randn(T, 5, generator=g, dtype=torch.float64)
        t = torch.arange(T)
        P = (1 - s.alpha_bar_prev).unsqueeze(1)  # Var(x_{t−1} | x0)
        cov = s.alphas.sqrt().unsqueeze(1) * P  # Cov(x_{t−1}, x_t | x0)
        var_xt = s.alphas.unsqueeze(1) * P + s.betas.unsqueeze(1)  # Var(x_t | x0)
        residual = xt - s.sqrt_alpha_bar.unsqueeze(1) * x0  # x_t − E[x_t | x0]
        bayes_mean = s.alpha_bar_prev.sqrt().unsqueeze(1) * x0 + cov / var_xt * residual
        bayes_var = P - cov**2 / var_xt
        mean, var, log_var = d.q_posterior_mean_variance(x0, xt, t)
        torch.testing.assert_close(mean, bayes_mean, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(var, bayes_var, rtol=1e-9, atol=1e-15)
        torch.testing.assert_close(log_var[1:].exp(), bayes_var[1:], rtol=1e-9, atol=0)
        torch.testing.assert_close(log_var[0].exp(), var[1])  # clipped at t = 0 (the posterior is a point)


@pytest.mark.parametrize("kind", ["eps", "x0", "v"])
def test_p_sample_step_is_algorithm_2(kind):
    s = make_schedule("cosine", 1000)
    d = GaussianDiffusion(s, prediction=kind)
    eps_model = ExactGaussian(MU, COV, s.alpha_bar, "eps")
    g = torch.Generator().manual_seed(2)
    t = torch.randint(0, 1000, (256,), generator=g)
    xt = torch.randn(256, 2, generator=g, dtype=torch.float64)
    z = torch.randn(256, 2, generator=g, dtype=torch.float64)
    eps = eps_model(xt, t)
    beta, ab = s.betas[t].unsqueeze(1), s.alpha_bar[t].unsqueeze(1)
    algorithm_2 = (xt - beta / (1 - ab).sqrt() * eps) / (1 - beta).sqrt()  # [DDPM, Alg. 2 line 4]
    den = denoiser(ExactGaussian(MU, COV, s.alpha_bar, kind), s, kind)
    time = s.time(t)  # step t at (t + 1)/T, one per sample
    torch.testing.assert_close(den(xt, time).eps, eps, rtol=1e-8, atol=1e-9)
    for variance, expected in (("beta", s.betas), ("posterior", d.posterior_variance)):
        mean = p_sample_step(den, xt, time, time - 1 / s.T, variance=variance, noise=torch.zeros_like(z))
        noisy = p_sample_step(den, xt, time, time - 1 / s.T, variance=variance, noise=z)
        torch.testing.assert_close(mean, algorithm_2, rtol=1e-8, atol=1e-9)
        # σ_t z with σ_t² = β_t or β̃_t, and no noise on the step to the data (t = 0)
        sigma = torch.where(t > 0, expected[t], 0.0).sqrt().unsqueeze(1)
        torch.testing.assert_close(noisy - mean, sigma * z, rtol=1e-7, atol=1e-10)


def test_training_loss_of_the_exact_predictor():
    # at fixed t the optimal ε-loss is E‖ε − E[ε|x_t]‖²/D = 1 − (1 − ᾱ)·tr(C⁻¹)/D, C = ᾱΣ + (1 − ᾱ)I
    s = make_schedule("linear", 1000)
    d = GaussianDiffusion(s)
    model = ExactGaussian(MU, COV, s.alpha_bar)
    g, N = torch.Generator().manual_seed(3), 20000
    x0 = MU + torch.randn(N, 2, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(COV).T
    for step in (0, 100, 400, 999):
        t = torch.full((N,), step)
        out = d.training_losses(model, x0, t=t, generator=g)
        assert out["loss"].shape == (N,) and torch.equal(out["t"], t)
        ab = s.alpha_bar[step]
        optimum = 1 - (1 - ab) * torch.linalg.inv(ab * COV + (1 - ab) * torch.eye(2)).trace() / 2
        se = out["loss"].std() / math.sqrt(N)
        assert abs(out["loss"].mean() - optimum) < 4 * se


def test_equivalent_weighting_makes_targets_agree():
    s = make_schedule("cosine", 1000)
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(64, 2, generator=g, dtype=torch.float64)
    t = torch.randint(0, 1000, (64,), generator=g)
    eps = torch.randn(64, 2, generator=g, dtype=torch.float64)
    wrong = torch.zeros(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64)  # a suboptimal model
    base_model = ExactGaussian(*wrong, s.alpha_bar, "eps")
    base = GaussianDiffusion(s, "eps").training_losses(base_model, x0, t=t, eps=eps)
    for kind in ("x0", "v"):
        d = GaussianDiffusion(s, prediction=kind, weighting="eps_equivalent")
        out = d.training_losses(ExactGaussian(*wrong, s.alpha_bar, kind), x0, t=t, eps=eps)
        torch.testing.assert_close(out["loss"], base["loss"], rtol=1e-7, atol=1e-10)
        torch.testing.assert_close(out["loss"], out["weight"] * out["mse"])
    t_drawn = GaussianDiffusion(s).training_losses(ExactGaussian(MU, COV, s.alpha_bar), x0, generator=g)["t"]
    assert t_drawn.dtype == torch.long and 0 <= int(t_drawn.min()) and int(t_drawn.max()) < 1000


@pytest.mark.parametrize("kind,variance", [("eps", "beta"), ("v", "posterior"), ("x0", "beta")])
def test_ancestral_sampler_recovers_a_gaussian(kind, variance):
    s = make_schedule("linear", 1000)
    d = GaussianDiffusion(s, prediction=kind)
    x = ancestral(ExactGaussian(MU, COV, s.alpha_bar, kind), s, (4000, 2), kind, seed=6, variance=variance)
    z_mean, z_cov = moment_z_scores(x, MU, COV)
    assert z_mean.max() < 4 and z_cov.max() < 4


def test_ancestral_sampler_recovers_mixture_weights():
    s = make_schedule("cosine", 1000)
    means = torch.tensor([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]])
    weights = torch.tensor([0.5, 0.3, 0.2])
    model = ExactMixture(means, torch.tensor([0.3, 0.2, 0.4]), weights, s.alpha_bar)
    N = 2000
    traj = Trajectory()
    x = ancestral(model, s, (N, 2), seed=7, callback=traj)
    assert len(traj.xs) == 1000 and torch.equal(traj.xs[-1], x) and model.calls == 1000
    component = torch.cdist(x, means.double()).argmin(1)  # components are > 5 std apart
    freq = torch.bincount(component, minlength=3).double() / N
    assert ((freq - weights.double()).abs() < 4 * (weights * (1 - weights) / N).sqrt()).all()


def test_bad_input():
    s = make_schedule("linear", 100)
    d = GaussianDiffusion(s)
    x = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="shape"):
        d.training_losses(lambda x, t: x[:, :1], x)
    with pytest.raises(ValueError, match=r"t must lie in 0..99"):
        d.q_sample(x, torch.tensor([0, 1, 2, 100]))
    with pytest.raises(ValueError, match=r"t must have shape \[B\]"):
        d.q_sample(x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="variance.*beta, posterior"):
        ancestral(ExactGaussian(MU, COV, s.alpha_bar), s, (4, 2), variance="learned")
    with pytest.raises(ValueError, match="prediction.*eps, x0, v"):
        GaussianDiffusion(s, prediction="score")
    with pytest.raises(ValueError, match="weighting"):
        GaussianDiffusion(s, weighting="p2")
    with pytest.raises(ValueError, match="variance.*beta, posterior"):
        d.vb_terms(ExactGaussian(MU, COV, s.alpha_bar), x, x, torch.zeros(4).long(), variance="learned")


# ----------------------------------------------------------------------------------
# The variational bound on 8-bit data quantised from N(0, S²)
# ----------------------------------------------------------------------------------

S = 0.2  # data std in [−1, 1] units; ±5 S stays inside [−1, 1], so the edge bins hold ~0 mass
K = torch.arange(256, dtype=torch.float64)
CENTERS = K / 127.5 - 1  # the 8-bit grid in [−1, 1], bin width Δ = 2/255
_LO = torch.where(K == 0, -math.inf, CENTERS - 1 / 255)
_HI = torch.where(K == 255, math.inf, CENTERS + 1 / 255)
PMF = torch.special.ndtr(_HI / S) - torch.special.ndtr(_LO / S)  # P(bin k)
ENTROPY_BITS = float(-(PMF * PMF.clamp_min(1e-300).log2()).sum())  # H of the discrete data
V0 = float((PMF * CENTERS**2).sum())  # its variance (mean 0): S² + Δ²/12 up to tiny terms


def _quantised_data(n: int, d: int, g: torch.Generator) -> torch.Tensor:
    x = S * torch.randn(n, d, generator=g, dtype=torch.float64)
    return ((x + 1) * 127.5).round().clamp(0, 255) / 127.5 - 1


def _expected_vlb_nats(schedule, variance: str) -> tuple[torch.Tensor, float, float]:
    """E[L_t] per dim for t ≥ 1 (entry 0 holds E[L_0]), and E[L_T], in nats; written from the
    formulas, with the predictor x̂0 = a_t·x_t, a_t = sqrt(ᾱ)V0/(ᾱV0 + 1 − ᾱ).

    E KL = ½[log(σ²/β̃) + β̃/σ² − 1] + ½ c1² E(x0 − x̂0)²/σ², with E(x0 − a x_t)² =
    (1 − a sqrt(ᾱ))² V0 + a²(1 − ᾱ); L_0 by Gauss-Hermite quadrature over the noise.
    """
    ab, ab_prev, beta = schedule.alpha_bar, schedule.alpha_bar_prev, schedule.betas
    beta_tilde = beta * (1 - ab_prev) / (1 - ab)
    sigma2 = beta.clone() if variance == "beta" else torch.cat([beta_tilde[1:2], beta_tilde[1:]])
    c1 = beta * ab_prev.sqrt() / (1 - ab)
    a = ab.sqrt() * V0 / (ab * V0 + 1 - ab)
    mse = (1 - a * ab.sqrt()) ** 2 * V0 + a**2 * (1 - ab)
    L = 0.5 * (torch.log(sigma2 / beta_tilde) + beta_tilde / sigma2 - 1) + 0.5 * c1**2 * mse / sigma2
    z, w = np.polynomial.hermite_e.hermegauss(80)
    z, w = torch.tensor(z), torch.tensor(w) / math.sqrt(2 * math.pi)
    x1 = ab[0].sqrt() * CENTERS[:, None] + (1 - ab[0]).sqrt() * z[None, :]  # [256, Q]
    mean, sd = a[0] * x1, sigma2[0].sqrt()
    upper = torch.where(K[:, None] == 255, math.inf, (CENTERS[:, None] + 1 / 255 - mean) / sd)
    lower = torch.where(K[:, None] == 0, -math.inf, (CENTERS[:, None] - 1 / 255 - mean) / sd)
    mass = (torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp_min(1e-300)
    L[0] = -(PMF[:, None] * w[None, :] * mass.log()).sum()
    prior = 0.5 * (-math.log(1 - ab[-1]) + (1 - ab[-1]) + ab[-1] * V0 - 1)
    return L, float(prior), float(L.sum() + prior)


def test_decoder_is_a_distribution_over_the_256_bins():
    d = GaussianDiffusion(make_schedule("linear", 1000))
    model = lambda x, t: torch.full_like(x, 0.7)  # noqa: E731 any fixed prediction
    x0 = CENTERS.unsqueeze(1)  # [256, 1]: every bin once
    xt = torch.full_like(x0, 0.3)
    bits = d.vb_terms(model, x0, xt, torch.zeros(256, dtype=torch.long), variance="beta")
    total_mass = (2.0 ** (-bits)).sum()
    torch.testing.assert_close(total_mass, torch.tensor(1.0, dtype=torch.float64), rtol=1e-6, atol=0)


@pytest.mark.parametrize("variance", ["beta", "posterior"])
def test_vb_terms_match_their_expectations(variance):
    s = make_schedule("linear", 1000)
    d = GaussianDiffusion(s)
    model = ExactGaussian(torch.zeros(1), torch.full((1, 1), V0), s.alpha_bar)
    L, prior, _ = _expected_vlb_nats(s, variance)
    g, n = torch.Generator().manual_seed(8), 16384
    x0 = _quantised_data(n, 1, g)
    for step in (0, 1, 10, 300, 999):
        t = torch.full((n,), step)
        bits = d.vb_terms(model, x0, d.q_sample(x0, t, generator=g), t, variance=variance)
        assert abs(bits.mean() - L[step] / math.log(2)) < 4 * bits.std() / math.sqrt(n) + 1e-12, step
    torch.testing.assert_close(d.prior_bpd(x0).mean(), torch.tensor(prior / math.log(2), dtype=torch.float64))


def test_bits_per_dim_of_the_exact_predictor():
    """The bound of the exact predictor at T = 1000, against its expectation and the entropy.

    Entropy of the 8-bit data: H = −Σ p_k log2 p_k ≈ h(X) + log2(127.5), h = ½ log2(2πe S²)
    (bins of width Δ = 1/127.5; the approximation is good to O(Δ²/S²)). The bound must hold,
    E[L_vlb] ≥ −E log p_θ(x0) ≥ H, and with σ_t² = β_t it is tight: its slack is
    Σ_t KL(true reverse kernel ‖ model kernel), whose continuous-data value here is ≈ 0.01
    bits/dim, plus ≤ 0.01 from the discretised decoder (its σ_0 ≈ Δ): tolerance 0.03.
    σ_t² = β̃_t is ≈ 0.6 bits/dim looser (β̃_1 = β_1/2 badly underestimates the first steps).
    """
    assert abs(ENTROPY_BITS - (0.5 * math.log2(2 * math.pi * math.e * S**2) + math.log2(127.5))) < 1e-3
    s = make_schedule("linear", 1000)
    d = GaussianDiffusion(s)
    model = ExactGaussian(torch.zeros(64), V0 * torch.eye(64), s.alpha_bar)
    x0 = _quantised_data(64, 64, torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(10)
    out = d.bits_per_dim(model, x0, generator=g, progress=False)  # the default variance is the tight one
    assert out["terms"].shape == (64, 1000)
    torch.testing.assert_close(out["total"], out["terms"].sum(1) + out["prior"])
    _, _, expected = _expected_vlb_nats(s, "beta")
    expected_bits = expected / math.log(2)
    assert abs(out["total"].mean() - expected_bits) < 4 * out["total"].std() / 8
    assert ENTROPY_BITS <= expected_bits <= ENTROPY_BITS + 0.03
    assert _expected_vlb_nats(s, "posterior")[2] / math.log(2) > expected_bits + 0.3
