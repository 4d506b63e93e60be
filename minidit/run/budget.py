"""How long a run trains, and the schedules that follow its budget.

A run stops after `steps` optimiser steps or `minutes` of training, whichever comes first
(minutes may be None: no time limit). The fraction of the budget used after step k,

    f = max(k / steps, elapsed / (60 · minutes))

drives the learning rate's decay and the EMA, so that a run cut short by its time budget is
annealed when it stops, as a run of the planned length would be. With k_f = f · steps, the step
the budget has reached:

    lr_k = lr · (k + 1) / warmup                       while k < warmup (linear warm-up)
         = lr_min + (lr − lr_min)(1 + cos πp) / 2,  p = (k_f − warmup)/(steps − warmup)   (cosine)

The warm-up counts optimiser steps k, not the budget: Adam's moment estimates need that many
real updates however slow the machine (a time budget with a large step cap would otherwise
warm up in a fraction of a step).
    EMA:  d_k = 1 − (1 − d) · steps / K,  K = k / f, the number of steps the budget allows

so the EMA averages over the same fraction of the run, 1/((1 − d) steps), whatever the
machine's speed. Without a time budget k_f = k, K = steps: the schedule of `steps` steps.
"""

from __future__ import annotations

import math


class Budget:
    """The stopping rule, learning-rate factor and EMA decay of a run (see the module docstring).

    Args:
        steps, minutes: the budgets (minutes None: no time limit).
        warmup_steps, cosine, lr, lr_min: the learning-rate schedule, in steps of the step budget.
        ema_decay: d, the EMA decay of a run of `steps` steps.
    """

    def __init__(self, steps: int, minutes: float | None = None, warmup_steps: int = 0, cosine: bool = False,
                 lr: float = 1.0, lr_min: float = 0.0, ema_decay: float = 0.9999):
        self.steps, self.minutes = steps, minutes
        self.warmup, self.cosine, self.floor, self.ema_decay = warmup_steps, cosine, lr_min / lr, ema_decay

    @classmethod
    def of(cls, config) -> Budget:
        return cls(config.steps, config.minutes, config.warmup_steps, config.cosine, config.lr, config.lr_min,
                   config.ema_decay)

    def fraction(self, step: int, seconds: float) -> float:
        """f after `step` steps and `seconds` of training, in [0, 1]."""
        by_steps = step / self.steps
        by_time = seconds / (60 * self.minutes) if self.minutes else 0.0
        return min(1.0, max(by_steps, by_time))

    def done(self, step: int, seconds: float) -> bool:
        return step >= self.steps or (self.minutes is not None and seconds >= 60 * self.minutes)

    def lr_factor(self, step: int, seconds: float = 0.0) -> float:
        """lr_k / lr for the step after `step` steps and `seconds` of training."""
        if step < self.warmup:
            return (step + 1) / self.warmup
        k = max(float(step), self.fraction(step, seconds) * self.steps)  # k_f
        if not self.cosine:
            return 1.0
        p = min(1.0, (k - self.warmup) / max(1.0, self.steps - self.warmup))
        return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * p))

    def ema(self, step: int, seconds: float) -> float:
        """d_k: the EMA decay whose horizon is the same fraction of the steps the budget allows."""
        f = self.fraction(step, seconds)
        if f <= 0 or step == 0:
            return self.ema_decay
        allowed = step / f  # K: the steps the budget will allow at this pace
        if allowed >= self.steps:
            return self.ema_decay
        return max(0.0, 1 - (1 - self.ema_decay) * self.steps / allowed)

    def describe(self) -> str:
        """When the run stops, in words."""
        if self.minutes is None:
            return f"stops after {self.steps} steps"
        return f"stops after {self.steps} steps or {self.minutes:g} minutes of training, whichever comes first"
