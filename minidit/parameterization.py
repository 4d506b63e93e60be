"""What a denoiser predicts, and how to turn one prediction into another.

Every Gaussian diffusion writes its noisy sample as x_t = alpha·x_0 + sigma·ε. Given
x_t, alpha and sigma, any one of four quantities fixes the other three:

    ε      the noise                                             [DDPM, Eq. 12]
    x0     the clean data:  x0 = (x_t − sigma·ε) / alpha
    v      the velocity:    v = alpha·ε − sigma·x0                 [Salimans & Ho 2022, Sec. 4]
    score  ∇ log q(x_t):    score = −ε / sigma                     [SDE, Eq. 7; Tweedie]

The losses on the three trainable targets differ only by a per-timestep factor. With
SNR = alpha²/sigma² (and alpha² + sigma² = 1):

    ‖ε − ε̂‖² = SNR · ‖x0 − x̂0‖²,     ‖v − v̂‖² = (SNR + 1) · ‖x0 − x̂0‖²

so a weighting stated in x0 units, w_x0(SNR), becomes w_x0/SNR for an ε-model and
w_x0/(SNR + 1) for a v-model. Min-SNR-γ is w_x0 = min(SNR, γ)   [MinSNR, Eq. 13]:
ε-target min(SNR, γ)/SNR, v-target min(SNR, γ)/(SNR + 1), x0-target min(SNR, γ).

Functions here take alpha and sigma already broadcast against x_t ([B, 1, ...]), so the
same code serves discrete DDPM steps and continuous-time SDEs. The conversions through
v use the general form (they hold even when alpha² + sigma² ≠ 1).
"""

from __future__ import annotations

import torch
from torch import Tensor

PREDICTIONS = ("eps", "x0", "v")  # what a network may be trained to output
KINDS = PREDICTIONS + ("score",)  # what a prediction may be converted to and from
WEIGHTINGS = ("none", "min_snr", "eps_equivalent")


def check_kind(kind: str, arg: str = "prediction", valid: tuple[str, ...] = PREDICTIONS) -> str:
    """Raise ValueError naming `arg` unless `kind` is one of `valid`."""
    if kind not in valid:
        raise ValueError(f"unknown {arg} {kind!r}; valid choices: {', '.join(valid)}")
    return kind


def to_x0(pred: Tensor, kind: str, xt: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """The x0 implied by a prediction of type `kind` ("eps", "x0", "v" or "score")."""
    check_kind(kind, "kind", KINDS)
    if kind == "x0":
        return pred
    if kind == "eps":
        return (xt - sigma * pred) / alpha
    if kind == "v":  # alpha·x_t − sigma·v = (alpha² + sigma²)·x0
        return (alpha * xt - sigma * pred) / (alpha**2 + sigma**2)
    return (xt + sigma**2 * pred) / alpha  # Tweedie: E[x0 | x_t] = (x_t + sigma²·score)/alpha


def to_eps(pred: Tensor, kind: str, xt: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """The ε implied by a prediction of type `kind` ("eps", "x0", "v" or "score")."""
    check_kind(kind, "kind", KINDS)
    if kind == "eps":
        return pred
    if kind == "x0":
        return (xt - alpha * pred) / sigma
    if kind == "v":  # sigma·x_t + alpha·v = (alpha² + sigma²)·ε
        return (sigma * xt + alpha * pred) / (alpha**2 + sigma**2)
    return -sigma * pred


def convert(pred: Tensor, src: str, dst: str, xt: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """Re-express a prediction of type `src` as type `dst` (both from `KINDS`).

    Args:
        pred: the prediction, same shape as `xt` [B, ...].
        src, dst: "eps", "x0", "v" or "score".
        xt: the noisy input [B, ...].
        alpha, sigma: the scales of x0 and ε in x_t, broadcastable to `xt`.
    """
    check_kind(src, "src", KINDS)
    check_kind(dst, "dst", KINDS)
    if src == dst:
        return pred
    if dst == "x0":
        return to_x0(pred, src, xt, alpha, sigma)
    if dst == "eps":
        return to_eps(pred, src, xt, alpha, sigma)
    eps = to_eps(pred, src, xt, alpha, sigma)
    if dst == "score":
        return -eps / sigma
    return alpha * eps - sigma * to_x0(pred, src, xt, alpha, sigma)  # v


def training_target(kind: str, x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """The regression target for a network that predicts `kind` ("eps", "x0" or "v")."""
    check_kind(kind)
    if kind == "eps":
        return eps
    if kind == "x0":
        return x0
    return alpha * eps - sigma * x0


def loss_weight(snr: Tensor, prediction: str, weighting: str = "none", gamma: float = 5.0) -> Tensor:
    """Per-example weight for the plain MSE on the `prediction` target.

    Args:
        snr: SNR of each example's timestep, [B] (any float dtype).
        prediction: the network's target, "eps", "x0" or "v".
        weighting: "none" (plain MSE on the target, DDPM's L_simple for ε),
            "min_snr" (Min-SNR-γ [MinSNR]), or "eps_equivalent" (w_x0 = SNR: the loss
            equals the ε-MSE whatever the target, so all targets train alike).
        gamma: the clamp γ of Min-SNR-γ.

    Returns:
        [B] weights, same dtype and device as `snr`.
    """
    check_kind(prediction)
    check_kind(weighting, "weighting", WEIGHTINGS)
    if weighting == "none":
        return torch.ones_like(snr)
    w_x0 = snr.clamp(max=gamma) if weighting == "min_snr" else snr  # weight in x0 units
    # divide by the factor that turns an x0-MSE into this target's MSE
    if prediction == "eps":
        return w_x0 / snr
    if prediction == "v":
        return w_x0 / (snr + 1)
    return w_x0
