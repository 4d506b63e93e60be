"""Train the feature network behind the MNIST-classifier FD and write the shipped weights.

The one command that reproduces ``minidit/weights/mnist_feature_net.safetensors``
(its exact command line, time and device are recorded in ``mnist_feature_net.json``):

    MINIDIT_DATA=/path/to/data python benchmarks/train_feature_net.py --threads 1

(We trained with one thread because the 2-core machine was shared: two OpenMP threads
that keep waiting on each other ran 2-4x slower than one. On an idle machine use more.)

It trains `minidit.classifier.FeatureNet` on the 60 000 training digits with random shifts
of up to ±2 pixels, reports the error on the 10 000 test digits, and writes the weights
plus a JSON record (test accuracy, epochs, seed, date, command, device, time) beside them.
`--smoke` runs a short sanity check on a subset and writes nothing unless `--out-dir` is
given. `--dataset fashion_mnist` trains weights for Fashion-MNIST (not shipped).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from minidit import data
from minidit.classifier import FeatureNet, save_feature_net

ROOT = Path(__file__).resolve().parents[1]


def random_shift(x: torch.Tensor, max_shift: int, g: torch.Generator) -> torch.Tensor:
    """Translate each image by its own (dy, dx) in [-max_shift, max_shift], filling with -1 (black)."""
    B, _, H, W = x.shape
    s = max_shift
    padded = F.pad(x, (s, s, s, s), value=-1.0)  # [B, 1, H + 2s, W + 2s]
    dy = torch.randint(0, 2 * s + 1, (B, 1, 1), generator=g)  # [B, 1, 1] crop offsets
    dx = torch.randint(0, 2 * s + 1, (B, 1, 1), generator=g)
    rows = dy + torch.arange(H).view(1, H, 1)  # [B, H, 1]
    cols = dx + torch.arange(W).view(1, 1, W)  # [B, 1, W]
    b = torch.arange(B).view(B, 1, 1)  # [B, 1, 1]
    return padded[b, 0, rows, cols].unsqueeze(1)  # [B, 1, H, W]


@torch.no_grad()
def accuracy(net: FeatureNet, x: torch.Tensor, y: torch.Tensor, batch_size: int = 250) -> float:
    net.eval()
    correct = sum((net(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum().item()
                  for i in range(0, x.shape[0], batch_size))
    return correct / x.shape[0]


def load(dataset: str, split: str, root: str | None):
    if dataset == "mnist":
        return data.load_mnist(split=split, root=root)
    return data.load_fashion_mnist(split=split, root=root)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", choices=("mnist", "fashion_mnist"), default="mnist")
    p.add_argument("--root", default=None, help="dataset root (default: $MINIDIT_DATA)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of the one-cycle schedule")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (1 is faster on a busy machine)")
    p.add_argument("--smoke", action="store_true", help="2 epochs on 20000 images, a sanity check")
    p.add_argument("--out-dir", default=None, help="where to write weights (default: minidit/weights)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)

    x_train, y_train = load(args.dataset, "train", args.root)
    x_test, y_test = load(args.dataset, "test", args.root)
    epochs = args.epochs
    if args.smoke:
        x_train, y_train, epochs = x_train[:20000], y_train[:20000], 2

    net = FeatureNet()
    steps_per_epoch = -(-x_train.shape[0] // args.batch_size)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=epochs * steps_per_epoch)

    t0 = time.time()
    for epoch in range(epochs):
        net.train()
        perm = torch.randperm(x_train.shape[0], generator=g)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{epochs}")
        for step in bar:
            idx = perm[step * args.batch_size : (step + 1) * args.batch_size]
            x = random_shift(x_train[idx], 2, g)  # [B, 1, 28, 28]
            loss = F.cross_entropy(net(x), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}")
        print(f"epoch {epoch + 1}: last training loss {loss.item():.4f}", flush=True)
    train_time = time.time() - t0
    test_acc = accuracy(net, x_test, y_test)

    record = {
        "model": "minidit.classifier.FeatureNet",
        "dataset": args.dataset,
        "test_accuracy": test_acc,
        "test_errors": round((1 - test_acc) * x_test.shape[0]),
        "n_test": x_test.shape[0],
        "epochs": epochs,
        "batch_size": args.batch_size,
        "peak_lr": args.lr,
        "seed": args.seed,
        "augmentation": "random shifts of up to ±2 px",
        "parameters": sum(q.numel() for q in net.parameters()),
        "train_time_s": round(train_time, 1),
        "device": f"{os.cpu_count()}-core CPU, {args.threads} torch thread(s)",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
        "command": "python benchmarks/train_feature_net.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    print(json.dumps(record, indent=2))
    out_dir = args.out_dir or (None if args.smoke else ROOT / "minidit" / "weights")
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = f"{args.dataset}_feature_net"
        save_feature_net(net, out_dir / f"{stem}.safetensors")
        os.chmod(out_dir / f"{stem}.safetensors", 0o644)  # safetensors writes 0600; package data must be readable
        record["sha256"] = hashlib.sha256((out_dir / f"{stem}.safetensors").read_bytes()).hexdigest()
        (out_dir / f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {out_dir / stem}.safetensors and .json")
    return record


if __name__ == "__main__":
    main()
