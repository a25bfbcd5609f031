"""launch/: the torchrun wrapper's command line and the SLURM script's pre-emption logic.

No SLURM here: ``srun`` and ``scontrol`` are small fakes on PATH (srun runs its command in place,
scontrol records its arguments), and ``torchrun`` is a fake too except in the end-to-end test, where a
real torchrun trains, receives SIGUSR1 through the batch shell, checkpoints, is requeued and resumes.
``nvidia-smi`` is a fake as well, so that the GPUs of the machine running the tests do not leak in.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY, losses, read_metrics

SBATCH = REPO / "launch" / "slurm.sbatch"
TORCHRUN_SH = REPO / "launch" / "torchrun.sh"

FAKE_SRUN = """#!/bin/sh
# srun: drop the options, run the command in place (exec: signals reach it directly)
while [ $# -gt 0 ]; do case "$1" in --*) shift;; *) break;; esac; done
exec "$@"
"""
FAKE_SCONTROL = """#!/bin/sh
echo "$*" >> "$FAKE_DIR/scontrol.log"
if [ "$1 $2" = "show hostnames" ]; then
  if [ -n "${FAKE_HOSTNAMES_FAIL:-}" ]; then echo "scontrol: error: Invalid node name specified" >&2; exit 1; fi
  # FAKE_HOSTS=N: node000001 .. N, far more than a pipe buffer holds for N = 100000
  if [ -n "${FAKE_HOSTS:-}" ]; then exec seq -f 'node%06g' 1 "$FAKE_HOSTS"; fi
  echo node01; echo node02; exit 0
fi
exit "${FAKE_SCONTROL_RC:-0}"
"""
FAKE_NVIDIA_SMI = """#!/bin/sh
# nvidia-smi -L: FAKE_GPUS lines (default none: "No devices were found", exit 6, as on a GPU-less host)
n=${FAKE_GPUS:-0}
if [ "$n" -eq 0 ]; then echo "No devices were found"; exit 6; fi
i=0
while [ "$i" -lt "$n" ]; do echo "GPU $i: NVIDIA H200 (UUID: GPU-$i)"; i=$((i + 1)); done
"""
FAKE_TORCHRUN = """#!/bin/bash
{ echo "$*"; env | grep -E '^PET_' | sort; } > "$FAKE_DIR/torchrun.args"
case "${FAKE_MODE:-ok}" in
  ok) exit 0;;
  fail) exit 3;;
  wait)
    trap 'echo USR1 >> "$FAKE_DIR/signals"; exit 0' USR1
    trap 'echo TERM >> "$FAKE_DIR/signals"; exit 0' TERM
    touch "$FAKE_DIR/ready"
    while :; do sleep 0.05; done;;
esac
"""


@pytest.fixture
def fakes(tmp_path) -> Path:
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("torchrun", FAKE_TORCHRUN),
                       ("nvidia-smi", FAKE_NVIDIA_SMI)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def _env(fakes: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PET_", "NNODES", "NODE_RANK",
                                                                     "MASTER_", "NPROC_PER_NODE"))}
    env.update(PATH=f"{fakes}:{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}",
               FAKE_DIR=str(fakes.parent), SLURM_JOB_ID="4242", SLURM_JOB_NAME="lrp",
               LRP_LAUNCH_DIR=str(REPO / "launch"))
    env.update(extra)
    return env


def _sbatch(fakes: Path, *args: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen(["bash", str(SBATCH), *args], env=_env(fakes, **env), cwd=fakes.parent,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < end, f"{path} did not appear"
        time.sleep(0.02)


def _scontrol_calls(fakes: Path) -> list[str]:
    log = fakes.parent / "scontrol.log"
    return log.read_text().splitlines() if log.exists() else []


# ---------------------------------------------------------------------------------------------
# slurm.sbatch: when it requeues


def test_sbatch_run_that_finishes_is_not_requeued(fakes):
    p = _sbatch(fakes, "train", "model=llama_tiny")
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    args = (fakes.parent / "torchrun.args").read_text()
    assert "--standalone" in args and "--nproc-per-node=1" in args
    assert "-m lrpretrain.cli.main train model=llama_tiny run.dir=runs/lrp-4242" in args  # stable across requeues
    assert "PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2" in args
    assert _scontrol_calls(fakes) == []
    assert "finished with exit status 0" in err


def test_sbatch_usr1_reaches_the_trainer_then_requeues(fakes):
    p = _sbatch(fakes, "train", "model=llama_tiny", FAKE_MODE="wait")
    _wait_for(fakes.parent / "ready")
    p.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 does before the time limit
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert (fakes.parent / "signals").read_text().split() == ["USR1"]
    assert _scontrol_calls(fakes) == ["requeue 4242"]
    assert "requeued" in err


def test_sbatch_failed_run_is_not_requeued(fakes):
    p = _sbatch(fakes, "train", "model=llama_tiny", FAKE_MODE="fail")
    out, err = p.communicate(timeout=30)
    assert p.returncode == 3
    assert _scontrol_calls(fakes) == []


def test_sbatch_sigterm_is_passed_on_without_requeue(fakes):
    p = _sbatch(fakes, "train", "model=llama_tiny", FAKE_MODE="wait")
    _wait_for(fakes.parent / "ready")
    p.send_signal(signal.SIGTERM)  # scancel: the trainer saves, the job stays cancelled
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert (fakes.parent / "signals").read_text().split() == ["TERM"]
    assert _scontrol_calls(fakes) == []


def test_sbatch_reports_a_failed_requeue(fakes):
    p = _sbatch(fakes, "train", "model=llama_tiny", FAKE_MODE="wait", FAKE_SCONTROL_RC="1")
    _wait_for(fakes.parent / "ready")
    p.send_signal(signal.SIGUSR1)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 1
    assert "scontrol requeue 4242 failed" in err


def test_sbatch_directories_and_refusals(fakes):
    p = _sbatch(fakes, "train", "model=llama_tiny", "run.dir=/data/run7")
    assert p.wait(timeout=30) == 0
    args = (fakes.parent / "torchrun.args").read_text().splitlines()[0]
    assert args.endswith("train model=llama_tiny run.dir=/data/run7")
    p = _sbatch(fakes, "train", "-m", "method=full,galore")
    assert p.wait(timeout=30) == 0
    args = (fakes.parent / "torchrun.args").read_text().splitlines()[0]
    assert args.endswith("train -m method=full,galore hydra.sweep.dir=sweeps/lrp-4242")
    p = _sbatch(fakes, "train", "trainer.resume=never")
    _, err = p.communicate(timeout=30)
    assert p.returncode == 2 and "trainer.resume=never" in err
    p = _sbatch(fakes, "model=llama_tiny")
    _, err = p.communicate(timeout=30)
    assert p.returncode == 2 and "usage" in err


# ---------------------------------------------------------------------------------------------
# torchrun.sh: rendezvous


def _torchrun_cmd(fakes: Path, **env: str) -> subprocess.CompletedProcess:
    e = _env(fakes, LRP_DRY_RUN="1", **env)
    return subprocess.run(["bash", str(TORCHRUN_SH), "train", "model=llama_tiny"], env=e, capture_output=True,
                          text=True, timeout=30)


def test_torchrun_one_node(fakes):
    r = _torchrun_cmd(fakes, NPROC_PER_NODE="2")
    assert r.returncode == 0, r.stderr
    assert "torchrun --nnodes=1 --nproc-per-node=2 --max-restarts=0 --standalone -m lrpretrain.cli.main train " \
           "model=llama_tiny" in r.stderr


def test_torchrun_several_nodes_from_slurm(fakes):
    r = _torchrun_cmd(fakes, SLURM_NNODES="2", SLURM_NODEID="1", SLURM_JOB_NODELIST="node[01-02]",
                      SLURM_GPUS_ON_NODE="8")
    assert r.returncode == 0, r.stderr
    assert "--nnodes=2 --nproc-per-node=8 --max-restarts=0 --node-rank=1 --rdzv-backend=c10d " \
           "--rdzv-endpoint=node01:24242 --rdzv-id=4242" in r.stderr
    assert _scontrol_calls(fakes) == ["show hostnames node[01-02]"]


def test_torchrun_several_nodes_from_env(fakes):
    r = _torchrun_cmd(fakes, SLURM_JOB_ID="", NNODES="3", NODE_RANK="2", MASTER_ADDR="10.0.0.5", MASTER_PORT="29400",
                      NPROC_PER_NODE="4", RDZV_ID="exp1")
    assert r.returncode == 0, r.stderr
    assert "--nnodes=3 --nproc-per-node=4 --max-restarts=0 --node-rank=2 --rdzv-backend=c10d " \
           "--rdzv-endpoint=10.0.0.5:29400 --rdzv-id=exp1" in r.stderr
    r = _torchrun_cmd(fakes, NNODES="2", NPROC_PER_NODE="1")
    assert r.returncode == 2 and "needs MASTER_ADDR" in r.stderr


def test_torchrun_elastic_node_range_and_bad_counts(fakes):
    r = _torchrun_cmd(fakes, SLURM_JOB_ID="", NNODES="2:4", NODE_RANK="0", MASTER_ADDR="10.0.0.5",
                      MASTER_PORT="29400", NPROC_PER_NODE="1")
    assert r.returncode == 0, r.stderr
    assert "--nnodes=2:4 --nproc-per-node=1 --max-restarts=0 --node-rank=0 --rdzv-backend=c10d " \
           "--rdzv-endpoint=10.0.0.5:29400" in r.stderr
    r = _torchrun_cmd(fakes, NNODES="1:1", NPROC_PER_NODE="1")
    assert r.returncode == 0 and "--standalone" in r.stderr, r.stderr
    for bad in ("two", "0", "2:", "2-4"):
        r = _torchrun_cmd(fakes, NNODES=bad, NPROC_PER_NODE="1")
        assert r.returncode == 2, (bad, r.stderr)
        assert r.stderr.strip().splitlines() == [f"torchrun.sh: NNODES={bad} is invalid: a node count N or a range "
                                                 "MIN:MAX (e.g. 2 or 2:4)"], r.stderr


def test_torchrun_first_of_very_many_slurm_hosts(fakes):
    # 100k hosts (1.1 MB) overflow the pipe: `scontrol ... | head -n 1` under pipefail died of SIGPIPE
    # (exit 141, no message) here every time, and by a race with the two-host fake now and then
    r = _torchrun_cmd(fakes, SLURM_NNODES="2", SLURM_NODEID="0", SLURM_JOB_NODELIST="node[000001-100000]",
                      SLURM_GPUS_ON_NODE="8", FAKE_HOSTS="100000")
    assert r.returncode == 0, r.stderr
    assert "--node-rank=0 --rdzv-backend=c10d --rdzv-endpoint=node000001:24242 --rdzv-id=4242" in r.stderr
    assert _scontrol_calls(fakes) == ["show hostnames node[000001-100000]"]


def test_torchrun_failing_scontrol_is_a_clear_error(fakes):
    r = _torchrun_cmd(fakes, SLURM_NNODES="2", SLURM_NODEID="1", SLURM_JOB_NODELIST="node[01-02]",
                      SLURM_GPUS_ON_NODE="8", FAKE_HOSTNAMES_FAIL="1")
    assert r.returncode == 1
    ours = [line for line in r.stderr.splitlines() if line.startswith("torchrun.sh:")]
    assert ours == ["torchrun.sh: 'scontrol show hostnames node[01-02]' failed; cannot find the master host "
                    "(set MASTER_ADDR)"], r.stderr  # one line, and no torchrun command
    assert "scontrol: error: Invalid node name specified" in r.stderr  # scontrol's own reason, passed on
    r = _torchrun_cmd(fakes, SLURM_NNODES="2", SLURM_JOB_NODELIST="node[01-02]", FAKE_HOSTS="0")  # lists no host
    assert r.returncode == 2 and "needs MASTER_ADDR" in r.stderr


def test_torchrun_counts_gpus_with_nvidia_smi(fakes):
    r = _torchrun_cmd(fakes, FAKE_GPUS="3")
    assert r.returncode == 0, r.stderr
    assert "--nnodes=1 --nproc-per-node=3 " in r.stderr
    r = _torchrun_cmd(fakes)  # nvidia-smi finds no GPU (and fails): one process
    assert r.returncode == 0, r.stderr
    assert "--nnodes=1 --nproc-per-node=1 " in r.stderr


# ---------------------------------------------------------------------------------------------
# End to end: real torchrun, real trainer, SIGUSR1 through the batch shell, requeue, exact resume


@pytest.mark.slow
def test_preempted_slurm_job_checkpoints_requeues_and_resumes_exactly(cli, fakes, tmp_path):
    (fakes / "torchrun").unlink()  # the real one (next to sys.executable, on PATH)
    args = [*TINY, "trainer.max_steps=24", "trainer.batch_size=8", "trainer.micro_batch_size=4",
            "trainer.ckpt_every=0", "trainer.threads=1"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    threads = torch.get_num_threads()
    try:
        assert cli("train", *args, f"run.dir={ref}").code == 0
    finally:
        torch.set_num_threads(threads)

    p = _sbatch(fakes, "train", *args, f"run.dir={run}")
    metrics = run / "metrics.jsonl"
    end = time.monotonic() + 120
    while not (metrics.exists() and any(r.get("step", 0) >= 2 for r in read_metrics(run))):
        assert p.poll() is None and time.monotonic() < end, p.communicate()[1][-3000:]
        time.sleep(0.02)
    p.send_signal(signal.SIGUSR1)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-3000:]
    assert _scontrol_calls(fakes) == ["requeue 4242"]
    stopped = int((run / "checkpoints" / "latest").read_text().strip().removeprefix("step_"))
    assert 2 <= stopped < 24 and f"stopped by SIGUSR1 at step {stopped}" in err

    p = _sbatch(fakes, "train", *args, f"run.dir={run}", SLURM_RESTART_COUNT="1")  # the requeued job
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-3000:]
    assert f"resumed from {run / 'checkpoints' / f'step_{stopped}'}" in err
    assert _scontrol_calls(fakes) == ["requeue 4242"]  # no second requeue
    assert losses(run) == losses(ref)  # bit for bit
