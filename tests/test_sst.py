"""SST: spectral init, the enhanced gradient, σ-weighted sampling, re-SVD, round-boundary state
restarts, accounting, errors, and end-to-end runs with exact mid-round resume."""

from __future__ import annotations

import math
import os
import signal

import pytest
import torch
from test_errors import one_line
from torch import nn

from lrpretrain.methods.base import Method, StepContext
from lrpretrain.methods.sst import SST, SpectralLinear, sample_spectrum
from lrpretrain.methods.toolkit import parameter_counts
from lrpretrain.model import build_model

from conftest import TINY, losses, prepare_with_dense, read_metrics

OVERRIDES = ["model=llama_tiny", "method=sst", "method.rank=8", "method.round_steps=3"]


def _setup(*extra: str, seed: int = 0):
    return prepare_with_dense([*OVERRIDES, *extra], seed)


def _ids(cfg, seed=1):
    return torch.randint(0, cfg.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(seed))


def _train(model, opt, ids, steps=1):
    for _ in range(steps):
        model(ids).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_starts_at_the_dense_init():
    cfg, model, dense, method, _ = _setup()
    ids = _ids(cfg)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), dense(ids), rtol=1e-5, atol=1e-5)
    layer = method.layers[4][1]  # gate_proj: m = 344, n = 128, k = 128
    assert layer.U.shape == (344, 128) and layer.V.shape == (128, 128) and layer.sigma.shape == (128,)
    assert not layer.U.requires_grad and not layer.V.requires_grad
    torch.testing.assert_close(layer.U.T @ layer.U, torch.eye(128), rtol=0, atol=1e-5)
    assert layer.sampled.shape == (8,) and len(set(layer.sampled.tolist())) == 8


def test_only_sigma_and_the_sampled_vectors_train():
    cfg, model, _, method, opt = _setup()
    layer = method.layers[0][1]
    before = {k: v.detach().clone() for k, v in layer.named_parameters()}
    _train(model, opt, _ids(cfg))
    assert torch.equal(layer.U, before["U"]) and torch.equal(layer.V, before["V"])  # frozen
    for name in ("sigma", "U_sampled", "V_sampled"):
        assert (getattr(layer, name) != before[name]).all(), name
    assert set(opt.state) >= {layer.sigma, layer.U_sampled, layer.V_sampled}


@pytest.mark.parametrize("enhanced", [True, False])
def test_enhanced_gradient_is_the_plain_gradient_divided_by_sigma(enhanced):
    torch.manual_seed(0)
    base = nn.Linear(12, 9, bias=False)
    layer = SpectralLinear(base, rank=3, enhanced_gradient=enhanced)
    index = torch.tensor([0, 4, 7])
    layer.resample_(index)
    with torch.no_grad():  # trained-looking state: sampled vectors moved, σ changed
        layer.U_sampled.add_(0.1 * torch.randn(9, 3))
        layer.V_sampled.add_(0.1 * torch.randn(12, 3))
        layer.sigma.mul_(torch.linspace(0.5, 2.0, 9))
    x = torch.randn(2, 5, 12, requires_grad=True)
    g = torch.randn(2, 5, 9)
    (layer(x) * g).sum().backward()
    # the plain gradient, by autograd through the explicit product U diag(σ) V^T
    us, vs, sig = (t.detach().clone().requires_grad_() for t in (layer.U_sampled, layer.V_sampled, layer.sigma))
    xr = x.detach().clone().requires_grad_()
    u = layer.U.detach().index_copy(1, index, us)
    v = layer.V.detach().index_copy(1, index, vs)
    (xr @ ((u * sig) @ v.T).T * g).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(layer.sigma.grad, sig.grad)
    scale = sig.detach()[index] if enhanced else torch.ones(3)
    torch.testing.assert_close(layer.U_sampled.grad, us.grad / scale)
    torch.testing.assert_close(layer.V_sampled.grad, vs.grad / scale)
    assert layer.U.grad is None and layer.V.grad is None


def test_bf16_autocast_matches_fp32():
    torch.manual_seed(0)
    layer = SpectralLinear(nn.Linear(32, 24, bias=False), rank=4)
    x = torch.randn(3, 7, 32)
    layer(x).square().sum().backward()
    ref = {k: p.grad.clone() for k, p in layer.named_parameters() if p.grad is not None}
    layer.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    for k, grad in ref.items():
        got = dict(layer.named_parameters())[k].grad
        assert got.dtype == torch.float32
        assert (got - grad).norm() < 0.05 * grad.norm(), k


def _inclusion_probabilities(w: list[float], r: int) -> list[float]:
    """Exact P(i drawn) when r items are drawn one after another, each ∝ w among those left."""
    pi = [0.0] * len(w)

    def walk(chosen: list[int], prob: float, left: float) -> None:
        if len(chosen) == r:
            for i in chosen:
                pi[i] += prob
            return
        for i, wi in enumerate(w):
            if i not in chosen:
                walk(chosen + [i], prob * wi / left, left - wi)

    walk([], 1.0, sum(w))
    return pi


def test_sampling_frequencies_follow_sigma():
    sigma = torch.tensor([3.0, 2.0, 1.0, 0.5, 0.25, -0.1])  # a negative σ counts by its magnitude
    gen = torch.Generator().manual_seed(0)
    n = 20000
    counts = torch.zeros(6)
    for _ in range(n):
        index = sample_spectrum(sigma, 3, gen)
        assert len(set(index.tolist())) == 3 and index.tolist() == sorted(index.tolist())
        counts[index] += 1
    freq = (counts / n).tolist()
    exact = _inclusion_probabilities(sigma.abs().tolist(), 3)
    assert sum(exact) == pytest.approx(3.0)
    for f, p in zip(freq, exact):
        assert abs(f - p) < 5 * math.sqrt(p * (1 - p) / n), (freq, exact)
    # the test can tell weights apart: σ² weighting would be rejected
    squared = _inclusion_probabilities(sigma.square().tolist(), 3)
    assert max(abs(f - p) / math.sqrt(p * (1 - p) / n) for f, p in zip(freq, squared)) > 10


def test_round_boundary_resvd_and_resample_keep_the_function_and_restart_state():
    cfg, model, _, method, opt = _setup()
    ids = _ids(cfg)
    _train(model, opt, ids, steps=3)
    layer = method.layers[4][1]
    assert (layer.U_sampled.T @ layer.U_sampled - torch.eye(8)).abs().max() > 1e-4  # drifted off orthonormal
    old_sampled = layer.sampled.clone()
    with torch.no_grad():
        before = model(ids)
    logs = {}
    method.after_step(StepContext(2, model, opt, 0.01, 0.0, logs.update))  # not a boundary: nothing happens
    assert not logs and layer.sigma in opt.state and torch.equal(layer.sampled, old_sampled)
    method.after_step(StepContext(3, model, opt, 0.01, 0.0, logs.update))  # end of round 1
    assert logs == {"sst_round": 1, "sst_resvd": 1}
    with torch.no_grad():
        torch.testing.assert_close(model(ids), before, rtol=1e-5, atol=1e-5)
    u, v = layer.factors()
    torch.testing.assert_close(u.T @ u, torch.eye(128), rtol=0, atol=1e-5)  # re-orthogonalised
    torch.testing.assert_close(v.T @ v, torch.eye(128), rtol=0, atol=1e-5)
    assert (layer.sigma[:-1] >= layer.sigma[1:]).all()
    for p in (layer.sigma, layer.U_sampled, layer.V_sampled):  # restarted: the next update starts Adam afresh
        assert p not in opt.state
    assert torch.equal(layer.U_sampled, layer.U[:, layer.sampled])
    _train(model, opt, ids)
    assert int(opt.state[layer.U_sampled]["step"]) == 1


def test_resvd_every_skips_rounds():
    cfg, model, _, method, opt = _setup("method.resvd_every=2")
    _train(model, opt, _ids(cfg))
    layer = method.layers[0][1]
    logs: dict = {}
    method.after_step(StepContext(3, model, opt, 0.01, 0.0, logs.update))
    assert logs["sst_resvd"] == 0 and layer.sigma in opt.state  # resampled only: σ keeps its state
    assert layer.U_sampled not in opt.state
    method.after_step(StepContext(6, model, opt, 0.01, 0.0, logs.update))
    assert logs["sst_resvd"] == 1 and layer.sigma not in opt.state


def test_weight_decay_on_sigma_only():
    cfg, model, _, method, opt = _setup("optim.weight_decay=0.1")
    layer = method.layers[0][1]
    decay = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(layer.sigma) in decay and id(model.lm_head.weight) in decay
    assert id(layer.U_sampled) not in decay and id(layer.V_sampled) not in decay


def test_dense_weights_export_keeps_the_function():
    cfg, model, _, method, opt = _setup()
    ids = _ids(cfg)
    _train(model, opt, ids, steps=2)
    plain = build_model(cfg.model)
    plain.load_state_dict(method.dense_weights(model))
    with torch.no_grad():
        torch.testing.assert_close(plain(ids), model(ids), rtol=1e-5, atol=1e-5)


def test_cost_matches_the_prepared_model():
    cfg, model, _, method, _ = _setup()
    counts = parameter_counts(model)
    cost = method.cost(cfg.model, 64)
    assert cost["params"] == counts["total"] and cost["trainable_params"] == counts["trainable"]
    base = Method.cost(method, cfg.model, 64)
    shapes = [(m.out_features, m.in_features) for _, m in method.layers]
    per_token = sum(4 * min(a, b) * (a + b) + 2 * 8 * (a + b) - 6 * a * b for a, b in shapes)
    assert cost["flops_per_token"] == base["flops_per_token"] + per_token


# -- through the CLI ----------------------------------------------------------------------------------------


S = ["method=sst", "method.rank=8", "method.round_steps=4", "optim.lr=0.01"]


def test_end_to_end_run_learns(cli, tmp_path):
    run = tmp_path / "run"
    r = cli("train", *TINY, *S, f"run.dir={run}", "trainer.max_steps=30", "trainer.eval_at_start=true")
    assert r.code == 0, r.err
    recs = read_metrics(run)
    train = [x for x in recs if "loss" in x]
    assert [x["sst_round"] for x in train if "sst_round" in x] == list(range(1, 8))
    evals = [x["val_loss"] for x in recs if "val_loss" in x]
    assert evals[-1] < evals[0] - 1.5
    assert sum(x["loss"] for x in train[-5:]) < sum(x["loss"] for x in train[:5]) - 5.0


def test_preempted_mid_round_resumes_bit_for_bit(cli, tmp_path, monkeypatch):
    """SIGUSR1 after update 6 (mid-round, after one resample) -> resume = one run of 10."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    common = [*TINY, *S, "trainer.max_steps=10", "trainer.ckpt_every=100"]
    assert cli("train", *common, f"run.dir={ref}").code == 0
    original = SST.after_step

    def stop_after_6(self, ctx):
        original(self, ctx)
        if ctx.step == 6:
            os.kill(os.getpid(), signal.SIGUSR1)

    monkeypatch.setattr(SST, "after_step", stop_after_6)
    r = cli("train", *common, f"run.dir={run}")
    assert r.code == 0 and "stopped by SIGUSR1 at step 6" in r.err
    monkeypatch.setattr(SST, "after_step", original)
    r = cli("train", *common, f"run.dir={run}")
    assert r.code == 0 and "resumed from" in r.err
    assert losses(run) == losses(ref)  # bit for bit, through the round boundary at 8


@pytest.mark.parametrize("override,expected", [
    ("method.rank=0", "method.rank=0 is invalid: must be > 0"),
    ("method.rank=129", "method.rank=129 is invalid: must be <= min(m, n) = 128 for q_proj (128x128)"),
    ("method.targets=[qkv]", "method.targets: unknown target 'qkv'"),
    ("method.round_steps=0", "method.round_steps=0 is invalid: must be > 0"),
    ("method.resvd_every=-1", "method.resvd_every=-1 is invalid: must be > 0"),
])
def test_bad_values_are_one_clear_line(cli, tmp_path, override, expected):
    r = cli("train", *TINY, "method=sst", override, f"run.dir={tmp_path / 'run'}", "trainer.max_steps=2")
    one_line(r, expected)
    assert not (tmp_path / "run").exists()  # refused before the run directory was made
