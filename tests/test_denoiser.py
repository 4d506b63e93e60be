"""The conversion table between ε, x0, v, the score and the velocity, on any process, and the loss
weights that relate DDPM's targets."""

from __future__ import annotations

import pytest
import torch

from minidit.ddpm import loss_weight, training_target
from minidit.denoiser import KINDS, convert
from minidit.flow import FlowProcess
from minidit.process import Process
from minidit.sde import VESDE, VPSDE


class Scaled(Process):
    """A process with any alpha(t) = a·e^{−t}, sigma(t) = s·(t + c): not VP, so alpha² + sigma² ≠ 1."""

    def __init__(self, a=0.9, s=3.0, c=0.1):
        self.a, self.s, self.c = a, s, c

    def alpha(self, t):
        return self.a * torch.exp(-torch.as_tensor(t, dtype=torch.float64))

    def sigma(self, t):
        return self.s * (torch.as_tensor(t, dtype=torch.float64) + self.c)

    def d_alpha(self, t):
        return -self.alpha(t)

    def d_sigma(self, t):
        return torch.full_like(torch.as_tensor(t, dtype=torch.float64), self.s)


PROCESSES = {"vp": VPSDE(), "ve": VESDE(), "flow": FlowProcess(), "scaled": Scaled()}


def _setup(process: Process, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    B = 64
    x0 = torch.randn(B, 3, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(B, 3, 4, generator=g, dtype=torch.float64)
    t = torch.rand(B, generator=g, dtype=torch.float64) * 0.9 + 0.05
    alpha, sigma = process.alpha(t)[:, None, None], process.sigma(t)[:, None, None]
    d_alpha, d_sigma = process.d_alpha(t)[:, None, None], process.d_sigma(t)[:, None, None]
    xt = alpha * x0 + sigma * eps
    truth = {"eps": eps, "x0": x0, "v": alpha * eps - sigma * x0, "score": -eps / sigma,
             "velocity": d_alpha * x0 + d_sigma * eps}  # dx_t/dt along the path of this (x0, eps)
    return xt, t, alpha, sigma, truth


@pytest.mark.parametrize("name", list(PROCESSES))
def test_every_conversion_recovers_the_truth(name):
    xt, t, _, _, truth = _setup(PROCESSES[name])
    for src in KINDS:
        for dst in KINDS:
            out = convert(truth[src], src, dst, xt, t, PROCESSES[name])
            torch.testing.assert_close(out, truth[dst], rtol=1e-9, atol=1e-9, msg=f"{src} -> {dst}")


@pytest.mark.parametrize("name", list(PROCESSES))
def test_round_trip_of_arbitrary_predictions(name):
    # a wrong prediction too must survive src -> dst -> src (the maps are affine bijections)
    xt, t, _, _, _ = _setup(PROCESSES[name], seed=1)
    pred = torch.randn(xt.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for src in KINDS:
        for dst in KINDS:
            back = convert(convert(pred, src, dst, xt, t, PROCESSES[name]), dst, src, xt, t, PROCESSES[name])
            torch.testing.assert_close(back, pred, rtol=1e-8, atol=1e-8)


def test_one_time_for_the_batch_is_the_same_as_one_per_sample():
    xt, t, _, _, truth = _setup(VPSDE())
    t0 = torch.tensor(0.4, dtype=torch.float64)
    for dst in KINDS:
        torch.testing.assert_close(convert(truth["eps"], "eps", dst, xt, t0, VPSDE()),
                                   convert(truth["eps"], "eps", dst, xt, t0.expand(64), VPSDE()))


def test_training_targets():
    xt, t, alpha, sigma, truth = _setup(VPSDE())
    for kind in ("eps", "x0", "v"):
        target = training_target(kind, truth["x0"], truth["eps"], alpha, sigma)
        torch.testing.assert_close(target, truth[kind])


def test_weights_make_targets_equivalent():
    # one wrong x̂0, seen as ε̂ and v̂: ‖ε − ε̂‖² = SNR‖x0 − x̂0‖², ‖v − v̂‖² = (SNR + 1)‖x0 − x̂0‖²
    xt, t, alpha, sigma, truth = _setup(VPSDE(), seed=3)
    error = torch.randn(xt.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x0_hat = truth["x0"] + 0.3 * error
    snr = (alpha**2 / sigma**2).flatten()
    mse = {}
    for k in ("eps", "x0", "v"):
        mse[k] = (convert(x0_hat, "x0", k, xt, t, VPSDE()) - truth[k]).pow(2).flatten(1).mean(1)  # [B]
    for kind in ("eps", "x0", "v"):
        w_eq = loss_weight(snr, kind, "eps_equivalent")
        torch.testing.assert_close(w_eq * mse[kind], mse["eps"])  # every target trains like L_simple
        w_min = loss_weight(snr, kind, "min_snr", gamma=5.0)
        torch.testing.assert_close(w_min * mse[kind], snr.clamp(max=5.0) * mse["x0"])  # Min-SNR-γ
        torch.testing.assert_close(loss_weight(snr, kind, "none"), torch.ones_like(snr))
    # the per-target Min-SNR-γ forms as stated in the paper
    torch.testing.assert_close(loss_weight(snr, "eps", "min_snr", 5.0), snr.clamp(max=5.0) / snr)
    torch.testing.assert_close(loss_weight(snr, "v", "min_snr", 5.0), snr.clamp(max=5.0) / (snr + 1))


def test_bad_names():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="src.*eps, x0, v, score, velocity"):
        convert(x, "noise", "x0", x, torch.tensor(0.5), VPSDE())
    with pytest.raises(ValueError, match="prediction"):
        training_target("score", x, x, x, x)
    with pytest.raises(ValueError, match="weighting.*min_snr"):
        loss_weight(torch.ones(2), "eps", "p2")
