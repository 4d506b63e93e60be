"""A whole run, as the README's main command does it: train, then write a sample grid and score it."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from minidit.device import get_device
from minidit.metrics import EVAL_DATASETS
from minidit.run.build import load_checkpoint
from minidit.run.config import TrainConfig
from minidit.run.engine import train
from minidit.run.generate import evaluate_model, sample_model
from minidit.run.outputs import atomic_write, write_samples


def train_and_report(config: TrainConfig, resume: bool = False, *, restart: bool = False, eval_n: int = 500,
                     grid_n: int = 100, progress: bool = True) -> dict:
    """Train (`minidit.run.engine.train`), then, from the saved checkpoint's EMA weights, write a
    sample grid `out_dir/samples.png` and score `eval_n` samples into `out_dir/eval.json`.

    Args:
        config: a TrainConfig (its out_dir is claimed for the run by `minidit.run.runfolder`).
        resume: continue from out_dir/latest.pt; restart: start over, keeping an old run there.
        eval_n: samples to score (0: skip; skipped too for datasets without a feature network).
        grid_n: samples in the grid (class i % K in column i % K).

    Returns:
        {"train": train's summary without the networks, "grid": path, "eval": scores or None}.
    """
    config.validate()
    out = Path(config.out_dir)
    summary = train(config, resume=resume, restart=restart, progress=progress)
    report = {"train": {k: v for k, v in summary.items() if k not in ("model", "ema_model")},
              "grid": None, "eval": None}
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 reports
        return report
    _, ema_model, objective, config = load_checkpoint(out / "latest.pt", get_device(config.device))
    grid = sample_model(ema_model, objective, config, grid_n, seed=config.seed, progress=progress)
    nrow = min(grid_n, objective.null_label or math.ceil(math.sqrt(grid_n)))
    report["grid"] = str(write_samples(out / "samples.png", grid["images"], grid["labels"], nrow))
    if eval_n and config.dataset in EVAL_DATASETS:
        report["eval"] = evaluate_model(ema_model, objective, config, eval_n, seed=config.seed, progress=progress)
        text = json.dumps({"step": summary["step"], **report["eval"]}, indent=2)
        atomic_write(out / "eval.json", lambda tmp: tmp.write_text(text))
    return report
