"""A run folder belongs to one run: it is locked while the run writes, and never silently reused.

    fresh folder          the run starts
    folder with a run     refused, unless resume=True (continue it exactly) or restart=True
                          (the old run is kept under a dated name, `out.20261129-201503`)
    folder being written  refused: an OS file lock (`.lock`, held by the writing process and
                          released when it ends, even by kill -9) names the holder

A run that fails before it has saved anything leaves no folder behind (nor does it leave
the folder it was refused on changed).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import socket
import sys
from pathlib import Path

from minidit.run.outputs import OutputError

try:  # POSIX
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt


class RunFolderError(ValueError):
    """The run folder holds another run, or another process is writing it; the message says what to do."""


def _lock(handle) -> bool:
    try:
        if fcntl is not None:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        return True
    except OSError:
        return False


class RunFolder:
    """Claim `out_dir` for one run (a context manager; see the module docstring).

    Args:
        out_dir: the run's folder.
        resume: continue the run in it.
        restart: start over, keeping an existing run under a dated name.
        lock: take the folder's lock (rank 0 of a distributed run; the others only read).
    """

    def __init__(self, out_dir: str | os.PathLike, resume: bool = False, restart: bool = False, lock: bool = True):
        if resume and restart:
            raise RunFolderError("give --resume (continue the run) or --restart (start over), not both")
        self.out, self.resume, self.restart, self.lock = Path(out_dir), resume, restart, lock
        self.created, self.handle, self.kept = None, None, None

    def __enter__(self) -> RunFolder:
        if not self.lock:
            return self
        missing = [p for p in (self.out, *self.out.parents) if not p.exists()]
        self.created = missing[-1] if missing else None  # the topmost folder this run makes
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            self.handle = open(self.out / ".lock", "a+")  # noqa: SIM115  (held for the whole run)
        except OSError as err:
            raise OutputError(f"cannot write to the output folder {self.out}: {err.strerror or err}") from err
        if not _lock(self.handle):
            self.handle.seek(0)
            holder = self.handle.read().strip() or "another process"
            self.handle.close()
            raise RunFolderError(f"{self.out} is in use by {holder}; wait for it to finish, or choose another --out")
        latest = self.out / "latest.pt"
        if latest.is_file() and not self.resume:
            if not self.restart:
                self._release()
                raise RunFolderError(f"{self.out} already holds a run ({latest}); continue it with --resume, or start "
                                     f"over with --restart (the old run is then kept under a dated name)")
            self._keep_old_run()
        self.handle.seek(0)
        self.handle.truncate()
        started = datetime.datetime.now().isoformat(timespec="seconds")
        self.handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {started} ({' '.join(sys.argv)})\n")
        self.handle.flush()
        return self

    def _keep_old_run(self) -> None:
        """Move every file of the old run into `out.<date-time>` (the lock file stays, held)."""
        stamp = datetime.datetime.fromtimestamp((self.out / "latest.pt").stat().st_mtime).strftime("%Y%m%d-%H%M%S")
        self.kept = self.out.with_name(f"{self.out.name}.{stamp}")
        self.kept.mkdir()
        for item in self.out.iterdir():
            if item.name != ".lock":
                shutil.move(str(item), str(self.kept / item.name))

    def __exit__(self, exc_type, exc, tb) -> None:
        saved = (self.out / "latest.pt").is_file()
        self._release()
        if exc_type is not None and self.created is not None and not saved:  # a failed run that saved nothing
            shutil.rmtree(self.created, ignore_errors=True)

    def _release(self) -> None:
        if self.handle is not None:
            self.handle.close()  # closing releases the lock
            self.handle = None
            with contextlib.suppress(OSError):
                (self.out / ".lock").unlink()
