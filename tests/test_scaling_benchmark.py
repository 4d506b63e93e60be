"""benchmarks/scaling.py: the grid, the compute arithmetic, the step plan and the result files."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from minidit.flops import profile
from minidit.run.build import make_model
from minidit.run.config import PRESETS

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "scaling.py"


@pytest.fixture(scope="module")
def scaling():
    spec = importlib.util.spec_from_file_location("scaling_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_grid_is_every_size_by_every_patch(scaling):
    grid = scaling.build_grid(["XS", "S"], [2, 7, 4])
    assert [p.name for p in grid] == ["XS/7", "XS/4", "XS/2", "S/7", "S/4", "S/2"]
    assert [p.tokens for p in grid[:3]] == [16, 49, 196]  # L = (28 / P)^2
    with pytest.raises(ValueError, match="patches"):
        scaling.build_grid(["XS"], [3])
    with pytest.raises(ValueError, match="sizes"):
        scaling.build_grid(["XXL"], [4])


def test_dit_config_is_the_model_that_training_builds(scaling):
    point = scaling.build_grid(["XS"], [4])[0]
    model = make_model(dataclasses.replace(PRESETS["mnist-flow-cpu"], model_overrides=point.overrides()))
    params, macs = profile(point.dit_config())
    assert params == sum(p.numel() for p in model.parameters())
    assert model.config == point.dit_config()
    # the attention and MLP of the blocks dominate: N L (12 D^2 + 2 L D) <= MACs
    D, N, L = point.width, point.depth, point.tokens
    assert N * L * (12 * D * D + 2 * L * D) <= macs < 2 * N * L * (12 * D * D + 2 * L * D)


def test_training_compute_is_three_forwards_per_image(scaling):
    assert scaling.training_compute(6.06, 400_000, 256) == pytest.approx(3 * 6.06 * 400_000 * 256)
    # the guided sampler runs 2 forwards per step per sample, one forward ~ 1/3 of a training step
    assert scaling.eval_seconds(0.3, n=96, sample_steps=10, batch_size=32) == pytest.approx(0.3 * 20)


def test_plan_fits_the_budget(scaling):
    step_s, eval_s = [0.1, 0.2, 0.7], [10.0, 20.0, 30.0]
    steps = scaling.plan_steps(step_s, eval_s, budget_s=1800)
    assert steps % 50 == 0
    assert steps * sum(step_s) + sum(eval_s) <= 0.9 * 1800 < (steps + 50) * sum(step_s) + sum(eval_s)
    with pytest.raises(ValueError, match="minutes"):
        scaling.plan_steps(step_s, eval_s, budget_s=60)


def test_results_are_written(scaling, tmp_path):
    rows = []
    for i, p in enumerate(scaling.build_grid(["XS", "S"], [7, 4])):
        rows.append({"model": p.name, "size": p.size, "width": p.width, "depth": p.depth, "heads": p.heads,
                     "patch": p.patch, "tokens": p.tokens, "params": 1000 * (i + 1), "gmacs": 0.001 * (i + 1),
                     "steps": 10, "images": 320, "train_gmacs": scaling.training_compute(0.001 * (i + 1), 10, 32),
                     "train_minutes": 0.1, "loss": 1.0 / (i + 1), "eval_seconds": 1.0, "fd": 100.0 / (i + 1), "fd_floor": 5.0,
                     "accuracy": 0.5, "n": 50})
    report = {"recipe": {"preset": "mnist-cpu", "batch_size": 32, "lr": 2e-3, "ema_decay": 0.998}, "steps": 10,
              "minutes": 1.0, "device": "cpu", "machine": "test", "threads": 1, "command": "python x",
              "rows": rows, "wall_minutes": 0.5}
    scaling.write_results(report, tmp_path)
    assert json.loads((tmp_path / "scaling.json").read_text())["rows"] == rows
    md = (tmp_path / "scaling.md").read_text()
    assert "| S/4 |" in md and "| DiT-XL/2 |" in md and "-1.00" in md  # FD = 0.1 / GMACs exactly
    assert (tmp_path / "scaling.png").stat().st_size > 1000
    assert scaling.log_corr([1, 2, 4], [8, 4, 2]) == pytest.approx(-1.0)


def test_final_loss_is_the_last_logged_training_loss(scaling, tmp_path):
    assert scaling.final_loss(tmp_path) is None  # no log yet
    records = [{"event": "train", "step": 50, "loss": 0.5}, {"event": "train", "step": 100, "loss": 0.25},
               {"event": "checkpoint", "step": 100, "path": "latest.pt"}]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert scaling.final_loss(tmp_path) == 0.25
