"""End-to-end runs through the real CLI (in process): training, exact resume, hooks, guards, run dirs."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

import lrpretrain.methods as methods
from lrpretrain.train import load_config

import lrp_test_plugins  # noqa: F401  (registers test_recorder and test_fault)
from conftest import TINY, losses, read_metrics
from lrp_test_plugins import Recorder


def test_end_to_end_run_learns_and_writes_the_run_dir(cli, tmp_path):
    run = tmp_path / "run"
    r = cli("train", *TINY, f"run.dir={run}", "trainer.max_steps=30", "trainer.eval_every=15",
            "trainer.eval_at_start=true", "trainer.ckpt_every=10", "trainer.keep_last=2", "optim.lr=0.003")
    assert r.code == 0, r.err
    recs = read_metrics(run)
    train = [x for x in recs if "loss" in x]
    assert [x["step"] for x in train] == list(range(1, 31))
    for x in train:
        assert {"step", "loss", "lr", "tokens", "grad_norm", "tokens_per_s"} <= set(x)
    assert train[-1]["tokens"] == 30 * 4 * 64
    evals = [x for x in recs if "val_loss" in x]
    assert [x["step"] for x in evals] == [0, 15, 30]
    assert all(math.isclose(x["val_ppl"], math.exp(x["val_loss"])) for x in evals)
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0  # it learns
    assert sum(x["loss"] for x in train[-5:]) < sum(x["loss"] for x in train[:5]) - 5.0
    assert (run / "config.yaml").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_20", "step_30"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_30"
    state = torch.load(run / "checkpoints/step_30/train_state.pt", weights_only=True)
    assert state["step"] == 30 and set(state) >= {"optimizer", "data", "rng", "method", "tokens", "schedule"}
    assert "eval step 30 | val_loss" in r.err and "tok/s" in r.err


def test_lr_schedule_counts_updates_not_micro_batches(cli, tmp_path):
    run = tmp_path / "run"
    r = cli("train", *TINY, f"run.dir={run}", "trainer.max_steps=10", "trainer.batch_size=8",
            "trainer.micro_batch_size=2", "optim.warmup_steps=4", "optim.lr=0.01", "optim.min_lr_ratio=0.1")
    assert r.code == 0, r.err
    lrs = [x["lr"] for x in read_metrics(run) if "loss" in x]
    assert lrs[:5] == pytest.approx([0.0, 0.0025, 0.005, 0.0075, 0.01])
    assert lrs[-1] == pytest.approx(0.001 + 0.009 * 0.5 * (1 + math.cos(math.pi * 5 / 6)))


def test_gradient_accumulation_matches_one_big_batch(cli, tmp_path):
    """The loss is normalised by the update's target tokens: splitting the batch changes nothing
    but float summation order."""
    a, b = tmp_path / "a", tmp_path / "b"
    args = [*TINY, "trainer.max_steps=4", "trainer.batch_size=4", "data.mode=truncate"]
    assert cli("train", *args, f"run.dir={a}", "trainer.micro_batch_size=4").code == 0
    assert cli("train", *args, f"run.dir={b}", "trainer.micro_batch_size=1").code == 0
    la, lb = losses(a), losses(b)
    assert la.keys() == lb.keys()
    assert all(math.isclose(la[k], lb[k], rel_tol=1e-5) for k in la)


def _stop_at(cli, run: Path, n: int, total: int, extra=()):
    r = cli("train", *TINY, f"run.dir={run}", f"trainer.max_steps={total}", "method=test_fault",
            f"method.signal_at={n}", "trainer.ckpt_every=100", "trainer.eval_every=3", *extra)
    assert r.code == 0, r.err
    assert f"stopped by SIGUSR1 at step {n}" in r.err
    return r


@pytest.mark.parametrize("mode", ["pack", "truncate"])
def test_preempted_run_resumes_bit_for_bit(cli, tmp_path, mode):
    """SIGUSR1 after update 5 -> checkpoint -> resume=auto -> the same losses as one run of 10."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    common = [f"data.mode={mode}", "trainer.batch_size=4", "trainer.micro_batch_size=2"]
    assert cli("train", *TINY, *common, f"run.dir={ref}", "trainer.max_steps=10", "method=test_fault",
               "trainer.ckpt_every=100", "trainer.eval_every=3").code == 0
    _stop_at(cli, run, 5, 10, common)
    assert sorted(losses(run)) == [1, 2, 3, 4, 5]
    r = cli("train", *TINY, *common, f"run.dir={run}", "trainer.max_steps=10", "method=test_fault",
            "method.signal_at=5", "trainer.ckpt_every=100", "trainer.eval_every=3")
    assert r.code == 0, r.err
    assert "resumed from" in r.err
    assert losses(run) == losses(ref)  # bit for bit
    vals = lambda d: [(x["step"], x["val_loss"]) for x in read_metrics(d) if "val_loss" in x]  # noqa: E731
    assert vals(run) == vals(ref)
    assert [x["tokens"] for x in read_metrics(run)] == [x["tokens"] for x in read_metrics(ref)]


def test_plugin_hooks_fire(cli, tmp_path):
    Recorder.calls.clear()
    run = tmp_path / "run"
    r = cli("train", *TINY, f"run.dir={run}", "method=test_recorder", "method.factor=0.5", "trainer.max_steps=4",
            "trainer.ckpt_every=2", "optim.warmup_steps=0", "optim.schedule=constant", "optim.lr=0.002")
    assert r.code == 0, r.err
    calls = Recorder.calls
    assert calls[:3] == ["prepare_model", "param_groups", "build_optimizer"]
    assert [c for c in calls if isinstance(c, tuple) and c[0] == "lr_factor"] == [("lr_factor", s) for s in range(4)]
    assert [c for c in calls if isinstance(c, tuple) and c[0] == "after_step"] == [("after_step", s) for s in range(1, 5)]
    assert calls.count("state_dict") == 2  # checkpoints at 2 and 4
    recs = [x for x in read_metrics(run) if "loss" in x]
    assert [x["lr"] for x in recs] == [0.001] * 4  # base LR x the plugin's factor
    assert [x["recorder_counter"] for x in recs] == [1, 2, 3, 4]  # ctx.log adds metrics
    state = torch.load(run / "checkpoints/step_4/train_state.pt", weights_only=True)
    assert state["method"] == {"counter": 4}
    # resume from step 2: the plugin gets its state back
    import shutil

    shutil.rmtree(run / "checkpoints/step_4")
    Recorder.calls.clear()
    r = cli("train", *TINY, f"run.dir={run}", "method=test_recorder", "method.factor=0.5", "trainer.max_steps=4",
            "trainer.ckpt_every=2", "optim.warmup_steps=0", "optim.schedule=constant", "optim.lr=0.002")
    assert r.code == 0, r.err
    assert ("load_state_dict", 2) in Recorder.calls
    assert [x["recorder_counter"] for x in read_metrics(run) if "loss" in x] == [1, 2, 3, 4]


def test_third_party_plugin_through_the_entry_point_group(tmp_path, monkeypatch):
    (tmp_path / "ep_plugin_mod.py").write_text(
        "from dataclasses import dataclass\n"
        "from lrpretrain.methods import Method, MethodConfig\n"
        "@dataclass\nclass EpConfig(MethodConfig):\n    alpha: float = 1.5\n"
        "class EpMethod(Method):\n    Config = EpConfig\n")
    dist = tmp_path / "ep_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[lrpretrain.methods]\nep_method = ep_plugin_mod:EpMethod\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(methods, "_loaded", False)
    try:
        assert "ep_method" in methods.available_methods()
        cfg, _ = load_config(["method=ep_method", "method.alpha=2.5"])  # selectable without a YAML
        assert cfg.method.alpha == 2.5 and type(cfg.method).__name__ == "EpConfig"
    finally:
        methods._REGISTRY.pop("ep_method", None)
        sys.modules.pop("ep_plugin_mod", None)


def test_nonfinite_loss_is_skipped_and_logged(cli, tmp_path):
    run = tmp_path / "run"
    r = cli("train", *TINY, f"run.dir={run}", "method=test_fault", "method.nan_at=[3]", "trainer.max_steps=5")
    assert r.code == 0, r.err
    recs = {x["step"]: x for x in read_metrics(run) if "step" in x and x["step"] > 0}
    assert recs[3]["skipped"] is True and recs[3]["loss"] is None
    assert all("skipped" not in recs[s] and math.isfinite(recs[s]["loss"]) for s in (1, 2, 4, 5))
    assert "non-finite loss at update 3" in r.err and "update skipped" in r.err
    state = torch.load(run / "checkpoints/step_5/train_state.pt", weights_only=True)
    assert state["nonfinite"] == 1


def test_nonfinite_stop_and_too_many_skips(cli, tmp_path):
    r = cli("train", *TINY, f"run.dir={tmp_path / 'a'}", "method=test_fault", "method.nan_at=[2]",
            "trainer.max_steps=5", "trainer.on_nonfinite=stop")
    assert r.code == 2 and r.error_lines == [
        "lrpretrain: error: non-finite loss at update 2 (loss nan, grad norm nan); stopping (trainer.on_nonfinite=stop)"]
    r = cli("train", *TINY, f"run.dir={tmp_path / 'b'}", "method=test_fault", "method.nan_at=[2,3,4]",
            "trainer.max_steps=6", "trainer.max_nonfinite=3")
    assert r.code == 2 and "3 updates in a row were skipped" in r.error_lines[0]


def test_wandb_offline(cli, tmp_path):
    run = tmp_path / "run"
    r = cli("train", *TINY, f"run.dir={run}", "trainer.max_steps=2", "logging.wandb=offline")
    assert r.code == 0, r.err
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("run-*.wandb"))
    assert (run / "wandb_id.txt").read_text().strip() in offline[0].name


def test_generate_samples_from_the_latest_checkpoint(cli, tmp_path):
    run = tmp_path / "run"
    assert cli("train", *TINY, f"run.dir={run}", "trainer.max_steps=3").code == 0
    r = cli("generate", f"run.dir={run}", "prompt=ROMEO.", "max_new_tokens=12", "seed=1")
    assert r.code == 0, r.err
    assert r.out.startswith("ROMEO.") and len(r.out.strip()) > len("ROMEO.")
    again = cli("generate", f"run.dir={run}", "prompt=ROMEO.", "max_new_tokens=12", "seed=1")
    assert again.out == r.out  # seeded
    bad = cli("generate", f"run.dir={tmp_path / 'none'}")
    assert bad.code == 2 and "holds no run" in bad.error_lines[0]


def test_finished_run_is_not_trained_again(cli, tmp_path):
    run = tmp_path / "run"
    assert cli("train", *TINY, f"run.dir={run}", "trainer.max_steps=2").code == 0
    before = (run / "metrics.jsonl").read_text()
    r = cli("train", *TINY, f"run.dir={run}", "trainer.max_steps=2")
    assert r.code == 0 and "run already complete" in r.err
    assert (run / "metrics.jsonl").read_text() == before


def test_resume_can_extend_max_steps_with_a_warning(cli, tmp_path):
    run = tmp_path / "run"
    assert cli("train", *TINY, f"run.dir={run}", "trainer.max_steps=2").code == 0
    r = cli("train", *TINY, f"run.dir={run}", "trainer.max_steps=4")
    assert r.code == 0 and "trainer.max_steps: 2 -> 4" in r.err
    assert sorted(losses(run)) == [1, 2, 3, 4]
    assert json.loads((run / "checkpoints/step_4/meta.json").read_text())["step"] == 4
