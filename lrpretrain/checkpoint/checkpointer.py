"""The :class:`Checkpointer`: writes checkpoints atomically, verifies and reads them (layout: the
package docstring, :mod:`lrpretrain.checkpoint`)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lrpretrain.checkpoint.files import fsync_file, tensor_bytes, unshared
from lrpretrain.errors import CheckpointError, StorageError
from lrpretrain.storage import (
    atomic_write_text,
    crc32,
    free_bytes,
    fsync_dir,
    guarded_write,
    pid_alive,
    storage_error,
)

FORMAT = 1
FILES = ("model.safetensors", "train_state.pt", "config.yaml")
SHARDED = "dcp"  # torch.distributed.checkpoint directory (model + optimizer) of FSDP2 checkpoints
_STEP_RE = re.compile(r"^step_(\d+)$")
# .tmp-step_<N>-<host>-<pid> (a checkpoint being written), .old-step_<N>-... (one being replaced);
# earlier versions wrote .tmp-step_<N>-<pid>
_TEMP_RE = re.compile(r"^\.(?:tmp|old)-step_\d+-(?:(?P<host>.+)-)?(?P<pid>\d+)$")



@dataclass
class Loaded:
    path: Path
    step: int
    model: dict[str, torch.Tensor] | None  # None: sharded (path/dcp, loaded by the FSDP2 strategy)
    state: dict[str, Any]


class Checkpointer:
    def __init__(self, run_dir: str | os.PathLike, keep_last: int = 2, checksum: bool = True):
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.checksum = checksum
        self._tmp: Path | None = None  # the temporary directory being written (by this process)
        self._needed: int | Callable[[], int] | None = None  # what the checkpoint being written takes
        self._free: int | None = None  # bytes free on the filesystem when it began

    # -- writing -------------------------------------------------------------------------------
    def save(self, step: int, model_state: dict[str, torch.Tensor], train_state: dict[str, Any],
             config_yaml: str) -> Path:
        with self.writing(step, tensor_bytes(model_state) + tensor_bytes(train_state) + len(config_yaml)):
            tmp = self.begin(step)
            with self.writing(step, path=tmp / "model.safetensors"):
                save_file(unshared(model_state), str(tmp / "model.safetensors"), metadata={"step": str(step)})
            return self.commit(step, tmp, train_state, config_yaml)

    def begin(self, step: int) -> Path:
        """A fresh temporary directory for checkpoint ``step`` (several processes may write into it)."""
        with self.writing(step):
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = self.root / f".tmp-step_{step}-{socket.gethostname()}-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        self._tmp = tmp
        return tmp

    def commit(self, step: int, tmp: Path, train_state: dict[str, Any], config_yaml: str) -> Path:
        """Add train_state.pt and config.yaml to ``tmp`` (whose model files are written), record every
        file's size and CRC32 in meta.json, and move it into place atomically."""
        with self.writing(step, tensor_bytes(train_state), path=tmp / "train_state.pt"):
            with open(tmp / "train_state.pt", "wb") as f:  # a file object: a full disk then shows as an OSError
                torch.save(train_state, f)
        if os.environ.get("LRPRETRAIN_FAULT_KILL_IN_SAVE") == str(step):  # fault injection for the crash tests
            os.kill(os.getpid(), signal.SIGKILL)
        with self.writing(step, path=tmp / "config.yaml"):
            (tmp / "config.yaml").write_text(config_yaml)
        return self.seal(step, tmp, {"model": "dcp" if (tmp / SHARDED).is_dir() else "safetensors"})

    def expected_bytes(self, fallback: int) -> int:
        """What the next checkpoint will take: the newest complete one's size, else ``fallback``."""
        for path in self.complete_steps():
            try:
                files = json.loads((path / "meta.json").read_text())["files"]
                return sum(int(f["bytes"]) for f in files.values())
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return fallback

    @contextmanager
    def writing(self, step: int, needed: int | Callable[[], int] | None = None,
                path: Path | None = None) -> Iterator[None]:
        """Around the writes of checkpoint ``step`` (by this class or by a strategy into :meth:`begin`'s
        directory): a failure removes the temporary directory; a storage failure becomes one line naming
        ``path`` (default: the temporary directory) that says what is intact and how to continue.
        ``needed``: the bytes of the whole checkpoint (or a function computing them, called only after a
        failure); in nested blocks the outermost block's figure counts."""
        outermost = self._needed is None
        if outermost:
            self._needed = needed if needed is not None else 0
            self._free = free_bytes(self.root)  # a statvfs: what the message compares the need with
        try:
            yield
        except StorageError:  # an inner block said it already
            self.discard()
            raise
        except Exception as e:
            total = self._needed() if callable(self._needed) else self._needed
            err = self._failed(step, e, total or needed or None, path)  # type: ignore[arg-type]
            self.discard()
            if err is e:
                raise
            raise err from e
        except BaseException:
            self.discard()
            raise
        finally:
            if outermost:
                self._needed = None

    def _failed(self, step: int, e: Exception, needed: int | None, path: Path | None) -> Exception:
        previous = self.complete_steps()
        intact = (f"checkpoint step_{step} was not written; the last checkpoint {previous[0].name} and "
                  "checkpoints/latest are intact: fix that, then continue with trainer.resume=auto") if previous else \
                 (f"checkpoint step_{step} was not written (there is no earlier checkpoint); fix that and start "
                  "the run again")
        return storage_error(e, path or self._tmp or self.root, needed, intact, self._free) or e

    def discard(self) -> None:
        """Remove the temporary directory of a checkpoint whose writing failed."""
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def seal(self, step: int, tmp: Path, about: dict[str, Any]) -> Path:
        """Make the complete ``tmp`` checkpoint ``step_<step>``: fsync every file, record each one's size and
        CRC32 in meta.json (with ``about``: what wrote it), written last, then rename it into place and
        point ``latest`` at it. A crash before the rename leaves the previous checkpoints untouched."""
        final = self.root / f"step_{step}"
        with self.writing(step, path=tmp / "meta.json"):
            self._seal_files(step, tmp, about)
        with self.writing(step):
            self._move_into_place(step, tmp, final)
        self._tmp = None
        # the new checkpoint is complete: a failure from here on leaves it in place, and latest as it was
        after = (f"checkpoint step_{step} is complete, checkpoints/latest still names {self._latest_name()}; "
                 "continue with trainer.resume=auto once it is fixed")
        with guarded_write(self.root, after=after):
            fsync_dir(self.root)
        atomic_write_text(self.root / "latest", f"step_{step}\n", after=after)
        self._prune()
        return final

    def _latest_name(self) -> str:
        try:
            return (self.root / "latest").read_text().strip() or "nothing"
        except OSError:
            return "nothing"

    def _seal_files(self, step: int, tmp: Path, about: dict[str, Any]) -> None:
        files = {}
        for f in sorted(x for x in tmp.rglob("*") if x.is_file()):
            fsync_file(f)
            files[f.relative_to(tmp).as_posix()] = {"bytes": f.stat().st_size,
                                                    "crc32": crc32(f) if self.checksum else None}
        for d in sorted({f.parent for f in tmp.rglob("*") if f.is_file()}, key=lambda p: len(p.parts), reverse=True):
            fsync_dir(d)
        meta = {"format": FORMAT, "step": step, **about, "files": files}
        with open(tmp / "meta.json", "w") as f:
            json.dump(meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tmp)

    def _move_into_place(self, step: int, tmp: Path, final: Path) -> None:
        if final.exists():  # e.g. saved again after a resume at the same step
            old = self.root / f".old-step_{step}-{socket.gethostname()}-{os.getpid()}"
            os.replace(final, old)
            try:
                os.replace(tmp, final)
            except BaseException:
                os.replace(old, final)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)

    def _prune(self) -> None:
        for path in self.complete_steps()[self.keep_last :]:
            shutil.rmtree(path, ignore_errors=True)

    def remove_stale(self, warn: Callable[[str], None] | None = None) -> None:
        """Temporary directories left by a crash while saving, never those of a live process on this
        host. Called while this process holds the run directory's lock (lrpretrain/train/lock.py), which
        no live process of another host holds: their temporaries are stale too."""
        if not self.root.is_dir():
            return
        here = socket.gethostname()
        for p in self.root.iterdir():
            m = _TEMP_RE.match(p.name)
            if m is None:
                continue
            pid, host = int(m.group("pid")), m.group("host")
            if pid != os.getpid() and (host is None or host == here) and pid_alive(pid):
                if warn is not None:
                    warn(f"left {p} in place: process {pid} on this host, which is writing it, is alive")
                continue
            shutil.rmtree(p, ignore_errors=True)

    # -- reading -------------------------------------------------------------------------------
    def complete_steps(self) -> list[Path]:
        """``step_N`` directories, newest first (complete or not: :meth:`load` verifies)."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if (m := _STEP_RE.match(p.name)) and p.is_dir()]
        return [p for _, p in sorted(found, reverse=True)]

    @staticmethod
    def verify(path: Path) -> dict[str, Any]:
        """Raise CheckpointError unless every file is present with its recorded size and CRC32."""
        meta_path = path / "meta.json"
        if not path.is_dir():
            raise CheckpointError(f"checkpoint {path} does not exist")
        if not meta_path.exists():
            raise CheckpointError(f"checkpoint {path} is partial: no meta.json")
        try:
            meta = json.loads(meta_path.read_text())
            files = meta["files"]
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"checkpoint {path} is corrupt: unreadable meta.json") from e
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"checkpoint {path} has format {meta.get('format')}, expected {FORMAT}")
        sharded = meta.get("model") == "dcp"
        required = ("train_state.pt", "config.yaml", f"{SHARDED}/.metadata") if sharded else FILES
        for name in dict.fromkeys([*required, *files]):
            f = path / name
            info = files.get(name)
            if info is None or not f.exists():
                raise CheckpointError(f"checkpoint {path} is partial: {name} is missing")
            if f.stat().st_size != info["bytes"]:
                raise CheckpointError(f"checkpoint {path} is corrupt: {name} has {f.stat().st_size} bytes, "
                                      f"expected {info['bytes']}")
            if info.get("crc32") is not None and crc32(f) != info["crc32"]:
                raise CheckpointError(f"checkpoint {path} is corrupt: {name} fails its CRC32 check")
        return meta

    @classmethod
    def load(cls, path: str | os.PathLike) -> Loaded:
        """Verify checkpoint ``path`` (sizes, CRC32s), then read it."""
        cls.verify(Path(path))
        return cls.read(path)

    @classmethod
    def read(cls, path: str | os.PathLike) -> Loaded:
        """Read checkpoint ``path`` that was verified already (every file's CRC32 is not read again)."""
        path = Path(path)
        try:
            meta = json.loads((path / "meta.json").read_text())
            model = None if meta.get("model") == "dcp" else load_file(str(path / "model.safetensors"))
            state = torch.load(path / "train_state.pt", map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"checkpoint {path} is corrupt: {str(e).splitlines()[0]}") from e
        return Loaded(path, int(meta["step"]), model, state)

    def load_latest(self, warn) -> Loaded | None:
        """The newest checkpoint that verifies; corrupt or partial ones are skipped with a warning."""
        for path in self.complete_steps():
            try:
                return self.load(path)
            except CheckpointError as e:
                warn(f"{e}; falling back to an earlier checkpoint")
        return None
