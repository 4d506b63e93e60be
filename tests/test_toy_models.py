"""The toy MLP denoiser, and (slow) a trained toy DDPM whose samples reach the MMD noise floor."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from minidit.embeddings import timestep_frequencies
from minidit.toy_models import TOY_CONFIGS, ToyDenoiser


def test_embedding_and_shapes():
    e = timestep_frequencies(torch.tensor([0, 5, 999]), 16)  # the one sinusoidal code, shared with the DiT
    assert e.shape == (3, 16)
    torch.testing.assert_close(e[0], torch.cat([torch.ones(8), torch.zeros(8)]))  # cos 0, sin 0
    torch.testing.assert_close(e[:, :8] ** 2 + e[:, 8:] ** 2, torch.ones(3, 8))
    model = ToyDenoiser(TOY_CONFIGS["tiny"], num_classes=3)
    x = torch.randn(5, 2)
    out_int = model(x, torch.tensor([0, 1, 2, 3, 4]), torch.tensor([0, 1, 2, 3, 0]))
    out_float = model(x, torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0]))  # fractional timesteps work too
    assert out_int.shape == out_float.shape == (5, 2)
    assert torch.count_nonzero(out_int) == 0  # zero-initialised output layer
    with pytest.raises(ValueError, match="num_classes"):
        ToyDenoiser()(x, torch.zeros(5), torch.zeros(5, dtype=torch.long))


def _load_benchmark():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "toy_ddpm.py"
    spec = importlib.util.spec_from_file_location("toy_ddpm_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_trained_toy_ddpm_reaches_the_mmd_noise_floor():
    """Train the MLP (v-prediction, cosine schedule) for 1500 steps, sample with DDIM-100.

    A perfect sampler has the MMD² of two fresh data sets (the floor, ~c/n for n = 2000);
    we allow 2x the floor. For scale: blurring the data by N(0, 0.1²) gives ~3x, and a
    Gaussian with the data's moments ~50x (asserted > 10x, so the metric can fail).
    """
    bench = _load_benchmark()
    r = bench.run(steps=1500, sampler="ddim", n_samples=2000, progress=False)
    assert r["mmd2_gaussian"] > 10 * r["mmd2_floor"]
    assert r["mmd2_model"] < 2 * r["mmd2_floor"], r
