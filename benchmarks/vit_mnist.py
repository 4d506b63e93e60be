"""A short recipe: train minidit's ViT classifier on MNIST for a fixed wall-clock budget.

The learning rate follows the clock rather than a step count, so the same recipe fits any
machine: a linear warm-up over the first 5% of the budget, then a cosine decay to zero at the
deadline. Each batch is lightly augmented (a random rotation, scale and shift, one batched
`grid_sample`), which matters for a ViT: it has none of a CNN's built-in translation prior.

    python benchmarks/vit_mnist.py --minutes 10          # target: >= 99.0% test accuracy
    MINIDIT_DATA=/path/to/data python benchmarks/vit_mnist.py --minutes 2 --threads 2
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from minidit.data import load_mnist
from minidit.vit import VIT_CONFIGS, make_vit


def augment(x: torch.Tensor, degrees: float = 10.0, scale: float = 0.1, shift: float = 2.0) -> torch.Tensor:
    """Random rotation (+-degrees), zoom (1 +- scale) and shift (+-shift pixels) of x [B, C, H, W]."""
    B, _, H, _ = x.shape
    angle = (torch.rand(B, device=x.device) * 2 - 1) * math.radians(degrees)
    zoom = 1 + (torch.rand(B, device=x.device) * 2 - 1) * scale
    offset = (torch.rand(B, 2, device=x.device) * 2 - 1) * (2 * shift / H)  # in [-1, 1] units
    cos, sin = angle.cos() / zoom, angle.sin() / zoom
    theta = torch.stack([torch.stack([cos, -sin, offset[:, 0]], 1),
                         torch.stack([sin, cos, offset[:, 1]], 1)], 1)  # [B, 2, 3]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # [B, H, W, 2]
    return F.grid_sample(x + 1, grid, align_corners=False) - 1  # the background -1 stays -1


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    """Fraction of `images` [N, C, H, W] whose predicted class equals `labels` [N]."""
    model.eval()
    hits = sum((model(images[i : i + batch_size]).argmax(1) == labels[i : i + batch_size]).sum().item()
               for i in range(0, len(images), batch_size))
    model.train()
    return hits / len(images)


def train_vit_classifier(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                         minutes: float, batch_size: int = 128, lr: float = 3e-3,
                         weight_decay: float = 0.05, label_smoothing: float = 0.1,
                         seed: int = 0, progress: bool = True) -> dict:
    """Train `model` with AdamW on (images [N, C, H, W], labels [N]) for `minutes` of wall clock.

    Returns:
        {"steps", "epochs", "seconds"} of the run.
    """
    if minutes <= 0 or batch_size < 1:
        raise ValueError(f"minutes must be > 0 and batch_size >= 1, got {minutes}, {batch_size}")
    g = torch.Generator().manual_seed(seed)
    decay = [p for p in model.parameters() if p.ndim >= 2]  # no decay on biases, norms, tokens
    rest = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=lr)
    budget, start, steps, seen = 60 * minutes, time.perf_counter(), 0, 0
    bar = tqdm(total=round(budget), unit="s", disable=not progress)
    order = torch.randperm(len(images), generator=g)
    model.train()
    while (elapsed := time.perf_counter() - start) < budget:
        # 1. the learning rate of this moment: warm-up, then cosine to zero at the deadline
        frac = elapsed / budget
        for group in opt.param_groups:
            group["lr"] = lr * min(frac / 0.05, 0.5 * (1 + math.cos(math.pi * frac)))
        # 2. the next batch of a fresh permutation of the data, augmented
        if len(order) < batch_size:
            order = torch.randperm(len(images), generator=g)
        idx, order = order[:batch_size], order[batch_size:]
        x, y = augment(images[idx]), labels[idx]
        # 3. one AdamW step on the label-smoothed cross-entropy
        loss = F.cross_entropy(model(x), y, label_smoothing=label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps, seen = steps + 1, seen + len(idx)
        bar.update(round(time.perf_counter() - start) - bar.n)
        bar.set_postfix(loss=f"{loss.item():.3f}", step=steps, refresh=False)
    bar.close()
    return {"steps": steps, "epochs": seen / len(images), "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--config", default="vit-mnist", choices=list(VIT_CONFIGS))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", default=None, help="write the result line to this markdown file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train_x, train_y = load_mnist("train")
    test_x, test_y = load_mnist("test")
    model = make_vit(args.config)
    run = train_vit_classifier(model, train_x, train_y, args.minutes, args.batch_size, args.lr,
                               seed=args.seed)
    acc = accuracy(model, test_x, test_y)
    line = (f"{args.config}: test accuracy {100 * acc:.2f}% after {run['steps']} steps "
            f"({run['epochs']:.1f} epochs) in {run['seconds'] / 60:.1f} min, "
            f"{torch.get_num_threads()} threads")
    print(line)
    if args.results:
        device = f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"
        Path(args.results).write_text(
            "# ViT classifier on MNIST, fixed wall-clock budget\n\n"
            f"{line}.\n\nDevice: {device}; torch {torch.__version__}; {time.strftime('%Y-%m-%d')}.\n\n"
            f"Command: `python benchmarks/vit_mnist.py --minutes {args.minutes:g} --config {args.config} "
            f"--batch-size {args.batch_size} --lr {args.lr:g} --seed {args.seed}`\n")


if __name__ == "__main__":
    main()
