"""Exponential moving average (EMA) of model weights, the copy that diffusion models sample with.

After every optimiser step the averaged weights move a little towards the live ones:

    θ_ema ← d_n · θ_ema + (1 − d_n) · θ                        [DDPM, App. B; DiT, Sec. 4]
    d_n   = min(decay, (1 + n) / (10 + n))                     (warm-up, n = updates so far)

The warm-up keeps d_n small at first (d_0 = 0.1), so that the average forgets the random
initialisation quickly, and lets it grow towards `decay` (e.g. 0.9999) as training settles.
Buffers (e.g. running statistics) are copied, not averaged.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """An averaged copy of a model, updated in place after each optimiser step.

    Args:
        model: the live model whose parameters are averaged (unwrap DDP/compile first).
        decay: the long-run decay, in [0, 1); 0 copies the live weights every step.
        warmup: use d_n = min(decay, (1 + n) / (10 + n)) instead of a constant `decay`.

    Attributes:
        model: the averaged copy, in eval mode and without gradients.
        num_updates: n, the number of `update` calls so far.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must lie in [0, 1), got {decay!r}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.num_updates = 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def current_decay(self) -> float:
        """d_n for the next update: the warm-up formula capped at `decay`."""
        if not self.warmup:
            return self.decay
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """θ_ema ← d_n θ_ema + (1 − d_n) θ for every parameter; buffers are copied."""
        d = self.current_decay()
        ema_params = list(self.model.parameters())
        live_params = [p.detach().to(q.dtype) for p, q in zip(model.parameters(), ema_params)]
        if len(live_params) != len(ema_params):
            raise ValueError("model and EMA model have a different number of parameters")
        # lerp(a, b, w) = a + w (b − a) = d a + (1 − d) b with w = 1 − d; one fused kernel per list.
        torch._foreach_lerp_(ema_params, live_params, 1.0 - d)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)
        self.num_updates += 1

    def state_dict(self) -> dict:
        """Averaged weights and the update count, as plain data for a checkpoint."""
        return {
            "model": self.model.state_dict(),
            "num_updates": self.num_updates,
            "decay": self.decay,
            "warmup": self.warmup,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned."""
        self.model.load_state_dict(state["model"])
        self.num_updates = int(state["num_updates"])
        self.decay = float(state["decay"])
        self.warmup = bool(state["warmup"])
