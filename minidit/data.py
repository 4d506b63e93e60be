"""Image datasets as ready tensors (MNIST, Fashion-MNIST, CIFAR-10) and a fast batch loader.

Pixels u in {0, ..., 255} become the data x0 of the diffusion models, scaled to [-1, 1]:

    x0 = u / 127.5 - 1          images [N, C, H, W] float32, labels [N] int64

Files are read from a root folder in torchvision's layout (ROOT/MNIST/raw/,
ROOT/FashionMNIST/raw/, ROOT/cifar-10-batches-py/), where ROOT is the `root` argument,
else the ``MINIDIT_DATA`` environment variable, else ~/.cache/minidit (honouring
``XDG_CACHE_HOME``). A file already there is used as it is after a check: the md5 of its
decompressed content where it is known, and always its size and header. A missing file
is downloaded (see `minidit.download`). Toy 2-D distributions live in `minidit.toy`.

References: LeCun et al. 1998 (MNIST and its IDX format); Xiao et al. 2017
(Fashion-MNIST); Krizhevsky 2009 (CIFAR-10, "Learning multiple layers of features").
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from minidit.download import DatasetError, download_file, extract_tar_folder, md5_file, restricted_loads

__all__ = ["DATASETS", "DatasetError", "DatasetInfo", "Resource", "TensorLoader", "data_root", "dataset_shape",
           "load_cifar10", "load_dataset", "load_fashion_mnist", "load_mnist", "random_hflip"]


# ----------------------------------------------------------------------------------------
# What each dataset is and which files hold it


@dataclass(frozen=True)
class Resource:
    """One data file: its name on disk, how many examples it holds, and its checksums."""

    filename: str  # as it lies on disk, decompressed (an IDX file may also lie there as .gz)
    count: int  # examples it must hold
    md5: str | None = None  # md5 of the (decompressed) content; None: size and header only
    archive_md5: str | None = None  # md5 of filename + ".gz" as the mirrors serve it


@dataclass(frozen=True)
class DatasetInfo:
    """Metadata of an image dataset and where its files come from."""

    name: str
    channels: int
    image_size: int
    num_classes: int
    folder: str  # relative to the root
    file_format: str  # "idx" (images file, labels file) or "cifar" (pickled batches)
    splits: dict[str, tuple[Resource, ...]]
    mirrors: tuple[str, ...]  # base URLs tried in turn
    archive: Resource | None = None  # CIFAR: the tar.gz (lying in ROOT) holding `folder`


_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
              "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _idx_splits(*md5s: tuple[str, str | None]) -> dict[str, tuple[Resource, ...]]:
    """The train/test table of an MNIST-style dataset from (gz md5, content md5) per file."""
    res = [Resource(name, 60000 if name.startswith("train") else 10000, md5, gz_md5)
           for name, (gz_md5, md5) in zip(_IDX_FILES, md5s)]
    return {"train": (res[0], res[1]), "test": (res[2], res[3])}


def _cifar_batch(name: str, md5: str) -> Resource:
    return Resource(name, 10000, md5)  # md5 of the extracted batch, as published with the dataset


DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo(
        name="mnist", channels=1, image_size=28, num_classes=10, folder="MNIST/raw", file_format="idx",
        splits=_idx_splits(("f68b3c2dcbeaaa9fbdd348bbdeb94873", "6bbc9ace898e44ae57da46a324031adb"),
                           ("d53e105ee54ea40749a09fcbcd1e9432", "a25bea736e30d166cdddb491f175f624"),
                           ("9fb629c4189551a2d022fa330f9573f3", "2646ac647ad5339dbf082846283269ea"),
                           ("ec29112dd5afa0611ce80d1b7f02629c", "27ae3e4e09519cfbb04c329615203637")),
        mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/",
                 "https://storage.googleapis.com/cvdf-datasets/mnist/")),
    "fashion-mnist": DatasetInfo(
        name="fashion-mnist", channels=1, image_size=28, num_classes=10, folder="FashionMNIST/raw",
        file_format="idx",
        splits=_idx_splits(("8d4fb7e6c68d591d4c3dfef9ec88bf0d", None),  # content md5s unpublished:
                           ("25c81989df183df01b3e8a0aad5dffbe", None),  # size and header are checked
                           ("bef4ecab320f06d8554ea6380940ec79", None),
                           ("bb300cfdad3c16e7a12a480ee83cd310", None)),
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)),
    "cifar10": DatasetInfo(
        name="cifar10", channels=3, image_size=32, num_classes=10, folder="cifar-10-batches-py",
        file_format="cifar",
        splits={"train": (_cifar_batch("data_batch_1", "c99cafc152244af753f735de768cd75f"),
                          _cifar_batch("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
                          _cifar_batch("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
                          _cifar_batch("data_batch_4", "634d18415352ddfa80567beed471001a"),
                          _cifar_batch("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb")),
                "test": (_cifar_batch("test_batch", "40351d587109b95175f43aff81a1287e"),)},
        mirrors=("https://www.cs.toronto.edu/~kriz/",),
        archive=Resource("cifar-10-python.tar.gz", 60000, "c58f30108f718f92721af3b95e74349a")),
}


def dataset_shape(name: str) -> tuple[int, int, int]:
    """(channels, side, classes) of a dataset of `DATASETS`, or of "synthetic" (random 8x8 images, 10 labels)."""
    if name == "synthetic":
        return 1, 8, 10
    info = _info(name)
    return info.channels, info.image_size, info.num_classes


def _info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {sorted(DATASETS)}")
    return DATASETS[name]


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The dataset root: `root`, else $MINIDIT_DATA, else $XDG_CACHE_HOME/minidit or ~/.cache/minidit."""
    if root is not None:
        return Path(root).expanduser()
    if os.environ.get("MINIDIT_DATA"):
        return Path(os.environ["MINIDIT_DATA"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "minidit"


# ----------------------------------------------------------------------------------------
# Loaders


def load_dataset(name: str, split: str = "train", root: str | os.PathLike | None = None,
                 download: bool = True, *, mirrors: tuple[str, ...] | None = None,
                 progress: bool = True) -> tuple[Tensor, Tensor]:
    """Load a whole split of an image dataset into memory.

    Args:
        name: "mnist", "fashion-mnist" or "cifar10" (see `DATASETS`).
        split: "train" or "test".
        root: the dataset root (None: $MINIDIT_DATA, else the per-user cache folder).
        download: fetch missing files from the mirrors; False raises instead.
        mirrors: base URLs to try instead of the dataset's own (`DatasetInfo.mirrors`).
        progress: show a progress bar while downloading.

    Returns:
        images [N, C, H, W] float32 in [-1, 1] and labels [N] int64.

    Raises:
        ValueError: unknown name or split.
        DatasetError: a file is missing (download=False), corrupt, or cannot be fetched.
    """
    info = _info(name)
    if split not in info.splits:
        raise ValueError(f"unknown split {split!r} for {name}; valid splits: {sorted(info.splits)}")
    if isinstance(mirrors, str):
        mirrors = (mirrors,)
    root, mirrors = data_root(root), tuple(mirrors or info.mirrors)
    if info.file_format == "idx":
        u8, labels = _load_idx_split(info, split, root / info.folder, download, mirrors, progress)
    else:
        u8, labels = _load_cifar_split(info, split, root, download, mirrors, progress)
    if labels.size and not 0 <= int(labels.min()) <= int(labels.max()) < info.num_classes:
        raise DatasetError(f"{name} {split}: labels must lie in 0..{info.num_classes - 1}")
    # x0 = u / 127.5 - 1; torch.tensor copies the read-only numpy view of the file bytes
    x0 = torch.tensor(u8).float().div_(127.5).sub_(1.0)  # [N, C, H, W] float32
    return x0, torch.tensor(labels, dtype=torch.int64)


def load_mnist(split: str = "train", root: str | os.PathLike | None = None, download: bool = True, *,
               mirrors: tuple[str, ...] | None = None, progress: bool = True) -> tuple[Tensor, Tensor]:
    """MNIST digits: images [N, 1, 28, 28] in [-1, 1], labels [N]. See `load_dataset`."""
    return load_dataset("mnist", split, root, download, mirrors=mirrors, progress=progress)


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None, download: bool = True, *,
                       mirrors: tuple[str, ...] | None = None, progress: bool = True) -> tuple[Tensor, Tensor]:
    """Fashion-MNIST: images [N, 1, 28, 28] in [-1, 1], labels [N]. See `load_dataset`."""
    return load_dataset("fashion-mnist", split, root, download, mirrors=mirrors, progress=progress)


def load_cifar10(split: str = "train", root: str | os.PathLike | None = None, download: bool = True, *,
                 mirrors: tuple[str, ...] | None = None, progress: bool = True) -> tuple[Tensor, Tensor]:
    """CIFAR-10: images [N, 3, 32, 32] in [-1, 1], labels [N]. See `load_dataset`."""
    return load_dataset("cifar10", split, root, download, mirrors=mirrors, progress=progress)


# ----------------------------------------------------------------------------------------
# IDX files (MNIST, Fashion-MNIST)


def _load_idx_split(info, split, folder, download, mirrors, progress):
    images_res, labels_res = info.splits[split]
    s = info.image_size
    images = _read_idx(_idx_path(images_res, folder, download, mirrors, progress), images_res, (s, s))
    labels = _read_idx(_idx_path(labels_res, folder, download, mirrors, progress), labels_res, ())
    return images[:, None], labels  # [N, H, W] -> [N, 1, H, W]


def _idx_path(res: Resource, folder: Path, download: bool, mirrors, progress: bool) -> Path:
    """The file to read, decompressed or gzip, downloading the .gz when neither is there."""
    for path in (folder / res.filename, folder / f"{res.filename}.gz"):
        if path.is_file():
            return path
    if not download:
        raise DatasetError(f"{res.filename} not found: expected {folder / res.filename} or "
                           f"{folder / res.filename}.gz; pass download=True to fetch it (download=False)")
    return download_file(f"{res.filename}.gz", mirrors, folder, res.archive_md5, progress=progress)


def _read_idx(path: Path, res: Resource, item_shape: tuple[int, ...]) -> np.ndarray:
    """Decode an IDX file of unsigned bytes into a read-only uint8 array [count, *item_shape]."""
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DatasetError(f"{path} is not a valid gzip file ({e}); "
                               "delete it to download it again") from e
    # 1. header: 0x00 0x00, type 0x08 (unsigned byte), the number of dims, each dim a big-endian u32
    dims = (res.count, *item_shape)
    start = 4 + 4 * len(dims)
    if len(raw) < start or raw[:4] != bytes([0, 0, 0x08, len(dims)]):
        raise DatasetError(f"{path} is not an IDX file of {len(dims)}-d unsigned bytes "
                           f"(magic {raw[:4].hex()}, expected {0x0800 + len(dims):08x})")
    found = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(len(dims)))
    if found != dims:
        raise DatasetError(f"{path} holds an array of shape {found}, expected {dims}")
    # 2. size, then the md5 of the decompressed content where it is known
    if len(raw) != start + math.prod(dims):
        raise DatasetError(f"{path} has {len(raw)} bytes, expected {start + math.prod(dims)} "
                           f"for shape {dims} (truncated or padded)")
    _check_md5(path, raw, res.md5)
    return np.frombuffer(raw, dtype=np.uint8, offset=start).reshape(dims)


def _check_md5(path: Path, content: bytes, md5: str | None) -> None:
    if md5 is not None and (actual := hashlib.md5(content).hexdigest()) != md5:
        raise DatasetError(f"md5 mismatch for {path}: expected {md5}, got {actual} (of the decompressed "
                           "content); the file is corrupt or not the published one: delete it to "
                           "download it again")


# ----------------------------------------------------------------------------------------
# CIFAR-10 python batches


def _load_cifar_split(info, split, root, download, mirrors, progress):
    folder = root / info.folder
    missing = [r.filename for r in info.splits[split] if not (folder / r.filename).is_file()]
    if missing:
        archive = root / info.archive.filename
        if archive.is_file():
            if info.archive.md5 is not None and (actual := md5_file(archive)) != info.archive.md5:
                raise DatasetError(f"md5 mismatch for {archive}: expected {info.archive.md5}, "
                                   f"got {actual}; delete it to download it again")
        elif download:
            download_file(archive.name, mirrors, root, info.archive.md5, progress=progress)
        else:
            raise DatasetError(f"{info.name}: {missing} not found in {folder}, and no {archive} to extract "
                               "them from; pass download=True to fetch it (download=False)")
        extract_tar_folder(archive, info.folder, root)
    batches = [_read_cifar_batch(folder / r.filename, r) for r in info.splits[split]]
    images = np.concatenate([data for data, _ in batches])  # [N, 3072], rows of R, G, B planes
    labels = np.concatenate([labels for _, labels in batches])  # [N]
    s = info.image_size
    return images.reshape(-1, info.channels, s, s), labels  # [N, 3072] -> [N, 3, 32, 32]


def _read_cifar_batch(path: Path, res: Resource) -> tuple[np.ndarray, np.ndarray]:
    """Read one pickled batch {'data': uint8 [count, 3072], 'labels': [count]} safely."""
    raw = path.read_bytes()
    _check_md5(path, raw, res.md5)
    try:
        batch = restricted_loads(raw)
    except DatasetError as e:
        raise DatasetError(f"{path} is not a readable CIFAR-10 batch: {e}") from e
    if not isinstance(batch, dict):
        raise DatasetError(f"{path} is not a CIFAR-10 batch: it holds a {type(batch).__name__}, not a dict")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    data = batch.get("data")
    try:
        labels = np.asarray(batch.get("labels", []))
    except ValueError as e:  # ragged nesting
        raise DatasetError(f"{path} is not a CIFAR-10 batch: 'labels' is not a flat list ({e})") from e
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.shape != (res.count, 3072):
        found = (data.dtype, data.shape) if isinstance(data, np.ndarray) else type(data).__name__
        raise DatasetError(f"{path} is not a CIFAR-10 batch: 'data' should be uint8 of shape "
                           f"({res.count}, 3072), found {found}")
    if labels.shape != (res.count,) or labels.dtype.kind not in "iu":
        raise DatasetError(f"{path} is not a CIFAR-10 batch: 'labels' should be {res.count} integers")
    return data, labels


# ----------------------------------------------------------------------------------------
# Mini-batches of in-memory tensors


def random_hflip(x: Tensor, generator: torch.Generator) -> Tensor:
    """Mirror each image left-right with probability 1/2, [B, C, H, W] -> [B, C, H, W]."""
    flip = torch.rand(x.shape[0], generator=generator) < 0.5  # [B], drawn on the CPU generator
    return torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)


class TensorLoader:
    """Seeded, shardable, resumable mini-batches of tensors held in memory.

    Epoch e shuffles the N examples with the seed `seed + e`. For data-parallel training,
    rank r of `world_size` takes every world_size-th entry of that permutation from
    entry r, so the shards of an epoch are disjoint and every rank runs `len(self)`
    steps. Global step s is batch s % len(self) of epoch s // len(self), so `stream`
    resumes at any step without replaying the ones before it. Batches are gathered
    with one index per batch, no per-example Python.

    Args:
        x: [N, ...] examples (any device).
        y: [N] labels, or None (batches then carry None).
        batch_size: examples per batch on each rank.
        shuffle: permute each epoch; False keeps the stored order.
        drop_last: drop the last, short batch (and the examples that do not split evenly
            over the ranks); False wraps around so every example is seen each epoch.
        seed: base seed of the permutations and of the augmentation.
        rank, world_size: this process's shard, 0 <= rank < world_size.
        augment: optional ``f(x_batch, generator) -> x_batch``, e.g. `random_hflip`,
            seeded per global step.
    """

    def __init__(self, x: Tensor, y: Tensor | None = None, batch_size: int = 128, *,
                 shuffle: bool = True, drop_last: bool = True, seed: int = 0, rank: int = 0,
                 world_size: int = 1, augment: Callable[[Tensor, torch.Generator], Tensor] | None = None):
        if y is not None and len(y) != len(x):
            raise ValueError(f"x and y must hold as many examples, got {len(x)} and {len(y)}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not isinstance(world_size, int) or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")
        if len(x) < world_size:
            raise ValueError(f"{len(x)} examples cannot be shared over world_size={world_size} ranks")
        self.x, self.y, self.batch_size = x, y, batch_size
        self.shuffle, self.drop_last, self.seed, self.augment = shuffle, drop_last, seed, augment
        self.rank, self.world_size = rank, world_size
        n = len(x)
        self.per_rank = n // world_size if drop_last else math.ceil(n / world_size)
        self.steps = self.per_rank // batch_size if drop_last else math.ceil(self.per_rank / batch_size)
        if self.steps == 0:
            raise ValueError(f"batch_size={batch_size} exceeds the {self.per_rank} examples per rank "
                             "and drop_last=True leaves no batch")
        self._next_epoch = 0

    def __len__(self) -> int:  # batches per epoch on each rank
        return self.steps

    def indices(self, epoch: int) -> Tensor:
        """This rank's example indices for one epoch, [per_rank] int64 on the CPU."""
        n = len(self.x)
        g = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)  # [N]
        pad = self.per_rank * self.world_size - n
        if pad > 0:  # drop_last=False: wrap around so that every rank gets per_rank examples
            order = torch.cat([order, order[:pad]])  # [N + pad]
        # deal out like cards: rank r takes entries r, r + world_size, ...
        return order[self.rank:: self.world_size][: self.per_rank]  # [per_rank]

    def epoch(self, epoch: int = 0, start: int = 0) -> Iterator[tuple[Tensor, Tensor | None]]:
        """The batches (x_batch [B, ...], y_batch [B] or None) of one epoch, from batch `start` on."""
        index = self.indices(epoch).to(self.x.device)
        generator = torch.Generator()
        for i in range(start, self.steps):
            batch = index[i * self.batch_size: (i + 1) * self.batch_size]  # [B]
            x_batch = self.x[batch]
            if self.augment is not None:
                # seeded by (seed, rank, global step): the same batch whether resumed or not
                step = epoch * self.steps + i
                generator.manual_seed(((self.seed * 1_000_003 + self.rank) * 1_000_003 + step) % 2**63)
                x_batch = self.augment(x_batch, generator)
            yield x_batch, None if self.y is None else self.y[batch.to(self.y.device)]

    def stream(self, start_step: int = 0) -> Iterator[tuple[Tensor, Tensor | None]]:
        """Endless batches from global step `start_step`, crossing epochs e, e + 1, ..."""
        if not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"start_step must be a non-negative int, got {start_step!r}")
        return self._stream(*divmod(start_step, self.steps))

    def _stream(self, epoch: int, offset: int) -> Iterator[tuple[Tensor, Tensor | None]]:
        while True:
            yield from self.epoch(epoch, offset)
            epoch, offset = epoch + 1, 0

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor | None]]:
        """One epoch; each new `for` loop over the loader moves on to the next epoch."""
        self._next_epoch += 1
        return self.epoch(self._next_epoch - 1)
