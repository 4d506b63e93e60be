"""Trained models that ship with minidit, ready to sample with no training.

    from minidit.run.pretrained import load
    model, objective, config = load("mnist-dit")              # the main job's DiT, EMA weights
    images = objective.sample(model, (10, 1, 28, 28), torch.arange(10))

or `minidit sample --pretrained mnist-dit --n 100 --out digits.png`. `names()` lists them;
each comes from one preset, and its manifest entry records the run (command, device, time,
steps) and its measured quality (FD beside its floor, accuracy). `benchmarks/pretrained.py`
remakes them. See `minidit.run.weights` for the files and their checksums.
"""

from __future__ import annotations

import torch
from torch import nn

from minidit.run.build import load_shipped
from minidit.run.config import TrainConfig
from minidit.run.weights import FOLDER, entries


def names() -> list[str]:
    """The shipped models' names."""
    return sorted(entries())


def describe(name: str) -> str:
    """One line: what `name` is and how it scored when it was made."""
    e = entries()[name]
    r = e.record
    quality = (f"FD {r['fd']:.2f} (floor {r['fd_floor']:.2f}), accuracy {100 * r['accuracy']:.1f}%, n {r['n']}"
               if r.get("fd") is not None else
               f"reconstruction PSNR {r['psnr']:.1f} dB" if r.get("psnr") is not None else "not scored")
    if r.get("thickness_accuracy") is not None:  # a caption model: its prompts' attributes (chance 1/3 each)
        quality += (f", thickness {100 * r['thickness_accuracy']:.1f}%, slant {100 * r['slant_accuracy']:.1f}% "
                    "(chance 33.3%)")
    return (f"{name}: preset {r.get('preset')}, {r.get('steps')} steps in {r.get('train_minutes', 0):.1f} min on "
            f"{r.get('device')}; {quality}")


def load(name: str, device: str | torch.device = "cpu", folder=FOLDER) -> tuple[nn.Module, object, TrainConfig]:
    """Shipped model `name` as (network in eval mode on `device`, its objective, its TrainConfig).

    The network holds the run's EMA weights (checked by SHA-256 first); the objective draws
    with the run's own sampler, steps and guidance (`objective.make_sampler(model, ...)`).

    Raises:
        ValueError: no such name (the message lists them).
        CheckpointError: the weights file is missing or corrupt.
    """
    return load_shipped(name, device, folder)
