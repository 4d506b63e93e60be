"""Shared fixtures: the real dataset root, for the tests that need real MNIST."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture
def mnist_root() -> Path:
    """The root holding real MNIST ($MINIDIT_DATA, as CI sets it); skips the test when unset."""
    root = os.environ.get("MINIDIT_DATA")
    if not root:
        pytest.skip("real MNIST needed: set MINIDIT_DATA to the dataset root (CI sets it to shared/data)")
    return Path(root)
