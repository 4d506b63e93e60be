"""Where tensors live and how runs are made repeatable.

`get_device` picks the fastest available backend (CUDA, then Apple's MPS, then the
CPU), overridable by argument or by the ``MINIDIT_DEVICE`` environment variable.
`autocast_dtype` says which mixed precision a device runs in hardware (and whether it
needs a gradient scaler). `seed_everything` seeds every random number generator a run touches.
"""

from __future__ import annotations

import os
import platform
import random
from pathlib import Path

import numpy as np
import torch


def get_device(prefer: str | torch.device | None = None) -> torch.device:
    """Return the device to run on.

    Args:
        prefer: an explicit choice ("cpu", "cuda", "cuda:1", "mps"); when None the
            ``MINIDIT_DEVICE`` environment variable is read, and when that is unset
            CUDA, then MPS, then the CPU is chosen.

    Raises:
        ValueError: the requested backend is not available on this machine.
    """
    if prefer is None:
        prefer = os.environ.get("MINIDIT_DEVICE") or None
    if prefer is not None:
        try:
            device = torch.device(prefer)
        except RuntimeError:
            raise ValueError(f"unknown device {str(prefer)!r}; valid devices: cpu, cuda, cuda:N, mps") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {str(prefer)!r} requested but CUDA is not available here")
        if device.type == "mps" and not _mps_available():
            raise ValueError(f"device {str(prefer)!r} requested but MPS is not available here")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if _mps_available():
        return torch.device("mps")
    return torch.device("cpu")


AMPERE = (8, 0)  # the first CUDA compute capability with bf16 tensor cores (A100; H100 is 9.0)


def autocast_dtype(device: str | torch.device) -> tuple[torch.dtype | None, bool]:
    """The low-precision dtype that `device` runs natively, and whether it needs a gradient scaler.

        CUDA, compute capability >= 8.0 (Ampere, Ada, Hopper: A100, L4, H100)  ->  (bfloat16, False)
        CUDA, compute capability <  8.0 (Volta, Turing: V100, T4)               ->  (float16, True)
        CPU, MPS, anything else                                                 ->  (None, False): float32

    bf16 keeps float32's 8 exponent bits, so gradients do not underflow and need no scaling.
    fp16 has 5 exponent bits: gradients below 2^-24 flush to zero, so the loss is multiplied by a
    scale S before the backward pass and the gradients divided by S before the update
    (`torch.amp.GradScaler`, which also lowers S whenever a gradient overflows).

    Capability is the test, not `torch.cuda.is_bf16_supported()`: that counts emulation, and on a
    T4 it says True for a bf16 that runs slower than float32.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return None, False
    return dtype_for_capability(torch.cuda.get_device_capability(device))


def dtype_for_capability(capability: tuple[int, int]) -> tuple[torch.dtype, bool]:
    """`autocast_dtype` of a CUDA GPU of this compute capability (major, minor), e.g. (7, 5) for a T4."""
    return (torch.bfloat16, False) if tuple(capability) >= AMPERE else (torch.float16, True)


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def seed_everything(seed: int) -> torch.Generator:
    """Seed python's `random`, numpy and torch (every device) with `seed`.

    Returns:
        A CPU `torch.Generator` seeded with `seed`, for code that prefers an
        explicit generator to the global state.
    """
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device
    return torch.Generator().manual_seed(seed)


def cpu_name() -> str:
    """The CPU's model name, for the device line of a benchmark ("AMD EPYC 7B13"): /proc/cpuinfo's
    `model name` on Linux, else what `platform` knows."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()
