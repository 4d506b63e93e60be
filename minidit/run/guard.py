"""What stops a training run early, cleanly: divergence, and SIGINT / SIGTERM.

Divergence. An update whose gradient norm is NaN or infinite is skipped (and counted); a step
whose loss is NaN, infinite, or more than `divergence_factor` times its running mean (an
exponential mean over about 50 steps, once 20 steps have set it) is a bad step too. After
`max_bad_steps` bad steps in a row the run stops with `DivergenceError`. No checkpoint is
written while the latest step is bad, so the last checkpoint is always a good one.

Signals. The first SIGINT (Ctrl-C) or SIGTERM lets the current step finish; the engine then
saves a checkpoint (of the last good step) and raises `Interrupted` with the exit code a shell
expects, 130 or 143. A second signal stops at once.

One read of the device per step decides all of it: the gradient norm and the mean loss
(all-reduced with the stop votes of every rank under DDP, so that all ranks agree).
"""

from __future__ import annotations

import math
import signal
import threading
from pathlib import Path

import torch
import torch.distributed as dist

WARMUP_STEPS = 20  # steps before the running mean of the loss is trusted
MEAN_DECAY = 0.98  # the running mean's decay: about 50 steps


class DivergenceError(RuntimeError):
    """The training diverged; the message names the step and the last good checkpoint."""


class Interrupted(RuntimeError):
    """SIGINT or SIGTERM stopped the run after saving; `exit_code` is 130 or 143."""

    def __init__(self, message: str, exit_code: int, checkpoint: Path | None):
        super().__init__(message)
        self.exit_code, self.checkpoint = exit_code, checkpoint


class Guard:
    """Skips non-finite updates, stops a diverged run, and turns SIGINT/SIGTERM into a clean stop.

    Used as a context manager around the training loop: it installs the signal handlers (in
    the main thread only) and puts the previous ones back.
    """

    def __init__(self, config):
        self.factor, self.patience = config.divergence_factor, config.max_bad_steps
        self.bad, self.first_bad, self.skipped, self.mean, self.seen = 0, None, 0, None, 0
        self.signal, self.previous = None, {}

    # -- signals -------------------------------------------------------------------------------
    def __enter__(self) -> Guard:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum, frame) -> None:
        if self.signal is not None:  # the second one: stop now
            raise KeyboardInterrupt
        self.signal = signum

    @property
    def interrupted(self) -> bool:
        return self.signal is not None

    @property
    def healthy(self) -> bool:
        """Whether the latest step was good (so its state may be saved)."""
        return self.bad == 0

    # -- divergence ----------------------------------------------------------------------------
    def keep(self, run, grad_norm: torch.Tensor, loss: torch.Tensor) -> bool:
        """Whether to apply this step's update; raises DivergenceError after too many bad steps."""
        votes = torch.stack([grad_norm.float(), loss.float(), torch.tensor(float(self.interrupted), device=loss.device)])
        if run.world > 1:
            votes = votes.to(grad_norm.device)
            dist.all_reduce(votes)  # the grad norm is already the same on every rank: summed W times
            votes = votes / torch.tensor([run.world, run.world, 1.0], device=votes.device)
        norm, loss_value, stop = votes.tolist()  # the one read of the device
        if stop and self.signal is None:  # another rank was interrupted
            self.signal = signal.SIGINT
        finite = math.isfinite(norm)
        exploded = not math.isfinite(loss_value) or (
            self.mean is not None and self.seen >= WARMUP_STEPS and self.factor is not None
            and loss_value > self.factor * self.mean)
        if finite and not exploded:
            self.bad, self.first_bad = 0, None
            self.mean = loss_value if self.mean is None else MEAN_DECAY * self.mean + (1 - MEAN_DECAY) * loss_value
            self.seen += 1
            return True
        self.bad += 1
        self.first_bad = run.step + 1 if self.first_bad is None else self.first_bad
        self.skipped += not finite
        if self.bad >= self.patience:
            latest = Path(run.config.out_dir) / "latest.pt"
            what = "the gradient norm was NaN or infinite" if not finite else (
                f"the loss was {loss_value:.3g}, above {self.factor:g} x its running mean {self.mean:.3g}"
                if math.isfinite(loss_value) else "the loss was NaN or infinite")
            kept = f"the last good checkpoint is {latest}" if latest.is_file() else "no checkpoint was written"
            raise DivergenceError(f"training diverged at step {run.step + 1}: {what} for {self.bad} steps in a row "
                                  f"(from step {self.first_bad}); stopped, {kept}. Lower the learning rate "
                                  f"(lr={run.config.lr:g}) or clip the gradients harder.")
        return finite

    def raise_if_interrupted(self, run, latest: Path) -> None:
        """After the loop: raise Interrupted if a signal stopped it (the checkpoint is saved by then)."""
        if self.signal is None:
            return
        name, code = ("SIGTERM", 143) if self.signal == signal.SIGTERM else ("SIGINT", 130)
        saved = latest if latest.is_file() else None
        where = f"saved {latest} (step {run.step if self.healthy else 'before the last bad one'})" if saved \
            else "nothing was saved"
        raise Interrupted(f"interrupted by {name} at step {run.step}: {where}", code, saved)
