"""Faults as a user meets them, through the real `minidit` console script in a subprocess: a run is
never lost, and every expected failure is one line on stderr with the command's prefix and an exit code.

    0 done · 1 the work failed · 2 refused before any work · 130 Ctrl-C · 143 SIGTERM
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from minidit.run.checkpoint import read_checkpoint
from minidit.run.config import PRESETS
from minidit.run.runfolder import RunFolder

TINY = ["--device", "cpu", "--no-progress", "--eval-n", "0", "--grid-n", "10", "model=mlp", "dataset=synthetic",
        "dataset_size=64", "batch_size=16", "model_overrides.hidden=16", "log_every=5", "sample_every=0",
        "checkpoint_every=5", "lr=1e-3", 'objective={"kind": "flow", "sample_steps": 2}']


def minidit(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: float = 240):
    """Run the installed console script (or `python -m minidit` where it is not on the PATH)."""
    script = shutil.which("minidit", path=str(Path(sys.executable).parent)) or shutil.which("minidit")
    command = [script] if script else [sys.executable, "-m", "minidit"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([*command, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)


def one_line(proc, code: int, *words: str) -> str:
    """The failure is exit code `code` and one line `minidit ...: error: ...` holding `words`, no traceback."""
    err = proc.stderr.strip()
    assert proc.returncode == code, (proc.returncode, err)
    assert "Traceback" not in err and err.count("\n") == 0, err
    assert err.startswith("minidit ") and ": error: " in err, err
    for word in words:
        assert word in err, (word, err)
    return err


def offline(tmp_path: Path) -> dict:
    """An environment with no dataset anywhere: an empty home and cache, no MINIDIT_DATA."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {"HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache"), "MINIDIT_DATA": ""}
    return env


def test_a_second_run_into_the_same_folder_is_refused_and_restart_keeps_the_old_one(tmp_path):
    out = tmp_path / "run"
    assert minidit("train", "--out", str(out), "--steps", "10", *TINY).returncode == 0
    before = (out / "latest.pt").read_bytes(), (out / "log.jsonl").read_text()
    one_line(minidit("train", "--out", str(out), "--steps", "2", *TINY), 2, "already holds a run", "--resume",
             "--restart")
    assert ((out / "latest.pt").read_bytes(), (out / "log.jsonl").read_text()) == before  # nothing lost
    # --restart starts afresh and keeps the old run, whole, under a dated name
    assert minidit("train", "--out", str(out), "--steps", "2", "--restart", *TINY).returncode == 0
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("run.")]
    assert len(kept) == 1 and (kept[0] / "latest.pt").read_bytes() == before[0]
    assert read_checkpoint(out / "latest.pt")["step"] == 2
    # --resume continues the run
    assert minidit("train", "--out", str(out), "--steps", "4", "--resume", *TINY).returncode == 0
    assert read_checkpoint(out / "latest.pt")["step"] == 4


def test_a_second_writer_is_refused_and_kill_9_releases_the_lock(tmp_path):
    out = tmp_path / "run"
    with RunFolder(out):  # this process writes the folder
        err = one_line(minidit("train", "--out", str(out), "--steps", "2", *TINY), 2, "is in use by pid")
        assert f"pid {os.getpid()}" in err
    # a writer killed with SIGKILL leaves its lock file, but not its lock
    code = f"from minidit.run.runfolder import RunFolder; import time\nwith RunFolder({str(out)!r}): time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", code])
    for _ in range(200):
        if (out / ".lock").is_file() and (out / ".lock").read_text():
            break
        time.sleep(0.05)
    one_line(minidit("train", "--out", str(out), "--steps", "2", *TINY), 2, f"in use by pid {holder.pid}")
    holder.kill()
    holder.wait()
    assert minidit("train", "--out", str(out), "--steps", "2", *TINY).returncode == 0


def test_a_diverging_run_stops_with_one_line_and_writes_no_bad_checkpoint(tmp_path):
    out = tmp_path / "run"
    proc = minidit("train", "--out", str(out), "--steps", "200", *TINY, "lr=1e6", "warmup_steps=0")
    one_line(proc, 1, "diverged at step", "Lower the learning rate")
    assert not out.exists()  # it saved nothing, so it leaves nothing


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_saves_the_step_and_the_resumed_run_is_exact(tmp_path, sig, code):
    out, reference = tmp_path / "run", tmp_path / "reference"
    args = ["--steps", "2000", *TINY, "checkpoint_every=0"]
    script = shutil.which("minidit", path=str(Path(sys.executable).parent)) or shutil.which("minidit")
    command = [script] if script else [sys.executable, "-m", "minidit"]
    proc = subprocess.Popen([*command, "train", "--out", str(out), *args], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    for _ in range(600):  # wait for the first log records: training is under way
        if (out / "log.jsonl").is_file() and (out / "log.jsonl").read_text().count("\n") >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(sig)
    err = proc.communicate(timeout=120)[1].strip()
    assert proc.returncode == code and err.count("\n") == 0 and "Traceback" not in err, err
    assert f"interrupted by {sig.name}" in err and "--resume" in err and str(out / "latest.pt") in err
    stopped = read_checkpoint(out / "latest.pt")["step"]
    assert 0 < stopped < 2000
    # continue it, and compare with a run that was never interrupted
    assert minidit("train", "--out", str(out), *args, "--resume").returncode == 0
    assert minidit("train", "--out", str(reference), *args).returncode == 0
    resumed, whole = read_checkpoint(out / "latest.pt"), read_checkpoint(reference / "latest.pt")
    assert resumed["step"] == whole["step"] == 2000
    for name, value in whole["model"].items():
        assert torch.equal(resumed["model"][name], value), name


def test_no_data_and_no_network_is_one_line_and_leaves_nothing(tmp_path):
    env = offline(tmp_path)
    proc = minidit("train", "--preset", "mnist-cpu", "--steps", "2", "--device", "cpu", "--no-progress",
                   env=env, cwd=tmp_path, timeout=600)
    one_line(proc, 1, "could not download", "MINIDIT_DATA")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "home" / ".cache" / "minidit").exists()
    # eval fails on the data before it draws a single sample
    assert minidit("train", "--out", str(tmp_path / "tiny"), "--steps", "2", *TINY).returncode == 0
    tiny = tmp_path / "tiny" / "latest.pt"
    config = json.loads((tmp_path / "tiny" / "config.json").read_text())
    state = torch.load(tiny, weights_only=True)
    state["config"] = {**config, "dataset": "mnist", "data_root": None}
    state["model"] = state["ema"]["model"] = _mnist_mlp_weights()
    torch.save(state, tmp_path / "mnist.pt")
    begin = time.perf_counter()
    one_line(minidit("eval", "--ckpt", str(tmp_path / "mnist.pt"), "--n", "1000", "--device", "cpu", env=env,
                     cwd=tmp_path, timeout=600), 1, "could not download")
    assert time.perf_counter() - begin < 120


def _mnist_mlp_weights() -> dict:
    from minidit.toy_models import TinyMLP

    return TinyMLP(1, 28, 10, hidden=16).state_dict()


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong content"])
def test_bad_data_files_are_one_line(tmp_path, damage):
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    header = bytes([0, 0, 8, 3]) + (60000).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    content = {"garbage": b"not gzip at all", "truncated": gzip.compress(header + b"\0" * 100),
               "wrong content": gzip.compress(header + b"\1" * (60000 * 784))}[damage]
    (raw / "train-images-idx3-ubyte.gz").write_bytes(content)
    proc = minidit("train", "--preset", "mnist-cpu", "--out", str(tmp_path / "run"), "--steps", "2", "--device",
                   "cpu", "--no-progress", env={"MINIDIT_DATA": str(tmp_path / "data")})
    one_line(proc, 1, "train-images-idx3-ubyte")
    assert not (tmp_path / "run").exists()


def test_missing_cifar10_is_one_line(tmp_path):
    proc = minidit("train", "--preset", "cifar10-gpu", "--out", str(tmp_path / "run"), "--steps", "2", "--device",
                   "cpu", "--no-progress", env=offline(tmp_path), cwd=tmp_path, timeout=600)
    one_line(proc, 1, "cifar-10-python.tar.gz")


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_an_unknown_device_is_refused_before_any_work(tmp_path, how):
    args = ["--device", "tpu"] if how == "flag" else []
    env = {"MINIDIT_DEVICE": "tpu"} if how == "environment" else {}
    proc = minidit("train", "--out", str(tmp_path / "run"), "--steps", "2", *args, *TINY[2:], env=env)
    one_line(proc, 2, "unknown device 'tpu'", "cpu, cuda")
    assert not (tmp_path / "run").exists()
    proc = minidit("sample", "--ckpt", str(tmp_path / "no.pt"), "--out", str(tmp_path / "new" / "x.png"), *args,
                   env=env)
    one_line(proc, 2, "unknown device 'tpu'")
    assert not (tmp_path / "new").exists()  # nothing made for a command that did no work


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "run"
    assert minidit("train", "--out", str(out), "--steps", "5", *TINY).returncode == 0
    return out / "latest.pt"


def test_a_checkpoint_that_holds_code_is_refused_without_torchs_advice(tmp_path, tiny_run):
    hostile = tmp_path / "hostile.pt"
    state = torch.load(tiny_run, weights_only=True)
    state["payload"] = _Exploit()
    torch.save(state, hostile)
    err = one_line(minidit("sample", "--ckpt", str(hostile), "--out", str(tmp_path / "x.png")), 1,
                   "the file holds code (GLOBAL posix.system)", "loads weights only")
    assert "weights_only" not in err and "likely succeed" not in err
    assert not (tmp_path / "pwned").exists()


class _Exploit:
    def __reduce__(self):
        return os.system, ("touch pwned",)


def test_an_architecture_mismatch_names_a_few_weights(tmp_path, tiny_run):
    state = torch.load(tiny_run, weights_only=True)
    state["config"]["model_overrides"] = {"hidden": 32}  # the weights are of hidden=16
    torch.save(state, tmp_path / "other.pt")
    err = one_line(minidit("sample", "--ckpt", str(tmp_path / "other.pt"), "--out", str(tmp_path / "x.png")), 1,
                   "does not fit the model", "of another shape")
    assert len(err) < 600


@pytest.mark.parametrize("cfg", ["-1", "nan", "inf"])
def test_a_bad_guidance_scale_is_refused(tmp_path, tiny_run, cfg):
    one_line(minidit("sample", "--ckpt", str(tiny_run), "--out", str(tmp_path / "x.png"), "--cfg", cfg), 2,
             "guidance scale must be a finite number >= 0")
    assert not (tmp_path / "x.png").exists()


def test_a_malformed_notebook_is_one_line(tmp_path):
    (tmp_path / "nb").mkdir()
    (tmp_path / "nb" / "broken.ipynb").write_text("{ not json")
    one_line(minidit("exercises", "generate", str(tmp_path / "nb"), "--out", str(tmp_path / "student")), 2,
             "broken.ipynb is not a notebook")
    (tmp_path / "nb" / "broken.ipynb").write_text('{"cells": [{"source": "x"}]}')
    one_line(minidit("exercises", "generate", str(tmp_path / "nb"), "--out", str(tmp_path / "student")), 2,
             "not an nbformat-4 notebook")


def test_help_texts_and_flops_errors():
    proc = minidit("sample", "--help")
    assert proc.returncode == 0 and "%%" not in proc.stdout and "class i mod K" in proc.stdout
    assert "130" in minidit("--help").stdout  # the exit codes are documented
    one_line(minidit("flops", "DiT-M/2"), 2, "valid names")


def test_training_length_flags_combine_and_conflicts_are_refused(tmp_path):
    def dry(*args):
        proc = minidit("train", "--dry-run", *args)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout[: proc.stdout.rindex("}") + 1]), proc.stdout.strip().splitlines()[-1]

    preset = PRESETS["mnist-cpu"]
    config, stop = dry()  # the preset: its steps or its minutes
    assert (config["steps"], config["minutes"]) == (preset.steps, preset.minutes) and "whichever comes first" in stop
    config, stop = dry("--steps", "400")  # --steps alone: exactly that many, no time limit
    assert (config["steps"], config["minutes"]) == (400, None) and stop == "# the run stops after 400 steps"
    config, _ = dry("--steps", "400", "--minutes", "3")  # both: whichever comes first
    assert (config["steps"], config["minutes"]) == (400, 3.0)
    config, _ = dry("--minutes", "3")  # --minutes alone keeps the preset's steps as a cap
    assert (config["steps"], config["minutes"]) == (preset.steps, 3.0)
    one_line(minidit("train", "--dry-run", "--steps", "400", "steps=30"), 2, "steps given both as a flag and as key=value")
    one_line(minidit("train", "--out", str(tmp_path / "x"), "--resume", "--restart", *TINY), 2, "not both")
    assert not (tmp_path / "x").exists()


def test_a_time_budget_ends_the_run_annealed(tmp_path):
    out = tmp_path / "run"
    proc = minidit("train", "--out", str(out), "--steps", "100000", "--minutes", "0.03", *TINY, "cosine=true",
                   "lr_min=1e-5", "warmup_steps=2", "log_every=1")
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    train = [r for r in records if r["event"] == "train"]
    assert 10 < train[-1]["step"] < 100_000  # the time stopped it, long before the steps
    assert train[-1]["lr"] == pytest.approx(1e-5, rel=0.05, abs=2e-6)  # annealed to lr_min when it stopped
    assert max(r["lr"] for r in train) == pytest.approx(1e-3, rel=0.05)
