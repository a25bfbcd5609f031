"""One process per run directory: a lock held for the whole run.

``lrpretrain train`` (rank 0 under torchrun/DeepSpeed; each job of a sweep) holds ``<run.dir>/.lrpretrain.lock``
from before the data and the model are built until it exits. A second process on the same directory
(a SLURM job requeued while its old processes linger, a run submitted twice) stops at once with one
line naming the holder. Reading commands (``generate``, ``sweep-summary``, ``estimate``) take no lock.

The mechanism is a POSIX record lock (``fcntl.lockf``) on that file, not ``flock``: record locks are
what NFS (v3 through the lock manager, v4 natively), Lustre (mounted ``-o flock``) and GPFS carry
between hosts, and they are not inherited by forked children (a data worker cannot keep a dead run's
lock alive). The kernel drops the lock when the holder dies, however it dies. The file also holds a
record of its holder (host, pid, the pid's start time, when, the command), which serves where the
OS lock cannot:

- a record of a process on this host that is gone (its pid dead, or reused by another process) is
  taken over with a warning;
- a record of another host is never overridden silently: the lock may have been lost with that host
  (a crashed node) or the filesystem may not carry locks between hosts; the error says how to clear it
  (``run.break_lock=true``, or deleting the file);
- on a filesystem without lock support (``ENOLCK``/``EOPNOTSUPP``: some FUSE and old NFS mounts, Lustre
  with ``-o noflock``) the record alone decides, with a warning: two processes started within the same
  instant could both pass.

A clean exit deletes the file (after the lock is gone, a waiting process re-checks that it locked the
file that is still there). POSIX locks belong to the process, not to a file descriptor: a second lock
on the same path in this process would succeed, so holds in one process are counted instead (a sweep
job holds its directory and the training inside it holds it again).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from lrpretrain.errors import ConfigError, RunDirInUse
from lrpretrain.storage import guarded_write, pid_alive, pid_start, storage_error

LOCK_NAME = ".lrpretrain.lock"
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def _describe(rec: dict[str, Any]) -> str:
    return f"host {rec.get('host')}, pid {rec.get('pid')}, started {rec.get('started')}"


def _make_dir(run_dir: Path) -> list[Path]:
    """Create ``run_dir``; the directories this created, deepest first. Bad paths: one line each."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run.dir={run_dir} is a file, not a directory; choose a directory path")
    missing = []
    p = run_dir.absolute()
    while not p.exists():
        missing.append(p)
        p = p.parent
    if not p.is_dir():
        raise ConfigError(f"run.dir={run_dir} cannot be created: {p} is a file, not a directory")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"run.dir={run_dir} cannot be created: {e.strerror.lower()} "
                          f"({errno.errorcode.get(e.errno, e.errno)}) at {e.filename or p}") from e
    return missing


class RunLock:
    """The lock of one run directory, held by this process (see the module docstring)."""

    _held: ClassVar[dict[Path, RunLock]] = {}

    def __init__(self, run_dir: str | os.PathLike, break_lock: bool = False,
                 warn: Callable[[str], None] | None = None):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.break_lock = break_lock
        self.warn = warn or (lambda m: print(f"warning: {m}", file=sys.stderr, flush=True))
        self._fd: int | None = None
        self._count = 0
        self._created: list[Path] = []
        self._shared: RunLock | None = None  # this process's hold of the same directory, counted

    # -- taking it -------------------------------------------------------------------------------
    def acquire(self) -> RunLock:
        """Take the lock (or count one more hold of it by this process); raise one line if in use."""
        self._created = _make_dir(self.run_dir)
        key = self.path.resolve()
        held = RunLock._held.get(key)
        if held is not None:
            held._count += 1
            self._shared = held
            return self
        try:
            fd = self._lock()
        except BaseException:
            self._remove_created()
            raise
        self._fd = fd
        try:
            self._check_record(self._read(fd))
            self._write_record(fd)
        except BaseException:
            self._fd = None
            os.close(fd)
            self._remove_created()
            raise
        self._count = 1
        RunLock._held[key] = self
        return self

    def hold(self) -> None:
        """:meth:`acquire`, returning nothing (for :func:`lrpretrain.comm.on_main`)."""
        self.acquire()

    def _lock(self) -> int:
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as e:
                err = storage_error(e, self.path)
                raise ConfigError(f"run.dir={self.run_dir} is not writable: {err or e}") from e
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EACCES, errno.EAGAIN):
                    rec = self._read(fd)
                    os.close(fd)
                    raise self._in_use(rec) from e
                if e.errno not in _NO_LOCKS:
                    os.close(fd)
                    raise
                self.warn(f"the filesystem of {self.run_dir} does not support file locks "
                          f"({errno.errorcode.get(e.errno, e.errno)}): only the lock file's record keeps a second "
                          "process out of this run directory")
            try:  # the previous holder deletes the file on exit: lock the file that is still there
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)

    @staticmethod
    def _read(fd: int) -> dict[str, Any]:
        try:
            text = os.pread(fd, 1 << 16, 0).decode(errors="replace")
            rec = json.loads(text) if text.strip() else {}
        except (OSError, ValueError):
            return {}
        return rec if isinstance(rec, dict) else {}

    def _check_record(self, rec: dict[str, Any]) -> None:
        """The OS lock is ours; what does the previous holder's record (left by a crash) say?"""
        if not rec:
            return
        here = socket.gethostname()
        clear = f"if that process is gone, rerun with run.break_lock=true (or delete {self.path})"
        if rec.get("host") != here:
            if not self.break_lock:
                raise RunDirInUse(f"run.dir {self.run_dir} is locked by a process on another host ({_describe(rec)}), "
                                  f"which this host cannot check; {clear}")
            self._break(rec)
            return
        pid = rec.get("pid")
        if isinstance(pid, int) and pid != os.getpid() and pid_alive(pid, rec.get("pid_start")):
            # alive, yet the OS lock was free (or the filesystem has none): it may have lost its lock
            if not self.break_lock:
                raise self._in_use(rec, f"; {clear}")
            self._break(rec)
            return
        self.warn(f"taking over the lock of {self.run_dir} from a process that is gone ({_describe(rec)})")

    def _in_use(self, rec: dict[str, Any], then: str = "") -> RunDirInUse:
        holder = _describe(rec) if rec else "a process that has not written its record yet"
        return RunDirInUse(f"run.dir {self.run_dir} is in use by another lrpretrain process ({holder}); "
                           f"wait for it to finish or stop it, or use another run.dir{then}")

    def _break(self, rec: dict[str, Any]) -> None:
        self.warn(f"run.break_lock=true: taking over the lock of {self.run_dir} from {_describe(rec)}")

    def _write_record(self, fd: int) -> None:
        rec = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": pid_start(os.getpid()),
               "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv)[:500]}
        data = (json.dumps(rec) + "\n").encode()
        with guarded_write(self.path, len(data)):
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
            os.fsync(fd)

    # -- giving it back --------------------------------------------------------------------------
    def release(self) -> None:
        """One hold less; the last deletes the file and drops the lock (and removes the run directory
        again if this lock created it and nothing was written into it)."""
        if self._shared is not None:
            self._shared.release()
            self._shared = None
            return
        if self._fd is None:
            return
        self._count -= 1
        if self._count > 0:
            return
        RunLock._held.pop(self.path.resolve(), None)
        try:
            self.path.unlink(missing_ok=True)  # while still holding it: see _lock
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None
        self._remove_created()

    def _remove_created(self) -> None:
        for d in self._created:
            try:
                d.rmdir()  # only if empty
            except OSError:
                break
        self._created = []

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
