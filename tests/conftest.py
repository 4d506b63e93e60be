"""Shared fixtures: the real dataset root, and one torch thread for every test."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from minidit.data import DATASETS, data_root


@pytest.fixture
def mnist_root() -> Path:
    """The root holding real MNIST, wherever minidit finds it ($MINIDIT_DATA, else the cache folder);
    skips the test when neither holds it (CI sets MINIDIT_DATA to shared/data)."""
    root = data_root()
    folder = root / DATASETS["mnist"].folder
    names = [r.filename for split in DATASETS["mnist"].splits.values() for r in split]
    if not all((folder / n).is_file() or (folder / f"{n}.gz").is_file() for n in names):
        pytest.skip(f"real MNIST needed in {root}: set MINIDIT_DATA to a dataset root that holds it "
                    "(CI sets it to shared/data)")
    return root


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Every test runs on one torch thread: the tests push small tensors through long loops,
    where extra threads only add waiting, and on a shared 2-core machine they oversubscribe it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
