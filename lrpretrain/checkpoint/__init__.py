"""Atomic, verified checkpoints.

Layout of ``<run.dir>/checkpoints/``::

    step_<N>/model.safetensors   the model's weights (as prepared by the method); or, from FSDP2,
    step_<N>/dcp/                model and optimizer sharded by torch.distributed.checkpoint
    step_<N>/train_state.pt      optimizer, schedule, counters, data position, RNGs, method state
                                 (plain tensors and Python scalars: loads with weights_only=True)
    step_<N>/config.yaml         the resolved config of the run
    step_<N>/meta.json           step and the size and CRC32 of every file above; written last
    latest                       "step_<N>", replaced atomically after the directory is in place

A checkpoint is written into ``.tmp-step_<N>-<pid>`` next to its final place, every file fsynced,
then renamed into place, so a crash at any moment leaves either the complete new checkpoint or none
(plus a temporary directory that the next start removes) and never harms the previous one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lrpretrain.errors import CheckpointError

FORMAT = 1
FILES = ("model.safetensors", "train_state.pt", "config.yaml")
SHARDED = "dcp"  # torch.distributed.checkpoint directory (model + optimizer) of FSDP2 checkpoints
_STEP_RE = re.compile(r"^step_(\d+)$")


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            crc = zlib.crc32(chunk, crc)
    return crc


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing storage (tied weights): copy the later ones."""
    seen: set[int] = set()
    out = {}
    for k, v in tensors.items():
        v = v.detach()
        ptr = v.untyped_storage().data_ptr() if v.numel() else -1
        out[k] = v.clone().contiguous() if ptr in seen else v.contiguous()
        seen.add(ptr)
    return out


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

    # -- writing -------------------------------------------------------------------------------
    def save(self, step: int, model_state: dict[str, torch.Tensor], train_state: dict[str, Any],
             config_yaml: str) -> Path:
        tmp = self.begin(step)
        save_file(_unshared(model_state), str(tmp / "model.safetensors"), metadata={"step": str(step)})
        return self.commit(step, tmp, train_state, config_yaml)

    def begin(self, step: int) -> Path:
        """A fresh temporary directory for checkpoint ``step`` (several processes may write into it)."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-step_{step}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        return tmp

    def commit(self, step: int, tmp: Path, train_state: dict[str, Any], config_yaml: str) -> Path:
        """Add train_state.pt and config.yaml to ``tmp`` (whose model files are written), record every
        file's size and CRC32 in meta.json, and move it into place atomically."""
        torch.save(train_state, tmp / "train_state.pt")
        if os.environ.get("LRPRETRAIN_FAULT_KILL_IN_SAVE") == str(step):  # fault injection for the crash tests
            os.kill(os.getpid(), signal.SIGKILL)
        (tmp / "config.yaml").write_text(config_yaml)
        return self.seal(step, tmp, {"model": "dcp" if (tmp / SHARDED).is_dir() else "safetensors"})

    def seal(self, step: int, tmp: Path, about: dict[str, Any]) -> Path:
        """Make the complete ``tmp`` checkpoint ``step_<step>``: fsync every file, record each one's size and
        CRC32 in meta.json (with ``about``: what wrote it), written last, then rename it into place and
        point ``latest`` at it. A crash before the rename leaves the previous checkpoints untouched."""
        final = self.root / f"step_{step}"
        files = {}
        for f in sorted(x for x in tmp.rglob("*") if x.is_file()):
            _fsync_file(f)
            files[f.relative_to(tmp).as_posix()] = {"bytes": f.stat().st_size,
                                                    "crc32": _crc32(f) if self.checksum else None}
        for d in sorted({f.parent for f in tmp.rglob("*") if f.is_file()}, key=lambda p: len(p.parts), reverse=True):
            _fsync_dir(d)
        meta = {"format": FORMAT, "step": step, **about, "files": files}
        with open(tmp / "meta.json", "w") as f:
            json.dump(meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():  # e.g. saved again after a resume at the same step
            old = self.root / f".old-step_{step}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(self.root)
        atomic_write_text(self.root / "latest", f"step_{step}\n")
        self._prune()
        return final

    def _prune(self) -> None:
        for path in self.complete_steps()[self.keep_last :]:
            shutil.rmtree(path, ignore_errors=True)

    def remove_stale(self) -> None:
        """Temporary directories left by a crash while saving."""
        if self.root.is_dir():
            for p in self.root.iterdir():
                if p.name.startswith((".tmp-step_", ".old-step_")):
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
            if info.get("crc32") is not None and _crc32(f) != info["crc32"]:
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


def load_sharded_model(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The full model weights of a sharded (FSDP2, ``dcp/``) checkpoint, read in one process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    checkpoint_id = str(Path(path) / SHARDED)
    meta = dcp.FileSystemReader(checkpoint_id).read_metadata().state_dict_metadata
    model = {k.removeprefix("model."): torch.empty(m.size, dtype=m.properties.dtype)
             for k, m in meta.items() if k.startswith("model.") and isinstance(m, TensorStorageMetadata)}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({"model": model}, checkpoint_id=checkpoint_id, no_dist=True)
    return model
