"""Writing outputs so that a failed write never destroys what was there: check first, write to a
temporary name beside the target, then rename it over the target (atomic on POSIX and Windows).
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from torch import Tensor

from minidit import plotting
from minidit.run.checkpoint import file_mode

OUTPUT_SUFFIXES = (".png", ".npz")


class OutputError(RuntimeError):
    """An output file or folder cannot be written."""


def check_output(path: str | os.PathLike, suffixes: Sequence[str] | None = None) -> Path:
    """Check before any work that `path` can be written: its suffix, and a writable folder.

    Raises:
        ValueError: the suffix is not one of `suffixes`.
        OutputError: the folder cannot be made or written (the message names it).
    """
    path = Path(path)
    if suffixes is not None and path.suffix.lower() not in suffixes:
        raise ValueError(f"output {path} must end with one of {list(suffixes)}")
    check_folder(path.parent)
    if path.is_dir():
        raise OutputError(f"output {path} is a folder; give a file name")
    return path


def check_folder(folder: str | os.PathLike) -> Path:
    """Check that `folder` can be written, making nothing: it, or the nearest folder above it that
    exists (where it would be made), must be a writable folder."""
    folder = Path(folder)
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise OutputError(f"cannot write to the output folder {folder}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write to the output folder {folder}: {existing} is not writable")
    return folder


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it over `path`.

    The temporary name keeps the suffix (writers pick the format from it); on any failure
    it is removed and whatever `path` held before is left as it was.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
        os.close(fd)
    except OSError as err:
        raise OutputError(f"cannot write {path}: {err.strerror or err}") from err
    try:
        write(Path(tmp))
        os.chmod(tmp, file_mode())  # mkstemp makes 0600; give the file the user's usual mode
        os.replace(tmp, path)  # atomic on POSIX and Windows
    except OSError as err:
        raise OutputError(f"cannot write {path}: {err.strerror or err}") from err
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return path


def write_samples(path: str | os.PathLike, images: Tensor, labels: Tensor, nrow: int | None = None) -> Path:
    """Write samples as a PNG grid (`nrow` per row, default √n) or an .npz of
    `images` float32 [N, C, H, W] in [−1, 1] and `labels` int64 [N] (−1: unconditional)."""
    path = check_output(path, OUTPUT_SUFFIXES)
    if path.suffix.lower() == ".png":
        nrow = nrow or math.ceil(math.sqrt(len(images)))
        return atomic_write(path, lambda tmp: plotting.save_image_grid(images, tmp, nrow=nrow))
    arrays = {"images": images.detach().cpu().float().numpy(), "labels": labels.cpu().long().numpy()}
    return atomic_write(path, lambda tmp: np.savez(tmp, **arrays))
