"""The SDEs against their own mathematics: marginals vs drift/diffusion, priors, DDPM, DSM, the denoiser."""

from __future__ import annotations

import math

import pytest
import torch

from minidit.denoiser import Denoiser, convert
from minidit.edm import EDMProcess
from minidit.flow import FlowProcess
from minidit.guidance import guided
from minidit.process import Process
from minidit.schedules import make_schedule
from minidit.sde import CosineVP, SigmoidVP, SubVPSDE, VESDE, VPSDE, dsm_loss, make_sde
from minidit.toy import GaussianMixture, mixture_denoiser

SDE = Process  # the interface every process shares


PROCESSES = [VPSDE(), SubVPSDE(), VESDE(), VESDE(sigma_min=0.05, sigma_max=10.0), FlowProcess(), CosineVP(),
             SigmoidVP(), make_schedule("cosine", 1000).process, EDMProcess()]
IDS = ["vp", "subvp", "ve", "ve-small", "flow", "cosine", "sigmoid", "ddpm-table", "edm"]


def mixture(dtype=torch.float64) -> GaussianMixture:
    means = torch.tensor([[-2.0, 0.0], [1.5, 1.0], [0.5, -1.5]])
    return GaussianMixture(torch.tensor([0.3, 0.5, 0.2]), means, torch.tensor([0.5, 0.3, 0.4])).to(dtype=dtype)


def test_make_sde_names_and_arguments():
    assert isinstance(make_sde("vp"), VPSDE) and isinstance(make_sde("subvp"), SubVPSDE)
    assert make_sde("ve", sigma_max=80.0).sigma_max == 80.0
    with pytest.raises(ValueError, match="vp, subvp, ve"):
        make_sde("cosine")
    with pytest.raises(ValueError, match="sigma_min"):
        VESDE(sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ValueError, match="beta_min"):
        VPSDE(beta_min=-1.0)


@pytest.mark.parametrize("sde", PROCESSES, ids=IDS)
def test_derivatives_drift_and_diffusion_match_the_marginal(sde: SDE):
    # alpha', sigma' against central differences; f = (alpha'/alpha) x, g² = d sigma²/dt − 2 (alpha'/alpha) sigma²
    # (the DDPM table's β is constant on each step [i/T, (i+1)/T): its times sit inside a step)
    t, h = torch.linspace(0.05, 0.95, 19, dtype=torch.float64) + 4e-4, 1e-6
    torch.testing.assert_close(sde.d_alpha(t), (sde.alpha(t + h) - sde.alpha(t - h)) / (2 * h), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(sde.d_sigma(t), (sde.sigma(t + h) - sde.sigma(t - h)) / (2 * h), rtol=1e-6, atol=1e-8)
    x = torch.randn(19, 3, dtype=torch.float64)
    f_rate = sde.d_alpha(t) / sde.alpha(t)
    torch.testing.assert_close(sde.drift(x, t), f_rate[:, None] * x)
    g2 = 2 * sde.sigma(t) * sde.d_sigma(t) - 2 * f_rate * sde.sigma(t) ** 2
    torch.testing.assert_close(sde.diffusion(t) ** 2, g2)


@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE(), VESDE(sigma_max=5.0)], ids=["vp", "subvp", "ve"])
def test_simulated_forward_sde_has_the_stated_marginal(sde: SDE):
    # Euler-Maruyama from a point x0 (VE: x0 + sigma_min noise) to t = 0.5: mean alpha x0, std sigma
    gen = torch.Generator().manual_seed(0)
    n, steps, t_end = 10000, 200, 0.5
    x0 = torch.tensor([1.0, -2.0], dtype=torch.float64)
    x = x0.repeat(n, 1) + sde.sigma(0.0).item() * (sde.alpha(0.0) == 1) * torch.randn(n, 2, generator=gen,
                                                                                          dtype=torch.float64)
    dt = t_end / steps
    for i in range(steps):
        t = torch.full((n,), i * dt, dtype=torch.float64)
        x = x + sde.drift(x, t) * dt + sde.diffusion(t)[:, None] * math.sqrt(dt) * torch.randn(
            n, 2, generator=gen, dtype=torch.float64)
    alpha, sigma = sde.alpha(t_end).item(), sde.sigma(t_end).item()
    se = sigma / math.sqrt(n)  # standard error of the mean
    torch.testing.assert_close(x.mean(0), alpha * x0, atol=5 * se + 2e-3 * sigma, rtol=0)
    # std: standard error sigma/sqrt(2n), plus the O(dt) bias of Euler-Maruyama
    torch.testing.assert_close(x.std(0), torch.full((2,), sigma, dtype=torch.float64),
                               atol=5 * sigma / math.sqrt(2 * n) + 0.02 * sigma, rtol=0)


@pytest.mark.parametrize("sde", PROCESSES, ids=IDS)
def test_log_snr_inverse(sde: SDE):
    t = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    torch.testing.assert_close(sde.t_from_log_snr(sde.log_snr(t)), t, atol=1e-9, rtol=0)
    # the closed forms agree with the generic bisection (EDM's time is unbounded: bisect on [0, t_max])
    torch.testing.assert_close(sde.t_from_log_snr(sde.log_snr(t)), Process.t_from_log_snr(sde, sde.log_snr(t)),
                               atol=1e-9, rtol=0)


def test_vp_matches_discrete_ddpm_alpha_bar():
    # DDPM's linear betas 1e-4..0.02 (T = 1000) are the VP SDE's discretisation: ᾱ_i ≈ alpha((i+1)/T)²,
    # and the table's own process holds them exactly at t = (i + 1)/T
    T = 1000
    alpha_bar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, T, dtype=torch.float64), 0)
    t = torch.arange(1, T + 1, dtype=torch.float64) / T
    torch.testing.assert_close(VPSDE().alpha(t) ** 2, alpha_bar, atol=1e-3, rtol=0)
    torch.testing.assert_close(make_schedule("linear", T).process.alpha(t) ** 2, alpha_bar, atol=0, rtol=1e-12)


@pytest.mark.parametrize("sde", PROCESSES, ids=IDS)
def test_prior_sample_and_log_prob(sde: SDE):
    x = sde.prior_noise((4000, 3), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    std = sde.prior_std()
    # variance preserving: N(0, I), DDPM's x_T; otherwise the marginal sigma(t_max) of a point mass
    assert std == 1.0 if isinstance(sde, (VPSDE, CosineVP, SigmoidVP, type(PROCESSES[7]))) else \
        std == pytest.approx(float(sde.sigma(sde.t_max)))
    assert abs(x.std().item() / std - 1) < 5 / math.sqrt(2 * x.numel())
    normal = torch.distributions.Normal(0.0, std)
    torch.testing.assert_close(sde.prior_log_prob(x[:10]), normal.log_prob(x[:10]).sum(1))


@pytest.mark.parametrize("sde", PROCESSES, ids=IDS)
def test_reverse_and_pf_ode_drifts(sde: SDE):
    # f − ½ g² score is the velocity alpha' x̂0 + sigma' ε̂ of the mixture's exact predictions
    den = mixture_denoiser(mixture(), sde, "score")
    x = torch.randn(64, 2, dtype=torch.float64)
    t = torch.rand(64, dtype=torch.float64) * 0.9 + 0.05
    score = den.score(x, t)
    torch.testing.assert_close(sde.pf_ode_drift(x, t, score), mixture_denoiser(mixture(), sde, "velocity").network(x, t))
    g2 = sde.diffusion(t)[:, None] ** 2
    torch.testing.assert_close(sde.reverse_drift(x, t, score), sde.drift(x, t) - g2 * score)


@pytest.mark.parametrize("sde", PROCESSES, ids=IDS)
def test_transition_is_the_exact_forward_step(sde: SDE):
    # x_t = a x_s + G z keeps the marginal: a² sigma_s² + G² = sigma_t², a = alpha_t/alpha_s
    t, dt = torch.tensor([0.5, 0.9], dtype=torch.float64) + 4e-4, 1e-3
    a, G = sde.transition(t, t - dt)
    torch.testing.assert_close(a, sde.alpha(t) / sde.alpha(t - dt))
    torch.testing.assert_close(a**2 * sde.sigma(t - dt) ** 2 + G**2, sde.sigma(t) ** 2)
    # for small steps G² ≈ g² dt
    torch.testing.assert_close(G**2 / dt, sde.diffusion(t - dt / 2) ** 2, rtol=2e-2, atol=0)


@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE(), VESDE()], ids=["vp", "subvp", "ve"])
def test_dsm_loss_with_the_exact_score_of_gaussian_data(sde: SDE):
    # data N(0, s²): at fixed t the exact score gives E‖sigma s + eps‖²/D = alpha² s²/(alpha² s² + sigma²)
    s, n, t0 = 0.7, 200000, 0.3
    gen = torch.Generator().manual_seed(0)
    x0 = s * torch.randn(n, 2, generator=gen, dtype=torch.float64)
    t = torch.full((n,), t0, dtype=torch.float64)
    alpha, sigma = sde.alpha(t0).item(), sde.sigma(t0).item()
    v = alpha**2 * s**2 + sigma**2

    def score(x, t):
        return -x / v

    expected = alpha**2 * s**2 / v
    loss = dsm_loss(score, sde, x0, t=t, generator=gen).item()
    assert abs(loss - expected) < 5 * math.sqrt(2 / n) * expected  # chi-square-like MC error
    # the same loss from an eps-model eps = −sigma·score, and the likelihood weighting = g²/sigma² times it
    eps_model = lambda x, t: -sigma * score(x, t)  # noqa: E731
    gen_a, gen_b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    a = dsm_loss(score, sde, x0[:1000], t=t[:1000], generator=gen_a)
    b = dsm_loss(eps_model, sde, x0[:1000], t=t[:1000], prediction="eps", generator=gen_b)
    torch.testing.assert_close(a, b)
    c = dsm_loss(score, sde, x0[:1000], t=t[:1000], weighting="likelihood", generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(c, a * sde.diffusion(t0).item() ** 2 / sigma**2)


def test_dsm_loss_samples_t_and_rejects_bad_arguments():
    sde, x0 = VPSDE(), torch.randn(8, 2)
    seen = []
    dsm_loss(lambda x, t: seen.append(t) or torch.zeros_like(x), sde, x0, t_eps=0.2)
    assert seen[0].min() >= 0.2 and seen[0].max() <= 1
    for kwargs, word in [({"weighting": "snr"}, "variance, likelihood"), ({"prediction": "v"}, "score, eps"),
                         ({"reduce": "max"}, "mean, sum"), ({"t_eps": 1.0}, "t_eps")]:
        with pytest.raises(ValueError, match=word):
            dsm_loss(lambda x, t: x, sde, x0, **kwargs)


@pytest.mark.parametrize("sde", PROCESSES, ids=IDS)
def test_prediction_kinds_convert_consistently(sde: SDE):
    x = torch.randn(32, 2, dtype=torch.float64)
    t = torch.rand(32, dtype=torch.float64) * 0.9 + 0.05
    exact = {k: mixture_denoiser(mixture(), sde, k).network(x, t) for k in ("score", "eps", "x0", "v", "velocity")}
    for src in exact:
        for dst in exact:
            torch.testing.assert_close(convert(exact[src], src, dst, x, t, sde), exact[dst])
    torch.testing.assert_close(exact["score"], -exact["eps"] / sde.sigma(t)[:, None])


def test_ddpm_network_on_every_process_through_its_table():
    # a "DDPM network" that is the exact prediction of its table's process at its (fractional) step
    # τ = T·t − 1, viewed on the VP, VE, sub-VP and flow processes, must give each process's exact
    # prediction: the view matches the log-SNR and rescales the input to the table's x
    T = 1000
    table = make_schedule("linear", T).process
    mix = mixture()

    def exact_ddpm(kind):
        return lambda x, tau: mixture_denoiser(mix, table, kind).network(x, (tau + 1) / T)

    for sde in (VPSDE(), VESDE(), SubVPSDE(), FlowProcess()):
        x = torch.randn(16, 2, dtype=torch.float64) * 3
        t = torch.linspace(0.1, 0.6, 16, dtype=torch.float64)
        for kind in ("eps", "x0", "v"):
            den = Denoiser(exact_ddpm(kind), kind, table, time_scale=T, time_shift=-1.0).on(sde)
            for dst in ("eps", "x0", "score", "velocity"):
                torch.testing.assert_close(den(x, t).as_kind(dst), mixture_denoiser(mix, sde, dst).network(x, t))
    # the linear table's process stays within 0.07 of the VP SDE's log-SNR (its β_i are DDPM's)
    tt = torch.linspace(0.01, 1.0, 100, dtype=torch.float64)
    assert (table.log_snr(tt) - VPSDE().log_snr(tt)).abs().max() < 0.1
    # on its own process, step i of the table is time (i + 1)/T and the network reads i exactly
    seen = []
    den = Denoiser(lambda x, tau: seen.append(tau) or x, "eps", table, time_scale=T, time_shift=-1.0)
    den(torch.zeros(3, 2), torch.tensor(42 / T, dtype=torch.float64))
    assert seen[0].tolist() == [41.0, 41.0, 41.0]


def test_network_output_time_scale_and_learned_sigma():
    calls = []

    def model(x, t, y=None):
        calls.append((t.clone(), y))
        return torch.cat([x, x], dim=1)  # [B, 2C]: eps and a variance

    den = Denoiser(model, "eps", VPSDE(), time_scale=1000.0, learned_sigma=True)
    out = den.network_output(torch.ones(3, 2), torch.full((3,), 0.25))
    assert out.shape == (3, 2) and torch.allclose(calls[0][0], torch.full((3,), 250.0))
    den.network_output(torch.ones(3, 2), torch.tensor(0.5, dtype=torch.float64), torch.tensor([1, 2, 3]))
    assert torch.equal(calls[1][0], torch.full((3,), 500.0)) and calls[1][1].tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match="time_scale"):
        Denoiser(model, "eps", VPSDE(), time_scale=0)


def test_guidance_is_one_batched_call():
    calls = []

    def fn(x, t, y):
        calls.append(x.shape[0])
        return x + y[:, None].to(x)  # "prediction" label-dependent

    x, t, y = torch.zeros(4, 2), torch.full((4,), 0.5), torch.tensor([1, 2, 3, 4])
    den = Denoiser(fn, "eps", VPSDE())
    out = guided(den, y, cfg_scale=3.0, null_label=10).network_output(x, t)
    assert calls == [8]  # one call on the doubled batch
    torch.testing.assert_close(out, (10 + 3.0 * (y - 10.0))[:, None].expand(4, 2))
    with pytest.raises(ValueError, match="null_label"):
        guided(den, y, cfg_scale=3.0)
    with pytest.raises(ValueError, match="labels y"):
        guided(den, None, cfg_scale=2.0)


def test_denoiser_checks_kind_and_outputs():
    with pytest.raises(ValueError, match="valid kinds"):
        Denoiser(lambda x, t: x, "noise", VPSDE())
    den = Denoiser(lambda x, t: x[:, :1], "eps", VPSDE())
    den.step = 7
    with pytest.raises(ValueError, match=r"shape \(4, 1\).*step 7"):
        den.score(torch.zeros(4, 2), torch.full((4,), 0.5))
    # NaN is remembered on the device and reported once, with the step where it first appeared
    den = Denoiser(lambda x, t: x * (torch.nan if int(t[0] * 10) == 3 else 1.0), "eps", VPSDE())
    for step in range(6):
        den.step = step
        den(torch.ones(2, 2), torch.tensor(step / 10, dtype=torch.float64) + 0.05)
    with pytest.raises(ValueError, match="NaN or inf at step 3"):
        den.check_finite()


def test_a_ddpm_network_refuses_log_snr_outside_its_table():
    # sub-VP's log-SNR near t = 0 is far above the linear table's first step (β_0 = 1e-4): the
    # table's process cannot map it to a step, so the view refuses instead of clamping to step 0
    T = 1000
    table = make_schedule("linear", T).process
    seen = []
    den = Denoiser(lambda x, tau: seen.append(tau) or x, "eps", table, time_scale=T, time_shift=-1.0)
    view = den.on(SubVPSDE())
    x = torch.zeros(4, 2, dtype=torch.float64)
    lam_first = float(table.log_snr(1.0 / T))
    t_inside = float(SubVPSDE().t_from_log_snr(torch.tensor(lam_first - 0.5, dtype=torch.float64)))
    t_outside = float(SubVPSDE().t_from_log_snr(torch.tensor(lam_first + 0.5, dtype=torch.float64)))
    view(x, t_inside)  # inside the table: fine
    assert 0.0 <= float(seen[-1][0]) < 1.0
    for t in (t_outside, torch.tensor([t_inside, t_outside], dtype=torch.float64)):
        with pytest.raises(ValueError, match="log-SNR"):
            view(x if isinstance(t, float) else x[:2], t)
    # the far end: beyond the table's last step (pure noise side)
    lam_last = float(table.log_snr(1.0))
    t_beyond = math.exp(-(lam_last - 1.0) / 2)  # EDM: sigma = t, log-SNR = −2 log t
    with pytest.raises(ValueError, match="log-SNR"):
        den.on(EDMProcess())(x, t_beyond)
    # the table's own ends are inside (round-off of the grid must not trip it)
    for t in (1.0 / T, 1.0):
        den.on(VPSDE())(x, float(VPSDE().t_from_log_snr(table.log_snr(t))))
