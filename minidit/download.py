"""Getting dataset files onto disk and opening them safely: mirrors, checksums, archives, pickles.

Every file is written under a temporary name in its destination folder and renamed into
place (`os.replace`, atomic on one file system) only once it is whole and its md5 is the
expected one, so a failed, corrupt or interrupted download leaves nothing behind that
could later pass for a good file. Only the standard library's urllib is used. Archives
and pickles are treated as untrusted: tar members cannot write outside their folder, and
unpickling builds numpy arrays and plain containers but calls no other function.
"""

from __future__ import annotations

import codecs
import contextlib
import gzip
import hashlib
import http.client
import io
import os
import pickle
import tarfile
import urllib.request
import uuid
import zlib
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Iterator, Sequence

import numpy as np
from tqdm.auto import tqdm

_CHUNK = 1 << 20  # read and hash 1 MiB at a time


class DatasetError(RuntimeError):
    """A dataset file is missing, corrupt or could not be fetched; the message says what to do."""


def md5_file(path: str | os.PathLike) -> str:
    """The hex md5 of a file's bytes, read in chunks."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_open(dest: Path) -> Iterator[BinaryIO]:
    """Open a temporary file beside `dest` for writing; it becomes `dest` only if the block succeeds.

    Any exception (a network error, a checksum mismatch, Ctrl-C) removes the temporary
    file and leaves `dest` as it was.
    """
    # a fresh hidden name; open(..., "xb") rather than mkstemp so the umask sets the permissions
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:12]}.part")
    try:
        with open(tmp, "xb") as f:
            yield f
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


class _BadDownload(Exception):
    """One mirror served an incomplete or wrong file (the next mirror is tried)."""


def _fetch(url: str, dest: Path, md5: str | None, progress: bool, timeout: float) -> None:
    """Stream `url` into `dest` through a temporary file, checking its length and md5."""
    with atomic_open(dest) as f, urllib.request.urlopen(url, timeout=timeout) as response:
        expected_size = int(response.headers.get("Content-Length") or 0) or None
        digest, size = hashlib.md5(), 0
        with tqdm(total=expected_size, unit="B", unit_scale=True, desc=dest.name,
                  disable=not progress, leave=False) as bar:
            while chunk := response.read(_CHUNK):
                f.write(chunk)
                digest.update(chunk)
                size += len(chunk)
                bar.update(len(chunk))
        # A server that closes early gives a short body without an error on some Pythons.
        if expected_size is not None and size != expected_size:
            raise _BadDownload(f"cut off after {size} of {expected_size} bytes")
        if md5 is not None and digest.hexdigest() != md5:
            raise _BadDownload(f"md5 mismatch for {dest.name}: expected {md5}, got {digest.hexdigest()}")


def download_file(filename: str, mirrors: Sequence[str], dest_dir: Path, md5: str | None, *,
                  progress: bool = True, timeout: float = 30.0) -> Path:
    """Download `filename` from the first mirror that serves it whole and with the right md5.

    Args:
        filename: the file's name on the mirrors and on disk.
        mirrors: base URLs tried in turn; the URL is ``mirror + filename``.
        dest_dir: the folder it is written to (created if needed).
        md5: the expected hex md5 of the file, or None to skip the check.
        progress: show a tqdm progress bar.
        timeout: seconds to wait for a mirror to answer.

    Returns:
        The path of the verified file, ``dest_dir / filename``.

    Raises:
        DatasetError: every mirror failed; the message lists each URL with its reason and
            says where to put the file by hand.
    """
    dest = Path(dest_dir) / filename
    made = [p for p in (dest.parent, *dest.parent.parents) if not p.exists()]  # removed again on failure
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(dest.parent, os.W_OK):
            raise PermissionError("not writable")
    except OSError as e:
        raise DatasetError(f"cannot write {filename} into {dest.parent} ({e}); pass root= or set "
                           "MINIDIT_DATA to a writable folder") from e
    failures = []
    for mirror in mirrors:
        url = mirror if mirror.endswith(filename) else mirror.rstrip("/") + "/" + filename
        try:
            _fetch(url, dest, md5, progress, timeout)
            return dest
        except (OSError, http.client.HTTPException, ValueError, _BadDownload) as e:
            failures.append(f"{url}: {str(e) or type(e).__name__}")
    for folder in made:  # leave no empty folders behind
        with contextlib.suppress(OSError):
            folder.rmdir()
    tried = "; ".join(failures) or "no mirrors given"
    raise DatasetError(
        f"could not download {filename} (tried {tried}); download it by hand on a machine with network "
        f"access and place it at {dest}" + (f" (md5 {md5})" if md5 else "")
        + ", or pass root= / set MINIDIT_DATA to a folder that already holds the data"
    )


def extract_tar_folder(archive: Path, folder: str, dest: Path) -> list[Path]:
    """Extract the plain files lying directly in `folder/` of a tar archive into ``dest/folder``.

    Safe against hostile archives (path traversal): only regular-file members named
    exactly ``folder/<name>`` are read, and each is written to a path built here, so
    links, devices, absolute names and ``..`` cannot reach outside ``dest``. Each file
    appears atomically.

    Returns:
        The paths written.

    Raises:
        DatasetError: the archive cannot be read (not a tar, truncated, bad gzip).
    """
    target = Path(dest) / folder
    target.mkdir(parents=True, exist_ok=True)
    written = []
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                path = PurePosixPath(member.name)
                if not member.isfile() or path.parent != PurePosixPath(folder) or path.name in ("", ".."):
                    continue  # skip anything that is not a plain file of `folder`
                source = tar.extractfile(member)
                with atomic_open(target / path.name) as f:
                    while chunk := source.read(_CHUNK):
                        f.write(chunk)
                written.append(target / path.name)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise DatasetError(f"{archive} is not a readable tar archive ({e}); "
                           "delete it so that it is downloaded again") from e
    return written


def _numpy_globals() -> dict[tuple[str, str], object]:
    """The globals a pickled numpy array needs, under numpy 1 and numpy 2 module names."""
    try:
        from numpy._core import multiarray, numeric  # numpy >= 2
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray, numeric
    allowed: dict[tuple[str, str], object] = {("numpy", "ndarray"): np.ndarray,
                                              ("numpy", "dtype"): np.dtype}
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer  # pickle protocol 5
    allowed[("_codecs", "encode")] = codecs.encode  # how Python 3 writes bytes in protocol 2
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that refuses every global but numpy's array and dtype reconstruction."""

    allowed = _numpy_globals()

    def find_class(self, module: str, name: str):
        if (module, name) not in self.allowed:
            raise DatasetError(f"refused to unpickle the global {module}.{name}: only numpy arrays, "
                               "containers, strings and numbers are allowed (the file may be hostile)")
        return self.allowed[(module, name)]


def restricted_loads(data: bytes) -> object:
    """Unpickle untrusted bytes that should hold only numpy arrays, containers and scalars.

    A pickle may call any importable function while it loads; this one may build only
    numpy arrays, dicts, lists, tuples, strings, bytes and numbers, so a hostile file
    cannot run code. Python 2 strings (the CIFAR-10 batches) are kept as bytes.

    Raises:
        DatasetError: a forbidden global, or data that is not a valid pickle.
    """
    try:
        return _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except DatasetError:
        raise
    except Exception as e:  # garbage makes pickle raise many types; report them all alike
        raise DatasetError(f"not a valid pickle ({type(e).__name__}: {e})") from e
