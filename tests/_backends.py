"""Shared by the backbone tests: a network gives the same output with fused and explicit attention."""

from __future__ import annotations

import torch


def assert_fused_equals_explicit(model: torch.nn.Module, *inputs) -> None:
    """Run `model(*inputs)` with its attention layers' own backend (fused SDPA), then with every
    layer switched to the explicit softmax(QK^T/sqrt(d))V, and compare."""
    fused = model(*inputs)
    for m in model.modules():
        if hasattr(m, "backend"):
            m.backend = "explicit"
    torch.testing.assert_close(model(*inputs), fused)
