"""The discrete Gaussian diffusion of Ho et al.: noising, training, the bound, and Algorithm 2.

Time is an integer t in 0..T-1 (t = 0 is the first noising step, x_0 is data); the tables
come from a `DiscreteSchedule` (β_t, ᾱ_t, ᾱ_{t−1} with ᾱ_{−1} = 1).

    q(x_t | x_0)          = N(sqrt(ᾱ_t)·x_0, (1 − ᾱ_t)·I)                       [DDPM, Eq. 4]
    q(x_{t−1} | x_t, x_0) = N(μ̃_t, β̃_t·I),                                     [DDPM, Eq. 6-7]
        μ̃_t = β_t·sqrt(ᾱ_{t−1})/(1 − ᾱ_t)·x_0 + (1 − ᾱ_{t−1})·sqrt(α_t)/(1 − ᾱ_t)·x_t
        β̃_t = (1 − ᾱ_{t−1})/(1 − ᾱ_t)·β_t
    p(x_{t−1} | x_t)      = N(μ̃_t(x̂_0(x_t), x_t), σ_t²·I),  σ_t² = β_t or β̃_t  [DDPM, Alg. 2]
    L_simple              = E_{t, x_0, ε} ‖target − model(x_t, t)‖²           [DDPM, Eq. 14]
    L_vlb = L_T + Σ_{t≥1} KL(q(x_{t−1}|x_t,x_0) ‖ p(x_{t−1}|x_t)) − log p(x_0|x_1)  [DDPM, Eq. 5]

The network may predict ε, x0 or v; the losses on the three targets differ only by a
per-timestep factor (SNR = ᾱ/(1 − ᾱ)):

    ‖ε − ε̂‖² = SNR · ‖x0 − x̂0‖²,     ‖v − v̂‖² = (SNR + 1) · ‖x0 − x̂0‖²

so a weight stated in x0 units, w_x0, is w_x0/SNR for an ε-model and w_x0/(SNR + 1) for a
v-model; Min-SNR-γ is w_x0 = min(SNR, γ) [MinSNR, Eq. 13]. Networks are called as
`model(x_t, t)` or `model(x_t, t, y)`, t a LongTensor [B].

Sampling runs on the table's continuous process (`schedule.process`, step t at time (t + 1)/T),
through a `minidit.denoiser.Denoiser`: `p_sample_step` is Algorithm 2 from any time to any
earlier one (the posterior of `minidit.process`), so the same step serves all T steps or a
respaced sub-sequence [IDDPM, Sec. 4].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from minidit.denoiser import Denoiser, check_kind, convert
from minidit.grids import Callback, intervals, report
from minidit.process import gaussian_noise, noise_like, per_sample, posterior_coefficients
from minidit.schedules import DiscreteSchedule, extract

PREDICTIONS = ("eps", "x0", "v")  # what a DDPM network may be trained to output
LOSS_WEIGHTINGS = ("none", "min_snr", "eps_equivalent")
VARIANCES = ("beta", "posterior")


def training_target(kind: str, x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """The regression target for a network that predicts `kind` ("eps", "x0" or "v")."""
    check_kind(kind, "prediction", PREDICTIONS)
    if kind == "eps":
        return eps
    if kind == "x0":
        return x0
    return alpha * eps - sigma * x0


def loss_weight(snr: Tensor, prediction: str, weighting: str = "none", gamma: float = 5.0) -> Tensor:
    """Per-example weight [B] for the plain MSE on the `prediction` target.

    weighting: "none" (DDPM's L_simple), "min_snr" (Min-SNR-γ [MinSNR]) or "eps_equivalent"
    (w_x0 = SNR: the loss equals the ε-MSE whatever the target).
    """
    check_kind(prediction, "prediction", PREDICTIONS)
    check_kind(weighting, "weighting", LOSS_WEIGHTINGS)
    if weighting == "none":
        return torch.ones_like(snr)
    w_x0 = snr.clamp(max=gamma) if weighting == "min_snr" else snr  # weight in x0 units
    if prediction == "eps":  # divide by the factor that turns an x0-MSE into this target's MSE
        return w_x0 / snr
    return w_x0 / (snr + 1) if prediction == "v" else w_x0


@dataclass
class GaussianDiffusion:
    """DDPM on a discrete schedule: forward process, loss and bound, on integer steps.

    Args:
        schedule: the `DiscreteSchedule` (T steps).
        prediction: the network's target, "eps", "x0" or "v".
        weighting: per-timestep loss weight, "none", "min_snr" or "eps_equivalent".
        min_snr_gamma: γ of Min-SNR-γ.
    """

    schedule: DiscreteSchedule
    prediction: str = "eps"
    weighting: str = "none"
    min_snr_gamma: float = 5.0

    def __post_init__(self) -> None:
        check_kind(self.prediction, "prediction", PREDICTIONS)
        check_kind(self.weighting, "weighting", LOSS_WEIGHTINGS)
        s = self.schedule
        # the posterior q(x_{t-1} | x_t, x_0) [DDPM, Eq. 7], all float64 [T]
        self.posterior_mean_coef_x0, self.posterior_mean_coef_xt, self.posterior_variance, _ = \
            posterior_coefficients(s.sqrt_alpha_bar, s.sqrt_one_minus_alpha_bar,
                                   s.alpha_bar_prev.sqrt(), (1 - s.alpha_bar_prev).sqrt())
        # β̃_0 = 0, so the log variance at t = 0 borrows β̃_1 (it sets the decoder L_0)
        first = self.posterior_variance[1:2] if s.T > 1 else s.betas[:1]
        self.posterior_log_variance_clipped = torch.log(torch.cat([first, self.posterior_variance[1:]]))
        # σ_t² = β_t at every t, t = 0 included, keeps the decoder (and the bound) tight on 8-bit data
        self.beta_log_variance = torch.log(s.betas)

    @property
    def T(self) -> int:
        return self.schedule.T

    def _alpha_sigma(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        s = self.schedule
        return extract(s.sqrt_alpha_bar, t, x), extract(s.sqrt_one_minus_alpha_bar, t, x)

    def _check(self, x: Tensor, t: Tensor) -> None:
        self.schedule.check_t(t)
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape [B]=[{x.shape[0]}], got {tuple(t.shape)}")

    # -- forward process -------------------------------------------------------------------

    def q_mean_variance(self, x0: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean [B, ...], variance and log variance [B, 1, ...] of q(x_t | x_0) [DDPM, Eq. 4]."""
        self._check(x0, t)
        alpha, sigma = self._alpha_sigma(t, x0)
        return alpha * x0, sigma**2, extract(torch.log1p(-self.schedule.alpha_bar), t, x0)

    def q_sample(self, x0: Tensor, t: Tensor, eps: Tensor | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        """Draw x_t ~ q(x_t | x_0) in one shot: sqrt(ᾱ_t)·x_0 + sqrt(1 − ᾱ_t)·ε."""
        self._check(x0, t)
        eps = noise_like(x0, generator) if eps is None else eps
        alpha, sigma = self._alpha_sigma(t, x0)
        return alpha * x0 + sigma * eps

    def q_posterior_mean_variance(self, x0: Tensor, xt: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean [B, ...], variance `β̃_t` and clipped log variance [B, 1, ...] of `q(x_{t−1} | x_t, x_0)`."""
        self._check(xt, t)
        mean = extract(self.posterior_mean_coef_x0, t, xt) * x0 + extract(self.posterior_mean_coef_xt, t, xt) * xt
        return mean, extract(self.posterior_variance, t, xt), extract(self.posterior_log_variance_clipped, t, xt)

    # -- training [DDPM, Alg. 1] -------------------------------------------------------------

    def training_losses(self, model: nn.Module, x0: Tensor, y: Tensor | None = None, t: Tensor | None = None,
                        eps: Tensor | None = None, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Per-example weighted MSE with t ~ Uniform{0..T−1}  [DDPM, Alg. 1].

        Args:
            model: the network, `model(x_t, t)` or `model(x_t, t, y)`.
            x0: clean data [B, ...]; y: class labels [B] or None.
            t, eps: fix the timesteps [B] / noise [B, ...] instead of drawing them.
            generator: source of randomness for t and ε.

        Returns:
            "loss" [B] (weighted), "mse" [B] (unweighted), "t" [B], "weight" [B].
        """
        B, device = x0.shape[0], x0.device
        # 1. t ~ Uniform({0..T-1}), ε ~ N(0, I)
        if t is None:  # drawn here, so in range: no check (a check would wait for an accelerator)
            gen_device = generator.device if generator is not None else device
            t = torch.randint(0, self.T, (B,), generator=generator, device=gen_device).to(device)
        else:
            self._check(x0, t)
        eps = gaussian_noise(x0.shape, generator, device, x0.dtype) if eps is None else eps
        # 2. x_t = sqrt(ᾱ_t)·x_0 + sqrt(1 − ᾱ_t)·ε [DDPM, Eq. 4]
        alpha, sigma = self._alpha_sigma(t, x0)
        xt = alpha * x0 + sigma * eps
        # 3. regress the target, ‖target − model(x_t, t)‖² per example [DDPM, Eq. 14]
        out = model(xt, t) if y is None else model(xt, t, y)
        if out.shape != x0.shape:
            raise ValueError(f"model output must have the input's shape {tuple(x0.shape)}, got {tuple(out.shape)}")
        mse = (out - training_target(self.prediction, x0, eps, alpha, sigma)).pow(2).flatten(1).mean(dim=1)  # [B]
        snr = extract(self.schedule.alpha_bar / (1 - self.schedule.alpha_bar), t, mse)  # [B]
        weight = loss_weight(snr, self.prediction, self.weighting, self.min_snr_gamma)
        return {"loss": weight * mse, "mse": mse, "t": t, "weight": weight}

    # -- the variational bound in bits/dim [DDPM, Sec. 3.3] ------------------------------------

    def predict_x0(self, model: nn.Module, xt: Tensor, t: Tensor, y: Tensor | None = None,
                   clip_x0: bool = False) -> Tensor:
        """The network's x̂0 at integer steps t [B] (through `minidit.denoiser.convert`)."""
        out = model(xt, t) if y is None else model(xt, t, y)
        x0 = convert(out, self.prediction, "x0", xt, self.schedule.time(t).to(xt), self.schedule.process)
        return x0.clamp(-1.0, 1.0) if clip_x0 else x0

    def vb_terms(self, model: nn.Module, x0: Tensor, xt: Tensor, t: Tensor, y: Tensor | None = None,
                 variance: str = "beta", clip_x0: bool = False) -> Tensor:
        """One term of the bound per example, in bits/dim, [B].

        KL(q(x_{t−1}|x_t, x_0) ‖ p(x_{t−1}|x_t)) for t ≥ 1, and the discretised-Gaussian decoder
        −log p(x_0|x_1) for t = 0 (x_0 on the 8-bit grid in [−1, 1]). `variance` is σ_t² = β_t
        ("beta", tight on 8-bit data, as [DDPM] and [IDDPM] use) or β̃_t ("posterior").
        """
        check_kind(variance, "variance", VARIANCES)
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x0, xt, t)
        mean, _, _ = self.q_posterior_mean_variance(self.predict_x0(model, xt, t, y, clip_x0), xt, t)
        table = self.beta_log_variance if variance == "beta" else self.posterior_log_variance_clipped
        log_var = extract(table, t, xt)
        kl = _normal_kl(true_mean, true_log_var, mean, log_var)  # [B, ...] nats
        nll = -_discretized_gaussian_log_likelihood(x0, mean, log_var)  # [B, ...] nats
        t0 = (t == 0).reshape(-1, *([1] * (x0.ndim - 1)))  # [B, 1, ...]
        return torch.where(t0, nll, kl).flatten(1).mean(dim=1) / math.log(2.0)

    def prior_bpd(self, x0: Tensor) -> Tensor:
        """L_T = KL(q(x_T | x_0) ‖ N(0, I)) in bits/dim, [B]."""
        t = torch.full((x0.shape[0],), self.T - 1, dtype=torch.long, device=x0.device)
        mean, _, log_var = self.q_mean_variance(x0, t)
        kl = _normal_kl(mean, log_var, torch.zeros_like(mean), torch.zeros_like(log_var))
        return kl.flatten(1).mean(dim=1) / math.log(2.0)

    @torch.no_grad()
    def bits_per_dim(self, model: nn.Module, x0: Tensor, y: Tensor | None = None, variance: str = "beta",
                     clip_x0: bool = False, generator: torch.Generator | None = None,
                     progress: bool = True) -> dict[str, Tensor]:
        """The full bound −log p(x_0) ≤ L_vlb for 8-bit data in [−1, 1], in bits/dim.

        One x_t ~ q(x_t|x_0) is drawn per example and step (an unbiased estimate).

        Returns:
            "total" [B], "prior" [B] (L_T) and "terms" [B, T] (terms[:, 0] is the decoder L_0).
        """
        terms = torch.zeros(x0.shape[0], self.T, dtype=x0.dtype, device=x0.device)
        for step in tqdm(range(self.T - 1, -1, -1), disable=not progress, desc="bits/dim"):
            t = torch.full((x0.shape[0],), step, dtype=torch.long, device=x0.device)
            terms[:, step] = self.vb_terms(model, x0, self.q_sample(x0, t, generator=generator), t, y,
                                           variance, clip_x0)
        prior = self.prior_bpd(x0)
        return {"total": terms.sum(dim=1) + prior, "prior": prior, "terms": terms}


def _normal_kl(mean1: Tensor, log_var1: Tensor, mean2: Tensor, log_var2: Tensor) -> Tensor:
    """KL(N(mean1, e^log_var1) ‖ N(mean2, e^log_var2)) per element, in nats."""
    ratio = torch.exp(log_var1 - log_var2)  # variance ratio σ1²/σ2²
    return 0.5 * (log_var2 - log_var1 + ratio + (mean1 - mean2) ** 2 * torch.exp(-log_var2) - 1.0)


def _discretized_gaussian_log_likelihood(x0: Tensor, mean: Tensor, log_var: Tensor) -> Tensor:
    """log ∫ N(x; mean, e^log_var) over x0's 8-bit bin (edge bins open to ±inf) [DDPM, Eq. 13]."""
    inv_std = torch.exp(-0.5 * log_var)
    upper = inv_std * (x0 - mean + 1.0 / 255.0)  # standardised bin edges
    lower = inv_std * (x0 - mean - 1.0 / 255.0)
    # bin mass Φ(upper) − Φ(lower), computed on the side of the tail it lies in to avoid cancellation
    ndtr = torch.special.ndtr
    mass = torch.where(lower > 0, ndtr(-lower) - ndtr(-upper), ndtr(upper) - ndtr(lower))
    log_mid = torch.log(mass.clamp_min(1e-12))
    log_left = torch.special.log_ndtr(upper)  # x0 = −1: mass from −inf
    log_right = torch.special.log_ndtr(-lower)  # x0 = +1: mass to +inf
    return torch.where(x0 < -0.999, log_left, torch.where(x0 > 0.999, log_right, log_mid))


# ----------------------------------------------------------------------------------------
# Ancestral sampling [DDPM, Alg. 2], on any grid of any process
# ----------------------------------------------------------------------------------------


def p_sample_step(den: Denoiser, x: Tensor, t: Tensor, t_next: Tensor, *, variance: str = "beta",
                  generator: torch.Generator | None = None, noise: Tensor | None = None) -> Tensor:
    """One step of DDPM's ancestral sampler, x_t -> x_{t_next} for t_next < t  [DDPM, Alg. 2].

    x_{t_next} = μ̃(x̂0, x_t) + σ z with the posterior mean of q(x_{t_next} | x_t, x̂0) and
    σ² = β ("beta", the variance of q(x_t | x_{t_next})) or β̃ ("posterior"); z = 0 on the step
    that reaches the data (sigma(t_next) = 0). t, t_next: one time, or one per sample [B].
    `noise` is z (default: drawn from `generator`).
    """
    process = den.process
    alpha_s, sigma_s = process.alpha(t_next), process.sigma(t_next)
    # 1. the model's x̂0 at (x_t, t)
    x0 = den(x, t).x0
    # 2. the posterior mean μ̃ at x̂0 [DDPM, Eq. 7]
    c_x0, c_xt, posterior_var, beta = posterior_coefficients(process.alpha(t), process.sigma(t), alpha_s, sigma_s)
    mean = per_sample(c_x0, x) * x0 + per_sample(c_xt, x) * x
    # 3. x_{t_next} = μ̃ + σ z, no noise onto the data
    var = beta if variance == "beta" else posterior_var
    std = per_sample(torch.where(sigma_s > 0, var, torch.zeros_like(var)).sqrt(), x)
    if noise is None and std.ndim == 0 and float(std) == 0:
        return mean
    return mean + std * (noise_like(x, generator) if noise is None else noise)


@torch.no_grad()
def sample_ddpm(den: Denoiser, x: Tensor, grid: Tensor, *, variance: str = "beta",
                generator: torch.Generator | None = None, callback: Callback | None = None) -> Tensor:
    """DDPM's ancestral sampler through `grid` (all T steps: `minidit.grids.ddpm_grid(T)`); NFE = N.

    Args:
        den: the denoiser; x: the start x_T [B, ...] at grid[0] (e.g. N(0, I)).
        grid: decreasing times of den.process; variance: "beta" or "posterior".
        generator: source of noise; callback: see `minidit.grids.report`.
    """
    check_kind(variance, "variance", VARIANCES)
    for i, t, t_next in intervals(den, grid):
        x = p_sample_step(den, x, t, t_next, variance=variance, generator=generator)
        x = report(callback, x, i, t, t_next, den, grid)
    return x
