"""Toy distributions: the Gaussian mixture's density, score and noising in closed form, and the samplers."""

from __future__ import annotations

import math

import pytest
import torch

from minidit.toy import (TOY_SAMPLERS, GaussianMixture, checkerboard, ring_of_gaussians, sample_toy,
                         swiss_roll, two_moons)


def _mixture(std_kind: str = "diag") -> GaussianMixture:
    """Three well-separated components in 2-D, float64, with the requested kind of std."""
    weights = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    means = torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]], dtype=torch.float64)
    std = {"scalar": 0.4, "iso": torch.tensor([0.3, 0.5, 0.4]),
           "diag": torch.tensor([[0.3, 0.6], [0.5, 0.35], [0.4, 0.45]])}[std_kind]
    return GaussianMixture(weights, means, std)


@pytest.mark.parametrize("std_kind", ["scalar", "iso", "diag"])
def test_score_is_the_gradient_of_log_prob(std_kind):
    gm = _mixture(std_kind)
    x = (3 * torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)).requires_grad_()
    (autograd_score,) = torch.autograd.grad(gm.log_prob(x).sum(), x)
    torch.testing.assert_close(gm.score(x.detach()), autograd_score, rtol=1e-10, atol=1e-10)


def test_log_prob_integrates_to_one_on_a_grid():
    gm = _mixture("diag")
    h = 0.02  # the smallest std is 0.3, so a midpoint sum with this step is exact to far below 1e-6
    axis = torch.arange(-7.0, 7.0, h, dtype=torch.float64) + h / 2
    grid = torch.cartesian_prod(axis, axis)  # [M*M, 2]
    mass = gm.log_prob(grid).exp().sum() * h * h
    assert abs(mass.item() - 1.0) < 1e-6


def test_sample_moments_and_weights_match_the_parameters():
    gm = _mixture("diag")
    n = 200_000
    x = gm.sample(n, torch.Generator().manual_seed(1))  # [n, 2]
    # mean and covariance, 5 standard errors estimated from the sample itself
    m = x.mean(0)
    assert ((m - gm.mean()).abs() <= 5 * (x.var(0) / n).sqrt()).all()
    centred = x - m
    products = centred[:, :, None] * centred[:, None, :]  # [n, 2, 2]
    se = products.std(0) / math.sqrt(n)
    assert ((products.mean(0) - gm.covariance()).abs() <= 5 * se + 1e-12).all()
    # with std 0.1 the components lie > 15 std apart: the nearest mean names each sample's component
    narrow = GaussianMixture(gm.weights, gm.means, 0.1)
    k = torch.cdist(narrow.sample(n, torch.Generator().manual_seed(6)), gm.means).argmin(1)
    freq = torch.bincount(k, minlength=3).double() / n
    w = gm.weights
    assert ((freq - w).abs() <= 5 * (w * (1 - w) / n).sqrt()).all()


def test_diffused_is_the_law_of_the_noised_samples():
    gm = _mixture("iso")
    alpha, sigma = 0.6, 0.8
    g = torch.Generator().manual_seed(2)
    n = 200_000
    xt = alpha * gm.sample(n, g) + sigma * torch.randn(n, 2, generator=g, dtype=torch.float64)
    gmt = gm.diffused(alpha, sigma)
    assert ((xt.mean(0) - gmt.mean()).abs() <= 5 * (xt.var(0) / n).sqrt()).all()
    cov = torch.cov(xt.T)
    centred = xt - xt.mean(0)
    se = (centred[:, :, None] * centred[:, None, :]).std(0) / math.sqrt(n)
    assert ((cov - gmt.covariance()).abs() <= 5 * se).all()
    # alpha = 1, sigma = 0 leaves the mixture unchanged
    same = gm.diffused(1.0, 0.0)
    torch.testing.assert_close(same.means, gm.means)
    torch.testing.assert_close(same.var, gm.var)


def test_diffused_density_is_the_convolution_by_quadrature():
    # 1-D: p_t(x) = integral p0(x0) N(x; alpha x0, sigma^2) dx0
    gm = GaussianMixture(torch.tensor([0.4, 0.6]), torch.tensor([[-1.0], [1.5]], dtype=torch.float64),
                         torch.tensor([0.3, 0.5]))
    alpha, sigma = 0.7, 0.5
    h = 1e-3
    x0 = (torch.arange(-8.0, 8.0, h, dtype=torch.float64) + h / 2)[:, None]  # [M, 1]
    p0 = gm.log_prob(x0).exp()  # [M]
    x = torch.linspace(-3, 3, 13, dtype=torch.float64)[:, None]  # [13, 1]
    kernel = torch.exp(-0.5 * ((x - alpha * x0.T) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))  # [13, M]
    quadrature = (kernel * p0).sum(1) * h
    torch.testing.assert_close(gm.diffused(alpha, sigma).log_prob(x).exp(), quadrature, rtol=1e-6, atol=1e-9)


def test_to_changes_dtype_and_keeps_the_density():
    gm = _mixture("diag").to(dtype=torch.float32)
    assert gm.means.dtype == gm.var.dtype == gm.weights.dtype == torch.float32
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(gm.log_prob(x).double(), _mixture("diag").log_prob(x.double()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    ({"weights": [1.0, 1.0], "means": [1.0, 2.0], "std": 1.0}, "means"),
    ({"weights": [1.0], "means": [[0.0, 0.0], [1.0, 1.0]], "std": 1.0}, "weights"),
    ({"weights": [1.0, -1.0], "means": [[0.0, 0.0], [1.0, 1.0]], "std": 1.0}, "weights"),
    ({"weights": [1.0, 1.0], "means": [[0.0, 0.0], [1.0, 1.0]], "std": [1.0, 1.0, 1.0]}, "std"),
    ({"weights": [1.0, 1.0], "means": [[0.0, 0.0], [1.0, 1.0]], "std": 0.0}, "std"),
])
def test_bad_parameters_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GaussianMixture(**{k: torch.tensor(v) if k != "std" else v for k, v in kwargs.items()})
    with pytest.raises(ValueError, match="scalar"):
        _mixture().diffused(torch.ones(3), 0.5)


# ----------------------------------------------------------------------------------------
# samplers


def test_sample_toy_names_shapes_and_seeds():
    for name in TOY_SAMPLERS:
        a, b = sample_toy(name, 500, seed=7), sample_toy(name, 500, seed=7)
        assert a.shape == (500, 2) and a.dtype == torch.float32 and torch.isfinite(a).all()
        assert torch.equal(a, b)
        assert not torch.equal(a, sample_toy(name, 500, seed=8))
    with pytest.raises(ValueError, match="two_moons"):
        sample_toy("spiral", 10)
    with pytest.raises(ValueError, match="n must"):
        sample_toy("two_moons", 0)


def test_two_moons_and_swiss_roll_lie_on_their_curves():
    g = torch.Generator().manual_seed(4)
    x, y = two_moons(2000, g, noise=0.0).unbind(1)
    x, y = x + 0.5, y + 0.25  # undo the centring
    upper = (x.hypot(y) - 1).abs() < 1e-5
    lower = ((x - 1).hypot(y - 0.5) - 1).abs() < 1e-5
    assert (upper & (y >= -1e-6) | lower & (y <= 0.5 + 1e-6)).all()
    assert abs(upper.double().mean().item() - 0.5) < 5 * math.sqrt(0.25 / 2000)
    roll = 5 * swiss_roll(2000, g, noise=0.0)  # r = theta on the spiral
    theta = roll.norm(dim=1)
    assert ((theta >= 1.5 * math.pi - 1e-4) & (theta <= 4.5 * math.pi + 1e-4)).all()
    torch.testing.assert_close(roll, torch.stack([theta * theta.cos(), theta * theta.sin()], 1), atol=1e-4, rtol=0)


def test_checkerboard_fills_the_dark_squares_evenly():
    n = 40_000
    p = checkerboard(n, torch.Generator().manual_seed(5))
    assert ((p >= -2) & (p < 2)).all()
    cell = torch.floor(p).long() + 2  # [n, 2] in 0..3
    assert ((cell[:, 0] + cell[:, 1]) % 2 == 0).all()
    counts = torch.bincount(cell[:, 0] * 4 + cell[:, 1], minlength=16).double() / n
    dark = counts[counts > 0]
    assert len(dark) == 8 and ((dark - 1 / 8).abs() < 5 * math.sqrt((1 / 8) * (7 / 8) / n)).all()


def test_ring_of_gaussians_places_means_on_the_circle():
    gm = ring_of_gaussians(k=6, radius=3.0, std=0.2)
    torch.testing.assert_close(gm.means.norm(dim=1), torch.full((6,), 3.0))
    torch.testing.assert_close(gm.weights, torch.full((6,), 1 / 6))
    torch.testing.assert_close(gm.mean(), torch.zeros(2), atol=1e-6, rtol=0)
