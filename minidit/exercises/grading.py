"""The helpers every graded check shares: call the student's function, compare its output with
minidit's, and name what is wrong (the shape, a known mistake, the timesteps where it differs).

A check raises `ExerciseError` (an AssertionError, so nbgrader marks the cell failed) with one
sentence of advice; "not implemented yet" when the cell still holds the stub.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

F64 = torch.float64


class ExerciseError(AssertionError):
    """The student's function disagrees with minidit; the message says where."""


def call_student(name: str, fn: Callable, *args, on_error: str = "", pair: bool = False):
    """Call the student's function; turn 'not implemented', broadcasting errors and non-pairs into advice."""
    try:
        out = fn(*args)
        if pair and not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise ExerciseError(f"{name}: return a pair (mean, variance), got {type(out).__name__}")
        return out
    except NotImplementedError:
        raise ExerciseError(f"{name}: not implemented yet (replace `raise NotImplementedError()`)") from None
    except RuntimeError as err:
        if on_error and "size of tensor" in str(err):
            raise ExerciseError(f"{name} raised `{err}`: {on_error}") from err
        raise


def expect_shape(name: str, what: str, got, shape: torch.Size, hint: str = "") -> None:
    """Raise ExerciseError unless `got` is a tensor of `shape`."""
    if not isinstance(got, Tensor):
        raise ExerciseError(f"{name}: {what} must be a torch.Tensor, got {type(got).__name__}")
    if got.shape != shape:
        msg = f"{name}: {what} has shape {tuple(got.shape)}, expected {tuple(shape)}"
        raise ExerciseError(msg + (f"; {hint}" if hint else ""))


def expect_close(name: str, what: str, got, want: Tensor, t: Tensor | None = None,
                 hints: tuple = (), shape_hint: str = "") -> None:
    """Raise ExerciseError unless got ≈ want, naming the shape, a known mistake or the wrong t."""
    expect_shape(name, what, got, want.shape, shape_hint)
    got = got.detach().to("cpu", F64)
    if not bool(torch.isfinite(got).all()):
        raise ExerciseError(f"{name}: {what} contains NaN or inf")
    close = torch.isclose(got, want, rtol=1e-5, atol=1e-6)
    if bool(close.all()):
        return
    for hint, candidate in hints:  # known mistakes, tried in order
        if candidate.shape == got.shape and torch.allclose(got, candidate, rtol=1e-5, atol=1e-6):
            raise ExerciseError(f"{name}: {what} is wrong: {hint}")
    msg = f"{name}: {what} is wrong"
    if t is not None:
        bad = ~close.reshape(close.shape[0], -1).all(dim=1)  # [B] examples with an error
        wrong, right = (", ".join(map(str, sorted(set(t[m].tolist()))[:8])) for m in (bad, ~bad))
        msg += f" at t = {wrong}" + (f" (right at t = {right}, ...)" if right else "")
    raise ExerciseError(msg + f"; largest error {float((got - want).abs().max()):.3g}")


def per_example(values: Tensor, x: Tensor) -> Tensor:
    """Values [B] shaped to broadcast against x [B, ...]."""
    return values.reshape(-1, *([1] * (x.ndim - 1)))  # [B] -> [B, 1, ..., 1]
