"""Storage faults and the run directory (lrpretrain/storage.py, lrpretrain/train/lock.py).

A write that fails at each site (checkpoint tensors, train state, meta.json, ``latest``, metrics)
stops the run with one line; nothing complete is lost and ``trainer.resume=auto`` continues the
identical run. A real full filesystem where this process may mount a tmpfs (root). One process per
run directory; a moved run directory resumes; bad run.dir values are one line each.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from test_errors import one_line

import lrpretrain.checkpoint.checkpointer as ckpt_mod
import lrpretrain.metrics.logger as metrics_mod
from lrpretrain.checkpoint import Checkpointer
from lrpretrain.errors import RunDirInUse
from lrpretrain.storage import errno_of, storage_error
from lrpretrain.train.lock import LOCK_NAME, RunLock

from conftest import TINY, losses, read_metrics, spawn_cli

ARGS = [*TINY, "trainer.threads=1", "trainer.max_steps=6", "trainer.ckpt_every=2", "trainer.keep_last=2"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus) -> dict[int, float]:
    from lrpretrain.cli.main import main

    run = tmp_path_factory.mktemp("ref") / "run"
    assert main(["train", *ARGS, f"run.dir={run}"]) == 0
    return losses(run)


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _no_temporaries(run: Path) -> None:
    left = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    assert left == [], left


# -- a failing write at each site ----------------------------------------------------------------

def _fail_model(monkeypatch, step, err):
    real = ckpt_mod.save_file

    def save_file(tensors, path, metadata=None):
        if metadata and metadata.get("step") == str(step):
            Path(path).write_bytes(b"partial")
            raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, path, metadata=metadata)
    monkeypatch.setattr(ckpt_mod, "save_file", save_file)
    return "model.safetensors"


def _fail_train_state(monkeypatch, step, err):
    real = torch.save

    def save(obj, f, *a, **k):
        if isinstance(obj, dict) and obj.get("step") == step and getattr(f, "name", "").endswith("train_state.pt"):
            f.write(b"partial")
            try:  # what torch.save raises when the file object's write fails: the OSError is its context
                raise err
            except OSError:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from None
        return real(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", save)
    return "train_state.pt"


def _fail_meta(monkeypatch, step, err):
    real = json.dump

    def dump(obj, f, *a, **k):
        if isinstance(obj, dict) and obj.get("step") == step and "files" in obj:
            raise err
        return real(obj, f, *a, **k)
    monkeypatch.setattr(ckpt_mod.json, "dump", dump)
    return "meta.json"


def _fail_latest(monkeypatch, step, err):
    real = ckpt_mod.atomic_write_text

    def write(path, text, after=""):
        if path.name == "latest" and text.strip() == f"step_{step}":
            with ckpt_mod.guarded_write(path, len(text), after):
                raise err
        return real(path, text, after)
    monkeypatch.setattr(ckpt_mod, "atomic_write_text", write)
    return "checkpoints/latest still names step_2"


def _fail_metrics(monkeypatch, step, err):
    def fake_open(path, mode="r", *a, **k):
        p = Path(path)
        if p.name == "metrics.jsonl" and "a" in mode and p.exists() and len(read_metrics(p.parent)) >= step - 1:
            raise OSError(err.errno, err.strerror, str(path))
        return open(path, mode, *a, **k)
    monkeypatch.setattr(metrics_mod, "open", fake_open, raising=False)
    return "metrics.jsonl"


def _oserror(code: int) -> OSError:
    return OSError(code, os.strerror(code))


SITES = [(_fail_model, errno.ENOSPC), (_fail_train_state, errno.ENOSPC), (_fail_meta, errno.ENOSPC),
         (_fail_latest, errno.ENOSPC), (_fail_metrics, errno.ENOSPC), (_fail_meta, errno.EDQUOT),
         (_fail_metrics, errno.EROFS)]
SAYS = {errno.ENOSPC: "no space left on device (ENOSPC): the write needed ",
        errno.EDQUOT: "disk quota exceeded (EDQUOT): the write needed ",
        errno.EROFS: "read-only file system (EROFS); the filesystem is mounted read-only"}


@pytest.mark.parametrize("site, code", SITES, ids=[f"{f.__name__.removeprefix('_fail_')}-{errno.errorcode[c]}"
                                                   for f, c in SITES])
def test_failed_write_stops_with_one_line_and_resume_is_exact(cli, tmp_path, monkeypatch, reference, site, code):
    run = tmp_path / "run"
    step = 3 if site is _fail_metrics else 4  # the metrics record of update 3; the checkpoint of update 4
    with monkeypatch.context() as m:
        expected = site(m, step, _oserror(code))
        r = cli("train", *ARGS, f"run.dir={run}")
    one_line(r, expected)
    line = r.error_lines[0]
    assert f"cannot write {run}" in line and SAYS[code] in line, line
    if code == errno.ENOSPC:
        size = r"[\d,]+ bytes( \([\d.]+ [MG]iB\))?"
        assert re.search(f"the write needed {size}, {size} free", line), line
        if site in (_fail_model, _fail_train_state, _fail_meta):
            assert re.search(r"the write needed [\d,]+ bytes \(28\.6 MiB\)", line), line  # the whole checkpoint
    if site is not _fail_metrics:
        intact = ("checkpoint step_4 is complete, checkpoints/latest still names step_2" if site is _fail_latest else
                  "checkpoint step_4 was not written; the last checkpoint step_2 and checkpoints/latest are intact")
        assert intact in line, line
    _no_temporaries(run)
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert latest == "step_2", latest  # latest as it was
    complete = [p.name for p in Checkpointer(run).complete_steps()]
    assert complete == (["step_4", "step_2"] if site is _fail_latest else ["step_2"])
    for name in complete:
        Checkpointer.verify(run / "checkpoints" / name)
    assert not (run / LOCK_NAME).exists()  # released on the way out

    r = cli("train", *ARGS, f"run.dir={run}")
    assert r.code == 0, r.err
    assert losses(run) == reference  # the identical run, bit for bit


@contextmanager
def tmpfs(where: Path, options: str):
    """A tmpfs mounted at ``where`` for the block; the test is skipped where this process may not mount."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root: the injected faults cover every write site")
    where.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True).returncode:
        pytest.skip("mount -t tmpfs is not permitted here: the injected faults cover every write site")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_real_full_filesystem(cli, tmp_path, reference):
    """A 72 MB tmpfs holds two checkpoints of this run (29 MB each) but not a third beside them."""
    with tmpfs(tmp_path / "small", "size=72m") as mnt:
        run = mnt / "run"
        r = cli("train", *ARGS, f"run.dir={run}")
        one_line(r, "no space left on device (ENOSPC): the write needed ")
        assert "checkpoint step_6 was not written; the last checkpoint step_4 and checkpoints/latest are intact" \
            in r.error_lines[0], r.error_lines[0]
        _no_temporaries(run)
        assert (run / "checkpoints" / "latest").read_text().strip() == "step_4"
        subprocess.run(["mount", "-o", "remount,size=120m", str(mnt)], check=True)
        r = cli("train", *ARGS, f"run.dir={run}")
        assert r.code == 0, r.err
        assert losses(run) == reference


def test_library_errors_are_read_for_their_errno(tmp_path):
    try:
        try:
            raise _oserror(errno.ENOSPC)
        except OSError:
            raise RuntimeError("unexpected pos 1 vs 2") from None
    except RuntimeError as e:
        assert errno_of(e) == errno.ENOSPC
    assert errno_of(RuntimeError("I/O error: Read-only file system (os error 30)")) == errno.EROFS
    assert storage_error(ValueError("not a storage problem"), tmp_path) is None
    # no errno anywhere, but the write needed more than the filesystem has: a full disk
    err = storage_error(RuntimeError("basic_ios::clear"), tmp_path / "x", needed=1 << 62)
    assert err is not None and "(ENOSPC): the write needed 4,611,686,018,427,387,904 bytes (4294967296.0 GiB)" in str(err)


def test_stale_temporaries_of_dead_processes_only(tmp_path):
    ck = Checkpointer(tmp_path)
    ck.root.mkdir()
    here = socket.gethostname()
    live = subprocess.Popen(["sleep", "30"])
    try:
        names = {"dead": f".tmp-step_3-{here}-{_dead_pid()}", "old_format": f".tmp-step_3-{_dead_pid()}",
                 "live": f".tmp-step_5-{here}-{live.pid}", "other_host": ".old-step_4-node17-123"}
        for n in names.values():
            (ck.root / n).mkdir()
        warned = []
        ck.remove_stale(warned.append)
        assert sorted(p.name for p in ck.root.iterdir()) == [names["live"]]
        assert warned and f"process {live.pid} on this host, which is writing it, is alive" in warned[0]
    finally:
        live.kill()
        live.wait()


# -- one process per run directory ----------------------------------------------------------------

@pytest.mark.slow
def test_second_process_is_refused_while_the_first_trains_unharmed(cli, tmp_path, reference):
    run = tmp_path / "run"
    first = spawn_cli(["train", *ARGS, f"run.dir={run}"])
    try:
        deadline = time.time() + 120
        while not (run / LOCK_NAME).exists() or not (run / LOCK_NAME).read_text().strip():
            assert first.poll() is None, first.stderr.read()
            assert time.time() < deadline, "the first run never took its lock"
            time.sleep(0.01)
        os.kill(first.pid, signal.SIGSTOP)  # it holds the lock, wherever it is, while the second one starts
        try:
            r = cli("train", *ARGS, f"run.dir={run}")
        finally:
            os.kill(first.pid, signal.SIGCONT)
        one_line(r, f"run.dir {run} is in use by another lrpretrain process (host {socket.gethostname()}, "
                    f"pid {first.pid}, started ")
        _, err = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 0, err
    steps = [rec["step"] for rec in read_metrics(run)]
    assert steps == sorted(steps) and len(steps) == len(set(steps))
    assert losses(run) == reference


def test_a_lock_left_by_a_dead_process_is_taken_over(cli, tmp_path, reference):
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid(), "started": "then"}))
    r = cli("train", *ARGS, f"run.dir={run}")
    assert r.code == 0, r.err
    assert f"warning: taking over the lock of {run} from a process that is gone" in r.err
    assert losses(run) == reference
    assert not (run / LOCK_NAME).exists()


def test_a_lock_of_another_host_is_never_broken_silently(cli, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_NAME).write_text(json.dumps({"host": "node17", "pid": 4242, "started": "2026-12-01T10:00:00"}))
    r = cli("train", *ARGS, "trainer.max_steps=1", f"run.dir={run}")
    one_line(r, f"run.dir {run} is locked by a process on another host (host node17, pid 4242, started "
                f"2026-12-01T10:00:00), which this host cannot check; if that process is gone, rerun with "
                f"run.break_lock=true (or delete {run / LOCK_NAME})")
    assert not (run / "config.yaml").exists()  # refused before anything was written
    r = cli("train", *ARGS, "trainer.max_steps=1", "run.break_lock=true", f"run.dir={run}")
    assert r.code == 0, r.err
    assert "warning: run.break_lock=true: taking over the lock of" in r.err


@pytest.mark.slow
def test_lock_is_held_across_processes_and_counted_within_one(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from lrpretrain.train.lock import RunLock; "
        f"RunLock({str(run)!r}).acquire(); print('held', flush=True); sys.stdin.read()")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirInUse, match=f"pid {holder.pid}"):
            RunLock(run).acquire()
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    # the holder is gone: its kernel lock with it (its record was deleted on exit, or taken over)
    with RunLock(run, warn=lambda m: None) as outer:
        with RunLock(run):  # the same process again (a sweep job, then its training): counted
            pass
        assert (run / LOCK_NAME).exists() and outer._count == 1
    assert not (run / LOCK_NAME).exists()


# -- where the run directory is --------------------------------------------------------------------

def test_a_moved_run_directory_resumes_bit_for_bit(cli, tmp_path, reference):
    old, new = tmp_path / "scratch" / "run", tmp_path / "project" / "run"
    r = cli("train", *ARGS, "trainer.max_steps=2", f"run.dir={old}")
    assert r.code == 0, r.err
    new.parent.mkdir()
    shutil.move(old, new)
    r = cli("train", *ARGS, f"run.dir={new}")
    assert r.code == 0, r.err
    assert f"warning: this run was moved: it was trained in {old} and continues in {new}" in r.err
    assert losses(new) == reference


@pytest.mark.parametrize("make, expected", [
    (lambda t: (t / "f").write_text("x") and t / "f", "run.dir={p} is a file, not a directory; choose a directory path"),
    (lambda t: (t / "f").write_text("x") and t / "f" / "run", "run.dir={p} cannot be created: {t}/f is a file, not a directory"),
])
def test_bad_run_dirs_are_one_line_before_anything_is_built(cli, tmp_path, make, expected):
    p = make(tmp_path)
    r = cli("train", *TINY, "trainer.max_steps=1", f"run.dir={p}")
    one_line(r, expected.format(p=p, t=tmp_path))
    assert "params" not in r.err  # refused before the model was built


def test_a_read_only_run_dir(cli, tmp_path):
    with tmpfs(tmp_path / "ro", "ro,size=1m") as mnt:
        r = cli("train", *TINY, "trainer.max_steps=1", f"run.dir={mnt}")
        one_line(r, f"run.dir={mnt} is not writable: cannot write {mnt / LOCK_NAME}: read-only file system (EROFS)")
        r = cli("train", *TINY, "trainer.max_steps=1", f"run.dir={mnt}/sub")
        one_line(r, f"run.dir={mnt}/sub cannot be created: read-only file system (EROFS)")
