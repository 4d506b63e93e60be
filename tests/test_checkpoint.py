"""Checkpoints: atomic writes, clear errors on damaged files, plain data, RNG states, export, rebuild."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from _train_worker import tiny_config
from minidit.run import checkpoint as ckpt
from minidit.run.build import load_checkpoint
from minidit.run.checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from minidit.run.engine import train


def _state(value: float) -> dict:
    return {"step": 1, "config": {"a": [1, 2.5, "x", None, True]}, "model": {"w": torch.full((3,), value)},
            "ema": {}, "optimizer": {}, "scheduler": {}, "rng": [], "data": []}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished tiny run: (out_dir, summary)."""
    out = tmp_path_factory.mktemp("run")
    summary = train(tiny_config(out, steps=6), progress=False)
    return out, summary


def test_round_trip_is_plain_data(tmp_path):
    path = save_checkpoint(_state(1.0), tmp_path / "latest.pt")
    raw = torch.load(path, weights_only=True)  # no pickled code needed
    assert raw["format"] == ckpt.FORMAT and raw["version"] == ckpt.VERSION
    state = read_checkpoint(path)
    assert state["config"] == {"a": [1, 2.5, "x", None, True]}
    assert torch.equal(state["model"]["w"], torch.ones(3))


def test_real_checkpoint_loads_with_weights_only(trained):
    out, _ = trained
    state = torch.load(out / "latest.pt", weights_only=True)
    assert state["step"] == 6 and state["config"]["steps"] == 6
    assert len(state["rng"]) == 1 and state["data"] == [{"micro_step": 6}]


def test_a_failed_write_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    path = save_checkpoint(_state(1.0), tmp_path / "latest.pt")

    def dies_half_way(obj, f):
        f.write(b"PK\x03\x04 half a zip file")
        raise KeyboardInterrupt  # a kill while writing

    monkeypatch.setattr(ckpt.torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(_state(2.0), path)
    monkeypatch.undo()
    assert torch.equal(read_checkpoint(path)["model"]["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.pt"]  # no temporary file left


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_damaged_file_is_a_checkpoint_error_naming_it(tmp_path, damage):
    path = save_checkpoint(_state(1.0), tmp_path / "latest.pt")
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x00\x17" * 999, "empty": b""}[damage])
    with pytest.raises(CheckpointError, match="latest.pt"):
        read_checkpoint(path)


def test_missing_foreign_and_incomplete_files(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint file"):
        read_checkpoint(tmp_path / "nope.pt")
    torch.save({"weights": torch.ones(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a minidit checkpoint"):
        read_checkpoint(tmp_path / "other.pt")
    torch.save({"format": ckpt.FORMAT, "version": ckpt.VERSION, "step": 3}, tmp_path / "part.pt")
    with pytest.raises(CheckpointError, match="lacks"):
        read_checkpoint(tmp_path / "part.pt")


def test_config_must_be_plain_data(tmp_path):
    state = _state(1.0)
    state["config"] = {"out_dir": Path("/tmp")}
    with pytest.raises(TypeError, match="out_dir"):
        save_checkpoint(state, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="lacks"):
        save_checkpoint({"step": 1}, tmp_path / "x.pt")


def test_rng_state_round_trip():
    state = ckpt.capture_rng_state()
    first = (random.random(), np.random.rand(), np.random.randn(), torch.rand(3))
    ckpt.restore_rng_state(state)
    again = (random.random(), np.random.rand(), np.random.randn(), torch.rand(3))
    assert first[:3] == again[:3] and torch.equal(first[3], again[3])
    ckpt.check_plain({k: v for k, v in state.items() if k.startswith("python")})


def test_export_ema_to_safetensors(trained, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    out, summary = trained
    path = ckpt.export_ema(out / "latest.pt", tmp_path / "ema.safetensors")
    weights = load_file(path)
    expected = summary["ema_model"].state_dict()
    assert weights.keys() == expected.keys()
    for k in weights:
        assert torch.equal(weights[k], expected[k]), k
    with safe_open(path, "pt") as f:
        assert json.loads(f.metadata()["config"]) == read_checkpoint(out / "latest.pt")["config"]


def test_load_checkpoint_rebuilds_the_run(trained):
    out, summary = trained
    model, ema_model, objective, config = load_checkpoint(out / "latest.pt")
    for mine, theirs in ((model, summary["model"]), (ema_model, summary["ema_model"])):
        for (k, a), b in zip(mine.state_dict().items(), theirs.state_dict().values()):
            assert torch.equal(a, b), k
    assert not model.training and not any(p.requires_grad for p in ema_model.parameters())
    assert config.steps == 6 and objective.kind == "ddpm" and objective.T == 100
    assert objective.null_label == 10  # the synthetic data's 10 classes
    x = objective.sample(ema_model, (2, 1, 8, 8), torch.tensor([0, 1]), torch.Generator().manual_seed(0))
    assert x.shape == (2, 1, 8, 8) and torch.isfinite(x).all()


def test_restore_checks_world_size(trained):
    out, _ = trained
    state = read_checkpoint(out / "latest.pt")
    with pytest.raises(ValueError, match="written by 1 processes"):
        ckpt.restore_run(state, state["config"], 0, 2, None, None, None, None)
