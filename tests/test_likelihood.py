"""Log-likelihoods through the probability-flow ODE against analytic densities."""

from __future__ import annotations

import math

import pytest
import torch

from minidit.denoiser import Denoiser
from minidit.flow import FlowProcess
from minidit.likelihood import LikelihoodResult, bits_per_dim, dequantize, ode_log_likelihood
from minidit.sde import SubVPSDE, VESDE, VPSDE
from minidit.toy import GaussianMixture, mixture_denoiser


T_EPS = 1e-5
GAUSS = GaussianMixture(torch.ones(1), torch.tensor([[0.5, -1.0, 0.3]]),
                        torch.tensor([[0.8, 0.5, 1.2]])).to(dtype=torch.float64)
MIX = GaussianMixture(torch.tensor([0.4, 0.6]), torch.tensor([[-1.5, 0.5], [1.0, -1.0]]),
                      torch.tensor([0.4, 0.6])).to(dtype=torch.float64)


def exact_log_prob(data: GaussianMixture, process, x: torch.Tensor, t: float = T_EPS) -> torch.Tensor:
    return data.diffused(process.alpha(t).item(), process.sigma(t).item()).log_prob(x)


def kind_for(process) -> str:
    return "velocity" if isinstance(process, FlowProcess) else "eps"


@pytest.mark.parametrize("process", [VPSDE(), SubVPSDE(), FlowProcess()], ids=["vp", "subvp", "flow"])
@pytest.mark.parametrize("data", [GAUSS, MIX], ids=["gaussian-3d", "mixture-2d"])
def test_exact_trace_likelihood_matches_the_density(process, data):
    den = mixture_denoiser(data, process, kind_for(process))
    x = data.sample(200, torch.Generator().manual_seed(0))
    out = ode_log_likelihood(den, x, t_eps=T_EPS, progress=False)
    D = x.shape[1]
    assert (out.logp - exact_log_prob(data, process, x)).abs().max() / D < 0.01
    torch.testing.assert_close(out.logp, out.prior_logp + out.delta_logp)
    assert out.z.shape == x.shape and out.nfe > 0


@pytest.mark.parametrize("process", [VPSDE(), VESDE()], ids=["vp", "ve"])
def test_the_ode_part_is_exact_given_the_true_prior(process):
    # the only approximation left at tight tolerance is p_1 ≈ N(0, sigma(1)²): with the true p_1
    # (the diffused Gaussian) the change of variables is exact
    den = mixture_denoiser(GAUSS, process, "eps")
    x = GAUSS.sample(100, torch.Generator().manual_seed(0))
    out = ode_log_likelihood(den, x, rtol=1e-8, atol=1e-8, progress=False)
    logp = exact_log_prob(GAUSS, process, out.z, t=1.0) + out.delta_logp
    assert (logp - exact_log_prob(GAUSS, process, x)).abs().max() / 3 < 1e-4


def rotated_gaussian_denoiser(process):
    # a correlated Gaussian (GAUSS rotated by R): the divergence has off-diagonal Jacobian terms,
    # which a Rademacher probe does not see exactly
    R, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    base = mixture_denoiser(GAUSS, process, "eps")
    return Denoiser(lambda x, t: base.network(x @ R, t) @ R.T, "eps", process), R


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased(probe):
    process = VPSDE()
    den, R = rotated_gaussian_denoiser(process)
    x = GAUSS.sample(400, torch.Generator().manual_seed(1)) @ R.T  # [B, 3] rows x = R z
    exact = ode_log_likelihood(den, x, progress=False).logp
    torch.testing.assert_close(exact, exact_log_prob(GAUSS, process, x @ R), atol=0.03, rtol=0)
    est = ode_log_likelihood(den, x, divergence_method="hutchinson", probe=probe,
                             generator=torch.Generator().manual_seed(2), progress=False).logp
    diff = est - exact
    se = diff.std().item() / math.sqrt(len(diff))
    assert diff.std() > 1e-3  # really a Monte-Carlo estimate
    assert abs(diff.mean().item()) < 4 * se


def test_fixed_step_heun_likelihood():
    process = VPSDE()
    den = mixture_denoiser(MIX, process, "eps")
    x = MIX.sample(100, torch.Generator().manual_seed(0))
    out = ode_log_likelihood(den, x, method="heun", steps=100, progress=False)
    assert out.nfe == 200
    assert (out.logp - exact_log_prob(MIX, process, x)).abs().max() / 2 < 0.02


def test_bits_per_dim_and_dequantisation():
    # uniform density on [−1, 1)^D: log p = −D log 2, i.e. 8 bits per 256-level pixel
    D = 12
    logp = torch.full((3,), -D * math.log(2.0))
    torch.testing.assert_close(bits_per_dim(logp, D), torch.full((3,), 8.0))
    torch.testing.assert_close(bits_per_dim(logp, D, n_bins=None), torch.full((3,), 1.0))
    result = LikelihoodResult(logp, logp, torch.zeros(3), torch.zeros(3, 3, 2, 2), nfe=0)
    torch.testing.assert_close(result.bits_per_dim(), torch.full((3,), 8.0))
    # every pixel value k lands in its own bin [(k/128) − 1, ((k + 1)/128) − 1)
    k = torch.arange(256, dtype=torch.uint8).repeat(50)
    x = dequantize(k, torch.Generator().manual_seed(0))
    assert x.min() >= -1 and x.max() < 1
    assert bool((torch.floor((x + 1) * 128).long() == k.long()).all())
    with pytest.raises(ValueError, match="integer"):
        dequantize(torch.rand(4))
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        dequantize(torch.tensor([3, 17]), n_bins=16)


def test_bad_arguments():
    process, x = VPSDE(), torch.randn(4, 2, dtype=torch.float64)
    den = mixture_denoiser(MIX, process)
    for kwargs, word in [({"method": "euler"}, "rk45, heun"), ({"divergence_method": "skilling"}, "exact"),
                         ({"probe": "sphere"}, "rademacher"), ({"rtol": 0.0}, "rtol"), ({"atol": 2.0}, "atol"),
                         ({"method": "heun", "steps": 0}, "steps"), ({"t_eps": 0.0}, "t_eps")]:
        with pytest.raises(ValueError, match=word):
            ode_log_likelihood(den, x, progress=False, **kwargs)
