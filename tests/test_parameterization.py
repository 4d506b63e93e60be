"""Conversions between ε, x0, v and the score, and the loss weights that relate targets."""

from __future__ import annotations

import pytest
import torch

from minidit.parameterization import KINDS, convert, loss_weight, to_eps, to_x0, training_target


def _setup(vp: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    B = 64
    x0 = torch.randn(B, 3, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(B, 3, 4, generator=g, dtype=torch.float64)
    alpha = torch.rand(B, 1, 1, generator=g, dtype=torch.float64) * 0.98 + 0.01
    sigma = (1 - alpha**2).sqrt() if vp else torch.rand(B, 1, 1, generator=g, dtype=torch.float64) * 5 + 0.05
    xt = alpha * x0 + sigma * eps
    truth = {"eps": eps, "x0": x0, "v": alpha * eps - sigma * x0, "score": -eps / sigma}
    return xt, alpha, sigma, truth


@pytest.mark.parametrize("vp", [True, False])
def test_every_conversion_recovers_the_truth(vp):
    xt, alpha, sigma, truth = _setup(vp)
    for src in KINDS:
        for dst in KINDS:
            out = convert(truth[src], src, dst, xt, alpha, sigma)
            torch.testing.assert_close(out, truth[dst], rtol=1e-9, atol=1e-9, msg=f"{src} -> {dst}")
        torch.testing.assert_close(to_x0(truth[src], src, xt, alpha, sigma), truth["x0"])
        torch.testing.assert_close(to_eps(truth[src], src, xt, alpha, sigma), truth["eps"])


def test_round_trip_of_arbitrary_predictions():
    # a wrong prediction too must survive src -> dst -> src (the maps are affine bijections)
    xt, alpha, sigma, _ = _setup(True, seed=1)
    pred = torch.randn(xt.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for src in KINDS:
        for dst in KINDS:
            back = convert(convert(pred, src, dst, xt, alpha, sigma), dst, src, xt, alpha, sigma)
            torch.testing.assert_close(back, pred, rtol=1e-8, atol=1e-8)


def test_training_targets():
    xt, alpha, sigma, truth = _setup(True)
    for kind in ("eps", "x0", "v"):
        target = training_target(kind, truth["x0"], truth["eps"], alpha, sigma)
        torch.testing.assert_close(target, truth[kind])


def test_weights_make_targets_equivalent():
    # one wrong x̂0, seen as ε̂ and v̂: ‖ε − ε̂‖² = SNR‖x0 − x̂0‖², ‖v − v̂‖² = (SNR + 1)‖x0 − x̂0‖²
    xt, alpha, sigma, truth = _setup(True, seed=3)
    error = torch.randn(xt.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x0_hat = truth["x0"] + 0.3 * error
    snr = (alpha**2 / sigma**2).flatten()
    mse = {}
    for k in ("eps", "x0", "v"):
        mse[k] = (convert(x0_hat, "x0", k, xt, alpha, sigma) - truth[k]).pow(2).flatten(1).mean(1)  # [B]
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
    with pytest.raises(ValueError, match="src.*eps, x0, v, score"):
        convert(x, "noise", "x0", x, x + 1, x + 1)
    with pytest.raises(ValueError, match="prediction"):
        training_target("score", x, x, x, x)
    with pytest.raises(ValueError, match="weighting.*min_snr"):
        loss_weight(torch.ones(2), "eps", "p2")
