"""Shared fixtures: the real dataset root, and one torch thread for every test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


@pytest.fixture
def mnist_root() -> Path:
    """The root holding real MNIST ($MINIDIT_DATA, as CI sets it); skips the test when unset."""
    root = os.environ.get("MINIDIT_DATA")
    if not root:
        pytest.skip("real MNIST needed: set MINIDIT_DATA to the dataset root (CI sets it to shared/data)")
    return Path(root)


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Every test runs on one torch thread: the tests push small tensors through long loops,
    where extra threads only add waiting, and on a shared 2-core machine they oversubscribe it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
