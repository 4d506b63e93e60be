"""The KL-autoencoder: shapes, the posterior against its closed forms, the scaling factor, PSNR,
and the training objective against its formula."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from minidit.autoencoder import (AUTOENCODER_CONFIGS, Autoencoder, AutoencoderConfig, DiagonalGaussian,
                                 evaluate_reconstructions, latent_scaling_factor, make_autoencoder, psnr)
from minidit.run.build import OBJECTIVES
from minidit.run.latent import AutoencoderObjective
from minidit.run.objectives import objective_from_config


@pytest.mark.parametrize("name,image,latent", [("ae-mnist", (1, 28, 28), (4, 7, 7)),
                                                ("ae-cifar10", (3, 32, 32), (4, 8, 8))])
def test_encode_decode_shapes(name, image, latent):
    torch.manual_seed(0)
    ae = make_autoencoder(name)
    x = torch.rand(2, *image) * 2 - 1
    posterior = ae.encode(x)
    assert ae.latent_shape == latent == AUTOENCODER_CONFIGS[name].latent_shape
    assert posterior.mean.shape == posterior.logvar.shape == (2, *latent)
    assert ae.decode(posterior.sample()).shape == x.shape
    x_hat, _ = ae(x, sample=False)
    torch.testing.assert_close(x_hat, ae.decode(posterior.mode()))


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="divisible by the downsampling factor 4"):
        AutoencoderConfig(image_size=30)
    with pytest.raises(ValueError, match="valid names"):
        make_autoencoder("ae-imagenet")
    ae = make_autoencoder("ae-mnist", channels=[8, 8, 8])
    with pytest.raises(ValueError, match=r"x must have shape \[B, 1, 28, 28\]"):
        ae.encode(torch.zeros(2, 3, 28, 28))
    with pytest.raises(ValueError, match=r"z must have shape \[B, 4, 7, 7\]"):
        ae.decode(torch.zeros(2, 4, 8, 8))
    with pytest.raises(ValueError, match="beta"):
        AutoencoderObjective(beta=-1.0)


def _gaussian(B: int = 3, c: int = 2, side: int = 3, seed: int = 0) -> DiagonalGaussian:
    g = torch.Generator().manual_seed(seed)
    return DiagonalGaussian(torch.randn(B, 2 * c, side, side, generator=g, dtype=torch.float64))


def test_kl_matches_its_closed_form_and_torch_distributions():
    q = _gaussian()
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(q.mean, q.std), torch.distributions.Normal(0.0, 1.0)).flatten(1).sum(1)
    torch.testing.assert_close(q.kl(), expected)
    # a standard normal posterior is the prior itself: KL = 0
    assert torch.equal(DiagonalGaussian(torch.zeros(2, 4, 3, 3)).kl(), torch.zeros(2))


def test_kl_matches_monte_carlo_of_log_ratio():
    """KL = E_q[log q(z) − log p(z)], estimated from N draws; 5 standard errors of tolerance."""
    q = _gaussian(B=2)
    N = 20_000
    g = torch.Generator().manual_seed(1)
    z = torch.stack([q.sample(g) for _ in range(N)])  # [N, B, c, h, w]
    log_q = torch.distributions.Normal(q.mean, q.std).log_prob(z).flatten(2).sum(2)  # [N, B]
    log_p = torch.distributions.Normal(0.0, 1.0).log_prob(z).flatten(2).sum(2)  # [N, B]
    ratio = log_q - log_p
    stderr = ratio.std(0) / math.sqrt(N)
    assert ((ratio.mean(0) - q.kl()).abs() < 5 * stderr).all()


def test_sample_has_the_posterior_moments():
    q = _gaussian(B=1)
    N = 20_000
    g = torch.Generator().manual_seed(2)
    z = torch.stack([q.sample(g) for _ in range(N)])  # [N, 1, c, h, w]
    assert ((z.mean(0) - q.mean).abs() < 5 * q.std / math.sqrt(N)).all()
    # the sample std has standard error ≈ σ / sqrt(2N)
    assert ((z.std(0) - q.std).abs() < 5 * q.std / math.sqrt(2 * N)).all()


class _KnownEncoder(nn.Module):
    """moments = (a · x, log τ²): z = a·x + τ·ε, so std(z) = sqrt(a² + τ²) for x ~ N(0, 1)."""

    def __init__(self, a: float, tau: float):
        super().__init__()
        self.a, self.log_tau2 = a, 2 * math.log(tau)
        self.dummy = nn.Parameter(torch.zeros(()))  # gives the module a device

    def forward(self, x):
        return torch.cat([self.a * x, torch.full_like(x, self.log_tau2)], dim=1)  # [B, 2c, h, w]


def test_scaling_factor_is_one_over_latent_std():
    ae = Autoencoder(AutoencoderConfig(in_channels=4, image_size=4, latent_channels=4, channels=(8,)))
    ae.encoder = _KnownEncoder(a=3.0, tau=4.0)
    x = torch.randn(4096, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    n = x.numel()  # relative standard error of a sample std ≈ 1 / sqrt(2n)
    s = latent_scaling_factor(ae, x, sample=True, generator=torch.Generator().manual_seed(4))
    assert abs(s * 5.0 - 1) < 5 / math.sqrt(2 * n)  # std = sqrt(3² + 4²) = 5
    s_mean = latent_scaling_factor(ae, x, sample=False)
    assert abs(s_mean * 3.0 - 1) < 5 / math.sqrt(2 * n)
    # scaled latents have unit variance exactly on the data that set s
    with torch.no_grad():
        assert abs((ae.encode(x).mode() * s_mean).std().item() - 1) < 1e-5


def test_psnr_closed_form():
    x = torch.rand(3, 1, 4, 4) * 2 - 1
    for delta in (0.1, 0.02):
        expected = 10 * math.log10(4 / delta**2)  # peak-to-peak 2, MSE δ²
        torch.testing.assert_close(psnr(x, x + delta), torch.full((3,), expected), atol=1e-3, rtol=0)


def test_objective_is_reconstruction_plus_beta_kl_per_pixel():
    torch.manual_seed(0)
    ae = make_autoencoder("ae-mnist", channels=[8, 8, 8])
    objective = objective_from_config({"kind": "autoencoder", "beta": 0.5, "null_label": None}, OBJECTIVES)
    assert objective.config() == {"kind": "autoencoder", "beta": 0.5, "null_label": None}
    x0 = torch.rand(4, 1, 28, 28) * 2 - 1
    loss, t = objective.loss(ae, x0, None, torch.Generator().manual_seed(5))
    x_hat, q = ae(x0, torch.Generator().manual_seed(5))
    expected = ((x_hat - x0) ** 2).flatten(1).sum(1) / 784 + 0.5 * q.kl() / 784
    torch.testing.assert_close(loss, expected)
    assert torch.equal(t, torch.zeros(4))
    loss.mean().backward()
    assert ae.encoder[0].weight.grad is not None and ae.decoder[-1].weight.grad is not None
    # samples decode the prior N(0, I) to images of the data's shape
    assert objective.sample(ae, (3, 1, 28, 28), None, torch.Generator().manual_seed(0)).shape == (3, 1, 28, 28)


class _Identity(nn.Module):
    """A perfect autoencoder: x -> (x, no posterior)."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x, sample=True):
        return x, None


def test_reconstructions_are_scored_on_the_floor_images(mnist_root):
    """A perfect round trip reproduces the floor's own images: its FD is the floor exactly."""

    scores = evaluate_reconstructions(_Identity(), "mnist", 200, root=str(mnist_root))
    assert scores["fd"] == pytest.approx(scores["fd_floor"], rel=1e-9)
    assert scores["mse"] == 0 and scores["psnr"] > 100 and scores["accuracy"] > 0.9
    torch.testing.assert_close(scores["reconstructions"], scores["images"])
