"""Sweeps (``lrpretrain train -m``) through Hydra's multirun: job directories, skip and resume on re-run,
the summary, refusals before any job starts, and the SLURM (submitit) launcher's sbatch script."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
from test_errors import one_line

import lrpretrain.sweep as sweep

import lrp_test_plugins  # noqa: F401  (registers test_fault)
from conftest import TINY, losses


def _summary(sweep_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (sweep_dir / "summary.jsonl").read_text().splitlines()]


def test_sweep_of_two_methods_then_rerun_skips_both(cli, tmp_path):
    sw = tmp_path / "sw"
    args = ["-m", "method=full,galore", *TINY, "trainer.max_steps=2", f"hydra.sweep.dir={sw}"]
    r = cli("train", *args)
    assert r.code == 0, r.err
    rows = _summary(sw)
    assert [(x["job"], x["method"], x["overrides"], x["status"], x["step"]) for x in rows] == [
        ("method=full", "full", "method=full", "complete", 2), ("method=galore", "galore", "method=galore", "complete", 2)]
    for x in rows:
        assert math.isfinite(x["val_ppl"]) and x["val_ppl"] > 1
        assert x["tokens_per_s"] > 0 and x["peak_mem_mb"] > 50  # process RSS on the CPU
        assert (sw / x["job"] / "checkpoints" / "latest").read_text().strip() == "step_2"
    assert rows[0]["val_ppl"] != rows[1]["val_ppl"]  # two different trainings
    md = (sw / "summary.md").read_text()
    assert "| method=full | full | method=full | complete | 2 |" in md and "| method=galore | galore |" in md
    assert "| job | method | overrides | status |" in r.out
    report = (sw / "report.md").read_text()  # the report with its plots, beside the summary
    assert "| method=full | full | llama_tiny |" in report and "| method=galore | galore |" in report
    assert all((sw / png).stat().st_size > 1000 for png in ("val_ppl.png", "train_loss.png", "throughput.png",
                                                             "memory.png"))
    before = {x["job"]: (sw / x["job"] / "metrics.jsonl").read_text() for x in rows}

    r = cli("train", *args)  # the same sweep again: both jobs are finished
    assert r.code == 0, r.err
    assert r.err.count("already complete (step 2): skipped") == 2
    assert {j: (sw / j / "metrics.jsonl").read_text() for j in before} == before
    assert [x["status"] for x in _summary(sw)] == ["complete", "complete"]

    # Same job directories, different training config: each job is refused, nothing is overwritten.
    job_files = {j: (sw / j / "sweep_job.json").read_text() for j in before}
    r = cli("train", *args, "optim.lr=0.002")
    assert r.code == 1
    assert r.err.count("holds a run with a different config (optim.lr: 0.001 -> 0.002)") == 2
    assert {j: (sw / j / "metrics.jsonl").read_text() for j in before} == before
    assert {j: (sw / j / "sweep_job.json").read_text() for j in before} == job_files

    (sw / "summary.md").unlink()
    r = cli("sweep-summary", str(sw))
    assert r.code == 0 and "| method=galore | galore | method=galore | complete | 2 |" in r.out
    assert (sw / "summary.md").exists() and len(_summary(sw)) == 2
    r = cli("sweep-summary", str(tmp_path / "nosuch"))
    assert r.code == 2 and len(r.error_lines) == 1


def test_preempted_sweep_job_resumes_on_rerun(cli, tmp_path, monkeypatch):
    """SIGUSR2 (submitit's notice) after update 2 of job 1: it saves and stops, the sweep starts no further
    job and hands the signal back to submitit's handler; the re-run resumes job 1 and runs job 2, which
    trains the same model without interruption: the losses agree bit for bit."""
    sw = tmp_path / "sw"
    args = ["-m", "method.signal_at=2,0", *TINY, "method=test_fault", "method.signal_name=SIGUSR2",
            "trainer.max_steps=4", "trainer.ckpt_every=0", f"hydra.sweep.dir={sw}"]

    class FakeSubmititJob:  # a submitit job of one task; its handler would requeue the job
        USR_SIG = "USR2"
        num_tasks = 1

    handed_back = []
    monkeypatch.setattr(sweep, "_submitit_environment", lambda: FakeSubmititJob())
    previous = signal.signal(signal.SIGUSR2, lambda *_: handed_back.append(True))
    try:
        r = cli("train", *args)
    finally:
        signal.signal(signal.SIGUSR2, previous)
    monkeypatch.undo()
    assert r.code == 0, r.err
    assert handed_back == [True]
    assert "stopped by SIGUSR2 at step 2" in r.err and "not started: the sweep was stopped by SIGUSR2" in r.err
    assert [(x["job"], x["status"], x["step"]) for x in _summary(sw)] == [("method.signal_at=2", "preempted", 2)]

    r = cli("train", *args)
    assert r.code == 0, r.err
    assert f"resumed from {sw / 'method.signal_at=2' / 'checkpoints' / 'step_2'}" in r.err
    assert [(x["job"], x["status"], x["step"]) for x in _summary(sw)] == [
        ("method.signal_at=2", "complete", 4), ("method.signal_at=0", "complete", 4)]
    assert list(losses(sw / "method.signal_at=2")) == [1, 2, 3, 4]
    assert losses(sw / "method.signal_at=2") == losses(sw / "method.signal_at=0")


@pytest.mark.parametrize("bad, message", [
    (["method=full,nosuch"], "sweep job 'method=nosuch': unknown method 'nosuch'; allowed: "),
    (["method=full,galore", "optim.lr=-1"], "sweep job 'method=full': optim.lr=-1.0 is invalid: must be > 0"),
    (["method=full,galore", "run.dir=x"], "run.dir cannot be set in a sweep"),
    (["launcher=nosuch", "method=full,galore"], "unknown launcher 'nosuch'; allowed: local, slurm"),
    (["method=[full"], "cannot parse overrides"),
])
def test_sweep_refuses_bad_jobs_before_running_any(cli, tmp_path, bad, message):
    sw = tmp_path / "sw"
    r = cli("train", "-m", *TINY, *bad, f"hydra.sweep.dir={sw}")
    one_line(r, message)
    assert not sw.exists()


def test_single_run_names_the_sweep_flag_for_sweep_syntax(cli, tmp_path):
    r = cli("train", *TINY, "method=full,galore", f"run.dir={tmp_path / 'run'}")
    assert r.code == 2 and len(r.error_lines) == 1 and "-m" in r.error_lines[0], r.err


def test_slurm_launcher_renders_its_sbatch_script_in_a_dry_run(cli, tmp_path, monkeypatch):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the 'slurm' extra is not installed")
    fake_bin = tmp_path / "bin"  # submitit wants srun on PATH, as on a login node; nothing is submitted
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 1\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}:{os.environ['PATH']}")
    sw = tmp_path / "sw"
    r = cli("train", "-m", "--dry-run", "launcher=slurm", "method=full,galore", *TINY, "hydra.launcher.partition=gpu",
            "hydra.launcher.gpus_per_node=4", "hydra.launcher.tasks_per_node=4", "hydra.launcher.timeout_min=120",
            f"hydra.sweep.dir={sw}")
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    assert any(line.startswith(f"  {sw / 'method=galore'}: launcher=slurm method=galore model=llama_tiny")
               for line in lines)
    for expected in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=4", "#SBATCH --ntasks-per-node=4",
                     "#SBATCH --time=120", "#SBATCH --signal=USR2@300", "#SBATCH --array=0-1%2",
                     "#SBATCH --cpus-per-task=8"):
        assert expected in lines, r.out
    assert any(line.startswith("srun ") and "submitit.core._submit" in line for line in lines)
    assert not sw.exists()  # a dry run creates nothing
