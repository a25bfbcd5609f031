"""DDP and FSDP2 with 2 gloo processes on the CPU (torchrun), against single-process runs.

Starting torchrun costs more than a llama_tiny run, so the runs are grouped: one launch runs most
jobs in a row (tests/dist_worker.py), three more cover a SIGKILL, its resume and a resume on one
process. Every comparison is with the same global batch (distributed.data=global: the ranks split
each update's rows), so losses must agree with one process up to float summation order.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dist_worker  # noqa: F401  (registers method=test_kill, which the FSDP2 runs use)
from conftest import TINY, losses

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
COMMON = [*TINY, "trainer.threads=1", "trainer.max_steps=4", "trainer.ckpt_every=2", "logging.progress=none"]
GALORE = ["method=galore", "method.rank=8", "method.update_proj_gap=2"]
CRNET = ["method=crnet", "method.rank=8"]
LR_QAT = ["method=lr_qat", "method.rank=8", "optim.lr=0.01"]
RELORA = ["method=relora", "method.rank=8", "method.lora_dropout=0", "method.merge_every=2",
          "method.restart_warmup_steps=0"]
LORO = ["method=loro", "method.rank=8", "method.exact_every=2", "method.restart_warmup_steps=1"]  # exact at 2, 4
LOST = ["method=lost", "method.rank=8", "method.sparsity=0.1"]  # its SVD surgery runs on the meta device
GRADNORM = ["method=gradnorm_lorp", "method.rank=8", "method.update_proj_gap=2"]
PER_LAYER = ["trainer.per_layer_update=true"]
PURE = ["trainer.precision=pure_bf16"]
TOL = 2e-5  # losses of ~9: float summation order only


def torchrun(tmp: Path, jobs: list[dict], nproc: int = 2, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           str(HERE / "dist_worker.py"), str(tmp / "jobs.json"), str(tmp)],
                          env=full_env, capture_output=True, text=True, timeout=600)


def results(tmp: Path, rank: int) -> dict:
    return json.loads((tmp / f"rank{rank}.json").read_text())


def close(a: dict[int, float], b: dict[int, float], tol: float = TOL) -> bool:
    return sorted(a) == sorted(b) and all(abs(a[k] - b[k]) <= tol for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus) -> Path:
    """One launch: DDP/FSDP2 x (full, per-layer), GaLore, ReLoRA, CR-Net, LOST and GradNormLoRP under FSDP2
    (GradNormLoRP under DDP too), init check, refusals, a pre-emption signal seen by one rank."""
    root = tmp_path_factory.mktemp("dist")

    def job(name: str, *args: str, run: str | None = None) -> dict:
        return {"name": name, "args": [*COMMON, f"run.dir={root / (run or name)}", *args]}

    jobs = [
        {"name": "init_fsdp2", "init": ["model=llama_tiny", "trainer.micro_batch_size=2", "distributed=fsdp2", "method=lowrank", "method.rank=8"]},
        {"name": "init_fsdp2_full", "init": ["model=llama_tiny", "trainer.micro_batch_size=2", "distributed=fsdp2"]},
        {"name": "init_fsdp2_lr_qat", "init": ["model=llama_tiny", "trainer.micro_batch_size=2", "distributed=fsdp2",
                                              *LR_QAT]},
        job("ddp", "distributed=ddp"),
        job("ddp_pl", "distributed=ddp", *PER_LAYER),
        job("fsdp2", "distributed=fsdp2", "method=test_kill"),
        job("fsdp2_pl", "distributed=fsdp2", "method=test_kill", *PER_LAYER),
        job("fsdp2_galore", "distributed=fsdp2", *GALORE),
        job("fsdp2_galore_pl", "distributed=fsdp2", *GALORE, *PER_LAYER),
        job("fsdp2_relora", "distributed=fsdp2", *RELORA),
        # rank 0 refuses the existing run directory: every rank must stop with its line, no hang
        job("refused_rundir", "distributed=ddp", "trainer.resume=never", run="ddp"),
        job("refused_method", "distributed=fsdp2", "method=crnet", "method.rank=8", "trainer.recompute=method"),
        job("fsdp2_crnet", "distributed=fsdp2", *CRNET),
        job("ddp_loro", "distributed=ddp", *LORO),
        job("ddp_loro_pl", "distributed=ddp", *LORO, *PER_LAYER),
        job("ddp_loro_pure_pl", "distributed=ddp", *LORO, *PURE, *PER_LAYER),
        # pure bf16: bf16 parameters sharded as they are (no mixed-precision policy), stochastic rounding of
        # each shard's update (bits by position: as one process rounds), per-layer updates, DDP
        job("fsdp2_pure", "distributed=fsdp2", *PURE),
        job("fsdp2_pure_pl", "distributed=fsdp2", *PURE, *PER_LAYER),
        job("ddp_pure", "distributed=ddp", *PURE, "trainer.bf16_update=kahan"),
        job("fsdp2_lost", "distributed=fsdp2", *LOST),
        job("fsdp2_gradnorm", "distributed=fsdp2", *GRADNORM),
        job("ddp_gradnorm", "distributed=ddp", *GRADNORM),
        # LR-QAT: int8 codes (replicated buffers) beside sharded factors and scales; per-layer updates
        job("fsdp2_lr_qat_pl", "distributed=fsdp2", *LR_QAT, *PER_LAYER),
        job("ddp_lr_qat", "distributed=ddp", *LR_QAT),
        {**job("signal", "distributed=fsdp2", "method=test_kill"),
         "env": {"LRP_TEST_SIGNAL_AT": "3", "LRP_TEST_SIGNAL_RANK": "1"}},
    ]
    proc = torchrun(root / "launch", jobs)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


@pytest.fixture(scope="module")
def single(tmp_path_factory, corpus) -> Path:
    """The single-process references (in this process)."""
    from lrpretrain.cli.main import main

    root = tmp_path_factory.mktemp("single")
    for name, args in {"full": [], "galore": GALORE, "relora": RELORA, "crnet": CRNET, "loro": LORO,
                       "loro_pure": [*LORO, *PURE], "lost": LOST, "gradnorm": GRADNORM, "pure": PURE, "lr_qat": LR_QAT,
                       "pure_kahan": [*PURE, "trainer.bf16_update=kahan"]}.items():
        assert main(["train", *COMMON, f"run.dir={root / name}", *args]) == 0
    return root


def test_fsdp2_initial_weights_equal_single_process(runs):
    r = results(runs / "launch", 0)
    assert r["init_fsdp2"]["init_max_diff"] == 0.0  # lowrank: surgery + factor init on the meta device
    assert r["init_fsdp2_full"]["init_max_diff"] == 0.0


def test_ddp_and_fsdp2_losses_equal_single_process(runs, single):
    ref = losses(single / "full")
    assert len(ref) == 4
    assert close(losses(runs / "ddp"), ref)
    assert close(losses(runs / "fsdp2"), ref)


def test_per_layer_updates_equal_the_global_step_under_ddp_and_fsdp2(runs):
    assert close(losses(runs / "ddp_pl"), losses(runs / "ddp"), 1e-6)
    assert close(losses(runs / "fsdp2_pl"), losses(runs / "fsdp2"), 1e-6)
    gn = {r["step"]: r["grad_norm"] for r in _metrics(runs / "fsdp2_pl") if "grad_norm" in r}
    gn_ref = {r["step"]: r["grad_norm"] for r in _metrics(runs / "fsdp2") if "grad_norm" in r}
    assert close(gn, gn_ref, 1e-5)


def test_galore_under_fsdp2_projects_the_full_gradient(runs, single):
    """Equal to one process (a per-shard projection would differ), also with per-layer updates."""
    ref = losses(single / "galore")
    assert close(losses(runs / "fsdp2_galore"), ref)
    assert close(losses(runs / "fsdp2_galore_pl"), losses(runs / "fsdp2_galore"), 1e-6)


def test_relora_merges_under_fsdp2(runs, single):
    """Merge + re-init of the factors + magnitude reset of the moments at step 2, on sharded parameters."""
    assert close(losses(runs / "fsdp2_relora"), losses(single / "relora"))


def test_crnet_under_fsdp2(runs, single):
    """CR-Net's cross-layer carries pass between sharded blocks; its 1-element gates β are sharded too."""
    assert close(losses(runs / "fsdp2_crnet"), losses(single / "crnet"))


def test_loro_under_ddp(runs, single):
    """Identical replicas take identical exact Riemannian steps; per-layer updates pair the factors after
    each gradient's all-reduce."""
    assert close(losses(runs / "ddp_loro"), losses(single / "loro"))
    assert close(losses(runs / "ddp_loro_pl"), losses(runs / "ddp_loro"), 1e-6)
    # pure bf16: each factor rounded once per update by its own key on every replica (bf16 gradient sums
    # differ from one process's in order only: the pure-bf16 tolerance)
    assert close(losses(runs / "ddp_loro_pure_pl"), losses(single / "loro_pure"), 2e-3)


def test_lr_qat_under_fsdp2_and_ddp(runs, single):
    """The int8 codes equal one process's after FSDP2's meta-device build (rank 0's broadcast buffers);
    losses follow one process under FSDP2 with per-layer updates and under DDP."""
    assert results(runs / "launch", 0)["init_fsdp2_lr_qat"]["init_max_diff"] == 0.0
    ref = losses(single / "lr_qat")
    assert close(losses(runs / "fsdp2_lr_qat_pl"), ref)
    assert close(losses(runs / "ddp_lr_qat"), ref)


def test_pure_bf16_under_fsdp2_and_ddp(runs, single):
    """bf16 weights: the sharded runs follow one process's (their fp32 gradient sums differ in order only,
    so a stochastic rounding decision differs now and then: a looser tolerance than fp32's); per-layer
    updates equal the global step under FSDP2; the checkpoints hold bf16 weights."""
    ref = losses(single / "pure")
    assert len(ref) == 4 and losses(runs / "fsdp2_pure")[1] == pytest.approx(ref[1], abs=TOL)
    assert close(losses(runs / "fsdp2_pure"), ref, 2e-3)
    assert close(losses(runs / "fsdp2_pure_pl"), losses(runs / "fsdp2_pure"), 1e-6)
    assert close(losses(runs / "ddp_pure"), losses(single / "pure_kahan"), 2e-3)
    weights = load_file(str(runs / "ddp_pure" / "checkpoints" / "step_4" / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}


def test_lost_and_gradnorm_lorp_under_ddp_and_fsdp2(runs, single):
    """LOST's SVD split and channel buffers built on the meta device and filled from rank 0; GradNormLoRP's
    weight-normalised directions projected whole under FSDP2 (magnitudes sharded), and under DDP."""
    assert close(losses(runs / "fsdp2_lost"), losses(single / "lost"))
    assert close(losses(runs / "fsdp2_gradnorm"), losses(single / "gradnorm"))
    assert close(losses(runs / "ddp_gradnorm"), losses(single / "gradnorm"))


def test_fsdp2_checkpoints_are_sharded_dcp(runs):
    ckpt = runs / "fsdp2" / "checkpoints" / "step_4"
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["model"] == "dcp" and not (ckpt / "model.safetensors").exists()
    assert (ckpt / "dcp" / ".metadata").exists()
    assert sum(1 for f in meta["files"] if f.startswith("dcp/") and f.endswith(".distcp")) == 2  # one per rank


def test_generate_reads_a_sharded_checkpoint(runs, cli):
    r = cli("generate", f"run.dir={runs / 'fsdp2'}", "prompt=To be", "max_new_tokens=4")
    assert r.code == 0, r.err
    assert r.out.startswith("To be")


def test_export_reads_a_sharded_checkpoint(runs, cli, tmp_path):
    """FSDP2's dcp/ checkpoint exports as one transformers model computing what the run's model computes."""
    transformers = pytest.importorskip("transformers")
    import torch

    from lrpretrain.train.trained import load_trained

    r = cli("export", f"run.dir={runs / 'fsdp2'}", f"out={tmp_path / 'hf'}")
    assert r.code == 0, r.err
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32, local_files_only=True)
    ours = load_trained(runs / "fsdp2").model
    ids = torch.randint(0, 8192, (1, 32))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max().item() <= 1e-5


def test_refusals_reach_every_rank(runs):
    for rank in (0, 1):
        r = results(runs / "launch", rank)
        assert r["refused_rundir"]["code"] == 2
        assert r["refused_rundir"]["errors"] == [
            f"lrpretrain: error: run.dir {runs / 'ddp'} already holds a run and trainer.resume=never; use "
            "trainer.resume=auto to continue it, another run.dir, or run.overwrite=true to replace it"]
        assert r["refused_method"]["code"] == 2
        assert r["refused_method"]["errors"][0].startswith(
            "lrpretrain: error: method=crnet is not supported with distributed.strategy=fsdp2: its recomputation")


def test_fsdp2_sigkill_then_exact_resume(runs, tmp_path):
    """Rank 1 is SIGKILLed after update 3 (last checkpoint: step 2); the relaunch resumes from step 2
    and every loss equals the uninterrupted run's."""
    run = tmp_path / "run"
    jobs = [{"name": "run", "args": [*COMMON, f"run.dir={run}", "distributed=fsdp2", "method=test_kill"]}]
    killed = torchrun(tmp_path / "a", jobs, env={"LRP_TEST_KILL_AT": "3", "LRP_TEST_KILL_RANK": "1"})
    assert killed.returncode != 0
    assert "Signals.SIGKILL" in killed.stderr or "SIGKILL" in killed.stderr, killed.stderr[-2000:]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_2"
    resumed = torchrun(tmp_path / "b", jobs)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert results(tmp_path / "b", 0)["run"]["code"] == 0
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_4"
    assert losses(run) == losses(runs / "fsdp2")  # bit for bit: same world size, same shards


def test_a_signal_on_one_rank_stops_every_rank_at_the_same_update(runs):
    """SIGUSR1 reaches rank 1 only, after update 3: both ranks checkpoint step 3 and exit cleanly."""
    assert [results(runs / "launch", r)["signal"]["code"] for r in (0, 1)] == [0, 0]
    assert (runs / "signal" / "checkpoints" / "latest").read_text().strip() == "step_3"
    assert max(losses(runs / "signal")) == 3


def test_resume_on_another_world_size(runs, tmp_path):
    """2 -> 1 process. FSDP2: DCP reshards model and optimizer; DDP: full states. With
    distributed.data=global the data position is global and needs no change."""
    jobs = []
    for name, args in {"fsdp2": ["distributed=fsdp2", "method=test_kill"], "ddp": ["distributed=ddp"]}.items():
        src = runs / name / "checkpoints" / "step_2"
        jobs.append({"name": name, "args": [*COMMON, f"run.dir={tmp_path / name}", *args, f"trainer.resume={src}"]})
    proc = torchrun(tmp_path / "a", jobs, nproc=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("fsdp2", "ddp"):
        ref, got = losses(runs / name), losses(tmp_path / name)
        assert sorted(got) == [3, 4]
        assert close(got, {k: ref[k] for k in (3, 4)})


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
