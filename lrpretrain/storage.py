"""Writing into a run directory: failures become one line, never a traceback.

A run writes its checkpoints, ``latest``, ``metrics.jsonl``, ``config.yaml`` and the W&B mirror into
``run.dir``. When the storage refuses a write (no space, quota, read-only filesystem, permission) the
run stops with :class:`~lrpretrain.errors.StorageError`: the path, the error and, for a full disk,
how many bytes the write needed and how many were free. What the caller adds says what is intact and
how to continue.

The libraries that write for us do not all raise ``OSError``: ``torch.save`` raises a ``RuntimeError``
("unexpected pos ...") whose context holds the ``OSError`` only when it writes to a file object we
opened; safetensors raises its own error naming "os error 28"; torch.distributed.checkpoint collects
each rank's failure in a ``CheckpointException``. :func:`storage_error` looks through all of these.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lrpretrain.errors import StorageError

_ERRNO_IN_TEXT = re.compile(r"(?:os error|\[Errno) (\d+)")
_FULL = (errno.ENOSPC, errno.EDQUOT)
_ADVICE = {
    errno.ENOSPC: "free space on that filesystem (or move the run directory to a larger one)",
    errno.EDQUOT: "free some of your quota (or move the run directory)",
    errno.EROFS: "the filesystem is mounted read-only: use a writable run.dir",
    errno.EACCES: "fix the permissions or use another run.dir",
    errno.EPERM: "fix the permissions or use another run.dir",
}


def free_bytes(path: str | os.PathLike) -> int | None:
    """Bytes an unprivileged process may still write on the filesystem holding ``path`` (or its
    nearest existing parent); None where the filesystem does not say."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def errno_of(exc: BaseException) -> int | None:
    """The errno of the OS failure behind ``exc`` (its causes, contexts, DCP's per-rank failures, or an
    errno named in a library's message), or None."""
    stack, seen = [exc], set()
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno:
            return e.errno
        failures = getattr(e, "failures", None)  # torch.distributed.checkpoint.api.CheckpointException
        if isinstance(failures, dict):
            stack.extend(v for v in failures.values() if isinstance(v, BaseException))
        if (m := _ERRNO_IN_TEXT.search(str(e))) is not None:
            return int(m.group(1))
        stack.extend((e.__cause__, e.__context__))
    return None


def _count(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= size:
            return f"{n:,} bytes ({n / size:.1f} {unit})"
    return f"{n:,} bytes"


def storage_error(exc: BaseException, path: str | os.PathLike, needed: int | None = None,
                  after: str = "", free: int | None = None) -> StorageError | None:
    """The one-line :class:`StorageError` for ``exc``, raised while writing ``path`` (``needed``: the
    bytes the whole write takes; ``free``: the bytes free when it began, default: now), or None when
    ``exc`` is no storage failure. A library error that names no errno counts as a full disk when the
    filesystem has fewer than ``needed`` bytes free."""
    if isinstance(exc, StorageError):
        return exc
    code = errno_of(exc)
    free = free_bytes(path) if free is None else free
    if code is None and needed is not None and free is not None and free < needed:
        code = errno.ENOSPC
    if code is None:
        return None
    what = f"{os.strerror(code).lower()} ({errno.errorcode.get(code, code)})"
    msg = f"cannot write {path}: {what}"
    if code in _FULL:
        have = "" if free is None else f", {_count(free)} free"
        msg += f": the write needed {_count(needed)}{have}" if needed is not None else have.replace(",", ":", 1)
    if code in _ADVICE:
        msg += f"; {_ADVICE[code]}"
    return StorageError(msg + (f"; {after}" if after else ""))


@contextmanager
def guarded_write(path: str | os.PathLike, needed: int | None = None, after: str = "") -> Iterator[None]:
    """Turn a storage failure inside the block into the one-line :class:`StorageError` for ``path``."""
    try:
        yield
    except Exception as e:
        err = storage_error(e, path, needed, after)
        if err is None or err is e:
            raise
        raise err from e


def pid_start(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (field 22 of /proc/PID/stat), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def pid_alive(pid: int, start: int | None = None) -> bool:
    """Whether process ``pid`` of this host runs (and, given its ``start`` from :func:`pid_start`, is
    still the same process, not a later one with its number)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        pass
    now = pid_start(pid)
    return start is None or now is None or now == start


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str, after: str = "") -> None:
    """Replace ``path`` with ``text`` atomically (a crash leaves the old or the new file, never half of
    one); a storage failure leaves the old file and no temporary behind."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with guarded_write(path, len(text.encode()), after):
        try:
            with open(tmp, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(path.parent)


def crc32(path: str | os.PathLike) -> int:
    """CRC-32 of a file's bytes, read in 4 MiB pieces (zlib releases the GIL on each)."""
    crc = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            crc = zlib.crc32(chunk, crc)
    return crc
