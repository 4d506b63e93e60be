"""A small convolutional KL-autoencoder: the first stage of latent diffusion [LDM, Sec. 3.1].

The encoder E maps an image x [C, H, W] to a diagonal Gaussian posterior over a latent z
of a few channels at 1/f of the resolution; the decoder D maps z back to pixels:

    q(z | x) = N(μ(x), diag σ²(x)),   z = μ + σ ⊙ ε,  ε ~ N(0, I)      (reparameterisation)
    KL(q ‖ N(0, I)) = ½ Σ_j (μ_j² + σ_j² − 1 − log σ_j²)               [LDM, App. G; Kingma, Welling 2014]
    L(x) = (1/D) · (‖x − D(z)‖² + β · KL),  D = C·H·W                  (per pixel; β small)

A tiny β only keeps the latent near N(0, I) in scale ("KL-reg" of [LDM]); it is not a
generative VAE. Diffusion then runs on z · s, with the scaling factor s = 1 / std(z)
measured on data so that the diffused latents have unit variance [LDM, Sec. 4.3.2].
Quality of the round trip x → D(E(x)) is reported as PSNR = 10 log10(peak² / MSE), with
peak-to-peak 2 for images in [−1, 1], and as the FD of reconstructions (minidit.metrics).
`vae_loss` is that loss per example; `minidit.run.latent.AutoencoderObjective` trains it through
the training engine like any diffusion objective.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
import torch
from torch import Tensor, nn

from minidit import data, metrics


# ----------------------------------------------------------------------------- the posterior


class DiagonalGaussian:
    """The posterior q(z | x) = N(mean, diag exp(logvar)); mean, logvar [B, c, h, w]."""

    def __init__(self, moments: Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)  # [B, 2c, h, w] -> 2 x [B, c, h, w]
        self.logvar = logvar.clamp(-30.0, 20.0)  # keeps exp() finite early in training
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """z = μ + σ ⊙ ε, differentiable in μ and σ."""
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self) -> Tensor:
        """The posterior mean μ (its mode)."""
        return self.mean

    def kl(self) -> Tensor:
        """KL(q ‖ N(0, I)) per example [B], summed over the latent's c·h·w entries."""
        return 0.5 * (self.mean**2 + self.logvar.exp() - 1.0 - self.logvar).flatten(1).sum(1)


# ----------------------------------------------------------------------------- the networks


@dataclass(frozen=True)
class AutoencoderConfig:
    """Sizes of an `Autoencoder`: `len(channels) − 1` stride-2 downsamplings, so f = 2^(levels − 1)."""

    in_channels: int = 1
    image_size: int = 28
    latent_channels: int = 4
    channels: tuple[int, ...] = (32, 64, 64)  # width at each resolution, full resolution first
    groups: int = 8  # GroupNorm groups

    def __post_init__(self):
        f = 2 ** max(len(self.channels) - 1, 0)
        if len(self.channels) < 1 or self.image_size % f:
            raise ValueError(f"image_size={self.image_size} must be divisible by the downsampling factor {f} "
                             f"(len(channels) - 1 = {len(self.channels) - 1} halvings)")
        if any(c % self.groups for c in self.channels):
            raise ValueError(f"every width in channels={self.channels} must be divisible by groups={self.groups}")

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(c, h, w) of z."""
        side = self.image_size // 2 ** (len(self.channels) - 1)
        return self.latent_channels, side, side


AUTOENCODER_CONFIGS = {
    "ae-mnist": AutoencoderConfig(1, 28, 4, (16, 32, 64)),  # 1x28x28 -> 4x7x7 (f = 4, 4x fewer numbers)
    "ae-cifar10": AutoencoderConfig(3, 32, 4, (64, 128, 128)),  # 3x32x32 -> 4x8x8 (f = 4, 12x fewer)
}


class ResBlock(nn.Module):
    """h + conv(SiLU(GN(conv(SiLU(GN(h)))))), with a 1x1 skip when the width changes."""

    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.body = nn.Sequential(nn.GroupNorm(groups, c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1),
                                  nn.GroupNorm(groups, c_out), nn.SiLU(), nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)

    def forward(self, h: Tensor) -> Tensor:
        return self.skip(h) + self.body(h)


class Autoencoder(nn.Module):
    """Encoder (conv → [ResBlock → stride-2 conv] per level → 2c moments) and its mirror decoder
    (nearest ×2 upsampling + conv). `encode` gives q(z | x), `decode` z → x̂, `forward` x → x̂."""

    def __init__(self, config: AutoencoderConfig | None = None, **overrides):
        super().__init__()
        config = dataclasses.replace(config or AutoencoderConfig(), **overrides)
        self.config = c = config
        widths, g = c.channels, c.groups
        # encoder: full resolution -> 1/f, then the moments (μ, log σ²)
        enc = [nn.Conv2d(c.in_channels, widths[0], 3, padding=1)]
        for i, w in enumerate(widths):
            enc.append(ResBlock(widths[i - 1] if i else w, w, g))
            if i < len(widths) - 1:
                enc.append(nn.Conv2d(w, w, 3, stride=2, padding=1))  # [B, w, H, W] -> [B, w, H/2, W/2]
        enc += [ResBlock(widths[-1], widths[-1], g), nn.GroupNorm(g, widths[-1]), nn.SiLU(),
                nn.Conv2d(widths[-1], 2 * c.latent_channels, 3, padding=1)]
        self.encoder = nn.Sequential(*enc)
        # decoder: the mirror image
        dec = [nn.Conv2d(c.latent_channels, widths[-1], 3, padding=1), ResBlock(widths[-1], widths[-1], g)]
        for i in reversed(range(len(widths))):
            dec.append(ResBlock(widths[min(i + 1, len(widths) - 1)], widths[i], g))
            if i > 0:
                dec += [nn.Upsample(scale_factor=2.0, mode="nearest"),  # [B, w, h, w] -> [B, w, 2h, 2w]
                        nn.Conv2d(widths[i], widths[i], 3, padding=1)]
        dec += [nn.GroupNorm(g, widths[0]), nn.SiLU(), nn.Conv2d(widths[0], c.in_channels, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.config.latent_shape

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """x [B, C, H, W] in [−1, 1] -> q(z | x) over z [B, c, H/f, W/f]."""
        c = self.config
        if x.ndim != 4 or tuple(x.shape[1:]) != (c.in_channels, c.image_size, c.image_size):
            raise ValueError(f"x must have shape [B, {c.in_channels}, {c.image_size}, {c.image_size}], "
                             f"got {list(x.shape)}")
        return DiagonalGaussian(self.encoder(x))

    def decode(self, z: Tensor) -> Tensor:
        """z [B, c, h, w] -> x̂ [B, C, H, W] (not clipped)."""
        if z.ndim != 4 or tuple(z.shape[1:]) != self.latent_shape:
            raise ValueError(f"z must have shape [B, {', '.join(map(str, self.latent_shape))}], got {list(z.shape)}")
        return self.decoder(z)

    def forward(self, x: Tensor, generator: torch.Generator | None = None,
                sample: bool = True) -> tuple[Tensor, DiagonalGaussian]:
        """(x̂ [B, C, H, W], q(z | x)); z is drawn from q (or its mean with sample=False)."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.decode(z), posterior


def make_autoencoder(name: str, in_channels: int | None = None, input_size: int | None = None,
                     num_classes: int = 0, **overrides) -> Autoencoder:
    """An `Autoencoder` from `AUTOENCODER_CONFIGS[name]`, sized for a dataset (the signature of
    `minidit.train.make_model`'s builders; labels are not used)."""
    if name not in AUTOENCODER_CONFIGS:
        raise ValueError(f"unknown autoencoder {name!r}; valid names: {list(AUTOENCODER_CONFIGS)}")
    sizes = {k: v for k, v in (("in_channels", in_channels), ("image_size", input_size)) if v is not None}
    if "channels" in overrides:
        overrides["channels"] = tuple(overrides["channels"])
    return Autoencoder(AUTOENCODER_CONFIGS[name], **{**sizes, **overrides})


AUTOENCODER_BUILDERS = {name: functools.partial(make_autoencoder, name) for name in AUTOENCODER_CONFIGS}


# ----------------------------------------------------------------------------- training and quality


def psnr(x: Tensor, x_hat: Tensor, peak_to_peak: float = 2.0) -> Tensor:
    """PSNR in dB per image [B] = 10 log10(peak² / mean (x − x̂)²), images in [−1, 1] by default."""
    mse = (x.float() - x_hat.float()).pow(2).flatten(1).mean(1)  # [B]
    return 10 * torch.log10(peak_to_peak**2 / mse.clamp_min(1e-12))


def vae_loss(model: Autoencoder, x0: Tensor, beta: float, generator: torch.Generator | None = None) -> Tensor:
    """Per-example (‖x0 − D(z)‖² + β·KL(q(z | x0) ‖ N(0, I))) / D, z ~ q(z | x0) [VAE; LDM, Sec. 3].

    Returns:
        [B]: both terms per pixel of x0 (D = C·H·W).
    """
    # 1. z ~ q(z | x0) by reparameterisation, x̂ = D(z)
    x_hat, posterior = model(x0, generator)
    # 2. reconstruction plus β · closed-form KL, both per pixel of x0
    D = x0[0].numel()
    return ((x_hat.float() - x0.float()).pow(2).flatten(1).sum(1) + beta * posterior.kl().float()) / D


@torch.no_grad()
def latent_scaling_factor(model: Autoencoder, images: Tensor, *, sample: bool = True, batch_size: int = 500,
                          generator: torch.Generator | None = None) -> float:
    """s = 1 / std(z) over every entry of the latents of `images` [N, C, H, W], as in [LDM, Sec. 4.3.2].

    z is drawn from q(z | x) (`sample`) or is its mean, as the latent objective will use it.
    """
    device = next(model.parameters()).device
    z = []
    for start in range(0, len(images), batch_size):
        posterior = model.encode(images[start:start + batch_size].to(device))
        z.append((posterior.sample(generator) if sample else posterior.mode()).float().cpu())
    return 1.0 / torch.cat(z).double().std().item()


@torch.no_grad()
def evaluate_reconstructions(model: Autoencoder, dataset: str = "mnist", n: int = 1000, *,
                             root: str | None = None, batch_size: int = 500, progress: bool = False) -> dict:
    """Round-trip quality on n training images x → D(mean of q(z | x)).

    For MNIST the images are exactly those of the FD floor of `minidit.metrics.evaluate_samples`
    (the same seeded subset of the train split), so the reconstructions' FD compares with the
    floor like for like: the floor is the FD of the originals themselves.

    Returns:
        {"psnr": mean dB, "mse", "fd" and "fd_floor" (None unless MNIST), "accuracy" of the
            MNIST classifier on the reconstructions (None unless MNIST), "n", "images" [n, C, H, W],
            "reconstructions" [n, C, H, W]}.
    """
    images, labels = data.load_dataset(dataset, "train", root=root)
    if not isinstance(n, int) or not 2 <= n <= min(len(images), 10_000):
        raise ValueError(f"n must be an int in [2, {min(len(images), 10_000)}], got {n!r}")
    idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(metrics.REFERENCE_SEED))[:n]
    x, y = images[idx], labels[idx]  # [n, C, H, W], [n]
    device = next(model.parameters()).device
    x_hat = torch.cat([model(x[i:i + batch_size].to(device), sample=False)[0].float().clamp(-1, 1).cpu()
                       for i in range(0, n, batch_size)])
    out = {"psnr": psnr(x, x_hat).mean().item(), "mse": (x - x_hat).pow(2).mean().item(),
           "fd": None, "fd_floor": None, "accuracy": None, "n": n, "images": x, "reconstructions": x_hat}
    if dataset in metrics.EVAL_DATASETS:
        scores = metrics.evaluate_samples(x_hat, y, dataset, n, root, device, progress)
        out.update(fd=scores["fd"], fd_floor=scores["fd_floor"], accuracy=scores["accuracy"])
    return out
