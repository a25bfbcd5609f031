"""DeepSpeed (distributed.strategy=deepspeed): refusals at config time, and real 2-process runs on the
CPU (gloo) for ZeRO-1/2/3: losses equal the single-process ones for the same global batch, resume
is exact (also after a crash in the middle of a save), the deepspeed launcher works.

All multi-process runs come from two launches (``_launches``, module-scoped): the deepspeed launcher
for a run killed while saving, then one torchrun of ``deepspeed_worker.py`` that trains every other
job in one process group, so DeepSpeed's import and start-up are paid twice, not per run.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_errors import one_line

from lrpretrain.cli.main import strip_local_rank
from lrpretrain.train import load_config

import lrp_test_plugins  # noqa: F401  (registers test_nan_forward)
from conftest import REPO, TINY, USER_CACHE, losses, read_metrics

BASE = [*TINY, "trainer.threads=1"]  # two processes on two cores
DS = [*BASE, "distributed=deepspeed"]


# -- config time: one line, nothing built -------------------------------------------------------------

REFUSED = [
    (["method=relora"], "method 'relora' cannot run under distributed=deepspeed: its after_step rewrites"),
    (["method=periodic_lora"], "method 'periodic_lora' cannot run under distributed=deepspeed: its after_step"),
    (["method=sst", "method.rank=8"], "method 'sst' cannot run under distributed=deepspeed: its after_step"),
    (["method=switchlora", "method.rank=8"], "method 'switchlora' cannot run under distributed=deepspeed: its optimizer"),
    (["method=galore", "method.rank=8"], "method 'galore' cannot run under distributed=deepspeed: its optimizer needs"),
    (["method=fira", "method.rank=8"], "method 'fira' cannot run under distributed=deepspeed: its optimizer needs"),
    (["method=loro", "method.rank=8"], "method 'loro' cannot run under distributed=deepspeed: its optimizer needs"),
    (["method=dlrt", "method.rank=8"], "method 'dlrt' cannot run under distributed=deepspeed: its optimizer needs"),
    (["method=gradnorm_lorp", "method.rank=8"],
     "method 'gradnorm_lorp' cannot run under distributed=deepspeed: its optimizer needs"),
    (["optim.state_bits=8"], "optim.state_bits=8 cannot run under distributed=deepspeed"),
    (["trainer.compile=true"], "trainer.compile=true is not supported with distributed=deepspeed"),
    (["distributed.zero_stage=0"], "distributed.zero_stage=0 is plain data parallelism"),
    (["distributed.zero_stage=4"], "distributed.zero_stage=4 is invalid"),
    (["trainer.per_layer_update=true"], "trainer.per_layer_update=true is not supported by distributed.strategy=deepspeed"),
    (["method=crnet", "method.rank=8", "distributed.zero_stage=3", "trainer.recompute=method"],
     "method 'crnet' cannot run under distributed=deepspeed: its recomputation (trainer.recompute=method)"),
]


@pytest.mark.parametrize("extra,message", REFUSED, ids=[" ".join(e) for e, _ in REFUSED])
def test_refused_combinations_fail_at_config_time_with_one_line(cli, tmp_path, extra, message):
    run = tmp_path / "run"
    r = cli("train", *DS, *extra, f"run.dir={run}")
    one_line(r, message)
    assert not run.exists()


@pytest.mark.parametrize("method", ["full", "lowrank", "lora", "sltrain", "lost", "cola", "cola_m", "crnet", "lr_qat"])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_methods_without_periodic_edits_are_accepted(method, stage):
    cfg, _ = load_config([*DS, f"method={method}", f"distributed.zero_stage={stage}"], world_size=2)
    assert cfg.distributed.strategy == "deepspeed"


def test_generated_deepspeed_config():
    from lrpretrain.distributed.deepspeed import deepspeed_config

    cfg, _ = load_config([*DS, "trainer.batch_size=16", "trainer.micro_batch_size=2", "optim.grad_clip=0.5",
                          "distributed.zero_stage=3", "trainer.precision=bf16"], world_size=2)
    c = deepspeed_config(cfg, 2)
    assert (c["train_batch_size"], c["train_micro_batch_size_per_gpu"], c["gradient_accumulation_steps"]) == (16, 2, 4)
    assert c["gradient_clipping"] == 0.5 and c["zero_optimization"]["stage"] == 3
    assert c["bf16"]["enabled"] and not c["fp16"]["enabled"]
    assert "optimizer" not in c and "scheduler" not in c  # ours, not DeepSpeed's


def test_the_cli_drops_the_launchers_local_rank(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")  # recorded, so that the teardown restores the environment as it was
    monkeypatch.delenv("LOCAL_RANK")  # (a delenv of an unset variable records nothing: LOCAL_RANK=1 leaked into
    # the later tests, and lm-eval's accelerate then tried to start torch.distributed)
    assert strip_local_rank(["--local_rank=1", "train", "a=1"]) == ["train", "a=1"]
    assert os.environ["LOCAL_RANK"] == "1"
    assert strip_local_rank(["train", "--local-rank", "3", "a=1"]) == ["train", "a=1"]


# -- two processes --------------------------------------------------------------------------------------

STAGES = (1, 2, 3)
# Reparameterizations and architectures under ZeRO, compared with single-process runs (dropout off:
# the ranks draw their dropout masks from their own RNG streams).
METHODS = {"lowrank": (1, ["method.rank=16", "method.lora_dropout=0"]),
           "sltrain": (3, ["method.rank=16"]),
           "lost": (3, ["method.rank=16", "method.sparsity=0.1"]),  # its int64 channel buffer beside partitions
           "cola_m": (3, ["method.rank=16", "trainer.recompute=method"]),  # its recomputation under ZeRO-3
           "crnet": (3, ["method.rank=16"]),  # its 1-element gates β partitioned too
           "lr_qat": (3, ["method.rank=16"])}  # int8 codes (buffers) beside partitioned factors; the scales' own LR group
LORA_RESUME = ["method=lora", "method.rank=16", "distributed.zero_stage=3"]  # dropout on: per-rank RNGs resume


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    # DeepSpeed JIT-builds its CPU comm op on first use (~40 s): keep it in a cache that outlives the session
    cache = os.environ.get("TORCH_EXTENSIONS_DIR") or str(USER_CACHE / "torch_extensions")
    return {**os.environ, "TORCH_EXTENSIONS_DIR": cache, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


@pytest.fixture(scope="module")
def launches(tmp_path_factory, corpus):
    root = tmp_path_factory.mktemp("ds")
    runs = {}

    # 1. the deepspeed launcher (launch/deepspeed.sh), rank 0 killed while saving step 4, after step 2 was saved
    crashed = root / "crashed"
    env = {**_env(), "NPROC": "2", "MASTER_PORT": str(_free_port()), "LRPRETRAIN_FAULT_KILL_IN_SAVE": "4"}
    crash_args = [*BASE, "distributed.zero_stage=2", "trainer.max_steps=4", "trainer.ckpt_every=2", f"run.dir={crashed}"]
    proc = subprocess.run(["bash", str(REPO / "launch" / "deepspeed.sh"), *crash_args],  # adds distributed=deepspeed
                          env=env, capture_output=True, text=True, timeout=300)
    runs["crash"] = (proc, crashed)

    # 2. everything else in one torchrun launch of deepspeed_worker.py
    jobs: list[list[str]] = []

    def job(name: str, *args: str) -> Path:
        run = root / name
        jobs.append(["train", *DS, *args, f"run.dir={run}"])
        return run

    for s in STAGES:
        runs[f"z{s}"] = job(f"z{s}", f"distributed.zero_stage={s}", "trainer.max_steps=4")
        runs[f"z{s}_resumed"] = job(f"z{s}_resumed", f"distributed.zero_stage={s}", "trainer.max_steps=2")
        job(f"z{s}_resumed", f"distributed.zero_stage={s}", "trainer.max_steps=4")
    jobs.append(["train", "distributed=deepspeed", *crash_args])  # the same command again: trainer.resume=auto
    runs["lora"] = job("lora", *LORA_RESUME, "trainer.max_steps=4")
    runs["lora_resumed"] = job("lora_resumed", *LORA_RESUME, "trainer.max_steps=2")
    job("lora_resumed", *LORA_RESUME, "trainer.max_steps=4")
    for m, (s, args) in METHODS.items():
        runs[m] = job(m, f"method={m}", *args, f"distributed.zero_stage={s}", "trainer.max_steps=3")
    runs["nan"] = job("nan", "method=test_nan_forward", "method.nan_at=[2]", "distributed.zero_stage=2",
                      "trainer.max_steps=3")
    runs["accum"] = job("accum", "distributed.zero_stage=2", "trainer.batch_size=8", "trainer.max_steps=3")
    runs["recompute"] = job("recompute", "distributed.zero_stage=3", "trainer.recompute=full", "trainer.max_steps=3")
    runs["bf16"] = job("bf16", "distributed.zero_stage=2", "trainer.precision=bf16", "trainer.max_steps=2")
    jobs_file = root / "jobs.json"
    jobs_file.write_text(json.dumps(jobs))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={_free_port()}", str(REPO / "tests" / "deepspeed_worker.py"),
                           str(jobs_file)], env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    results = [json.loads(Path(f"{jobs_file}.rank{r}.json").read_text()) for r in (0, 1)]
    for res in results:
        failed = [(j["args"][-1], j["errors"]) for j in res if j["code"] != 0]
        assert not failed, failed
    runs["logs"] = {j["args"][-1].removeprefix("run.dir="): j["log"] for j in results[0]}  # the last of each run dir
    runs["results"] = {j["args"][-1].removeprefix("run.dir="): j for j in results[0]}
    return runs


def _weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step_{step}" / "model.safetensors"))


def _same_weights(a: Path, b: Path, step: int) -> bool:
    wa, wb = _weights(a, step), _weights(b, step)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def single(tmp_path_factory, launches):
    """Single-process references for the same global batch (in process)."""
    from lrpretrain.cli.main import main

    root = tmp_path_factory.mktemp("single")
    out = {}
    runs = {"full": ["trainer.max_steps=4"], "nan": ["method=test_nan_forward", "method.nan_at=[2]", "trainer.max_steps=3"],
            "accum": ["trainer.batch_size=8", "trainer.max_steps=3"]}
    runs.update({m: [f"method={m}", *args, "trainer.max_steps=3"] for m, (_, args) in METHODS.items()})
    for name, args in runs.items():
        assert main(["train", *TINY, *args, f"run.dir={root / name}"]) == 0
        out[name] = root / name
    return out


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_zero_trains_like_one_process_and_resumes_exactly(launches, single, stage):
    ref, run, resumed = losses(single["full"]), losses(launches[f"z{stage}"]), losses(launches[f"z{stage}_resumed"])
    assert sorted(run) == [1, 2, 3, 4]
    assert run[4] < run[1] - 0.2  # it learns
    for k in ref:  # same global batch: equal up to float summation order
        assert run[k] == pytest.approx(ref[k], rel=1e-5, abs=1e-6)
    assert resumed == run  # train 2, stop, resume to 4 == 4 uninterrupted: every loss, bit for bit
    assert _same_weights(launches[f"z{stage}"], launches[f"z{stage}_resumed"], 4)
    files = {str(p.relative_to(launches[f"z{stage}"])) for p in launches[f"z{stage}"].rglob("*") if p.is_file()}
    assert {"checkpoints/step_4/engine/" + ("zero_pp_rank_1_mp_rank_00_optim_states.pt")} <= files
    assert {f"checkpoints/step_4/{f}" for f in ("model.safetensors", "train_state.pt", "rank_0.pt", "rank_1.pt",
                                               "config.yaml", "meta.json")} <= files


@pytest.mark.slow
def test_gradient_accumulation_matches_one_process(launches, single):
    """2 micro-batches per rank and update (the engine's micro-step counter, ZeRO-2's per-micro-batch
    reduction) == one process accumulating 4 micro-batches of the same global batch."""
    ref, run = losses(single["accum"]), losses(launches["accum"])
    assert sorted(run) == [1, 2, 3]
    assert all(run[k] == pytest.approx(ref[k], rel=1e-5, abs=1e-6) for k in run)
    assert "8 seq/update = 2 x 2 x 2" in launches["logs"][str(launches["accum"])]


@pytest.mark.slow
def test_reparameterizations_run_under_zero(launches, single):
    for m, (stage, _) in METHODS.items():
        ref, run = losses(single[m]), losses(launches[m])
        assert sorted(run) == [1, 2, 3], m
        for k in ref:
            assert run[k] == pytest.approx(ref[k], rel=1e-5, abs=1e-6), (m, stage, k)
    # ZeRO-3 leaves the module's parameters empty: the run line counts them before wrapping
    assert "(2.49M params, 2.49M trainable)" in launches["logs"][str(launches["z3"])]
    # activation recomputation under ZeRO-3 (parameters gathered again for the recomputed forward)
    ref, run = losses(single["full"]), losses(launches["recompute"])
    assert sorted(run) == [1, 2, 3] and all(run[k] == pytest.approx(ref[k], rel=1e-5) for k in run)
    # LoRA with dropout under ZeRO-3 (frozen W0 partitioned too): exact resume includes each rank's RNG
    assert losses(launches["lora_resumed"]) == losses(launches["lora"])
    assert _same_weights(launches["lora"], launches["lora_resumed"], 4)


@pytest.mark.slow
def test_a_non_finite_update_is_skipped_as_in_one_process(launches, single):
    """NaN logits at update 2: the engine sees a non-finite gradient norm and skips the update (no
    parameter or optimizer state changes), so update 3 matches the single-process run that skipped too."""
    ds, ref = read_metrics(launches["nan"]), read_metrics(single["nan"])
    skipped = [r["step"] for r in ds if r.get("skipped")]
    assert skipped == [2] == [r["step"] for r in ref if r.get("skipped")]
    assert losses(launches["nan"])[3] == pytest.approx(losses(single["nan"])[3], rel=1e-5)


@pytest.mark.slow
def test_bf16_trains_close_to_fp32(launches):
    bf16, fp32 = losses(launches["bf16"]), losses(launches["z2"])
    assert sorted(bf16) == [1, 2]
    assert bf16[1] == pytest.approx(fp32[1], abs=0.05)
    meta = json.loads((launches["bf16"] / "checkpoints/step_2/meta.json").read_text())
    assert meta["engine"] == "deepspeed" and meta["world_size"] == 2
    assert all(v.dtype == torch.float32 for v in _weights(launches["bf16"], 2).values())  # the fp32 masters


@pytest.mark.slow
def test_deepspeed_launcher_crash_mid_save_resumes_from_the_last_good_checkpoint(launches):
    proc, run = launches["crash"]
    assert proc.returncode != 0  # rank 0 was killed inside the save of step 4
    log = proc.stdout + proc.stderr
    assert "--local_rank=0" in log  # the launcher's argument reached the CLI, which accepted it
    assert "checkpoint saved" in log and "step_2" in log
    # the second start (in the worker launch) found step_2, dropped the partial step_4 and went on exactly
    assert f"resumed from {run / 'checkpoints' / 'step_2'} (step 2," in launches["logs"][str(run)]
    assert losses(run) == losses(launches["z2"])
    assert _same_weights(run, launches["z2"], 4)
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp")]
