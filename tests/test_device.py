"""Device choice, mixed precision by hardware, and seeding."""

from __future__ import annotations

import dataclasses
import math
import random

import numpy as np
import pytest
import torch

from _train_worker import tiny_config
from minidit import get_device, seed_everything
from minidit.device import autocast_dtype, dtype_for_capability
from minidit.run import engine
from minidit.run.checkpoint import read_checkpoint
from minidit.run.config import TrainConfig
from minidit.run.engine import grad_scaler_for, precision_for, train
from minidit.run.guard import Guard


def test_explicit_cpu_and_environment_override(monkeypatch):
    assert get_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("MINIDIT_DEVICE", "cpu")
    assert get_device() == torch.device("cpu")


def test_auto_choice_follows_availability(monkeypatch):
    monkeypatch.delenv("MINIDIT_DEVICE", raising=False)
    expected = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    assert get_device().type == expected


def test_unavailable_backend_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available"):
        get_device("cuda")


def test_seed_everything_repeats_every_generator():
    def draw():
        return random.random(), float(np.random.rand()), float(torch.rand(()))

    seed_everything(123)
    first = draw()
    seed_everything(123)
    assert draw() == first
    g = seed_everything(7)
    assert torch.equal(torch.rand(3, generator=g), torch.rand(3, generator=torch.Generator().manual_seed(7)))
    with pytest.raises(ValueError, match="seed"):
        seed_everything(-1)


# ----------------------------------------------------------------------------- mixed precision by hardware


@pytest.mark.parametrize("capability,expected", [
    ((7, 0), (torch.float16, True)),  # Volta: V100
    ((7, 5), (torch.float16, True)),  # Turing: T4, where is_bf16_supported() counts emulation
    ((8, 0), (torch.bfloat16, False)),  # Ampere: A100
    ((8, 9), (torch.bfloat16, False)),  # Ada: L4
    ((9, 0), (torch.bfloat16, False)),  # Hopper: H100
])
def test_autocast_dtype_follows_the_compute_capability(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)  # emulation: not the test
    assert autocast_dtype("cuda") == expected
    assert autocast_dtype(torch.device("cuda", 0)) == expected
    assert dtype_for_capability(capability) == expected


def test_autocast_dtype_is_float32_off_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    for device in ("cpu", torch.device("cpu"), "mps", "meta"):
        assert autocast_dtype(device) == (None, False)


def test_engine_auto_precision_uses_the_hardware_choice(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    config = TrainConfig(precision="auto")
    assert precision_for(config, cuda) == (torch.float16, True)
    assert precision_for(config, cpu) == (None, False) and grad_scaler_for(config, cpu) is None
    assert precision_for(dataclasses.replace(config, precision="bf16"), cuda) == (torch.bfloat16, False)
    assert precision_for(dataclasses.replace(config, precision="fp32"), cuda) == (None, False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert precision_for(config, cuda) == (torch.bfloat16, False)


def test_fp16_with_a_grad_scaler_trains_and_resumes(monkeypatch, tmp_path):
    """The pre-Ampere path, run on the CPU: fp16 autocast, the loss scaled, fp32 master weights, S saved."""
    monkeypatch.setattr(engine, "autocast_dtype", lambda device: (torch.float16, True))
    config = tiny_config(tmp_path, steps=8, checkpoint_every=4)
    first = train(config, progress=False)
    assert math.isfinite(first["loss"])
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in first["model"].parameters())
    state = read_checkpoint(tmp_path / "latest.pt")
    assert state["scaler"]["scale"] > 0 and state["scaler"]["_growth_tracker"] >= 0
    with engine.autocast_for(config, torch.device("cpu")):
        assert torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.float16
    resumed = train(dataclasses.replace(config, steps=12), resume=True, progress=False)
    assert resumed["step"] == 12 and math.isfinite(resumed["loss"])


def test_an_overflowing_fp16_step_is_skipped_and_the_scale_halves(monkeypatch, tmp_path):
    """An overflow is the scaler's business: the weights stay, S halves, and the guard does not stop the run."""
    monkeypatch.setattr(engine, "autocast_dtype", lambda device: (torch.float16, True))
    config = tiny_config(tmp_path, steps=1, checkpoint_every=0, max_bad_steps=1)
    run = engine._start(config, False, None, 0, 1, torch.device("cpu"))
    run.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100)  # S * loss overflows in any dtype's gradient
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    with Guard(config) as guard:
        engine.train_step(run, engine.autocast_for(config, torch.device("cpu")), guard)
    assert all(torch.equal(v, run.model.state_dict()[k]) for k, v in before.items())
    assert run.scaler.get_scale() == 2.0**99


def test_cpu_name_reads_the_model_name_and_falls_back_to_platform(monkeypatch, tmp_path):
    import minidit.device as dev

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Example CPU 9000\nflags\t: fpu\n")
    real_path = dev.Path
    monkeypatch.setattr(dev, "Path", lambda p: info if p == "/proc/cpuinfo" else real_path(p))
    assert dev.cpu_name() == "Example CPU 9000"
    info.write_text("processor\t: 0\n")  # no model name line
    monkeypatch.setattr(dev.platform, "processor", lambda: "")
    monkeypatch.setattr(dev.platform, "machine", lambda: "arm64")
    assert dev.cpu_name() == "arm64"
