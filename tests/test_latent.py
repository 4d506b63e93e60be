"""Latent diffusion end to end on tiny runs: an autoencoder trained through minidit.train, a
model trained on its latents through `minidit train`, sampled through `minidit sample`; the
checkpoint records the autoencoder, and a missing or changed one is a clear error."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from minidit.autoencoder import Autoencoder, latent_scaling_factor
from minidit.cli import config_from_preset, main
from minidit.run.build import load_checkpoint, make_model, training_data
from minidit.run.checkpoint import CheckpointError, read_checkpoint
from minidit.run.config import PRESETS, TrainConfig
from minidit.run.engine import train
from minidit.run.generate import sample_model
from minidit.run.latent import SCALING_IMAGES, LatentObjective, fingerprint, with_autoencoder_facts
from minidit.run.objectives import FlowObjective

TINY = dict(dataset="synthetic", dataset_size=64, batch_size=16, log_every=5, sample_every=0, checkpoint_every=0,
            minutes=None, device="cpu")
INNER = {"kind": "flow", "sample_steps": 3, "cfg_scale": 1.5}
DIT = {"patch_size": 1, "depth": 1, "hidden_size": 32, "num_heads": 2}  # a one-block DiT on 4x2x2 latents


def _train_autoencoder(out: Path, seed: int = 0) -> Path:
    config = dataclasses.replace(PRESETS["mnist-ae-cpu"], **TINY, steps=6, seed=seed, out_dir=str(out),
                                 model_overrides={"channels": [8, 8, 8]})
    train(config, progress=False)
    return out / "latest.pt"


def _latent_args(ae: Path, out: Path, steps: int = 6) -> list[str]:
    return ["train", "--preset", "mnist-latent-cpu", "--out", str(out), "--steps", str(steps), "--device", "cpu",
            "--grid-n", "10", "--no-progress", f"model_overrides={DIT}",
            *[f"{k}={v}" for k, v in TINY.items() if k not in ("device", "minutes")], "minutes=none",
            f"objective.autoencoder={ae}", "objective.latent_shape=null", f"objective.inner={INNER}"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """An autoencoder (8x8 images -> 4x2x2 latents) and a latent DiT trained on it through the CLI."""
    root = tmp_path_factory.mktemp("latent")
    ae = _train_autoencoder(root / "ae")
    assert main(_latent_args(ae, root / "latent")) == 0
    return {"root": root, "ae": ae, "ckpt": root / "latent" / "latest.pt"}


def test_checkpoint_records_the_autoencoder(run):
    _, ema, objective, config = load_checkpoint(run["ckpt"])
    stored = config.objective
    _, ae_ema, _, ae_config = load_checkpoint(run["ae"])
    assert stored["kind"] == "latent" and stored["autoencoder"] == str(run["ae"])
    assert stored["fingerprint"] == fingerprint(ae_ema.state_dict())
    assert stored["latent_shape"] == [4, 2, 2] == list(ae_ema.latent_shape)
    # s = 1 / std of the latents of the same seeded subset of training images
    images, _ = training_data(config)
    g = torch.Generator().manual_seed(config.seed)
    subset = images[torch.randperm(len(images), generator=g)[:SCALING_IMAGES]]
    assert stored["scaling_factor"] == pytest.approx(latent_scaling_factor(ae_ema, subset, generator=g), rel=1e-6)
    # the DiT sees latents: it is sized for 4x2x2 inputs
    assert (ema.config.in_channels, ema.config.input_size, ema.config.patch_size) == (4, 2, 1)
    assert isinstance(objective, LatentObjective) and isinstance(objective.inner_objective, FlowObjective)
    assert objective.null_label == 10  # the synthetic data's classes, passed to the inner objective


def test_loss_is_the_inner_loss_on_scaled_latents(run):
    _, ema, objective, _ = load_checkpoint(run["ckpt"])
    objective = dataclasses.replace(objective, posterior="mean")  # deterministic encoding
    x0 = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    y = torch.arange(8)
    loss, t = objective.loss(ema, x0, y, torch.Generator().manual_seed(1))
    ae = objective.load()
    z0 = ae.encode(x0).mode() * objective.scaling_factor  # [8, 4, 2, 2]
    ref_loss, ref_t = objective.inner_objective.loss(ema, z0, y, torch.Generator().manual_seed(1))
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(t, ref_t)
    # decoding undoes the scaling: decode(encode(x)) is the autoencoder's own round trip
    torch.testing.assert_close(objective.decode(objective.encode(x0)), ae(x0, sample=False)[0])


def test_sample_decodes_latents_through_cli_and_library(run, tmp_path):
    out = tmp_path / "s.npz"
    assert main(["sample", "--ckpt", str(run["ckpt"]), "--out", str(out), "--n", "6", "--device", "cpu",
                 "--no-progress", "--sampler", "heun", "--steps", "2"]) == 0
    images = np.load(out)["images"]
    assert images.shape == (6, 1, 8, 8) and np.isfinite(images).all()
    _, ema, objective, config = load_checkpoint(run["ckpt"])
    drawn = sample_model(ema, objective, config, 4, seed=3)
    assert drawn["images"].shape == (4, 1, 8, 8) and drawn["nfe"] == 3 and drawn["sampler"] == "euler"
    assert objective.sampler_names() == objective.inner_objective.sampler_names()
    # the same seed draws the same latents as the inner sampler on the latent shape, then decodes them
    inner = objective.inner_objective.make_sampler(ema)
    g = torch.Generator().manual_seed(7)
    z0 = inner((2, 4, 2, 2), torch.tensor([0, 1]), g).x
    x = objective.make_sampler(ema)((2, 1, 8, 8), torch.tensor([0, 1]), torch.Generator().manual_seed(7)).x
    torch.testing.assert_close(x, objective.decode(z0))
    assert (run["root"] / "latent" / "samples.png").is_file()  # the run's grid, decoded


def test_missing_autoencoder_is_a_clear_error(run, tmp_path, capsys):
    ckpt = tmp_path / "latest.pt"
    shutil.copy(run["ckpt"], ckpt)
    state = read_checkpoint(ckpt)
    state["config"]["objective"]["autoencoder"] = str(tmp_path / "gone.pt")
    torch.save(state, ckpt)
    with pytest.raises(CheckpointError, match="gone.pt.*does not exist.*minidit train --preset mnist-ae-cpu"):
        load_checkpoint(ckpt)
    assert main(["sample", "--ckpt", str(ckpt), "--out", str(tmp_path / "x.png"), "--device", "cpu"]) == 1
    assert "mnist-ae-cpu" in capsys.readouterr().err
    # training a latent preset without its autoencoder fails before any data is read
    with pytest.raises(CheckpointError, match="minidit train --preset mnist-ae-cpu"):
        train(dataclasses.replace(TrainConfig.from_dict(state["config"]), out_dir=str(tmp_path / "new"), objective={
            **PRESETS["mnist-latent-cpu"].objective, "autoencoder": str(tmp_path / "gone.pt")}), progress=False)
    assert not (tmp_path / "new").exists()


def test_changed_autoencoder_is_a_clear_error(run, tmp_path):
    other = _train_autoencoder(tmp_path / "other", seed=1)  # same shapes, other weights
    ckpt = tmp_path / "latest.pt"
    state = read_checkpoint(run["ckpt"])
    state["config"]["objective"]["autoencoder"] = str(other)
    torch.save(state, ckpt)
    with pytest.raises(CheckpointError, match="not the one this latent model was trained with"):
        load_checkpoint(ckpt)
    # a checkpoint of another kind of model is not an autoencoder
    state["config"]["objective"]["autoencoder"] = str(run["ckpt"])
    torch.save(state, ckpt)
    with pytest.raises(CheckpointError, match="not an autoencoder"):
        load_checkpoint(ckpt)


def test_resume_keeps_the_recorded_autoencoder_facts(run, tmp_path):
    out = tmp_path / "latent"
    shutil.copytree(run["root"] / "latent", out)
    before = read_checkpoint(out / "latest.pt")["config"]["objective"]
    assert main([*_latent_args(run["ae"], out, steps=8), "--resume", "--eval-n", "0"]) == 0
    after = read_checkpoint(out / "latest.pt")
    assert after["step"] == 8 and after["config"]["objective"] == before


def test_presets_and_resolution_checks(run):
    config = config_from_preset("mnist-latent-cpu")  # builds without the autoencoder: its shape is in the preset
    assert make_model(config).config.input_size == 7 and make_model(config).config.in_channels == 4
    assert config_from_preset("cifar10-latent-gpu").objective["latent_shape"] == [4, 8, 8]
    assert with_autoencoder_facts(PRESETS["mnist-flow-cpu"]) is PRESETS["mnist-flow-cpu"]  # pixel configs pass through
    wrong = dataclasses.replace(PRESETS["mnist-latent-cpu"], objective={
        **PRESETS["mnist-latent-cpu"].objective, "autoencoder": str(run["ae"])})  # 8x8 autoencoder, MNIST
    with pytest.raises(ValueError, match="reads 1x8x8 images"):
        with_autoencoder_facts(wrong, torch.zeros(4, 1, 28, 28))
    with pytest.raises(ValueError, match="posterior"):
        LatentObjective(autoencoder=str(run["ae"]), posterior="mode")
    with pytest.raises(ValueError, match="inner objective"):
        LatentObjective(autoencoder=str(run["ae"]), inner={"kind": "latent"})
    with pytest.raises(ValueError, match="needs autoencoder=PATH"):
        LatentObjective()
    assert isinstance(load_checkpoint(run["ae"])[1], Autoencoder)  # the autoencoder trained as a model


def test_autoencoder_preset_trains_and_evaluates_through_the_cli(mnist_root, tmp_path, capsys):
    out = tmp_path / "ae"
    assert main(["train", "--preset", "mnist-ae-cpu", "--out", str(out), "--steps", "2", "--device", "cpu",
                 "--eval-n", "50", "--grid-n", "4", "--no-progress", "dataset_size=128", "minutes=none",
                 "sample_every=0", "checkpoint_every=0", 'model_overrides={"channels": [8, 8, 8]}']) == 0
    printed = capsys.readouterr().out
    assert "reconstructions: PSNR" in printed and "floor" in printed
    assert main(["eval", "--ckpt", str(out / "latest.pt"), "--n", "50", "--device", "cpu", "--json",
                 "--no-progress"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert {"psnr", "fd", "fd_floor", "accuracy", "n"} <= set(scores) and scores["n"] == 50
    # its sampler is the prior: decoded N(0, I) draws
    assert main(["sample", "--ckpt", str(out / "latest.pt"), "--out", str(tmp_path / "p.npz"), "--n", "3",
                 "--device", "cpu", "--no-progress"]) == 0
    assert np.load(tmp_path / "p.npz")["images"].shape == (3, 1, 28, 28)
    assert main(["sample", "--ckpt", str(out / "latest.pt"), "--out", str(tmp_path / "p.png"), "--steps", "3",
                 "--device", "cpu"]) == 2  # the prior has no steps to choose
