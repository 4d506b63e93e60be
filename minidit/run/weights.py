"""The weights that ship inside the package: files, checksums and the runs that made them.

`minidit/weights/manifest.json` lists each shipped model by name:

    {"mnist-dit": {"file": "mnist-dit.safetensors", "sha256": "...", "dtype": "float16",
                   "config": {...the TrainConfig of the run...},
                   "record": {"command": ..., "device": ..., "train_minutes": ..., "steps": ...,
                              "fd": ..., "fd_floor": ..., "accuracy": ..., "n": ...}}, ...}

`read(name)` checks the file's SHA-256 against the manifest before it reads a byte of it as
weights, and returns the state dict in float32; `write` adds or replaces an entry (the export
step of `benchmarks/pretrained.py`). A latent model's config names its autoencoder as
"pretrained:NAME" (`PREFIX`), which `minidit.run.latent` resolves here.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from minidit.run.checkpoint import CheckpointError
from minidit.run.outputs import atomic_write

FOLDER = Path(__file__).resolve().parents[1] / "weights"
PREFIX = "pretrained:"
DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class Entry:
    """One shipped model: its file (in `folder`), checksum, storage dtype, config and record."""

    name: str
    file: str
    sha256: str
    dtype: str
    config: dict
    record: dict


def _manifest(folder: Path) -> dict:
    path = folder / "manifest.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"the weights manifest {path} is corrupt ({err}); reinstall minidit") from err


def entries(folder: Path = FOLDER) -> dict[str, Entry]:
    """Every shipped model, by name."""
    return {name: Entry(name=name, **fields) for name, fields in _manifest(folder).items()}


def entry(name: str, folder: Path = FOLDER) -> Entry:
    """The manifest entry of `name`; ValueError naming the valid names if there is none."""
    known = entries(folder)
    if name not in known:
        raise ValueError(f"no pretrained model {name!r}; valid names: {', '.join(known) or '(none shipped)'}")
    return known[name]


def sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read(name: str, folder: Path = FOLDER) -> tuple[dict[str, torch.Tensor], Entry]:
    """The float32 state dict of shipped model `name`, after its SHA-256 is checked, and its entry.

    Raises:
        ValueError: no such name.
        CheckpointError: the file is missing or its checksum differs from the manifest's.
    """
    e = entry(name, folder)
    path = folder / e.file
    if not path.is_file():
        raise CheckpointError(f"the weights of {name!r} ({path}) are missing; reinstall minidit")
    found = sha256_of(path)
    if found != e.sha256:
        raise CheckpointError(f"the weights of {name!r} ({path}) are corrupt or changed: sha256 {found[:12]}..., "
                              f"expected {e.sha256[:12]}...; reinstall minidit")
    return {k: v.float() for k, v in load_file(str(path)).items()}, e


def write(name: str, state_dict: dict[str, torch.Tensor], config: dict, record: dict, dtype: str = "float16",
          folder: Path = FOLDER) -> Entry:
    """Store `state_dict` as `folder/NAME.safetensors` in `dtype` and add its entry to the manifest."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.safetensors"
    tensors = {k: v.detach().to("cpu", DTYPES[dtype] if v.is_floating_point() else v.dtype).contiguous().clone()
               for k, v in state_dict.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"name": name, "format": "minidit-pretrained"}))
    new = Entry(name=name, file=path.name, sha256=sha256_of(path), dtype=dtype, config=config, record=record)
    manifest = _manifest(folder)
    manifest[name] = {k: v for k, v in asdict(new).items() if k != "name"}
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    atomic_write(folder / "manifest.json", lambda tmp: tmp.write_text(text))
    return new
