"""Helpers for the training tests: toy objectives, and a script run in subprocesses.

    python tests/_train_worker.py run CONFIG_JSON [--resume] [--delay S] [--wait FILE]
        train with the config (one process), sleeping S seconds per micro-step; with
        --wait, import everything first and start only once FILE exists
    torchrun --nproc_per_node=2 tests/_train_worker.py ddp OUT_DIR
        the DDP checks: a deterministic run per rank, then a DDPM run, its resume and a
        reference; each rank saves what the test compares into OUT_DIR
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from minidit.run.build import make_objective
from minidit.run.config import TrainConfig
from minidit.run.engine import train


class DenoiseObjective:
    """A deterministic loss: reconstruct x0 from x0/2 at a fixed t (no randomness at all),
    so runs that split a batch differently must agree up to float rounding."""

    kind = "denoise"

    def config(self) -> dict:
        return {"kind": self.kind}

    def loss(self, model, x0, y, generator):
        t = torch.full((x0.shape[0],), 0.5, device=x0.device)
        out = model(x0 * 0.5, t * 1000, y)
        return (out.float() - x0).pow(2).flatten(1).mean(1), t

    def sample(self, model, shape, y=None, generator=None):
        return torch.randn(shape, generator=generator, device=generator.device).clamp(-1, 1)


class SlowObjective:
    """Wraps an objective and sleeps in every `loss` call, so a run can be killed mid-way."""

    def __init__(self, inner, delay: float):
        self.inner, self.delay, self.kind = inner, delay, inner.kind

    def config(self) -> dict:
        return self.inner.config()

    def loss(self, model, x0, y, generator):
        time.sleep(self.delay)
        return self.inner.loss(model, x0, y, generator)

    def sample(self, model, shape, y=None, generator=None):
        return self.inner.sample(model, shape, y, generator)


class NaNAfter:
    """Wraps an objective and multiplies its losses by `value` (NaN by default) on calls k + 1 .. until."""

    def __init__(self, inner, k: int, until: int | None = None, value: float = float("nan")):
        self.inner, self.k, self.until, self.value, self.calls, self.kind = inner, k, until, value, 0, inner.kind

    def config(self) -> dict:
        return self.inner.config()

    def loss(self, model, x0, y, generator):
        self.calls += 1
        loss, t = self.inner.loss(model, x0, y, generator)
        bad = self.calls > self.k and (self.until is None or self.calls <= self.until)
        return (loss * self.value if bad else loss), t

    def sample(self, model, shape, y=None, generator=None):
        return self.inner.sample(model, shape, y, generator)


def tiny_config(out_dir, **changes) -> TrainConfig:
    """A run of a small MLP on 8x8 random images with a 100-step DDPM: ~1 ms per step."""
    base = TrainConfig(model="mlp", model_overrides={"hidden": 32}, dataset="synthetic",
                       dataset_size=256, objective={"kind": "ddpm", "T": 100, "sample_steps": 5},
                       batch_size=16, lr=1e-3, warmup_steps=3, cosine=True, ema_decay=0.9,
                       steps=12, log_every=1, sample_every=0, checkpoint_every=4, n_samples=4,
                       device="cpu", out_dir=str(out_dir))
    return dataclasses.replace(base, **changes)


def _run(argv: list[str]) -> None:
    config = TrainConfig.from_dict(json.loads(Path(argv[0]).read_text()))
    delay = float(argv[argv.index("--delay") + 1]) if "--delay" in argv else 0.0
    objective = SlowObjective(make_objective(config), delay) if delay else None
    if "--wait" in argv:
        go = Path(argv[argv.index("--wait") + 1])
        while not go.exists():
            time.sleep(0.01)
    train(config, resume="--resume" in argv, progress=False, objective=objective)


def _ddp(out: Path) -> None:
    # several runs in one process share one group (train() makes and ends its own otherwise)
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    # 1. deterministic: the same global batch as one process -> the same weights (tolerance)
    summary = train(tiny_config(out / "denoise", steps=6), progress=False, objective=DenoiseObjective())
    torch.save(summary["model"].state_dict(), out / f"denoise_rank{rank}.pt")
    # 2. DDPM with per-rank noise: 8 steps straight, and 4 + 4 with a resume in between
    #    (a constant lr after the warm-up, so that both halves see the same schedule)
    train(tiny_config(out / "straight", steps=8, cosine=False), progress=False)
    train(tiny_config(out / "resumed", steps=4, cosine=False), progress=False)
    summary = train(tiny_config(out / "resumed", steps=8, cosine=False), resume=True, progress=False)
    torch.save(summary["model"].state_dict(), out / f"resumed_rank{rank}.pt")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[1] == "run":
        _run(sys.argv[2:])
    elif sys.argv[1] == "ddp":
        _ddp(Path(sys.argv[2]))
    else:
        raise SystemExit(f"unknown mode {sys.argv[1]!r}")
