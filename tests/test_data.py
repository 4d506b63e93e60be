"""Dataset loading (IDX, CIFAR pickles, downloads from a local server) and the batch loader."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import http.server
import io
import itertools
import os
import pickle
import socket
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from minidit.data import (DATASETS, DatasetError, Resource, TensorLoader, data_root, load_cifar10,
                          load_dataset, load_fashion_mnist, load_mnist, random_hflip)
from minidit.download import restricted_loads


def md5(b: bytes) -> str:
    return hashlib.md5(b).hexdigest()


def idx_bytes(a: np.ndarray) -> bytes:
    """An IDX file of unsigned bytes: 0, 0, 0x08, ndim, each dim big-endian, then the data."""
    header = bytes([0, 0, 8, a.ndim]) + b"".join(d.to_bytes(4, "big") for d in a.shape)
    return header + a.astype(np.uint8).tobytes()


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*")) if folder.exists() else []


# ----------------------------------------------------------------------------------------
# fixtures: a small MNIST stand-in, a small CIFAR-10 stand-in, a local HTTP server


@pytest.fixture
def fake_mnist(monkeypatch):
    """12 train / 5 test random digits; DATASETS["mnist"] patched to their md5s, with no mirrors."""
    rng = np.random.default_rng(0)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (12, 28, 28)),
              "train-labels-idx1-ubyte": rng.integers(0, 10, 12),
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (5, 28, 28)),
              "t10k-labels-idx1-ubyte": rng.integers(0, 10, 5)}
    raw = {name: idx_bytes(a) for name, a in arrays.items()}
    gz = {name: gzip.compress(b, mtime=0) for name, b in raw.items()}
    res = {name: Resource(name, len(a), md5(raw[name]), md5(gz[name])) for name, a in arrays.items()}
    names = list(arrays)
    splits = {"train": (res[names[0]], res[names[1]]), "test": (res[names[2]], res[names[3]])}
    monkeypatch.setitem(DATASETS, "mnist", dataclasses.replace(DATASETS["mnist"], splits=splits, mirrors=()))
    return arrays, raw, gz


def py2_pickle(data_: np.ndarray, labels: list[int]) -> bytes:
    """A batch pickled opcode for opcode as Python 2's cPickle wrote the real CIFAR-10 files."""
    def string(b):  # a Python 2 str: SHORT_BINSTRING or BINSTRING
        return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + len(b).to_bytes(4, "little") + b

    def int_(i):  # BININT (4-byte little-endian)
        return b"J" + i.to_bytes(4, "little", signed=True)

    array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + int_(0) + b"\x85" + string(b"b")
             + b"\x87R(" + int_(1) + int_(data_.shape[0]) + int_(data_.shape[1]) + b"\x86"
             + b"cnumpy\ndtype\n" + string(b"u1") + int_(0) + int_(1) + b"\x87R"
             + b"(" + int_(3) + string(b"|") + b"NNN" + int_(-1) + int_(-1) + int_(0) + b"tb"  # dtype state
             + b"\x89" + string(data_.tobytes()) + b"tb")  # array state: version, shape, dtype, fortran, bytes
    label_list = b"](" + b"".join(int_(v) for v in labels) + b"e"
    return (b"\x80\x02}(" + string(b"batch_label") + string(b"training batch") + string(b"data") + array
            + string(b"labels") + label_list + b"u.")


def cifar_batch(rng, count: int, style: str) -> tuple[np.ndarray, list, bytes]:
    """Random batch data, labels and the pickle; style "py2", "py3" (bytes keys) or "py3-str" (protocol 5)."""
    data_ = rng.integers(0, 256, (count, 3072)).astype(np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, count)]
    if style == "py2":
        return data_, labels, py2_pickle(data_, labels)
    batch = {b"batch_label": b"test", b"data": data_, b"labels": labels}
    if style == "py3-str":
        return data_, labels, pickle.dumps({k.decode(): v for k, v in batch.items()}, protocol=5)
    return data_, labels, pickle.dumps(batch, protocol=2)


@pytest.fixture
def fake_cifar(monkeypatch):
    """Six 4-image batches (5 train, 1 test), their tar.gz, and DATASETS["cifar10"] patched to them."""
    rng = np.random.default_rng(1)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    styles = {"data_batch_1": "py2", "data_batch_2": "py3-str", "test_batch": "py2"}
    batches = {n: cifar_batch(rng, 4, styles.get(n, "py3")) for n in names}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for n, (_, _, blob) in batches.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{n}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    archive = buf.getvalue()
    splits = {"train": tuple(Resource(n, 4, md5(batches[n][2])) for n in names[:5]),
              "test": (Resource("test_batch", 4, md5(batches["test_batch"][2])),)}
    info = dataclasses.replace(DATASETS["cifar10"], splits=splits, mirrors=(),
                               archive=Resource("cifar-10-python.tar.gz", 24, md5(archive)))
    monkeypatch.setitem(DATASETS, "cifar10", info)
    return batches, archive


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body, mode = self.server.routes.get(self.path, (None, None))
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        # "cut": promise the whole length, send half, close (HTTP/1.0 closes after each reply)
        self.wfile.write(body[: len(body) // 2] if mode == "cut" else body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(monkeypatch):
    """A local HTTP server on 127.0.0.1; fill `server.routes[path] = (body, mode)`."""
    monkeypatch.setenv("no_proxy", "*")  # never route 127.0.0.1 through a proxy
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.routes = {}
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def refused_url() -> str:
    """A URL on a port nothing listens on (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


# ----------------------------------------------------------------------------------------
# names, roots, metadata


def test_unknown_names_and_splits_list_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match="cifar10.*fashion-mnist.*mnist"):
        load_dataset("svhn", "train", root=tmp_path)
    with pytest.raises(ValueError, match="test.*train"):
        load_dataset("mnist", "valid", root=tmp_path)
    assert listing(tmp_path) == []


def test_metadata():
    assert (DATASETS["mnist"].channels, DATASETS["mnist"].image_size, DATASETS["mnist"].num_classes) == (1, 28, 10)
    assert (DATASETS["cifar10"].channels, DATASETS["cifar10"].image_size) == (3, 32)


def test_root_is_the_argument_then_the_environment_then_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("MINIDIT_DATA", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data_root(tmp_path / "arg") == tmp_path / "arg"
    assert data_root() == tmp_path / "env"
    monkeypatch.delenv("MINIDIT_DATA")
    assert data_root() == tmp_path / "xdg" / "minidit"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data_root() == tmp_path / "home" / ".cache" / "minidit"


# ----------------------------------------------------------------------------------------
# IDX files already on disk


def test_idx_files_raw_and_gzip_load_scaled(fake_mnist, tmp_path):
    arrays, raw, gz = fake_mnist
    folder = tmp_path / "MNIST" / "raw"
    folder.mkdir(parents=True)
    for name in raw:  # train decompressed, test gzip
        path = folder / (name if name.startswith("train") else name + ".gz")
        path.write_bytes(raw[name] if name.startswith("train") else gz[name])
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x, y = load_mnist(split, root=tmp_path, download=False)
        expected = torch.tensor(arrays[f"{prefix}-images-idx3-ubyte"], dtype=torch.float32)[:, None] / 127.5 - 1
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        torch.testing.assert_close(x, expected, rtol=0, atol=1e-6)
        assert torch.equal(y, torch.tensor(arrays[f"{prefix}-labels-idx1-ubyte"]))
        assert x.min() >= -1 and x.max() <= 1


def _corrupt_cases(raw: bytes):
    return {
        "bad gzip": (".gz", b"this is not gzip", "not a valid gzip"),
        "bad magic": ("", b"\x00\x00\x09\x03" + raw[4:], "not an IDX file"),
        "wrong dims": ("", raw[:4] + (13).to_bytes(4, "big") + raw[8:], r"shape \(13, 28, 28\), expected \(12, 28, 28\)"),
        "truncated": (".gz", gzip.compress(raw[:-100]), "truncated or padded"),
        "md5": ("", raw[:-1] + bytes([raw[-1] ^ 1]), "md5 mismatch"),
    }


@pytest.mark.parametrize("case", ["bad gzip", "bad magic", "wrong dims", "truncated", "md5"])
def test_bad_files_on_disk_give_clear_errors(fake_mnist, tmp_path, case):
    _, raw, _ = fake_mnist
    suffix, content, match = _corrupt_cases(raw["train-images-idx3-ubyte"])[case]
    folder = tmp_path / "MNIST" / "raw"
    folder.mkdir(parents=True)
    (folder / f"train-images-idx3-ubyte{suffix}").write_bytes(content)
    (folder / "train-labels-idx1-ubyte").write_bytes(raw["train-labels-idx1-ubyte"])
    with pytest.raises(DatasetError, match=match) as info:
        load_mnist("train", root=tmp_path, download=False)
    assert "train-images-idx3-ubyte" in str(info.value)
    if case == "md5":
        assert DATASETS["mnist"].splits["train"][0].md5 in str(info.value)
        assert md5(content) in str(info.value)


def test_fashion_mnist_checks_header_and_size_without_md5(fake_mnist, tmp_path, monkeypatch):
    _, raw, _ = fake_mnist
    monkeypatch.setitem(DATASETS, "fashion-mnist", dataclasses.replace(
        DATASETS["mnist"], name="fashion-mnist", folder="FashionMNIST/raw",
        splits={s: tuple(dataclasses.replace(r, md5=None) for r in rs) for s, rs in DATASETS["mnist"].splits.items()}))
    folder = tmp_path / "FashionMNIST" / "raw"
    folder.mkdir(parents=True)
    for name, b in raw.items():
        (folder / name).write_bytes(b)
    assert load_fashion_mnist("test", root=tmp_path, download=False)[0].shape == (5, 1, 28, 28)
    (folder / "t10k-labels-idx1-ubyte").write_bytes(raw["t10k-labels-idx1-ubyte"] + b"\x00")
    with pytest.raises(DatasetError, match="truncated or padded"):
        load_fashion_mnist("test", root=tmp_path, download=False)


def test_missing_files_without_download_name_the_expected_path(fake_mnist, tmp_path):
    with pytest.raises(DatasetError, match="download=False") as info:
        load_mnist("train", root=tmp_path, download=False)
    assert str(tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte") in str(info.value)


# ----------------------------------------------------------------------------------------
# downloads from a local server


def test_download_tries_mirrors_in_turn_then_loads_offline(fake_mnist, tmp_path, server):
    arrays, _, gz = fake_mnist
    for name, body in gz.items():
        server.routes[f"/good/{name}.gz"] = (body, "ok")
    mirrors = (refused_url(), f"{server.url}/missing/", f"{server.url}/good/")
    x, y = load_mnist("test", root=tmp_path, mirrors=mirrors, progress=False)
    assert torch.equal(y, torch.tensor(arrays["t10k-labels-idx1-ubyte"]))
    assert listing(tmp_path / "MNIST" / "raw") == ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    x2, y2 = load_mnist("test", root=tmp_path, download=False)  # the files now lie there
    assert torch.equal(x, x2) and torch.equal(y, y2)


@pytest.mark.parametrize("mode", ["corrupt", "cut"])
def test_a_bad_download_leaves_nothing_behind(fake_mnist, tmp_path, server, mode):
    _, _, gz = fake_mnist
    for name, body in gz.items():
        bad = body[:-8] + bytes(8) if mode == "corrupt" else body
        server.routes[f"/{name}.gz"] = (bad, "cut" if mode == "cut" else "ok")
    with pytest.raises(DatasetError) as info:
        load_mnist("train", root=tmp_path, mirrors=(f"{server.url}/",), progress=False)
    message = str(info.value)
    assert "train-images-idx3-ubyte.gz" in message and f"{server.url}/train-images-idx3-ubyte.gz" in message
    if mode == "corrupt":
        expected = DATASETS["mnist"].splits["train"][0].archive_md5
        actual = md5(gz["train-images-idx3-ubyte"][:-8] + bytes(8))
        assert f"expected {expected}, got {actual}" in message
    else:
        assert "cut off" in message or "IncompleteRead" in message
    assert listing(tmp_path / "MNIST" / "raw") == []


def test_no_network_lists_every_url_and_where_to_put_the_file(fake_mnist, tmp_path, server):
    mirrors = (refused_url(), f"{server.url}/nothing/")
    with pytest.raises(DatasetError) as info:
        load_mnist("train", root=tmp_path, mirrors=mirrors, progress=False)
    message = str(info.value)
    assert mirrors[0] + "train-images-idx3-ubyte.gz" in message and "refused" in message.lower()
    assert f"{server.url}/nothing/train-images-idx3-ubyte.gz: HTTP Error 404" in message
    assert str(tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte.gz") in message
    assert listing(tmp_path / "MNIST" / "raw") == []


def test_an_unwritable_root_is_reported_before_downloading(fake_mnist, tmp_path):
    (tmp_path / "file").write_text("a file where the root should be")
    with pytest.raises(DatasetError, match="cannot write train-images-idx3-ubyte.gz into"):
        load_mnist("train", root=tmp_path / "file", mirrors=("http://127.0.0.1:9/",), progress=False)


# ----------------------------------------------------------------------------------------
# CIFAR-10


def test_cifar_download_extract_and_load(fake_cifar, tmp_path, server):
    batches, archive = fake_cifar
    server.routes["/cifar-10-python.tar.gz"] = (archive, "ok")
    x, y = load_cifar10("train", root=tmp_path, mirrors=(f"{server.url}/",), progress=False)
    assert x.shape == (20, 3, 32, 32) and y.shape == (20,) and x.dtype == torch.float32
    expected = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)]).reshape(20, 3, 32, 32)
    torch.testing.assert_close(x, torch.tensor(expected, dtype=torch.float32) / 127.5 - 1, rtol=0, atol=1e-6)
    assert y.tolist() == sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    xt, _ = load_cifar10("test", root=tmp_path, download=False)
    assert xt.shape == (4, 3, 32, 32)
    assert (tmp_path / "cifar-10-python.tar.gz").is_file()
    assert not [p for p in tmp_path.rglob("*.part")]


def test_cifar_extraction_ignores_hostile_members(fake_cifar, tmp_path, server, monkeypatch):
    batches, _ = fake_cifar
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        def add(name, blob=b"x", kind=tarfile.REGTYPE, link=""):
            info = tarfile.TarInfo(name)
            info.size, info.type, info.linkname = (len(blob) if kind == tarfile.REGTYPE else 0), kind, link
            tar.addfile(info, io.BytesIO(blob) if kind == tarfile.REGTYPE else None)
        for evil in ("../escaped", "cifar-10-batches-py/../../escaped2", str(tmp_path / "absolute")):
            add(evil)
        add("cifar-10-batches-py/link", kind=tarfile.SYMTYPE, link="/etc/passwd")
        for n in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"):
            add(f"cifar-10-batches-py/{n}", batches[n][2])
    archive = buf.getvalue()
    info = dataclasses.replace(DATASETS["cifar10"], archive=Resource("cifar-10-python.tar.gz", 24, md5(archive)))
    monkeypatch.setitem(DATASETS, "cifar10", info)
    server.routes["/cifar-10-python.tar.gz"] = (archive, "ok")
    root = tmp_path / "root"
    assert load_cifar10("test", root=root, mirrors=(f"{server.url}/",), progress=False)[0].shape == (4, 3, 32, 32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root"]
    assert listing(root / "cifar-10-batches-py") == sorted(batches)


def test_cifar_pickle_with_a_forbidden_global_is_refused(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    with pytest.raises(DatasetError, match="refused to unpickle the global (posix|nt|os).system"):
        restricted_loads(pickle.dumps({"data": Evil()}, protocol=2))
    assert not marker.exists()
    with pytest.raises(DatasetError, match="not a valid pickle"):
        restricted_loads(b"garbage that is no pickle")


@pytest.mark.parametrize("case", ["forbidden", "garbage", "wrong shape", "md5"])
def test_bad_cifar_batches_give_clear_errors(fake_cifar, tmp_path, monkeypatch, case):
    batches, _ = fake_cifar
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    blob = {"forbidden": pickle.dumps({"data": print}), "garbage": b"\x80\x02garbage",
            "wrong shape": pickle.dumps({"data": np.zeros((4, 100), np.uint8), "labels": [0] * 4}),
            "md5": batches["data_batch_1"][2]}[case]
    (folder / "test_batch").write_bytes(blob)
    if case != "md5":  # let the md5 pass so that the format check is reached
        monkeypatch.setitem(DATASETS, "cifar10", dataclasses.replace(
            DATASETS["cifar10"], splits={"test": (Resource("test_batch", 4, md5(blob)),)}))
    match = {"forbidden": "refused to unpickle the global builtins.print", "garbage": "not a valid pickle",
             "wrong shape": r"'data' should be uint8 of shape \(4, 3072\)", "md5": "md5 mismatch"}[case]
    with pytest.raises(DatasetError, match=match) as info:
        load_cifar10("test", root=tmp_path, download=False)
    assert "test_batch" in str(info.value)


def test_cifar_missing_without_download_or_with_a_corrupt_archive(fake_cifar, tmp_path):
    with pytest.raises(DatasetError, match="download=False") as info:
        load_cifar10("test", root=tmp_path, download=False)
    assert str(tmp_path / "cifar-10-batches-py") in str(info.value)
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not the archive")
    with pytest.raises(DatasetError, match=f"expected {DATASETS['cifar10'].archive.md5}, got {md5(b'not the archive')}"):
        load_cifar10("test", root=tmp_path, download=False)


# ----------------------------------------------------------------------------------------
# the real MNIST (CI sets MINIDIT_DATA)


def test_real_mnist(mnist_root):
    start = time.perf_counter()
    x, y = load_mnist("train", root=mnist_root, download=False)
    seconds = time.perf_counter() - start
    xt, yt = load_mnist("test", root=mnist_root, download=False)
    assert x.shape == (60000, 1, 28, 28) and xt.shape == (10000, 1, 28, 28)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() == -1 and x.max() == 1  # 0 and 255 both occur
    assert torch.bincount(y, minlength=10).sum() == 60000 and torch.bincount(yt, minlength=10).sum() == 10000
    assert y.min() == 0 and y.max() == 9 and y[0] == 5
    assert seconds < 5.0, f"loading the 60k MNIST train set took {seconds:.2f} s"


# ----------------------------------------------------------------------------------------
# batches


def _epoch_indices(loader: TensorLoader, epoch: int) -> list[int]:
    return [int(v) for _, yb in loader.epoch(epoch) for v in yb]


def test_every_example_once_per_epoch_and_seeded():
    x = torch.arange(50, dtype=torch.float32)[:, None]  # [50, 1]
    y = torch.arange(50)
    loader = TensorLoader(x, y, batch_size=10, seed=3)
    assert len(loader) == 5
    first = _epoch_indices(loader, 0)
    assert sorted(first) == list(range(50)) and first != list(range(50))
    assert first == _epoch_indices(TensorLoader(x, y, batch_size=10, seed=3), 0)  # same seed, same order
    assert first != _epoch_indices(loader, 1) and sorted(_epoch_indices(loader, 1)) == list(range(50))
    assert _epoch_indices(loader, 1) == _epoch_indices(TensorLoader(x, y, batch_size=10, seed=4), 0)  # seed + e
    for xb, yb in loader.epoch(0):
        assert torch.equal(xb[:, 0].long(), yb)  # x and y stay paired
    assert [_epoch_indices(loader, e) for e in range(2)] == [[int(v) for _, yb in ep for v in yb] for ep in (loader, loader)]


def test_drop_last_and_unshuffled_order():
    x = torch.arange(23)
    loader = TensorLoader(x, None, batch_size=5, shuffle=False, drop_last=True)
    assert len(loader) == 4 and all(xb.shape == (5,) and yb is None for xb, yb in loader.epoch(0))
    assert torch.cat([xb for xb, _ in loader.epoch(0)]).tolist() == list(range(20))
    keep = TensorLoader(x, None, batch_size=5, shuffle=False, drop_last=False)
    assert len(keep) == 5 and torch.cat([xb for xb, _ in keep.epoch(0)]).tolist() == list(range(23))


@pytest.mark.parametrize("n, drop_last", [(60, True), (61, True), (61, False)])
def test_shards_are_disjoint_and_cover_the_epoch(n, drop_last):
    x = torch.arange(n)
    shards = [_epoch_indices(TensorLoader(x, x, 4, seed=9, rank=r, world_size=3, drop_last=drop_last), 2)
              for r in range(3)]
    assert len({len(s) for s in shards}) == 1  # every rank runs as many steps
    union = set().union(*shards)
    if drop_last:
        assert sum(len(s) for s in shards) == len(union)  # disjoint
        assert len(union) == n - n % 12  # all but the remainder that does not fill 3 batches of 4
    else:
        assert union == set(range(n))  # covering; the wrap-around repeats 2 examples to even the ranks
        assert sum(len(s) for s in shards) == 63


def test_starting_at_a_step_equals_skipping_the_steps_before():
    x = torch.randn(30, 1, 2, 3, generator=torch.Generator().manual_seed(0))
    loader = TensorLoader(x, torch.arange(30), batch_size=4, seed=5, rank=1, world_size=2, augment=random_hflip)
    assert len(loader) == 3
    full = list(itertools.islice(loader.stream(), 11))  # crosses three epoch boundaries
    for start in (0, 2, 3, 7):
        resumed = list(itertools.islice(loader.stream(start_step=start), 11 - start))
        for (xa, ya), (xb, yb) in zip(full[start:], resumed, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    with pytest.raises(ValueError, match="start_step"):
        loader.stream(start_step=-1)


def test_random_hflip_flips_about_half_and_only_flips():
    x = torch.randn(4000, 1, 3, 5, generator=torch.Generator().manual_seed(1))
    out = random_hflip(x, torch.Generator().manual_seed(2))
    same = (out == x).flatten(1).all(1)
    flipped = (out == x.flip(-1)).flatten(1).all(1)
    assert (same ^ flipped).all()
    assert abs(flipped.double().mean().item() - 0.5) < 5 * (0.25 / 4000) ** 0.5
    assert torch.equal(out, random_hflip(x, torch.Generator().manual_seed(2)))


@pytest.mark.parametrize("kwargs, match", [
    ({"batch_size": 0}, "batch_size"), ({"rank": 2, "world_size": 2}, "rank"),
    ({"batch_size": 11}, "batch_size=11"), ({"y": torch.arange(3)}, "as many"),
])
def test_bad_loader_arguments(kwargs, match):
    args = {"x": torch.zeros(10), "y": None, "batch_size": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        TensorLoader(**args)
