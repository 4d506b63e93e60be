"""The training loop: schedule, accumulation, bf16, outputs, NaN stop, time budget, resume after kill."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from _train_worker import DenoiseObjective, NaNAfter, tiny_config
from minidit.plotting import read_log
from minidit.run.build import make_model, make_objective
from minidit.run.checkpoint import read_checkpoint
from minidit.run.config import PRESETS, TrainConfig
from minidit.run.budget import Budget
from minidit.run.engine import autocast_for, train
from minidit.run.guard import DivergenceError


def lr_factor(step: int, config: TrainConfig, seconds: float = 0.0) -> float:
    return Budget.of(config).lr_factor(step, seconds)

WORKER = Path(__file__).with_name("_train_worker.py")


def assert_same_state(a: dict, b: dict, exact: bool = True, **tol) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], **tol, msg=k)


# ----------------------------------------------------------------------------- config


def test_presets_validate_and_build_their_model():
    for name, config in PRESETS.items():
        config.validate()
        assert TrainConfig.from_dict(config.to_dict()) == config, name
        make_objective(config)
    model = make_model(PRESETS["mnist-flow-cpu"])  # the DiT, sized for MNIST
    x = torch.randn(2, 1, 28, 28)
    assert model(x, torch.tensor([3, 500]), torch.tensor([1, 10])).shape == x.shape


@pytest.mark.parametrize("field,value", [("dataset", "imagenet"), ("precision", "fp16"),
                                         ("batch_size", 0), ("grad_accum", 1.5), ("lr", -1.0),
                                         ("betas", (0.9, 1.0)), ("grad_clip", 0.0),
                                         ("minutes", -2.0), ("log_every", 0)])
def test_bad_config_is_a_value_error_naming_the_field(field, value):
    config = dataclasses.replace(TrainConfig(), **{field: value})
    with pytest.raises(ValueError, match=field.rstrip("s")):
        config.validate()


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match="learning_rate"):
        TrainConfig.from_dict({"learning_rate": 1.0})


def test_lr_schedule_warmup_then_cosine():
    config = TrainConfig(lr=1.0, lr_min=0.1, warmup_steps=10, cosine=True, steps=110)
    assert [lr_factor(k, config) for k in range(10)] == pytest.approx([(k + 1) / 10 for k in range(10)])
    assert lr_factor(10, config) == pytest.approx(1.0)  # cosine starts at the peak
    assert lr_factor(60, config) == pytest.approx(0.55)  # half-way: (1 + 0.1) / 2
    assert lr_factor(110, config) == pytest.approx(0.1)  # ends at lr_min
    for k in range(10, 110):  # and decreases monotonically
        assert lr_factor(k + 1, config) <= lr_factor(k, config)
    flat = dataclasses.replace(config, cosine=False)
    assert lr_factor(50, flat) == 1.0
    # with a time budget the schedule follows whichever budget is further along
    timed = dataclasses.replace(config, minutes=1.0)
    assert lr_factor(10, timed, seconds=30.0) == pytest.approx(lr_factor(55, config))  # half the time
    assert lr_factor(10, timed, seconds=60.0) == pytest.approx(0.1)  # the time is up: lr_min
    assert lr_factor(80, timed, seconds=6.0) == pytest.approx(lr_factor(80, config))  # the steps lead
    # a time budget with a huge step cap: the warm-up still takes its 10 optimiser steps, then the
    # cosine follows the time
    capped = dataclasses.replace(config, steps=10**6, minutes=1.0)
    assert [lr_factor(k, capped, seconds=6.0 * k) for k in range(10)] == pytest.approx([(k + 1) / 10 for k in range(10)])
    assert lr_factor(10, capped, seconds=30.0) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (5e5 - 10) / (1e6 - 10))))
    assert lr_factor(10, capped, seconds=60.0) == pytest.approx(0.1)


def test_ema_horizon_follows_the_budget():
    budget = Budget(steps=1000, minutes=1.0, ema_decay=0.99)
    assert budget.ema(500, seconds=1.0) == pytest.approx(0.99)  # on pace for all 1000 steps
    # half-way through the time after 250 steps: 500 steps in all, so half the horizon, 50 steps
    assert budget.ema(250, seconds=30.0) == pytest.approx(1 - 1 / 50)


def test_logged_lr_follows_the_schedule(tmp_path):
    config = tiny_config(tmp_path, warmup_steps=4, steps=10, lr=0.01, lr_min=0.001)
    train(config, progress=False)
    logged = [r["lr"] for r in read_log(tmp_path / "log.jsonl")]
    assert logged == pytest.approx([0.01 * lr_factor(k, config) for k in range(10)])


# ----------------------------------------------------------------------------- optimisation


def test_grad_accumulation_equals_the_full_batch(tmp_path):
    """A = 2 micro-batches of B = 8 give the weights of one batch of 16 (no batch-dependent layers)."""
    runs = [train(tiny_config(tmp_path / str(a), grad_accum=a, batch_size=16, steps=5),
                  progress=False, objective=DenoiseObjective())["model"].state_dict() for a in (1, 2)]
    assert_same_state(runs[0], runs[1], exact=False, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_runs_on_cpu(tmp_path):
    config = tiny_config(tmp_path, precision="bf16", steps=4)
    with autocast_for(config, torch.device("cpu")):
        assert torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.bfloat16
    with autocast_for(dataclasses.replace(config, precision="fp32"), torch.device("cpu")):
        assert torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.float32
    summary = train(config, progress=False)
    assert math.isfinite(summary["loss"])
    assert all(p.dtype == torch.float32 for p in summary["model"].parameters())  # fp32 master weights


def test_a_dit_trains_through_the_engine(tmp_path):
    config = tiny_config(tmp_path, model="dit-mnist-cpu", steps=2, checkpoint_every=0,
                         model_overrides={"hidden_size": 32, "depth": 1, "num_heads": 2})
    summary = train(config, progress=False)
    assert summary["step"] == 2 and math.isfinite(summary["loss"])


# ----------------------------------------------------------------------------- outputs


def test_run_writes_log_samples_plots_and_checkpoint(tmp_path):
    config = tiny_config(tmp_path, steps=6, log_every=2, sample_every=3, checkpoint_every=4, loss_bins=5)
    summary = train(config, progress=False)
    records = read_log(tmp_path / "log.jsonl")
    assert [r["step"] for r in records] == [2, 4, 6]
    for r in records:
        assert {"loss", "lr", "grad_norm", "images_per_s", "elapsed_s"} <= r.keys()
        assert r["images_per_s"] > 0 and len(r["loss_by_t"]) == 5
        # the loss is the count-weighted mean of the per-bin means
        assert r["loss"] > 0 and min(v for v in r["loss_by_t"] if v) <= r["loss"] <= max(r["loss_by_t"])
    assert [r["step"] for r in read_log(tmp_path / "log.jsonl", "checkpoint")] == [4, 6]
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step_0000003.png", "step_0000006.png"]
    for name in ("loss.png", "loss_by_t.png", "config.json", "latest.pt"):
        assert (tmp_path / name).is_file(), name
    assert json.loads((tmp_path / "config.json").read_text()) == json.loads(json.dumps(config.to_dict()))
    assert summary["step"] == 6 and summary["checkpoint"] == str(tmp_path / "latest.pt")


def test_sampling_does_not_change_training(tmp_path):
    runs = [train(tiny_config(tmp_path / str(every), sample_every=every, steps=6), progress=False)
            for every in (0, 2)]
    assert_same_state(runs[0]["model"].state_dict(), runs[1]["model"].state_dict())


# ----------------------------------------------------------------------------- stopping


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    config = tiny_config(tmp_path, steps=20, log_every=3, checkpoint_every=2)
    objective = NaNAfter(make_objective(config), k=5)  # steps 1..5 fine, step 6 on NaN
    with pytest.raises(DivergenceError, match=r"at step 10: the gradient norm was NaN or infinite for 5 steps in a "
                                              r"row \(from step 6\)"):
        train(config, progress=False, objective=objective)
    state = read_checkpoint(tmp_path / "latest.pt")
    assert state["step"] == 4  # saved at 2 and 4; steps 6 and later were never saved
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_a_few_bad_steps_are_skipped_and_training_goes_on(tmp_path):
    config = tiny_config(tmp_path, steps=12, log_every=4, checkpoint_every=3)
    objective = NaNAfter(make_objective(config), k=5, until=8)  # steps 6, 7, 8 NaN, then fine again
    summary = train(config, progress=False, objective=objective)
    assert summary["step"] == 12 and summary["skipped"] == 3
    assert all(torch.isfinite(p).all() for p in summary["model"].parameters())  # no NaN update was applied
    saves = [r["step"] for r in read_log(tmp_path / "log.jsonl", "checkpoint")]
    assert 6 not in saves and 9 in saves  # no checkpoint during the bad streak


def test_huge_learning_rate_is_caught(tmp_path):
    with pytest.raises(DivergenceError, match="diverged at step"):
        train(tiny_config(tmp_path, lr=1e30, grad_clip=None, warmup_steps=0, steps=30), progress=False)
    assert not tmp_path.exists() or not (tmp_path / "latest.pt").exists()


def test_exploding_loss_stops_the_run(tmp_path):
    # a finite but growing loss: 10x its running mean for max_bad_steps steps in a row
    config = tiny_config(tmp_path, steps=60, log_every=5, checkpoint_every=5)
    objective = NaNAfter(make_objective(config), k=30, value=1e6)
    with pytest.raises(DivergenceError, match=r"above 10 x its running mean .* \(from step 31\)"):
        train(config, progress=False, objective=objective)
    assert read_checkpoint(tmp_path / "latest.pt")["step"] == 30


def test_minutes_budget_stops_early_with_a_checkpoint(tmp_path):
    summary = train(tiny_config(tmp_path, steps=100_000, minutes=0.5 / 60, checkpoint_every=0),
                    progress=False)
    assert 0 < summary["step"] < 100_000
    assert read_checkpoint(tmp_path / "latest.pt")["step"] == summary["step"]
    assert summary["elapsed_s"] >= 0.5


def test_resume_refuses_a_changed_config(tmp_path):
    train(tiny_config(tmp_path, steps=4), progress=False)
    with pytest.raises(ValueError, match="'lr'"):
        train(tiny_config(tmp_path, steps=8, lr=0.5), resume=True, progress=False)


# ----------------------------------------------------------------------------- resume after SIGKILL


def _worker(config: TrainConfig, path: Path, *args: str) -> subprocess.Popen:
    path.write_text(json.dumps(config.to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(WORKER), "run", str(path), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _wait(proc: subprocess.Popen, timeout: float = 60) -> None:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out.decode()


def _last_checkpoint_step(log: Path) -> int:
    steps = [r["step"] for r in read_log(log, "checkpoint")] if log.is_file() else []
    return max(steps, default=-1)


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_identical(tmp_path):
    """Kill -9 a run after its checkpoint at step >= 10, resume it, and compare with a run
    that was never interrupted: model, EMA and optimiser states are bit-identical."""
    steps = 60
    ref = tiny_config(tmp_path / "ref", steps=steps, checkpoint_every=5)
    cut = dataclasses.replace(ref, out_dir=str(tmp_path / "cut"))
    reference = _worker(ref, tmp_path / "ref.json")
    victim = _worker(cut, tmp_path / "cut.json", "--delay", "0.05")
    go = tmp_path / "go"  # the resuming process starts now, and waits for this file after its imports
    resumer = _worker(cut, tmp_path / "cut.json", "--resume", "--wait", str(go))
    deadline = time.monotonic() + 60
    while _last_checkpoint_step(tmp_path / "cut" / "log.jsonl") < 10:
        assert victim.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    killed_at = read_checkpoint(tmp_path / "cut" / "latest.pt")["step"]
    assert 10 <= killed_at < steps
    go.touch()
    _wait(resumer)
    _wait(reference)
    a, b = read_checkpoint(tmp_path / "ref" / "latest.pt"), read_checkpoint(tmp_path / "cut" / "latest.pt")
    assert a["step"] == b["step"] == steps
    assert_same_state(a["model"], b["model"])
    assert_same_state(a["ema"]["model"], b["ema"]["model"])
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert_same_state(pa, pb)
    # the resumed log continues the killed one: every step once, in order
    assert [r["step"] for r in read_log(tmp_path / "cut" / "log.jsonl")] == list(range(1, steps + 1))
