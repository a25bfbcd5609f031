"""SwitchLoRA: function-preserving switches, per-vector Adam state, the counterpart freeze, the
switch schedule, accounting, errors, and end-to-end runs with exact mid-run resume."""

from __future__ import annotations

import math
import os
import signal

import pytest
import torch
from test_errors import one_line
from torch import nn

from lrpretrain.methods.base import Method, StepContext
from lrpretrain.methods.switchlora import (
    SwitchLoRA,
    SwitchLoRALinear,
    candidate_bounds,
    stochastic_round,
    switch_interval,
    switch_rate,
)
from lrpretrain.methods.toolkit import parameter_counts
from lrpretrain.model import build_model
from lrpretrain.optim import AdamW, VectorwiseAdamW

from conftest import TINY, losses, prepare_with_dense, read_metrics

OVERRIDES = ["model=llama_tiny", "method=switchlora", "method.rank=8", "trainer.max_steps=100"]


def _setup(*extra: str, seed: int = 0):
    return prepare_with_dense([*OVERRIDES, *extra], seed)


def _train_step(model, opt, ids):
    model(ids).logsumexp(-1).mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _ids(cfg, seed=1):
    return torch.randint(0, cfg.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(seed))


# -- the layer -------------------------------------------------------------------------------------------


def test_starts_at_the_dense_init_with_non_zero_factors():
    cfg, model, dense, method, _ = _setup()
    ids = _ids(cfg)
    torch.testing.assert_close(model(ids), dense(ids), rtol=1e-5, atol=1e-5)
    layer = method.layers[0][1]
    assert layer.lora_B.abs().sum() > 0  # unlike LoRA, B is not zero: both factors learn at once
    bound_a, bound_b = candidate_bounds(128, 128, 8)
    assert layer.candidates_A.abs().max() <= bound_a and layer.candidates_B.abs().max() <= bound_b
    assert layer.candidates_A.shape == (128, 128) and layer.candidates_A.device.type == "cpu"  # min(m, n) vectors
    assert torch.equal(layer.lora_A, layer.candidates_A[120:])  # the pool's last r vectors
    assert layer.scale == 1 / 8  # lora_alpha / r


@pytest.mark.parametrize("order", ["sequential", "random"])
def test_switches_preserve_the_function_and_cycle_the_pool(order):
    cfg, model, _, method, opt = _setup(f"method.candidate_order={order}")
    ids = _ids(cfg)
    for _ in range(3):  # trained factors, so the switched vectors carry real contributions
        _train_step(model, opt, ids)
    layer = method.layers[4][1]  # a gate_proj: m = 344, n = 128
    gen = torch.Generator().manual_seed(3)
    for which, count in (("A", 3), ("B", 2), ("A", 8), ("B", 8)):
        with torch.no_grad():
            before = model(ids)
        vectors = (lambda: layer.lora_A) if which == "A" else (lambda: layer.lora_B.T)
        pool = layer.candidates_A if which == "A" else layer.candidates_B
        slots = layer.slots_A if which == "A" else layer.slots_B
        old_vectors, old_slots, other_slots = vectors().clone(), slots.clone(), slots.clone()
        index = layer.switch_(which, count, order, gen)
        with torch.no_grad():
            torch.testing.assert_close(model(ids), before, rtol=1e-5, atol=1e-5)
        assert len(index) == count
        torch.testing.assert_close(pool[old_slots[index]], old_vectors[index])  # the old vectors went back
        torch.testing.assert_close(vectors()[index], pool[slots[index]])  # the new ones come from the pool
        kept = torch.ones(8, dtype=torch.bool)
        kept[index] = False
        assert torch.equal(vectors()[kept], old_vectors[kept])
        assert len(set(slots.tolist())) == 8  # no pool vector is used twice
        if order == "sequential":  # the next vectors of the pool, in order
            prev = other_slots[(index[0] - 1) % 8]
            assert slots[index].tolist() == [(int(prev) + 1 + j) % 128 for j in range(count)]
        else:
            assert not set(slots[index].tolist()) & set(other_slots[kept].tolist())


def test_dense_weights_export_keeps_the_function():
    cfg, model, _, method, opt = _setup()
    ids = _ids(cfg)
    _train_step(model, opt, ids)
    method.after_step(StepContext(1, model, opt, 0.01, 0.0))
    plain = build_model(cfg.model)
    plain.load_state_dict(method.dense_weights(model))
    with torch.no_grad():
        torch.testing.assert_close(plain(ids), model(ids), rtol=1e-5, atol=1e-5)


# -- the optimizer ----------------------------------------------------------------------------------------


def _pair(seed=0):
    g = torch.Generator().manual_seed(seed)
    return nn.Parameter(torch.randn(6, 5, generator=g)), nn.Parameter(torch.randn(4, generator=g))


def test_vectorwise_adamw_is_adamw_outside_vector_groups_and_per_vector_inside():
    (a, bias), (a2, bias2) = _pair(), _pair()
    kw = dict(lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ours = VectorwiseAdamW([{"params": [a], "vectors": "rows"}, {"params": [bias]}], **kw)
    ref = AdamW([a2, bias2], **kw)
    for step in range(4):
        g = torch.Generator().manual_seed(step)
        for p, q in ((a, a2), (bias, bias2)):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        ours.step()
        ref.step()
    assert torch.equal(bias, bias2)  # plain groups: AdamW bit for bit
    torch.testing.assert_close(a, a2, rtol=1e-6, atol=1e-7)  # all rows at the same step: AdamW
    assert ours.state[a]["step"].shape == (6, 1) and ours.state[a]["step"].eq(4).all()


@pytest.mark.parametrize("axis", ["rows", "columns"])
def test_restarted_vector_runs_adam_from_step_one_while_the_others_go_on(axis):
    p = nn.Parameter(torch.randn(6, 5, generator=torch.Generator().manual_seed(0)))
    opt = VectorwiseAdamW([{"params": [p], "vectors": axis}], lr=0.01)
    grads = [torch.randn(6, 5, generator=torch.Generator().manual_seed(10 + i)) for i in range(6)]
    for g in grads[:3]:
        p.grad = g.clone()
        opt.step()
    opt.restart_vectors(p, torch.tensor([2, 4]))
    state = opt.state[p]
    pick = (lambda t: t[[2, 4]]) if axis == "rows" else (lambda t: t[:, [2, 4]])
    assert not pick(state["exp_avg"]).any() and not pick(state["exp_avg_sq"]).any()
    assert state["step"].flatten().tolist() == [3, 3, 0, 3, 0, 3][: 6 if axis == "rows" else 5]
    # a fresh AdamW on the restarted vectors alone, fed the same gradients, takes the same steps
    fresh = nn.Parameter(pick(p.detach()).clone())
    fresh_opt = AdamW([fresh], lr=0.01)
    for g in grads[3:]:
        p.grad = g.clone()
        opt.step()
        fresh.grad = pick(g).clone()
        fresh_opt.step()
    torch.testing.assert_close(pick(p.detach()), fresh.detach(), rtol=1e-5, atol=1e-6)


def test_frozen_vector_does_not_move_for_exactly_its_updates():
    p = nn.Parameter(torch.randn(4, 3))
    opt = VectorwiseAdamW([{"params": [p], "vectors": "columns"}], lr=0.1)
    p.grad = torch.randn(4, 3)
    opt.step()
    opt.restart_vectors(p, torch.tensor([1]))  # as SwitchLoRA does to a counterpart: restart and freeze
    opt.freeze_vectors(p, torch.tensor([1]), 3)
    assert opt.frozen_vectors(p).tolist() == [False, True, False]
    for update in range(4):
        before = p.detach().clone()
        p.grad = torch.randn(4, 3)
        opt.step()
        moved = (p.detach() != before).any(0).tolist()
        assert moved == [True, update == 3, True]
    assert int(opt.state[p]["step"][0, 1]) == 4  # frozen updates count: the reference's per-vector step
    assert not opt.frozen_vectors(p).any()


def test_vectorwise_state_round_trips_through_a_checkpoint(tmp_path):
    def run(resume_at=None):
        p = nn.Parameter(torch.ones(5, 4))
        opt = VectorwiseAdamW([{"params": [p], "vectors": "rows"}], lr=0.05)
        for step in range(6):
            if step == resume_at:
                torch.save(opt.state_dict(), tmp_path / "opt.pt")
                opt = VectorwiseAdamW([{"params": [p], "vectors": "rows"}], lr=0.05)
                opt.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
            p.grad = torch.randn(5, 4, generator=torch.Generator().manual_seed(step))
            opt.step()
            if step == 1:
                opt.restart_vectors(p, torch.tensor([0]))
                opt.freeze_vectors(p, torch.tensor([0]), 3)
        return p.detach()

    assert torch.equal(run(), run(resume_at=3))


# -- the method -----------------------------------------------------------------------------------------


def test_a_switch_restarts_and_freezes_the_counterpart_and_keeps_the_vectors_own_state():
    cfg, model, _, method, opt = _setup("method.interval=6", "method.adam_warm_step=3")
    ids = _ids(cfg)
    _train_step(model, opt, ids)
    layer = method.layers[0][1]
    a_state = {k: v.clone() for k, v in opt.state[layer.lora_A].items()}
    b_before = layer.lora_B.detach().clone()
    cursor = layer.cursor_A
    method.after_step(StepContext(1, model, opt, 0.01, 0.0))
    switched_a = sorted({(cursor + j) % 8 for j in range((layer.cursor_A - cursor) % 8)})
    assert switched_a, "r / interval > 1: at least one switch per layer"
    b_state = opt.state[layer.lora_B]
    for i in switched_a:
        assert b_state["step"][0, i] == 0 and not b_state["exp_avg"][:, i].any()
        assert b_state["exp_avg_sq"][:, i].eq(0).all() and b_state["frozen"][0, i] == 3
        # the switched a_i keeps its moments and step: its gradient does not depend on a_i
        assert torch.equal(opt.state[layer.lora_A]["exp_avg"][i], a_state["exp_avg"][i])
        assert opt.state[layer.lora_A]["step"][i, 0] == a_state["step"][i, 0]
    frozen_b = [i for i in range(8) if b_state["frozen"][0, i] > 0]
    for update in range(4):  # frozen columns of B stay put for exactly 3 updates
        _train_step(model, opt, ids)
        moved = (layer.lora_B.detach() != b_before).any(0)
        assert all(bool(moved[i]) == (update == 3) for i in frozen_b)
        b_before = layer.lora_B.detach().clone()


def test_frozen_vectors_are_never_switched():
    cfg, model, _, method, opt = _setup("method.interval=10", "method.adam_warm_step=5")
    ids = _ids(cfg)
    for step in range(1, 25):
        _train_step(model, opt, ids)
        frozen = {id(p): opt.frozen_vectors(p).clone() for _, m in method.layers for p in (m.lora_A, m.lora_B)}
        cursors = [(m.cursor_A, m.cursor_B) for _, m in method.layers]
        method.after_step(StepContext(step, model, opt, 0.01, 0.0))
        for (_, m), (ca, cb) in zip(method.layers, cursors):
            for which, p, c0, c1 in (("A", m.lora_A, ca, m.cursor_A), ("B", m.lora_B, cb, m.cursor_B)):
                switched = [(c0 + j) % 8 for j in range((c1 - c0) % 8)]
                assert not frozen[id(p)][switched].any(), (which, step)


def test_switch_schedule():
    d = 0.1 * 1000
    assert switch_rate(d - 1, d) == pytest.approx(0.3)  # 0.3x the starting frequency at ratio * T
    assert switch_rate(2 * d - 1, d) == pytest.approx(0.09)
    assert switch_interval(0, 40, d) == pytest.approx(40 / 0.3 ** (1 / d))
    assert switch_rate(10**9, d) == 1e-8
    gen = torch.Generator().manual_seed(0)
    draws = [stochastic_round(2.3, gen) for _ in range(4000)]
    assert set(draws) == {2, 3} and sum(draws) / 4000 == pytest.approx(2.3, abs=0.03)


def test_switch_counts_follow_the_decaying_frequency():
    """Over 150 updates the number of switched vectors matches sum_t 2 x layers x r / interval(t)."""
    cfg, model, _, method, opt = _setup("method.interval=8", "method.adam_warm_step=0", "trainer.max_steps=500")
    logs, steps = [], range(1, 151)
    for step in steps:
        method.after_step(StepContext(step, model, opt, 0.01, 0.0, logs.append))
    d = 0.1 * 500
    per_layer = [8 / switch_interval(t, 8, d) for t in steps]
    expected = 2 * 14 * sum(per_layer)
    sd = math.sqrt(4 * 14 * sum(x * (1 - x) for x in (p - math.floor(p) for p in per_layer)))
    got = sum(x["switched_vectors"] for x in logs)
    assert abs(got - expected) < 4 * sd + 1, (got, expected, sd)
    assert [x["switch_interval"] for x in logs] == pytest.approx([switch_interval(t, 8, d) for t in steps])
    first, last = logs[:30], logs[-30:]
    assert sum(x["switched_vectors"] for x in first) > 3 * sum(x["switched_vectors"] for x in last)


def test_cost_matches_the_prepared_model():
    cfg, model, _, method, _ = _setup()
    counts = parameter_counts(model)
    cost = method.cost(cfg.model, 64)
    assert cost["params"] == counts["total"] and cost["trainable_params"] == counts["trainable"]
    base = Method.cost(method, cfg.model, 64)  # full training's cost
    lora = sum(8 * (m.in_features + m.out_features) for _, m in method.layers)
    dense = sum(m.in_features * m.out_features for _, m in method.layers)
    assert cost["flops_per_token"] == base["flops_per_token"] - 6 * dense + 4 * dense + 6 * lora
    assert cost["candidate_params"] == sum(m.candidates_A.numel() + m.candidates_B.numel() for _, m in method.layers)


# -- through the CLI ----------------------------------------------------------------------------------------


SW = ["method=switchlora", "method.rank=8", "method.interval=6", "method.adam_warm_step=2", "method.total_steps=400",
      "optim.lr=0.01"]  # total_steps decoupled from the short runs: switching goes on throughout


def test_end_to_end_run_learns_and_switches(cli, tmp_path):
    run = tmp_path / "run"
    r = cli("train", *TINY, *SW, f"run.dir={run}", "trainer.max_steps=30", "trainer.eval_at_start=true")
    assert r.code == 0, r.err
    recs = read_metrics(run)
    train = [x for x in recs if "loss" in x]
    assert sum(x["switched_vectors"] for x in train) > 30  # switching went on
    evals = [x["val_loss"] for x in recs if "val_loss" in x]
    assert evals[-1] < evals[0] - 1.5
    assert sum(x["loss"] for x in train[-5:]) < sum(x["loss"] for x in train[:5]) - 5.0
    assert "2.14M trainable" in r.err


def test_preempted_mid_run_resumes_bit_for_bit(cli, tmp_path, monkeypatch):
    """SIGUSR1 after update 5 (vectors frozen, pools and RNG mid-stream) -> resume = one run of 10."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    common = [*TINY, *SW, "trainer.max_steps=10", "trainer.ckpt_every=100", "method.candidate_order=random"]
    assert cli("train", *common, f"run.dir={ref}").code == 0
    original = SwitchLoRA.after_step

    def stop_after_5(self, ctx):
        original(self, ctx)
        if ctx.step == 5:
            assert any(ctx.optimizer.frozen_vectors(m.lora_B).any() for _, m in self.layers)
            os.kill(os.getpid(), signal.SIGUSR1)

    monkeypatch.setattr(SwitchLoRA, "after_step", stop_after_5)
    r = cli("train", *common, f"run.dir={run}")
    assert r.code == 0 and "stopped by SIGUSR1 at step 5" in r.err
    monkeypatch.setattr(SwitchLoRA, "after_step", original)
    r = cli("train", *common, f"run.dir={run}")
    assert r.code == 0 and "resumed from" in r.err
    assert losses(run) == losses(ref)  # bit for bit
    sw = lambda d: [x["switched_vectors"] for x in read_metrics(d) if "loss" in x]  # noqa: E731
    assert sw(run) == sw(ref)


@pytest.mark.parametrize("override,expected", [
    ("method.rank=0", "method.rank=0 is invalid: must be > 0"),
    ("method.rank=129", "method.rank=129 is invalid: must be <= min(m, n) = 128 for q_proj (128x128)"),
    ("method.targets=[attn,ffn]", "method.targets: unknown target 'ffn'"),
    ("method.interval=0", "method.interval=0 is invalid: must be > 0"),
    ("method.interval=9", "method.interval=9 is invalid: must be >= 2 x method.adam_warm_step = 10"),
    ("method.adam_warm_step=-1", "method.adam_warm_step=-1 is invalid: must be >= 0"),
    ("method.descent_ratio=0", "method.descent_ratio=0.0 is invalid: must be > 0"),
    ("method.lora_alpha=-1", "method.lora_alpha=-1.0 is invalid: must be > 0"),
    ("method.candidate_order=shuffled", "method.candidate_order='shuffled' is invalid: allowed: sequential, random"),
    ("method.total_steps=0", "method.total_steps=0 is invalid: must be > 0"),
])
def test_bad_values_are_one_clear_line(cli, tmp_path, override, expected):
    r = cli("train", *TINY, "method=switchlora", override, f"run.dir={tmp_path / 'run'}", "trainer.max_steps=2")
    one_line(r, expected)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_every_target_module_is_switchlora(tmp_path):
    cfg, model, _, method, _ = _setup("method.targets=[mlp]")
    assert len(method.layers) == 6 and all(isinstance(m, SwitchLoRALinear) for _, m in method.layers)
    assert all(q.split(".")[2] == "mlp" for q, _ in method.layers)
    assert isinstance(model.layers[0].attn.q_proj, nn.Linear)
