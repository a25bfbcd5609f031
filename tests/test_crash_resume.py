"""Crashes in a child process, resumed: the run continues bit for bit.

SIGKILL in the middle of training, SIGKILL in the middle of writing a checkpoint, and SIGTERM
(pre-emption: checkpoint, exit 0). The reference is one uninterrupted run in this process.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from conftest import TINY, losses, read_metrics, spawn_cli

pytestmark = pytest.mark.slow

# one thread in the child and in this process alike: a resume continues bit for bit on the same thread count
ARGS = [*TINY, "trainer.threads=1", "trainer.batch_size=8", "trainer.micro_batch_size=4", "trainer.max_steps=40", "trainer.ckpt_every=8",
        "trainer.keep_last=3", "trainer.eval_every=16"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus) -> Path:
    from lrpretrain.cli.main import main

    run = tmp_path_factory.mktemp("ref") / "run"
    assert main(["train", *ARGS, f"run.dir={run}"]) == 0
    return run


def _wait_for_step(proc, run: Path, step: int, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"child exited early ({proc.returncode}): {proc.stderr.read()}")
        path = run / "metrics.jsonl"
        if path.exists():
            lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
            if lines and '"step": ' in lines[-1] and int(lines[-1].split('"step": ')[1].split(",")[0]) >= step:
                return
        time.sleep(0.01)
    raise AssertionError("child too slow")


def _resume_in_process(run: Path) -> str:
    from lrpretrain.cli.main import main

    assert main(["train", *ARGS, f"run.dir={run}"]) == 0
    return (run / "checkpoints" / "latest").read_text().strip()


def _same_run(run: Path, ref: Path) -> None:
    assert losses(run) == losses(ref)  # every step's loss, bit for bit
    vals = lambda d: [(r["step"], r["val_loss"]) for r in read_metrics(d) if "val_loss" in r]  # noqa: E731
    assert vals(run) == vals(ref)


def test_sigkill_mid_training(tmp_path, reference):
    run = tmp_path / "run"
    proc = spawn_cli(["train", *ARGS, f"run.dir={run}"])
    _wait_for_step(proc, run, 12)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert any(r["step"] > 8 for r in read_metrics(run))  # it died past its last checkpoint...
    assert _resume_in_process(run) == "step_40"  # ...and resumed from step 8 to the end
    _same_run(run, reference)
    assert (run / "metrics.rewound.jsonl").exists()  # the records after step 8 were kept aside, not lost


def test_sigkill_while_writing_a_checkpoint(tmp_path, reference):
    run = tmp_path / "run"
    proc = spawn_cli(["train", *ARGS, f"run.dir={run}"], env={"LRPRETRAIN_FAULT_KILL_IN_SAVE": "16"})
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, err
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_8"
    assert [p.name for p in ckpts.iterdir() if p.name.startswith(".tmp-step_16")]  # the half-written one
    assert not (ckpts / "step_16").exists()
    assert _resume_in_process(run) == "step_40"
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".tmp")]
    _same_run(run, reference)


def test_sigterm_checkpoints_and_exits_cleanly(tmp_path, reference):
    run = tmp_path / "run"
    proc = spawn_cli(["train", *ARGS, f"run.dir={run}"])
    _wait_for_step(proc, run, 3)
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "stopped by SIGTERM at step" in err
    step = int(err.split("stopped by SIGTERM at step ")[1].split(";")[0])
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{step}"
    assert _resume_in_process(run) == "step_40"
    _same_run(run, reference)
