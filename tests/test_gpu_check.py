"""The GPU check's smoke mode: the whole script on the CPU in seconds (issue 14)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_mode_writes_every_section(tmp_path):
    gpu_check = _load()
    report = gpu_check.main(["--smoke", "--out", str(tmp_path), "--no-progress"])
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["training"] == json.loads(json.dumps(report["training"]))
    ours = [r for r in saved["training"] if r["library"] == "minidit"]
    assert ours and all(r["step_ms"] > 0 and r["images_per_s"] > 0 and r["tflops"] > 0 for r in ours)
    # images/s is the batch over the step time
    assert all(abs(r["images_per_s"] - saved["batch_size"] / (r["step_ms"] / 1e3)) < 1e-6 * r["images_per_s"]
               for r in ours)
    assert all(r["images_nfe_per_s"] > 0 for r in saved["sampling"])
    run = saved["run"]
    assert run["steps"] == 3 and run["sample"]["nfe"] > 0 and run["n"] == 16
    text = (tmp_path / "gpu_check.md").read_text()
    for heading in ("## Training step", "## Sampling", "## A short `mnist-gpu` run"):
        assert heading in text


def test_peak_lookup_and_refusal_without_a_gpu(monkeypatch):
    gpu_check = _load()
    assert gpu_check.peak_tflops("NVIDIA H100 PCIe", None) == 756.0
    assert gpu_check.peak_tflops("NVIDIA H100 80GB HBM3", None) == 989.4
    assert gpu_check.peak_tflops("NVIDIA H200", None) == 989.4
    assert gpu_check.peak_tflops("Some GPU", None) is None and gpu_check.peak_tflops("Some GPU", 100.0) == 100.0
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA device"):
        gpu_check.main(["--out", "/nonexistent"])
