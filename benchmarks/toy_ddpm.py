"""Train a small MLP DDPM on a 2-D ring of Gaussians on the CPU, sample it, and score it.

Sample quality is the squared maximum mean discrepancy with a Gaussian kernel,

    MMD²(P, Q) = E k(x, x') + E k(y, y') − 2 E k(x, y),   k(x, y) = Σ_b exp(−‖x − y‖²/(2b²)),

between the model's samples and a fresh data set (the biased V-statistic, always ≥ 0).
Two fresh data sets of the same size give the noise floor: a perfect sampler reaches it.
A Gaussian with the data's mean and covariance is the reference for a bad sampler.

    python benchmarks/toy_ddpm.py                       # cosine schedule, v-prediction, ancestral
    python benchmarks/toy_ddpm.py --sampler ddim --steps 1500
    python benchmarks/toy_ddpm.py --schedule cosine --prediction eps --sampler ddim   # fails: see below

With ε-prediction on the cosine schedule, ᾱ_{T−1} ≈ 2e-9, so x̂0 = (x_t − sqrt(1 − ᾱ)ε̂)/sqrt(ᾱ)
multiplies the network's error at the first step by ~1/sqrt(ᾱ); use v (or x0) prediction,
the linear schedule, or clip_x0 for data in [−1, 1].
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from minidit.ddim import sample_ddim
from minidit.ddpm import GaussianDiffusion, sample_ddpm
from minidit.denoiser import Denoiser
from minidit.grids import ddpm_grid
from minidit.schedules import make_schedule
from minidit.toy_models import ToyDenoiser, ToyDenoiserConfig


def ring_data(n: int, generator: torch.Generator, k: int = 8, radius: float = 1.5,
              std: float = 0.1) -> torch.Tensor:
    """n points [n, 2] from k equal Gaussians of std `std` on a circle of `radius`."""
    angle = 2 * math.pi * torch.randint(0, k, (n,), generator=generator) / k  # [n]
    centres = radius * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)  # [n, 2]
    return centres + std * torch.randn(n, 2, generator=generator)


def mmd2(x: torch.Tensor, y: torch.Tensor, bandwidths: tuple[float, ...] = (0.05, 0.2, 1.0)) -> float:
    """Biased MMD² between samples x [n, D] and y [m, D], summed over kernel bandwidths."""

    def mean_kernel(a: torch.Tensor, b: torch.Tensor) -> float:
        d2 = torch.cdist(a.double(), b.double()).pow(2)  # [n, m]
        return float(sum(torch.exp(-d2 / (2 * bw * bw)).mean() for bw in bandwidths))

    return mean_kernel(x, x) + mean_kernel(y, y) - 2 * mean_kernel(x, y)


def run(steps: int = 3000, batch: int = 512, lr: float = 2e-3, n_samples: int = 2000, sampler: str = "ddpm",
        schedule: str = "cosine", prediction: str = "v", width: int = 128, seed: int = 0,
        progress: bool = True) -> dict[str, float]:
    """Train, sample, and return MMD² of the model, the noise floor and the Gaussian baseline.

    The floor is the mean MMD² over 4 pairs of fresh data sets of `n_samples` each.
    """
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    diffusion = GaussianDiffusion(make_schedule(schedule, 1000), prediction=prediction)
    model = ToyDenoiser(ToyDenoiserConfig(width=width, depth=3))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    lr_schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    # 1. train on fresh data every step (the simple loss on the chosen target)
    start = time.perf_counter()
    for step in range(steps):
        loss = diffusion.training_losses(model, ring_data(batch, g), generator=g)["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lr_schedule.step()
        if progress and (step + 1) % 500 == 0:
            print(f"step {step + 1:5d}  loss {loss.item():.4f}")
    train_s = time.perf_counter() - start
    # 2. sample: the T-step ancestral sampler, or DDIM with 100 steps
    start = time.perf_counter()
    model.eval()
    s = diffusion.schedule
    den = Denoiser(model, prediction, s.process, time_scale=s.T, time_shift=-1.0)  # step t at time (t + 1)/T
    x_T = torch.randn(n_samples, 2, generator=g)
    if sampler == "ddpm":
        x = sample_ddpm(den, x_T, ddpm_grid(s.T), generator=g)
    else:
        x = sample_ddim(den, x_T, ddpm_grid(s.T, 100), generator=g)
    sample_s = time.perf_counter() - start
    # 3. score against fresh data; the floor and the Gaussian baseline on the same footing
    reference = ring_data(n_samples, g)
    floor = sum(mmd2(ring_data(n_samples, g), reference) for _ in range(4)) / 4
    other = ring_data(n_samples, g)
    chol = torch.linalg.cholesky(torch.cov(other.T))  # [2, 2]
    gaussian = other.mean(0) + torch.randn(n_samples, 2, generator=g) @ chol.T
    return {"mmd2_model": mmd2(x, reference), "mmd2_floor": floor, "mmd2_gaussian": mmd2(gaussian, reference),
            "train_s": train_s, "sample_s": sample_s, "final_loss": loss.item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm")
    parser.add_argument("--schedule", choices=["linear", "cosine", "sigmoid"], default="cosine")
    parser.add_argument("--prediction", choices=["eps", "x0", "v"], default="v")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (small matrices: 1 is as fast, and immune to oversubscription)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    r = run(args.steps, args.batch, args.lr, args.samples, args.sampler, args.schedule, args.prediction,
            args.width, args.seed)
    print(f"train {r['train_s']:.1f} s, sample ({args.sampler}) {r['sample_s']:.1f} s, "
          f"threads {torch.get_num_threads()}")
    print(f"MMD²: model {r['mmd2_model']:.5f}   noise floor {r['mmd2_floor']:.5f}   "
          f"Gaussian fit {r['mmd2_gaussian']:.5f}")


if __name__ == "__main__":
    main()
