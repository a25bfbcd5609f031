"""lowrank, lora, relora, periodic_lora, sltrain, lost, gradnorm_lorp, lr_qat, loro and dlrt through the real
CLI: they learn, resume bit for bit from a stop between merges (GradNormLoRP: between subspace refreshes;
LORO: exact steps; DLRT: rank changes), reject bad values with one line, and ReLoRA's warm start and first
update."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from safetensors.torch import load_file
from test_errors import one_line

from lrpretrain.methods import get_method
from lrpretrain.model import build_model
from lrpretrain.optim import lr_factor
from lrpretrain.train import load_config

from conftest import TINY, losses, read_metrics

# Each case: a method and overrides whose merges/unloads fall at updates 4 and 8 of a 12-update run.
CASES = {
    "lowrank": ("lowrank", ["method.rank=16"]),
    "lora": ("lora", ["method.rank=16"]),
    "relora": ("relora", ["method.rank=16", "method.merge_every=4", "method.restart_warmup_steps=2"]),
    "relora_random_reset": ("relora", ["method.rank=16", "method.merge_every=4", "method.restart_warmup_steps=2",
                                       "method.optimizer_reset=random"]),  # draws from the method's RNG
    "periodic_lora": ("periodic_lora", ["method.rank=16", "method.unload_every=4"]),
    "periodic_lora_momentum": ("periodic_lora", ["method.rank=16", "method.unload_every=4", "method.unload=momentum",
                                                 "method.momentum=0.3"]),
    "sltrain": ("sltrain", ["method.rank=16", "method.delta=0.05"]),
    "lost": ("lost", ["method.rank=16", "method.sparsity=0.1"]),
    # subspace refreshes at updates 0, 4, 8: the stop after 6 is mid-cycle
    "gradnorm_lorp": ("gradnorm_lorp", ["method.rank=16", "method.update_proj_gap=4"]),
    "lr_qat": ("lr_qat", ["method.rank=16"]),  # no merges: the resume lands between ordinary updates
    # exact Riemannian steps (with the state refresh and the LR restart) at updates 4 and 8
    "loro": ("loro", ["method.rank=16", "method.exact_every=4", "method.restart_warmup_steps=2"]),
    # ranks shrink by one most updates from 16 (ϑ = 0.3 on a nearly flat spectrum): the stop at 6 falls
    # between rank changes, so the checkpoint holds ranks other than the initial ones
    "dlrt": ("dlrt", ["method.rank=16", "method.tol=0.3"]),
}
COMMON = [*TINY, "trainer.max_steps=12", "optim.lr=0.005", "trainer.ckpt_every=100", "trainer.eval_at_start=true"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _method_args(case: str) -> list[str]:
    method, overrides = CASES[case]
    return [f"method={method}", *overrides]


def _stop_after(monkeypatch, method: str, n: int) -> None:
    """Pre-empt the run (SIGUSR1, as SLURM does) right after update ``n``."""
    cls = get_method(method)
    original = cls.after_step

    def after_step(self, ctx):
        original(self, ctx)
        if ctx.step == n:
            os.kill(os.getpid(), signal.SIGUSR1)

    monkeypatch.setattr(cls, "after_step", after_step)


@pytest.mark.parametrize("case", list(CASES))
def test_learns_and_resumes_between_merges_bit_for_bit(cli, tmp_path, monkeypatch, case):
    ref, run = tmp_path / "ref", tmp_path / "run"
    args = [*COMMON, *_method_args(case)]
    r = cli("train", *args, f"run.dir={ref}")
    assert r.code == 0, r.err
    evals = [x["val_loss"] for x in read_metrics(ref) if "val_loss" in x]
    assert evals[-1] < evals[0] - 1.0, evals  # it learns
    train = losses(ref)
    assert sum(train[s] for s in (10, 11, 12)) < sum(train[s] for s in (1, 2, 3)) - 3.0

    # stopped after update 6: between the merges/unloads of updates 4 and 8
    method = CASES[case][0]
    _stop_after(monkeypatch, method, 6)
    r = cli("train", *args, f"run.dir={run}")
    assert r.code == 0 and "stopped by SIGUSR1 at step 6" in r.err, r.err
    monkeypatch.undo()
    r = cli("train", *args, f"run.dir={run}")
    assert r.code == 0 and "resumed from" in r.err, r.err
    assert losses(run) == losses(ref)  # bit for bit, across the merge at update 8
    vals = lambda d: [(x["step"], x["val_loss"]) for x in read_metrics(d) if "val_loss" in x]  # noqa: E731
    assert vals(run) == vals(ref)
    if case.startswith(("relora", "periodic")):
        assert [x["step"] for x in read_metrics(ref) if "restarts" in x] == [4, 8, 12]
    if case == "loro":
        assert [x["step"] for x in read_metrics(ref) if "loro_exact_steps" in x] == [4, 8, 12]
    if case == "dlrt":  # every target's rank after every update, the same in the resumed run
        ranks = {x["step"]: x["ranks"] for x in read_metrics(ref) if "ranks" in x}
        assert len(ranks) == 12 and len(ranks[1]) == 14
        assert ranks[6] != ranks[1] and ranks[12] != ranks[6]  # changed before and after the stop
        assert {x["step"]: x["ranks"] for x in read_metrics(run) if "ranks" in x} == ranks
    if case == "relora":  # the logged LR is the base schedule x the jagged factor
        cfg, _ = load_config(args)
        plugin = get_method("relora")(cfg.method, cfg.model)
        lrs = [x["lr"] for x in read_metrics(ref) if "loss" in x]
        expected = [0.005 * lr_factor(s, cfg.optim, 12) * plugin.lr_factor(s) for s in range(12)]
        assert lrs == pytest.approx(expected)
        assert lrs[4] == 0.0 and lrs[8] == 0.0 and 0 < lrs[5] < lrs[6]


def test_relora_lora_factors_learn_at_update_1(cli, tmp_path):
    run = tmp_path / "run"
    r = cli("train", *TINY, f"run.dir={run}", "method=relora", "method.rank=16", "trainer.max_steps=1",
            "optim.warmup_steps=0", "optim.schedule=constant")
    assert r.code == 0, r.err
    state = load_file(run / "checkpoints/step_1/model.safetensors")
    b_keys = [k for k in state if k.endswith("lora_B")]
    assert len(b_keys) == 14
    assert all(state[k].abs().sum() > 0 for k in b_keys)  # B was zero before update 1


def test_relora_warm_start_loads_the_dense_checkpoint_before_surgery(cli, tmp_path):
    full = tmp_path / "full"
    assert cli("train", *TINY, f"run.dir={full}", "trainer.max_steps=2").code == 0
    dense = load_file(full / "checkpoints/step_2/model.safetensors")
    for where in (full, full / "checkpoints" / "step_2"):  # a run dir (its latest checkpoint) or a checkpoint
        cfg, _ = load_config(["model=llama_tiny", "method=relora", "method.rank=8", f"method.warm_start={where}"])
        torch.manual_seed(123)
        plugin = get_method("relora")(cfg.method, cfg.model)
        model = plugin.prepare_model(build_model(cfg.model))
        state = model.state_dict()
        assert torch.equal(state["layers.1.mlp.down_proj.weight"], dense["layers.1.mlp.down_proj.weight"])  # W0
        assert torch.equal(state["embed_tokens.weight"], dense["embed_tokens.weight"])
        torch.testing.assert_close(plugin.dense_weights(model)["layers.0.attn.q_proj.weight"],
                                   dense["layers.0.attn.q_proj.weight"])  # B = 0: the dense function
    # a ReLoRA run from it trains
    r = cli("train", *TINY, f"run.dir={tmp_path / 'relora'}", "method=relora", "method.rank=8",
            f"method.warm_start={full}", "trainer.max_steps=2")
    assert r.code == 0, r.err


@pytest.mark.parametrize("args, expected", [
    (["method=lora", "method.rank=0"], "method.rank=0 is invalid: must be > 0"),
    (["method=lowrank", "method.rank=-3"], "method.rank=-3 is invalid: must be > 0"),
    (["method=relora", "method.rank=129"],
     "method.rank=129 is invalid: must be <= min(m, n) = 128 for q_proj of model=llama_tiny (128x128)"),
    (["method=sltrain", "method.rank=200", "method.targets=[mlp]"],
     "method.rank=200 is invalid: must be <= min(m, n) = 128 for gate_proj of model=llama_tiny (344x128)"),
    (["method=periodic_lora", "method.rank=1000"], "method.rank=1000 is invalid: must be <= min(m, n) = 128"),
    (["method=sltrain", "method.delta=0"], "method.delta=0.0 is invalid: must be in (0, 1]"),
    (["method=sltrain", "method.delta=1.5"], "method.delta=1.5 is invalid: must be in (0, 1]"),
    (["method=sltrain", "method.delta=-0.1"], "method.delta=-0.1 is invalid: must be in (0, 1]"),
    (["method=relora", "method.merge_every=0"], "method.merge_every=0 is invalid: must be > 0"),
    (["method=periodic_lora", "method.unload_every=-5"], "method.unload_every=-5 is invalid: must be > 0"),
    (["method=lora", "method.targets=[attn,qproj]"], "method.targets: unknown target 'qproj'; allowed: attn, mlp"),
    (["method=sltrain", "method.targets=[lm_head]"], "method.targets: unknown target 'lm_head'"),
    (["method=relora", "method.optimizer_reset=prune"],
     "method.optimizer_reset='prune' is invalid: allowed: magnitude, random, full, none"),
    (["method=relora", "method.reset_ratio=1.5"], "method.reset_ratio=1.5 is invalid: must be in [0, 1]"),
    (["method=relora", "method.merge_every=50"],
     "method.restart_warmup_steps=100 is invalid: must be in [0, method.merge_every=50]"),
    (["method=periodic_lora", "method.unload=half"], "method.unload='half' is invalid: allowed: full, momentum"),
    (["method=periodic_lora", "method.momentum=1.0"], "method.momentum=1.0 is invalid: must be in (0, 1)"),
    (["method=lowrank", "method.init=xavier"], "method.init='xavier' is invalid: allowed: kaiming, svd"),
    (["method=lora", "method.lora_dropout=1.0"], "method.lora_dropout=1.0 is invalid: must be in [0, 1)"),
    (["method=relora", "method.warm_start=/nonexistent/run"],
     "method.warm_start=/nonexistent/run is invalid: expected a checkpoint directory holding model.safetensors"),
])
def test_bad_values_are_one_clear_line(cli, tmp_path, args, expected):
    one_line(cli("train", *TINY, f"run.dir={tmp_path / 'run'}", *args), expected)
    assert not (tmp_path / "run").exists()  # rejected before anything was created


def test_relora_warm_start_that_does_not_fit_is_one_clear_line(cli, tmp_path):
    other = tmp_path / "other"
    assert cli("train", *TINY, f"run.dir={other}", "trainer.max_steps=1", "model.ffn_dim=256").code == 0
    r = cli("train", *TINY, f"run.dir={tmp_path / 'run'}", "method=relora", f"method.warm_start={other}")
    one_line(r, f"method.warm_start={other} does not fit model=llama_tiny: layers.0.mlp.gate_proj.weight has shape "
                 "(256, 128), the model needs (344, 128)")
    assert not (tmp_path / "run").exists()
    # a low-rank run's checkpoint is not a dense model either
    lr_run = tmp_path / "lowrank"
    assert cli("train", *TINY, f"run.dir={lr_run}", "trainer.max_steps=1", "method=lowrank", "method.rank=8").code == 0
    r = cli("train", *TINY, f"run.dir={tmp_path / 'run'}", "method=relora", f"method.warm_start={lr_run}")
    one_line(r, "does not fit model=llama_tiny: it lacks layers.0.attn.q_proj.weight")


def test_cost_reaches_the_run_log(cli, tmp_path):
    r = cli("train", *TINY, f"run.dir={tmp_path / 'run'}", "method=lora", "method.rank=16", "trainer.max_steps=1")
    assert r.code == 0, r.err
    cfg, _ = load_config(["model=llama_tiny", "method=lora", "method.rank=16"])
    cost = get_method("lora")(cfg.method, cfg.model).cost(cfg.model, 64)
    assert f"{cost['params'] / 1e6:.2f}M params, {cost['trainable_params'] / 1e6:.2f}M trainable" in r.err
