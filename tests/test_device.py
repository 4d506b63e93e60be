"""Device choice and seeding."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from minidit import get_device, seed_everything


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
