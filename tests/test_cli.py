"""The command line end to end on a tiny MLP and random 8x8 data: train -> checkpoint -> sample
(.png, .npz) -> eval, every sampler each objective can drive, and the errors users meet."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch

from minidit.cli import config_from_preset, main
from minidit.run import outputs
from minidit.run.build import load_checkpoint, make_model, make_objective
from minidit.run.checkpoint import file_mode
from minidit.run.config import PRESETS
from minidit.run.generate import class_labels, draw

TINY = ["model=mlp", "dataset=synthetic", "dataset_size=64", "batch_size=16", "model_overrides.hidden=16",
        "log_every=5", "sample_every=0", "checkpoint_every=0", "lr=1e-3"]
OBJECTIVES = {"ddpm": ['objective={"kind": "ddpm", "T": 50, "sample_steps": 4}'],
              "sde": ['objective={"kind": "sde", "sample_steps": 4}'],
              "flow": ['objective={"kind": "flow", "sample_steps": 4}']}
STEPS = 10  # tiny training runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """One trained tiny run per objective kind, made through `minidit train`."""
    out = {}
    for kind, extra in OBJECTIVES.items():
        folder = tmp_path_factory.mktemp(kind)
        rc = main(["train", "--preset", "mnist-cpu", "--out", str(folder), "--steps", str(STEPS),
                   "--device", "cpu", "--grid-n", "20", "--no-progress", *TINY, *extra])
        assert rc == 0
        out[kind] = folder
    return out


def _sample(ckpt: Path, out: Path, *args: str) -> int:
    return main(["sample", "--ckpt", str(ckpt), "--out", str(out), "--device", "cpu", "--no-progress", *args])


# ----------------------------------------------------------------------------- train


def test_train_writes_checkpoint_grid_and_config(runs, capsys):
    folder = runs["ddpm"]
    for name in ("latest.pt", "config.json", "log.jsonl", "samples.png"):
        assert (folder / name).is_file(), name
    config = json.loads((folder / "config.json").read_text())
    assert config["steps"] == STEPS and config["model_overrides"] == {"hidden": 16}
    assert config["objective"] == {"kind": "ddpm", "T": 50, "sample_steps": 4}
    # 20 samples of 8x8 in rows of 10 classes, 2 px of padding: 2 rows
    grid = matplotlib.image.imread(folder / "samples.png")
    assert grid.shape[:2] == (2 * 10 + 2, 10 * 10 + 2)
    assert not (folder / "eval.json").exists()  # synthetic data has no feature network


def test_train_resume_continues_the_run(runs, tmp_path, capsys):
    folder = tmp_path / "resumed"
    folder.mkdir()
    (folder / "latest.pt").write_bytes((runs["ddpm"] / "latest.pt").read_bytes())
    rc = main(["train", "--out", str(folder), "--steps", str(STEPS + 5), "--resume", "--eval-n", "0",
               "--grid-n", "4", "--device", "cpu", "--no-progress", *TINY, *OBJECTIVES["ddpm"]])
    assert rc == 0
    assert f"trained to step {STEPS + 5}" in capsys.readouterr().out
    assert torch.load(folder / "latest.pt", weights_only=True)["step"] == STEPS + 5


def test_overrides_are_converted_to_the_field_types():
    config = config_from_preset("mnist-flow-cpu", ["steps=1e3", "lr=0.002", "cosine=false", "grad_clip=none",
                                          "betas=0.9,0.95", "dataset_size=100", "objective.kind=flow",
                                          "objective.cfg_scale=2", "model_overrides.depth=2"])
    assert config.steps == 1000 and isinstance(config.steps, int)
    assert config.lr == 0.002 and config.cosine is False and config.grad_clip is None
    assert config.betas == (0.9, 0.95) and config.dataset_size == 100
    assert config.objective == {**PRESETS["mnist-flow-cpu"].objective, "kind": "flow", "cfg_scale": 2}
    assert config.model_overrides == {"depth": 2}


@pytest.mark.parametrize("args, expected", [
    (["--preset", "nope"], ["unknown preset 'nope'", "mnist-cpu", "cifar10-gpu"]),
    (["learning_rate=1"], ["unknown config key 'learning_rate'", "batch_size", "objective"]),
    (["steps=ten"], ["steps expects int"]),
    (["lr.x=1"], ["lr is not a dict"]),
    (["model=dit-huge"], ["unknown model 'dit-huge'", "dit-mnist-cpu"]),
    (["model_overrides.wings=2"], ["model_overrides"]),
    (["objective.kind=gan"], ["objective kind"]),
    (["batch_size=0"], ["batch_size"]),
    (["nokeyvalue"], ["key=value"]),
])
def test_train_usage_errors_exit_2_and_name_the_valid_choices(args, expected, capsys):
    assert main(["train", "--dry-run", *args]) == 2
    err = capsys.readouterr().err
    for text in expected:
        assert text in err


def test_train_into_an_unwritable_folder_fails_before_training(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("keep me")
    rc = main(["train", "--out", str(blocker / "run"), "--steps", "2", "--no-progress", *TINY])
    assert rc == 1
    assert f"cannot write to the output folder {blocker / 'run'}" in capsys.readouterr().err
    assert blocker.read_text() == "keep me"


# ----------------------------------------------------------------------------- sample


def test_sample_npz_has_balanced_labels_and_images_in_range(runs, tmp_path, capsys):
    out = tmp_path / "s.npz"
    assert _sample(runs["ddpm"] / "latest.pt", out, "--n", "25", "--batch-size", "10") == 0
    assert "NFE 4" in capsys.readouterr().out  # DDIM with the checkpoint's 4 steps
    data = np.load(out)
    images, labels = data["images"], data["labels"]
    assert images.shape == (25, 1, 8, 8) and images.dtype == np.float32
    assert images.min() >= -1 and images.max() <= 1 and np.isfinite(images).all()
    assert labels.dtype == np.int64 and labels.tolist() == [i % 10 for i in range(25)]
    assert np.ptp(np.bincount(labels, minlength=10)) <= 1  # balanced: counts differ by at most one


def test_sample_png_and_given_labels_and_seed(runs, tmp_path):
    ckpt = runs["ddpm"] / "latest.pt"
    assert _sample(ckpt, tmp_path / "g.png", "--n", "9") == 0  # a column per class: one row of 9
    assert matplotlib.image.imread(tmp_path / "g.png").shape[:2] == (1 * 10 + 2, 9 * 10 + 2)
    assert _sample(ckpt, tmp_path / "h.png", "--n", "9", "--labels", "4") == 0  # sqrt(9) per row
    assert matplotlib.image.imread(tmp_path / "h.png").shape[:2] == (3 * 10 + 2, 3 * 10 + 2)
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        assert _sample(ckpt, tmp_path / f"{name}.npz", "--n", "5", "--labels", "3", "7", "--seed", seed) == 0
    a, b, c = (np.load(tmp_path / f"{name}.npz") for name in "abc")
    assert a["labels"].tolist() == [3, 7, 3, 7, 3]
    np.testing.assert_array_equal(a["images"], b["images"])  # same seed, same samples
    assert not np.array_equal(a["images"], c["images"])
    for written in (tmp_path / "g.png", tmp_path / "a.npz", ckpt):  # not mkstemp's 0600
        assert written.stat().st_mode & 0o777 == file_mode(), written


@pytest.mark.parametrize("args, expected", [
    (["--sampler", "plms"], ["cannot drive sampler 'plms'", "ddim", "dpm_solver++"]),
    (["--sampler", "rk45", "--steps", "3"], ["chooses its own steps"]),
    (["--labels", "10"], ["labels must lie in [0, 10)"]),
    (["--steps", "0"], ["steps must be a positive int"]),
])
def test_sample_usage_errors_exit_2(runs, tmp_path, args, expected, capsys):
    out = tmp_path / "x.npz"
    assert _sample(runs["ddpm"] / "latest.pt", out, "--n", "4", *args) == 2
    err = capsys.readouterr().err
    assert all(text in err for text in expected), err
    assert not out.exists()


def test_flow_checkpoint_lists_the_samplers_it_can_drive(runs, tmp_path, capsys):
    assert _sample(runs["flow"] / "latest.pt", tmp_path / "x.png", "--sampler", "pc") == 2
    err = capsys.readouterr().err
    assert "a 'flow' checkpoint cannot drive sampler 'pc'" in err
    assert "euler, heun, rk45" in err and "edm" in err and "euler_maruyama" not in err


def test_sample_output_errors_keep_what_was_there(runs, tmp_path, monkeypatch, capsys):
    ckpt = runs["ddpm"] / "latest.pt"
    assert _sample(ckpt, tmp_path / "x.jpg") == 2  # only .png and .npz
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert _sample(ckpt, blocker / "x.npz") == 1
    assert "cannot write to the output folder" in capsys.readouterr().err
    # a write that fails half-way leaves the earlier file whole and no temporary file behind
    out = tmp_path / "old.npz"
    out.write_bytes(b"earlier results")

    def failing_savez(path, **arrays):
        Path(path).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(outputs.np, "savez", failing_savez)
    assert _sample(ckpt, out, "--n", "2") == 1
    assert "No space left on device" in capsys.readouterr().err
    assert out.read_bytes() == b"earlier results"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "old.npz"]


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_checkpoint_names_the_file(runs, tmp_path, damage, capsys):
    bad = tmp_path / "bad.pt"
    good = (runs["ddpm"] / "latest.pt").read_bytes()
    bad.write_bytes(b"not a checkpoint" * 10 if damage == "garbage" else good[: len(good) // 2])
    assert _sample(bad, tmp_path / "x.png") == 1
    assert main(["eval", "--ckpt", str(bad), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.count(str(bad)) == 2 and "corrupt" in err


def test_console_script_reports_a_bad_preset():
    proc = subprocess.run([sys.executable, "-m", "minidit", "train", "--preset", "nope"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "valid presets: mnist-cpu" in proc.stderr


@pytest.mark.parametrize("command, words", [("train", ["--preset", "--minutes", "presets:", "config keys:"]),
                                            ("sample", ["--ckpt", "--sampler", "--labels", ".npz"]),
                                            ("eval", ["--json", "floor", "--sampler"])])
def test_help_of_each_subcommand(command, words, capsys):
    assert main([command, "--help"]) == 0
    text = capsys.readouterr().out
    assert all(word in text for word in words)


# ----------------------------------------------------------------------------- samplers


def _nfe(name: str, N: int | None, T: int) -> int | None:
    """Network calls per sample of each sampler with N steps (None: adaptive)."""
    N = N or 0
    return {"ddpm": N or T, "ddim": N, "euler_maruyama": N, "reverse_diffusion": N, "langevin": N, "pc": 2 * N,
            "edm": 2 * N - 1, "dpm_solver++": N, "dpm_solver++3m": N, "euler": N, "heun": 2 * N}.get(name)


@pytest.mark.parametrize("kind", list(OBJECTIVES))
def test_every_sampler_the_objective_can_drive(runs, kind):
    model, ema_model, objective, config = load_checkpoint(runs[kind] / "latest.pt")
    names = objective.sampler_names()
    assert {"ddim", "euler", "heun", "rk45", "edm", "dpm_solver++"} <= set(names)
    labels = class_labels(6, 10)
    for name in names:
        N = None if name == "rk45" or (kind == "ddpm" and name == "ddpm") else 3
        loose = {"rtol": 1e-3, "atol": 1e-3} if name == "rk45" else {}
        sampler = objective.make_sampler(ema_model, name, N, cfg_scale=2.0, **loose)
        out = draw(sampler, labels, (1, 8, 8), batch_size=4, seed=0)
        assert out["images"].shape == (6, 1, 8, 8) and torch.isfinite(out["images"]).all(), name
        expected = _nfe(name, N, getattr(objective, "T", 0))
        if expected is None:  # adaptive RK45: at least its 2 start-up calls and one step of 7
            assert out["nfe"] >= 9, name
        else:
            assert out["nfe"] == expected, name


@pytest.mark.parametrize("kind, name", [("ddpm", "ddim"), ("ddpm", "dpm_solver++"), ("sde", "heun"),
                                        ("flow", "euler"), ("flow", "edm")])
def test_guidance_scale_0_is_the_null_label_and_1_the_label(runs, kind, name):
    _, ema_model, objective, _ = load_checkpoint(runs[kind] / "latest.pt")
    y, null = torch.tensor([1, 2, 3]), torch.full((3,), objective.null_label)

    def run(cfg_scale, labels):
        sampler = objective.make_sampler(ema_model, name, 3, cfg_scale)
        return sampler((3, 1, 8, 8), labels, torch.Generator().manual_seed(5)).x

    # equal up to float32 round-off, which differs between batches of 2B and B rows and which
    # EDM's start at sigma = 80 magnifies
    torch.testing.assert_close(run(0.0, y), run(1.0, null), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(run(1.0, y), run(1.0, null))


def test_default_sampling_comes_from_the_objective():
    config = config_from_preset("mnist-cpu", [*TINY, 'objective={"kind": "ddpm", "sampler": "ddpm", "cfg_scale": 3}'])
    objective = make_objective(config)
    sampler = objective.make_sampler(make_model(config))
    assert (sampler.name, sampler.steps, sampler.grid, sampler.cfg_scale) == ("ddpm", None, "ddpm", 3.0)
    # any grid with any solver: DDIM on Karras' noise levels, Heun on DDPM's steps
    for name, grid in (("ddim", "karras"), ("heun", "ddpm"), ("dpm_solver++", "uniform")):
        bound = objective.make_sampler(make_model(config), name, 4, grid=grid)
        assert bound.grid == grid and torch.isfinite(bound((2, 1, 8, 8), torch.tensor([0, 1])).x).all()
    with pytest.raises(ValueError, match="unknown grid"):
        objective.make_sampler(make_model(config), "ddim", 4, grid="cubic")


def test_guidance_needs_a_conditional_model():
    config = config_from_preset("mnist-flow-cpu", [*TINY, "class_conditional=false"])
    with pytest.raises(ValueError, match="class-conditional"):
        make_objective(config).make_sampler(make_model(config), "euler", 2, cfg_scale=2.0)
    # the preset's own guidance scale does not apply to an unconditional model
    assert make_objective(config).make_sampler(make_model(config), "euler", 2).cfg_scale == 1.0
    assert class_labels(3, 0).tolist() == [-1, -1, -1]
    with pytest.raises(ValueError, match="unconditional"):
        class_labels(3, 0, [1])


# ----------------------------------------------------------------------------- eval


def test_eval_refuses_datasets_without_a_feature_net(runs, capsys):
    assert main(["eval", "--ckpt", str(runs["ddpm"] / "latest.pt"), "--n", "10", "--device", "cpu"]) == 2
    assert "evaluation needs a checkpoint trained on one of ['mnist']" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_of_a_short_mnist_dit_run(mnist_root, tmp_path, capsys):
    folder = tmp_path / "dit"
    rc = main(["train", "--out", str(folder), "--steps", "4", "--eval-n", "20", "--grid-n", "10",
               "--device", "cpu", "--no-progress", f"data_root={mnist_root}", "dataset_size=64",
               "batch_size=16", "model_overrides.depth=1", "model_overrides.hidden_size=32",
               "model_overrides.num_heads=2", "objective.inner.sample_steps=2", "sample_every=0",
               "checkpoint_every=0"])
    assert rc == 0  # the main job: a DiT on the latents of the shipped autoencoder
    assert "real-vs-real floor" in capsys.readouterr().out
    saved = json.loads((folder / "eval.json").read_text())
    assert saved["n"] == 20 and saved["step"] == 4 and saved["sampler"] == "heun" and saved["nfe"] == 2 * 2
    rc = main(["eval", "--ckpt", str(folder / "latest.pt"), "--n", "30", "--sampler", "dpm_solver++",
               "--steps", "3", "--cfg", "1.5", "--json", "--device", "cpu", "--no-progress"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"fd", "fd_floor", "accuracy", "n", "sampler", "steps", "grid", "cfg_scale",
                           "cfg_interval", "nfe", "seconds"}
    assert result["n"] == 30 and result["sampler"] == "dpm_solver++" and result["nfe"] == 3
    assert result["cfg_scale"] == 1.5 and result["steps"] == 3 and result["seconds"] > 0
    assert result["fd"] >= 0 and result["fd_floor"] > 0 and 0 <= result["accuracy"] <= 1
