"""The discrete Gaussian diffusion of Ho et al.: noising, training, sampling, likelihood.

Time is an integer t in 0..T-1 (t = 0 is the first noising step, x_0 is data); the
tables come from a `DiscreteSchedule` (β_t, ᾱ_t, ᾱ_{t−1} with ᾱ_{−1} = 1).

    q(x_t | x_0)          = N(sqrt(ᾱ_t)·x_0, (1 − ᾱ_t)·I)                       [DDPM, Eq. 4]
    q(x_{t−1} | x_t, x_0) = N(μ̃_t, β̃_t·I),                                     [DDPM, Eq. 6-7]
        μ̃_t = β_t·sqrt(ᾱ_{t−1})/(1 − ᾱ_t)·x_0 + (1 − ᾱ_{t−1})·sqrt(α_t)/(1 − ᾱ_t)·x_t
        β̃_t = (1 − ᾱ_{t−1})/(1 − ᾱ_t)·β_t
    p(x_{t−1} | x_t)      = N(μ̃_t(x̂_0(x_t), x_t), σ_t²·I),  σ_t² = β_t or β̃_t  [DDPM, Alg. 2]
    L_simple              = E_{t, x_0, ε} ‖target − model(x_t, t)‖²           [DDPM, Eq. 14]
    L_vlb = L_T + Σ_{t≥1} KL(q(x_{t−1}|x_t,x_0) ‖ p(x_{t−1}|x_t)) − log p(x_0|x_1)  [DDPM, Eq. 5]

The network may predict ε, x0 or v (see `parameterization`). Models are called as
`model(x_t, t)`, or `model(x_t, t, y)` when class labels y are given, with t a
LongTensor [B]; the output must have x_t's shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from minidit.guidance import Inpainting, guided_output, model_output
from minidit.parameterization import WEIGHTINGS, check_kind, loss_weight, to_eps, to_x0, training_target
from minidit.schedules import DiscreteSchedule, extract

VARIANCES = ("beta", "posterior")


def gaussian_noise(
    shape: tuple[int, ...],
    device: torch.device | str,
    dtype: torch.dtype,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Standard normal noise of `shape`, drawn on the generator's device, moved to `device`."""
    if generator is None:
        return torch.randn(shape, device=device, dtype=dtype)
    return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)


def initial_noise(shape: tuple[int, ...], device: torch.device | str, dtype: torch.dtype,
                  generator: torch.Generator | None = None, x_T: Tensor | None = None) -> Tensor:
    """The sampler's start x_T ~ N(0, I) of `shape`, or the given `x_T` (checked against it)."""
    x = gaussian_noise(tuple(shape), device, dtype, generator) if x_T is None else x_T.to(device, dtype)
    if x.shape != tuple(shape):
        raise ValueError(f"x_T has shape {tuple(x.shape)}, expected shape {tuple(shape)}")
    return x


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and dtype of the model's first float parameter or buffer (else CPU float32)."""
    tensors = [*model.parameters(), *model.buffers()] if isinstance(model, nn.Module) else []
    first = next((p for p in tensors if p.is_floating_point()), None)
    return (first.device, first.dtype) if first is not None else (torch.device("cpu"), torch.float32)


@dataclass
class GaussianDiffusion:
    """DDPM on a discrete schedule: forward process, loss, ancestral sampler, bound.

    Args:
        schedule: the `DiscreteSchedule` (T steps).
        prediction: the network's target, "eps", "x0" or "v".
        weighting: per-timestep loss weight, "none", "min_snr" or "eps_equivalent"
            (see `parameterization.loss_weight`).
        min_snr_gamma: γ of Min-SNR-γ.
    """

    schedule: DiscreteSchedule
    prediction: str = "eps"
    weighting: str = "none"
    min_snr_gamma: float = 5.0

    def __post_init__(self) -> None:
        check_kind(self.prediction)
        check_kind(self.weighting, "weighting", WEIGHTINGS)
        s = self.schedule
        betas, alpha_bar, alpha_bar_prev = s.betas, s.alpha_bar, s.alpha_bar_prev
        # posterior q(x_{t-1} | x_t, x_0) [DDPM, Eq. 7]; all float64 [T]
        self.posterior_variance = betas * (1 - alpha_bar_prev) / (1 - alpha_bar)
        self.posterior_mean_coef_x0 = betas * alpha_bar_prev.sqrt() / (1 - alpha_bar)
        self.posterior_mean_coef_xt = (1 - alpha_bar_prev) * s.alphas.sqrt() / (1 - alpha_bar)
        # β̃_0 = 0, so the log variance at t = 0 borrows β̃_1 (it sets the decoder L_0)
        first = self.posterior_variance[1:2] if s.T > 1 else betas[:1]
        self.posterior_log_variance_clipped = torch.log(torch.cat([first, self.posterior_variance[1:]]))
        # σ_t² = β_t at every t, t = 0 included: the reverse variance of data that is smooth at
        # the noise scale, which keeps the decoder (and the bound) tight on 8-bit data
        self.beta_log_variance = torch.log(betas)

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

    # -- forward process -------------------------------------------------------------

    def q_mean_variance(self, x0: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean [B, ...], variance and log variance [B, 1, ...] of q(x_t | x_0) [DDPM, Eq. 4]."""
        self._check(x0, t)
        alpha, sigma = self._alpha_sigma(t, x0)
        log_variance = extract(torch.log1p(-self.schedule.alpha_bar), t, x0)
        return alpha * x0, sigma**2, log_variance

    def q_sample(
        self, x0: Tensor, t: Tensor, eps: Tensor | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """Draw x_t ~ q(x_t | x_0) in one shot: sqrt(ᾱ_t)·x_0 + sqrt(1 − ᾱ_t)·ε."""
        self._check(x0, t)
        if eps is None:
            eps = gaussian_noise(x0.shape, x0.device, x0.dtype, generator)
        alpha, sigma = self._alpha_sigma(t, x0)
        return alpha * x0 + sigma * eps

    def q_posterior_mean_variance(self, x0: Tensor, xt: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean [B, ...], variance β̃_t and clipped log variance [B, 1, ...] of q(x_{t−1}|x_t, x_0)."""
        self._check(xt, t)
        coef_x0 = extract(self.posterior_mean_coef_x0, t, xt)  # [B, 1, ...]
        coef_xt = extract(self.posterior_mean_coef_xt, t, xt)
        mean, variance = coef_x0 * x0 + coef_xt * xt, extract(self.posterior_variance, t, xt)
        return mean, variance, extract(self.posterior_log_variance_clipped, t, xt)

    # -- the model's reverse step -------------------------------------------------------

    def predict_x0_eps(
        self,
        model: nn.Module,
        xt: Tensor,
        t: Tensor,
        y: Tensor | None = None,
        clip_x0: bool = False,
        cfg_scale: float = 1.0,
        null_label: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The model's x̂0 and ε̂ at (x_t, t), optionally guided and with x̂0 clipped to [−1, 1]."""
        self._check(xt, t)
        out = guided_output(model, xt, t, y, cfg_scale, null_label)  # [B, ...], type self.prediction
        alpha, sigma = self._alpha_sigma(t, xt)
        x0 = to_x0(out, self.prediction, xt, alpha, sigma)
        if clip_x0:  # keep ε consistent with the clipped x̂0
            x0 = x0.clamp(-1.0, 1.0)
            return x0, to_eps(x0, "x0", xt, alpha, sigma)
        return x0, to_eps(out, self.prediction, xt, alpha, sigma)

    def p_mean_variance(
        self,
        model: nn.Module,
        xt: Tensor,
        t: Tensor,
        y: Tensor | None = None,
        variance: str = "beta",
        clip_x0: bool = False,
        cfg_scale: float = 1.0,
        null_label: int | None = None,
    ) -> dict[str, Tensor]:
        """p(x_{t−1} | x_t): keys "mean", "variance", "log_variance", "x0", "eps".

        The mean is the posterior mean at the predicted x̂0 (equal to DDPM Alg. 2's
        (x_t − β_t/sqrt(1 − ᾱ_t)·ε̂)/sqrt(α_t) when x̂0 is not clipped). `variance`
        "beta" gives σ_t² = β_t, "posterior" σ_t² = β̃_t (β̃_1 at t = 0, where β̃_0 = 0).
        """
        check_kind(variance, "variance", VARIANCES)
        x0, eps = self.predict_x0_eps(model, xt, t, y, clip_x0, cfg_scale, null_label)
        mean, _, _ = self.q_posterior_mean_variance(x0, xt, t)
        table = self.beta_log_variance if variance == "beta" else self.posterior_log_variance_clipped
        log_variance = extract(table, t, xt)
        return {"mean": mean, "variance": log_variance.exp(), "log_variance": log_variance,
                "x0": x0, "eps": eps}

    # -- training ---------------------------------------------------------------------

    def training_losses(
        self,
        model: nn.Module,
        x0: Tensor,
        y: Tensor | None = None,
        t: Tensor | None = None,
        eps: Tensor | None = None,
        generator: torch.Generator | None = None,
        null_label: int | None = None,
        p_uncond: float = 0.0,
    ) -> dict[str, Tensor]:
        """Per-example weighted MSE with t ~ Uniform{0..T−1}  [DDPM, Alg. 1].

        Args:
            model: the denoiser.
            x0: clean data [B, ...].
            y: class labels [B] or None.
            t, eps: fix the timesteps [B] / noise [B, ...] instead of drawing them.
            generator: source of randomness for t, ε and label dropout.
            null_label, p_uncond: replace each label by `null_label` with probability
                `p_uncond` (label dropout that trains classifier-free guidance [CFG]).

        Returns:
            "loss" [B] (weighted), "mse" [B] (unweighted), "t" [B], "weight" [B].
        """
        B, device = x0.shape[0], x0.device
        if not 0.0 <= p_uncond <= 1.0:
            raise ValueError(f"p_uncond must lie in [0, 1], got {p_uncond!r}")
        if p_uncond > 0 and (y is None or null_label is None):
            raise ValueError("p_uncond > 0 needs class labels y and null_label")
        # 1. t ~ Uniform({0..T-1}), ε ~ N(0, I)
        if t is None:  # drawn here, so in range: no check (a check would sync an accelerator)
            gen_device = generator.device if generator is not None else device
            t = torch.randint(0, self.T, (B,), generator=generator, device=gen_device).to(device)
        else:
            self._check(x0, t)
        if eps is None:
            eps = gaussian_noise(x0.shape, device, x0.dtype, generator)
        if p_uncond > 0:
            gen_device = generator.device if generator is not None else device
            drop = torch.rand(B, generator=generator, device=gen_device).to(device) < p_uncond  # [B]
            y = torch.where(drop, torch.full_like(y, null_label), y)
        # 2. x_t = sqrt(ᾱ_t)·x_0 + sqrt(1 − ᾱ_t)·ε [DDPM, Eq. 4]
        alpha, sigma = self._alpha_sigma(t, x0)
        xt = alpha * x0 + sigma * eps
        # 3. regress the target, ‖target − model(x_t, t)‖² per example [DDPM, Eq. 14]
        target = training_target(self.prediction, x0, eps, alpha, sigma)
        out = model_output(model, xt, t, y)
        mse = (out - target).pow(2).flatten(1).mean(dim=1)  # [B]
        snr = extract(self.schedule.alpha_bar / (1 - self.schedule.alpha_bar), t, mse)  # [B]
        weight = loss_weight(snr, self.prediction, self.weighting, self.min_snr_gamma)
        return {"loss": weight * mse, "mse": mse, "t": t, "weight": weight}

    # -- ancestral sampling [DDPM, Alg. 2] ----------------------------------------------

    @torch.no_grad()
    def sample(
        self,
        model: nn.Module,
        shape: tuple[int, ...],
        y: Tensor | None = None,
        variance: str = "beta",
        clip_x0: bool = False,
        return_trajectory: bool = False,
        progress: bool = True,
        generator: torch.Generator | None = None,
        cfg_scale: float = 1.0,
        null_label: int | None = None,
        x_T: Tensor | None = None,
        inpainting: Inpainting | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Draw samples with the T-step ancestral sampler  [DDPM, Alg. 2].

        Args:
            model: the denoiser; its first parameter sets device and dtype.
            shape: sample shape [B, ...].
            y: class labels [B] or None; cfg_scale, null_label: classifier-free guidance.
            variance: "beta" (σ_t² = β_t) or "posterior" (σ_t² = β̃_t).
            clip_x0: clip x̂0 to [−1, 1] at every step (for data in [−1, 1]).
            return_trajectory: also return every x_t, [T + 1, B, ...] (x_T first).
            generator: source of noise; x_T: start from this noise instead.
            inpainting: keep known pixels (see `guidance.Inpainting`).

        Returns:
            x_0 [B, ...], and the trajectory when asked.
        """
        check_kind(variance, "variance", VARIANCES)
        device, dtype = model_device_dtype(model)
        # 1. x_T ~ N(0, I)
        x = initial_noise(shape, device, dtype, generator, x_T)
        y = y.to(device) if y is not None else None
        trajectory = [x.cpu()] if return_trajectory else None
        for step in tqdm(range(self.T - 1, -1, -1), disable=not progress, desc="DDPM"):
            t = torch.full((x.shape[0],), step, dtype=torch.long, device=device)
            # 2. mean and variance of p(x_{t-1} | x_t) from the model's x̂0
            p = self.p_mean_variance(model, x, t, y, variance, clip_x0, cfg_scale, null_label)
            # 3. x_{t-1} = μ + σ_t·z, no noise on the last step
            x = p["mean"]
            if step > 0:
                x = x + (0.5 * p["log_variance"]).exp() * gaussian_noise(x.shape, device, dtype, generator)
            if inpainting is not None:
                x = inpainting(self, x, step - 1, generator)
            if trajectory is not None:
                trajectory.append(x.cpu())
        return (x, torch.stack(trajectory)) if trajectory is not None else x

    # -- the variational bound in bits/dim [DDPM, Sec. 3.3] -------------------------------

    def vb_terms(
        self,
        model: nn.Module,
        x0: Tensor,
        xt: Tensor,
        t: Tensor,
        y: Tensor | None = None,
        variance: str = "posterior",
        clip_x0: bool = False,
    ) -> Tensor:
        """One term of the bound per example, in bits/dim, [B].

        KL(q(x_{t−1}|x_t, x_0) ‖ p(x_{t−1}|x_t)) for t ≥ 1, and the discretised-Gaussian
        decoder −log p(x_0|x_1) for t = 0 (x_0 on the 8-bit grid in [−1, 1]).
        """
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x0, xt, t)
        p = self.p_mean_variance(model, xt, t, y, variance, clip_x0)
        kl = _normal_kl(true_mean, true_log_var, p["mean"], p["log_variance"])  # [B, ...] nats
        nll = -_discretized_gaussian_log_likelihood(x0, p["mean"], p["log_variance"])  # [B, ...] nats
        t0 = (t == 0).reshape(-1, *([1] * (x0.ndim - 1)))  # [B, 1, ...]
        return torch.where(t0, nll, kl).flatten(1).mean(dim=1) / math.log(2.0)

    def prior_bpd(self, x0: Tensor) -> Tensor:
        """L_T = KL(q(x_T | x_0) ‖ N(0, I)) in bits/dim, [B]."""
        t = torch.full((x0.shape[0],), self.T - 1, dtype=torch.long, device=x0.device)
        mean, _, log_var = self.q_mean_variance(x0, t)
        kl = _normal_kl(mean, log_var, torch.zeros_like(mean), torch.zeros_like(log_var))
        return kl.flatten(1).mean(dim=1) / math.log(2.0)

    @torch.no_grad()
    def bits_per_dim(
        self,
        model: nn.Module,
        x0: Tensor,
        y: Tensor | None = None,
        variance: str = "posterior",
        clip_x0: bool = False,
        generator: torch.Generator | None = None,
        progress: bool = True,
    ) -> dict[str, Tensor]:
        """The full bound −log p(x_0) ≤ L_vlb for 8-bit data in [−1, 1], in bits/dim.

        One x_t ~ q(x_t|x_0) is drawn per example and step (an unbiased estimate).

        Returns:
            "total" [B], "prior" [B] (L_T) and "terms" [B, T] (terms[:, 0] is the
            decoder L_0, terms[:, t] the KL term of step t).
        """
        terms = torch.zeros(x0.shape[0], self.T, dtype=x0.dtype, device=x0.device)
        for step in tqdm(range(self.T - 1, -1, -1), disable=not progress, desc="bits/dim"):
            t = torch.full((x0.shape[0],), step, dtype=torch.long, device=x0.device)
            xt = self.q_sample(x0, t, generator=generator)
            terms[:, step] = self.vb_terms(model, x0, xt, t, y, variance, clip_x0)
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
