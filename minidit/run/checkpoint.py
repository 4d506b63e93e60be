"""Checkpoints that survive a kill: atomic writes, every random state, plain-data contents.

A checkpoint is one `torch.save`d dict of tensors and plain data only (dicts, lists, numbers,
strings), so it loads with `torch.load(..., weights_only=True)` and never runs pickled code:

    {"format": "minidit-checkpoint", "version": 1, "step": n, "config": {...},
     "model": ..., "ema": ..., "optimizer": ..., "scheduler": ..., "rng": {...}, "data": {...}}

Writing goes to a temporary file in the same folder, which is flushed, fsync'ed and then
renamed over the target with `os.replace` (atomic on POSIX and Windows): a process killed
while saving leaves the previous checkpoint intact, never a half-written one.
Resuming bit-exactly needs every random state the run touches; `capture_rng_state` and
`restore_rng_state` gather python's `random`, numpy, torch's CPU and CUDA generators.
For a training run (`minidit.run.engine`), `run_state` / `save_run` / `restore_run` keep one
random state and data position per DDP rank; `minidit.run.build.load_checkpoint` rebuilds the
trained networks and objective from the config stored inside.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import re
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

FORMAT = "minidit-checkpoint"
VERSION = 1
REQUIRED_KEYS = ("step", "config", "model", "ema", "optimizer", "scheduler", "rng", "data")
# TrainConfig fields that may change when a run resumes: how long it runs, what it writes, where
RESUMABLE_CHANGES = ("steps", "minutes", "log_every", "sample_every", "checkpoint_every",
                     "keep_checkpoints", "n_samples", "device", "compile", "out_dir", "data_root",
                     "max_bad_steps", "divergence_factor")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupt or not a minidit checkpoint."""


# ----------------------------------------------------------------------------- random states


def capture_rng_state() -> dict:
    """Every global random state as plain data: python, numpy, torch CPU and CUDA."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
        "torch_cpu": torch.get_rng_state(),
        "torch_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict) -> None:
    """Set every global random state back to what `capture_rng_state` returned."""
    py_version, py_state, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch_cpu"])
    if state["torch_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["torch_cuda"])


# ----------------------------------------------------------------------------- plain data


def check_plain(obj: object, where: str = "config") -> None:
    """Raise TypeError unless `obj` is plain data (dict with str keys, list, tuple, number, str).

    Plain data is what `torch.load(weights_only=True)` accepts and JSON can show.
    """
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return
    if isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            check_plain(item, f"{where}[{i}]")
        return
    if isinstance(obj, dict):
        for key, item in obj.items():
            if not isinstance(key, str):
                raise TypeError(f"{where} has a non-string key {key!r}; checkpoints keep plain data only")
            check_plain(item, f"{where}[{key!r}]")
        return
    raise TypeError(f"{where} is a {type(obj).__name__}; checkpoints keep plain data only "
                    "(dict, list, tuple, int, float, str, bool, None)")


# ----------------------------------------------------------------------------- save / read


def save_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    """Atomically write `state` (which must hold `REQUIRED_KEYS`) to `path`.

    Returns:
        The path written.
    """
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise ValueError(f"checkpoint state lacks {missing}; it needs {list(REQUIRED_KEYS)}")
    check_plain(state["config"])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "version": VERSION, **state}
    # 1. write into a temporary file beside the target (same file system, so rename is atomic)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, file_mode())  # mkstemp makes 0600; give the file the user's usual mode
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())  # 2. the bytes are on disk before the name points at them
        os.replace(tmp, path)  # 3. atomic swap: readers see the old file or the new, never half
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)  # 4. make the rename itself durable
    return path


def file_mode() -> int:
    """The permissions a plain `open(path, "w")` would give a new file under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync_dir(folder: Path) -> None:
    """Flush a directory entry to disk where the OS allows it (not on Windows)."""
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load and validate a checkpoint written by `save_checkpoint`.

    Raises:
        CheckpointError: the file is missing, truncated, corrupt or of another format;
            the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))  # torch refused a global: the file would run code
        if found:
            raise CheckpointError(f"refused {path}: the file holds code (GLOBAL {found.group(1)}); minidit "
                                  "loads weights only, so it never runs code from a checkpoint") from None
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt and cannot be read") from err
    except Exception as err:  # zip and EOF errors all mean the same to the user
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt and cannot be read "
                              f"({type(err).__name__})") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a minidit checkpoint (no format tag {FORMAT!r})")
    if state.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {state.get('version')!r}; "
                              f"this minidit reads version {VERSION}")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: it lacks {missing}")
    return state


def load_weights(module: torch.nn.Module, state: dict, path: str | os.PathLike) -> None:
    """`module.load_state_dict(state)`, or a CheckpointError that names the first few weights that
    differ (missing, unexpected, or of another shape) and how many there are."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shaped = [f"{k} {list(state[k].shape)} in the file, {list(own[k].shape)} in the model" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    parts = [f"{len(names)} {what} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
             for what, names in (("missing", missing), ("unexpected", unexpected), ("of another shape", shaped))
             if names]
    if parts:
        raise CheckpointError(f"checkpoint {path} does not fit the model its config builds: weights "
                              + "; ".join(parts))
    module.load_state_dict(state)


# ----------------------------------------------------------------------------- export


def export_safetensors(state_dict: dict[str, torch.Tensor], path: str | os.PathLike,
                       metadata: dict | None = None) -> Path:
    """Write a state dict as a `.safetensors` file, with `metadata` stored as JSON strings."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # safetensors wants contiguous CPU tensors that share no memory
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    text = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    save_file(tensors, str(path), metadata=text)
    return path


def export_ema(checkpoint_path: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """Export a checkpoint's EMA weights to safetensors; its config goes into the metadata
    (key "config", JSON), so the file alone says which model it belongs to."""
    state = read_checkpoint(checkpoint_path)
    metadata = {"config": state["config"], "step": state["step"], "format": "minidit-ema"}
    return export_safetensors(state["ema"]["model"], out_path, metadata)


# ----------------------------------------------------------------------------- whole runs


def run_state(step: int, config: dict, model, ema, optimizer, generator: torch.Generator,
              micro_step: int, elapsed_s: float, world: int) -> dict:
    """Everything `save_checkpoint` needs from a training run.

    Under DDP every rank must call this (it gathers each rank's random state and data
    position, which differ from rank to rank); only rank 0 then saves.
    """
    mine = {"rng": {**capture_rng_state(), "generator": generator.get_state()},
            "data": {"micro_step": micro_step}}
    ranks = [mine]
    if world > 1:
        ranks = [None] * world
        torch.distributed.all_gather_object(ranks, mine)
    return {"step": step, "config": config, "model": model.state_dict(), "ema": ema.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": {"schedule": "budget"},  # the learning rate follows the step and the time (minidit.run.budget)
            "rng": [r["rng"] for r in ranks], "data": [r["data"] for r in ranks], "elapsed_s": elapsed_s}


def save_run(state: dict, path: str | os.PathLike, rank: int, world: int, keep_copy: bool = False) -> Path:
    """Rank 0 writes `state` to `path` (and to step_NNNNNNN.pt beside it with `keep_copy`);
    under DDP the other ranks wait until it is there, so a resume finds it on every rank."""
    path = Path(path)
    if rank == 0:
        save_checkpoint(state, path)
        if keep_copy:
            save_checkpoint(state, path.with_name(f"step_{state['step']:07d}.pt"))
    if world > 1:
        torch.distributed.barrier()
    return path


def restore_run(state: dict, config: dict, rank: int, world: int, model, ema, optimizer,
                generator: torch.Generator, may_change: tuple[str, ...] = RESUMABLE_CHANGES
                ) -> tuple[int, int, float]:
    """Load a checkpoint of `minidit.train` into a freshly built run, for this rank.

    Args:
        state: from `read_checkpoint`.
        config: the new run's config as plain data; it must equal the checkpoint's except
            for the fields in `may_change` (run length, intervals, device, ...).
        rank, world: this process and the number of processes (as many as wrote `state`).
        model, ema, optimizer, generator: fresh objects, updated in place (the learning rate
            needs no state: it follows the step and the elapsed time).

    Returns:
        (optimiser step, data micro-step, training seconds so far) at the checkpoint.
    """
    differs = sorted(k for k in config if k not in may_change
                     and json.dumps(config[k]) != json.dumps(state["config"].get(k)))
    if differs:
        raise ValueError(f"cannot resume: the config differs from the checkpoint's in {differs}; "
                         f"only {list(may_change)} may change between runs")
    if len(state["rng"]) != world:
        raise ValueError(f"the checkpoint was written by {len(state['rng'])} processes; resume it with "
                         f"as many (each holds its own random and data state), not {world}")
    model.load_state_dict(state["model"])
    ema.load_state_dict(state["ema"])
    optimizer.load_state_dict(state["optimizer"])
    restore_rng_state(state["rng"][rank])
    generator.set_state(state["rng"][rank]["generator"])
    return state["step"], state["data"][rank]["micro_step"], float(state.get("elapsed_s", 0.0))
