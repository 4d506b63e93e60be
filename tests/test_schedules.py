"""Noise schedules: endpoints, monotonicity, the cumulative product, the agreement of the discrete
tables with the continuous-time curves they come from, and the table's own process."""

from __future__ import annotations

import math

import pytest
import torch

from minidit.schedules import SCHEDULES, DiscreteSchedule, extract, make_schedule


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("T", [1000, 250])
def test_tables_are_consistent_and_monotone(name, T):
    s = make_schedule(name, T)
    assert s.T == T and s.betas.dtype == torch.float64 and s.alpha_bar.shape == (T,)
    assert bool(((s.betas > 0) & (s.betas < 1)).all())
    # ᾱ_t = ∏ α_s, checked against a plain running product
    running, expected = 1.0, []
    for a in s.alphas.tolist():
        running *= a
        expected.append(running)
    torch.testing.assert_close(s.alpha_bar, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)
    torch.testing.assert_close(s.alpha_bar_prev[1:], s.alpha_bar[:-1])
    assert s.alpha_bar_prev[0] == 1.0
    one = s.sqrt_alpha_bar**2 + s.sqrt_one_minus_alpha_bar**2
    torch.testing.assert_close(one, torch.ones(T, dtype=torch.float64))
    # endpoints: almost all signal after the first step, almost none after the last
    assert s.alpha_bar[0] > 0.99 and s.alpha_bar[-1] < 1e-4
    assert bool((s.alpha_bar[1:] < s.alpha_bar[:-1]).all())
    t = torch.arange(T)
    assert bool((s.log_snr(t)[1:] < s.log_snr(t)[:-1]).all())
    torch.testing.assert_close(s.snr(t), s.alpha_bar / (1 - s.alpha_bar))
    torch.testing.assert_close(s.log_snr(t), s.snr(t).log())


@pytest.mark.parametrize("T", [1000, 250, 50])
def test_linear_endpoints_scale_with_T(T):
    s = make_schedule("linear", T)
    # T·β spans [0.1, 20] for every T, i.e. DDPM's [1e-4, 0.02] at T = 1000
    torch.testing.assert_close(s.betas[[0, -1]] * T, torch.tensor([0.1, 20.0], dtype=torch.float64))
    # Σ β = ∫_0^1 β(s) ds exactly (linspace mean), so −log ᾱ_{T−1} differs from the continuous
    # (β_min + β_max)/2 only by the second-order term Σ β²/2 ≈ (β_max³ − β_min³)/(6T(β_max − β_min))
    second_order = (20.0**3 - 0.1**3) / (6 * T * (20.0 - 0.1))
    gap = -math.log(s.alpha_bar[-1]) - (0.1 + 20.0) / 2
    assert 0.0 < gap < 1.3 * second_order


@pytest.mark.parametrize("name", ["cosine", "sigmoid"])
def test_discrete_matches_continuous_exactly_for_closed_form_schedules(name):
    # β_i = 1 − ᾱ((i+1)/T)/ᾱ(i/T) telescopes: ᾱ_discrete[i] = ᾱ((i+1)/T) until β hits the 0.999 clip
    T = 1000
    s = make_schedule(name, T)
    t = (torch.arange(T, dtype=torch.float64) + 1) / T
    unclipped = s.betas < 0.999
    continuous = SCHEDULES[name]().alpha_bar(t)
    torch.testing.assert_close(s.alpha_bar[unclipped], continuous[unclipped], rtol=1e-9, atol=1e-15)
    assert unclipped[:-1].all()  # only the last step may be clipped


def test_linear_discrete_close_to_vp_sde():
    # log(1 − β) = −β − β²/2 − ..., so the discrete log-SNR sits below the continuous one by
    # at most Σβ²/2 ≈ 0.067 at T = 1000 (plus a rounding of the β-grid at the first steps)
    T = 1000
    s = make_schedule("linear", T)
    c = SCHEDULES["linear"]()
    t = (torch.arange(T, dtype=torch.float64) + 1) / T
    assert (s.alpha_bar - c.alpha_bar(t)).abs().max() < 1e-3
    assert (s.log_snr(torch.arange(T)) - c.log_snr(t)).abs().max() < 0.1


@pytest.mark.parametrize("name", SCHEDULES)
def test_continuous_view(name):
    c = SCHEDULES[name]()
    t = torch.linspace(0.0, 0.99, 100, dtype=torch.float64)
    torch.testing.assert_close(c.alpha(t) ** 2 + c.sigma(t) ** 2, torch.ones_like(t))
    assert abs(float(c.alpha(0.0)) - 1.0) < 1e-12
    lam = c.log_snr(t[1:])
    assert bool((lam[1:] < lam[:-1]).all())
    # β(t) = −d log ᾱ / dt, checked by central differences
    tt, h = torch.linspace(0.05, 0.95, 19, dtype=torch.float64), 1e-6
    numeric = -(c.alpha_bar(tt + h).log() - c.alpha_bar(tt - h).log()) / (2 * h)
    torch.testing.assert_close(c.beta(tt), numeric, rtol=1e-6, atol=0)
    # closed-form inverse of the log-SNR
    torch.testing.assert_close(c.t_from_log_snr(c.log_snr(tt)), tt, rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", SCHEDULES)
def test_the_table_is_T_samples_of_its_process(name):
    # step i of the table is the process at t = (i + 1)/T, and its log-SNR inverts there exactly
    T = 1000
    s = make_schedule(name, T)
    t = s.time(torch.arange(T))
    torch.testing.assert_close(s.process.alpha(t) ** 2, s.alpha_bar, rtol=1e-12, atol=0)
    torch.testing.assert_close(s.process.log_snr(t), s.log_snr(torch.arange(T)), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s.process.t_from_log_snr(s.log_snr(torch.arange(T))), t, rtol=0, atol=1e-12)
    # between the steps log ᾱ is linear in t, so β(t) is constant on each step: −T log(1 − β_i)
    mid = t - 0.5 / T
    torch.testing.assert_close(s.process.beta(mid), -T * torch.log1p(-s.betas))
    torch.testing.assert_close(s.process.alpha(mid) ** 2, (s.alpha_bar * s.alpha_bar_prev).sqrt())
    # and the table's time of its first step is where continuous samplers stop by default
    assert s.process.t_eps == 1 / T and float(s.process.alpha(0.0)) == 1.0


def test_extract_broadcasts_in_x_dtype_and_device():
    s = make_schedule("cosine", 100)
    x = torch.zeros(3, 2, 4, 4, dtype=torch.float32)
    t = torch.tensor([0, 50, 99])
    out = extract(s.alpha_bar, t, x)
    assert out.shape == (3, 1, 1, 1) and out.dtype == torch.float32
    torch.testing.assert_close(out.flatten(), s.alpha_bar[t].float())


def test_bad_input():
    with pytest.raises(ValueError, match="linear, cosine, sigmoid"):
        make_schedule("quadratic", 10)
    with pytest.raises(ValueError, match="T"):
        make_schedule("linear", T=0)
    with pytest.raises(ValueError, match="betas"):
        DiscreteSchedule(torch.tensor([0.1, 1.5]))
    s = make_schedule("linear", 10)
    with pytest.raises(ValueError, match=r"t must lie in 0..9"):
        s.snr(torch.tensor([10]))
    with pytest.raises(ValueError, match="integer"):
        s.snr(torch.tensor([1.0]))
    custom = DiscreteSchedule(torch.full((10,), 0.1))  # any betas have a process too
    torch.testing.assert_close(custom.process.alpha(torch.tensor(0.5, dtype=torch.float64)) ** 2,
                               torch.tensor(0.9**5, dtype=torch.float64))
