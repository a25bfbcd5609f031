"""The reparameterization methods lowrank, lora, relora, periodic_lora and sltrain, unit by unit:
surgery and accounting, exported function, merges and unloads, optimizer-state resets, the jagged
schedule, and SLTrain's sparse-support gradient. DLRT and LORO share the parametrized checks (their own
unit tests: test_dlrt.py, test_loro.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lrpretrain.kernels.sparse_lowrank import SparseLowRankFunction, support_gradient
from lrpretrain.methods import StepContext, get_method
from lrpretrain.methods.lora import adapter_parameters, lora_modules
from lrpretrain.methods.sltrain import SparseLowRankLinear
from lrpretrain.methods.toolkit import parameter_counts
from lrpretrain.model import build_model
from lrpretrain.train import load_config

METHODS = ["lowrank", "lora", "relora", "periodic_lora", "sltrain", "dlrt", "loro"]


pytestmark = pytest.mark.usefixtures("one_thread")


def built(method: str, *overrides: str, model: str = "llama_tiny"):
    cfg, _ = load_config([f"model={model}", f"method={method}", "method.rank=8", *overrides])
    torch.manual_seed(0)
    plugin = get_method(method)(cfg.method, cfg.model)
    return cfg, plugin, plugin.prepare_model(build_model(cfg.model))


def randomize_factors(model: nn.Module, std: float = 0.05) -> None:
    """Make every adapter non-trivial (B starts at zero)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std)


def train_steps(model, optimizer, ids, n=3):
    for _ in range(n):
        model(ids).logsumexp(-1).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("model,targets", [("llama_tiny", "[attn,mlp]"), ("llama_small", "[attn,down_proj]")])
def test_cost_matches_the_built_model(method, model, targets):
    cfg, plugin, m = built(method, f"method.targets={targets}", model=model)
    counts = parameter_counts(m)
    cost = plugin.cost(cfg.model, 64)
    assert cost["params"] == counts["total"]
    assert cost["trainable_params"] == counts["trainable"] == plugin.trainable_parameters(m)
    full = get_method("full")(cfg.method, cfg.model).cost(cfg.model, 64)
    assert 0 < cost["flops_per_token"]
    if method in ("lowrank", "lora", "relora", "periodic_lora"):
        assert cost["flops_per_token"] < full["flops_per_token"]  # rank 8 adapters beat 2mn of a frozen/dense W


@pytest.mark.parametrize("method", METHODS)
def test_embeddings_head_and_norms_stay_dense_and_trained(method):
    _, _, m = built(method)
    assert isinstance(m.lm_head, nn.Linear) and m.lm_head.weight.requires_grad
    assert m.embed_tokens.weight.requires_grad and m.norm.weight.requires_grad
    assert all(type(b.attn.q_proj) is not nn.Linear and type(b.mlp.down_proj) is not nn.Linear for b in m.layers)


@pytest.mark.parametrize("method", METHODS)
def test_dense_weights_export_the_function(method):
    cfg, plugin, m = built(method)
    randomize_factors(m)
    m.eval()
    ids = torch.randint(0, cfg.model.vocab_size, (2, 16))
    dense = build_model(cfg.model)
    dense.load_state_dict(plugin.dense_weights(m), strict=True)
    torch.testing.assert_close(dense(ids), m(ids), rtol=1e-5, atol=1e-5)


def test_lowrank_svd_init_is_the_best_rank_r_approximation():
    cfg, _ = load_config(["model=llama_tiny"])
    torch.manual_seed(0)
    w = build_model(cfg.model).layers[0].attn.q_proj.weight.detach().clone()
    _, _, m = built("lowrank", "method.init=svd")
    u, s, vh = torch.linalg.svd(w)
    torch.testing.assert_close(m.layers[0].attn.q_proj.dense_weight(), (u[:, :8] * s[:8]) @ vh[:8], atol=1e-5, rtol=1e-4)


# -- ReLoRA ----------------------------------------------------------------------------------------------


def _relora_after_training(*overrides):
    cfg, plugin, m = built("relora", "method.merge_every=5", "method.restart_warmup_steps=2", "method.lora_dropout=0",
                           *overrides)
    opt = plugin.build_optimizer(plugin.param_groups(m, cfg.optim), cfg.optim)
    ids = torch.randint(0, cfg.model.vocab_size, (2, 16))
    train_steps(m, opt, ids)
    return cfg, plugin, m, opt, ids


def test_relora_merge_preserves_the_function_and_restarts_the_adapters():
    cfg, plugin, m, opt, ids = _relora_after_training()
    m.eval()
    before = m(ids)
    a_before = [x.lora_A.detach().clone() for x in lora_modules(m)]
    plugin.after_step(StepContext(step=4, model=m, optimizer=opt, lr=0.0, loss=0.0))  # not a merge step
    assert all(torch.equal(x.lora_A, a) for x, a in zip(lora_modules(m), a_before))
    logged = {}
    plugin.after_step(StepContext(step=5, model=m, optimizer=opt, lr=0.0, loss=0.0, log=logged.update))
    torch.testing.assert_close(m(ids), before, rtol=1e-5, atol=1e-5)
    for x, a in zip(lora_modules(m), a_before):
        assert not x.lora_B.any() and not torch.equal(x.lora_A, a)
    assert logged["restarts"] == 1 and plugin.restarts == 1


@pytest.mark.parametrize("mode,ratio", [("magnitude", 0.9), ("magnitude", 0.5), ("random", 0.5), ("full", 0.9),
                                        ("none", 0.9)])
def test_relora_reset_prunes_exactly_the_intended_fraction_of_lora_state_only(mode, ratio):
    cfg, plugin, m, opt, ids = _relora_after_training(f"method.optimizer_reset={mode}", f"method.reset_ratio={ratio}")
    lora = {id(p) for p in adapter_parameters(m)}
    snapshot = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in m.parameters() if p.requires_grad}
    plugin.after_step(StepContext(step=5, model=m, optimizer=opt, lr=0.0, loss=0.0))
    for p in m.parameters():
        if not p.requires_grad:
            continue
        state, old = opt.state[p], snapshot[id(p)]
        assert torch.equal(state["step"], old["step"])  # bias correction goes on
        for key in ("exp_avg", "exp_avg_sq"):
            t, o = state[key], old[key]
            if id(p) not in lora or mode == "none":
                assert torch.equal(t, o)  # embeddings, head, norms keep their state
                continue
            assert torch.count_nonzero(o) == o.numel()  # (no zeros before: the count below is exact)
            zeros = int((t == 0).sum())
            if mode == "magnitude":  # exactly the int(p * numel) smallest |values| are gone, the rest kept
                k = int(ratio * t.numel())
                assert zeros == k
                keep = o.abs().flatten().argsort(stable=True)[k:]
                assert torch.equal(t.flatten()[keep], o.flatten()[keep])
            elif mode == "random":
                assert abs(zeros / t.numel() - ratio) < 0.1
                kept = t != 0
                assert torch.equal(t[kept], o[kept])
            else:
                assert zeros == t.numel()


def test_relora_jagged_schedule_shape():
    _, plugin, _ = built("relora", "method.merge_every=10", "method.restart_warmup_steps=4")
    f = [plugin.lr_factor(s) for s in range(31)]
    assert f[:10] == [1.0] * 10  # the first cycle has only the base schedule's warmup
    assert f[10:15] == [0.0, 0.25, 0.5, 0.75, 1.0]  # after each merge: 0, then a linear ramp back
    assert f[15:20] == [1.0] * 5
    assert f[20:25] == f[10:15] and f[30] == 0.0
    _, plugin, _ = built("relora", "method.merge_every=10", "method.restart_warmup_steps=0")
    assert {plugin.lr_factor(s) for s in range(40)} == {1.0}


def test_relora_adapters_get_gradient_at_the_first_update():
    cfg, plugin, m = built("relora")
    ids = torch.randint(0, cfg.model.vocab_size, (2, 16))
    m(ids).logsumexp(-1).mean().backward()
    assert all(x.lora_B.grad.abs().sum() > 0 for x in lora_modules(m))


# -- PeriodicLoRA --------------------------------------------------------------------------------------


@pytest.mark.parametrize("unload", ["full", "momentum"])
def test_periodic_lora_unload_preserves_the_function(unload):
    cfg, plugin, m = built("periodic_lora", "method.unload_every=3", f"method.unload={unload}", "method.momentum=0.3",
                           "method.lora_dropout=0")
    opt = plugin.build_optimizer(plugin.param_groups(m, cfg.optim), cfg.optim)
    ids = torch.randint(0, cfg.model.vocab_size, (2, 16))
    train_steps(m, opt, ids)
    m.eval()
    before = m(ids)
    mods = lora_modules(m)
    w0 = [x.weight.detach().clone() for x in mods]
    deltas = [x.delta() for x in mods]
    factors = [(x.lora_A.detach().clone(), x.lora_B.detach().clone()) for x in mods]
    states = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in adapter_parameters(m)}
    plugin.after_step(StepContext(step=3, model=m, optimizer=opt, lr=0.0, loss=0.0))
    torch.testing.assert_close(m(ids), before, rtol=1e-5, atol=1e-5)
    c = 0.7 ** 0.5
    for x, w, d, (a, b) in zip(mods, w0, deltas, factors):
        if unload == "full":
            torch.testing.assert_close(x.weight, w + d)
            assert not x.lora_B.any() and not torch.equal(x.lora_A, a)
        else:  # 30% of s·B·A moved into W0, the adapter keeps 70% of it
            torch.testing.assert_close(x.weight, w + 0.3 * d)
            torch.testing.assert_close(x.delta(), 0.7 * d, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(x.lora_A, c * a)
            torch.testing.assert_close(x.lora_B, c * b)
    for p in adapter_parameters(m):
        state, old = opt.state[p], states[id(p)]
        if unload == "full":  # a fresh optimizer's state for the new adapter
            assert int(state["step"]) == 0 and not state["exp_avg"].any() and not state["exp_avg_sq"].any()
        else:
            assert torch.equal(state["step"], old["step"])
            torch.testing.assert_close(state["exp_avg"], c * old["exp_avg"])
            torch.testing.assert_close(state["exp_avg_sq"], 0.7 * old["exp_avg_sq"])


# -- SLTrain -----------------------------------------------------------------------------------------------


def test_sltrain_support_is_fixed_random_and_of_density_delta():
    cfg, plugin, m = built("sltrain", "method.delta=0.05")
    mods = [x for x in m.modules() if isinstance(x, SparseLowRankLinear)]
    assert len(mods) == 14
    for x in mods:
        idx = x.sparse_index
        assert idx.numel() == int(0.05 * x.out_features * x.in_features) == x.sparse_values.numel()
        assert torch.equal(idx, idx.unique())  # sorted, no repeats
        assert 0 <= int(idx[0]) and int(idx[-1]) < x.out_features * x.in_features
        assert not x.lora_B.any()  # starts as S alone
        w = torch.zeros(x.out_features * x.in_features)
        w[idx] = x.sparse_values.detach()
        torch.testing.assert_close(x.dense_weight(), w.view(x.out_features, x.in_features))
    assert len({tuple(x.sparse_index[:5].tolist()) for x in mods}) == len(mods)  # a fresh support per target
    state = m.state_dict()
    assert "layers.0.attn.q_proj.sparse_index" in state and "layers.0.attn.q_proj.sparse_values" in state
    # the support never moves: a training step changes values, not indices
    opt = plugin.build_optimizer(plugin.param_groups(m, cfg.optim), cfg.optim)
    before = [x.sparse_index.clone() for x in mods]
    train_steps(m, opt, torch.randint(0, cfg.model.vocab_size, (2, 16)), n=1)
    assert all(torch.equal(x.sparse_index, b) for x, b in zip(mods, before))


def _dense_reference(x, a, b, values, index, scale):
    """Plain autograd on a dense weight: W = s·B·A + S, S scattered from the values."""
    m, n = b.shape[0], a.shape[1]
    w_sparse = torch.zeros(m * n, dtype=values.dtype).index_add(0, index, values).view(m, n)
    return torch.nn.functional.linear(x, scale * b @ a + w_sparse)


@pytest.mark.parametrize("block_elements", [1, 40, 10**9])  # one row per block, a few rows, all at once
def test_sparse_support_gradient_equals_the_dense_gradient_masked_to_the_support(block_elements):
    torch.manual_seed(0)
    m, n, r = 24, 20, 4
    layer = SparseLowRankLinear(n, m, r, scale=0.5, delta=0.2, generator=torch.Generator().manual_seed(1),
                                block_elements=block_elements)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 7, n, requires_grad=True)
    grad_out = torch.randn(3, 7, m)
    layer(x).backward(grad_out)

    # the literal statement: a dense W with autograd, its gradient masked to the support
    w = layer.dense_weight().detach().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(x_ref, w).backward(grad_out)
    torch.testing.assert_close(layer.sparse_values.grad, w.grad.view(-1)[layer.sparse_index])
    torch.testing.assert_close(x.grad, x_ref.grad)

    # and the factors against plain autograd through s·B·A + S
    a = layer.lora_A.detach().clone().requires_grad_(True)
    b = layer.lora_B.detach().clone().requires_grad_(True)
    v = layer.sparse_values.detach().clone().requires_grad_(True)
    _dense_reference(x.detach(), a, b, v, layer.sparse_index, 0.5).backward(grad_out)
    torch.testing.assert_close(layer.lora_A.grad, a.grad)
    torch.testing.assert_close(layer.lora_B.grad, b.grad)
    torch.testing.assert_close(layer.sparse_values.grad, v.grad)


def test_support_gradient_holds_at_most_one_block_of_the_dense_product():
    g, x = torch.randn(5, 12), torch.randn(5, 9)
    index = torch.tensor([0, 8, 9, 30, 31, 107])
    shapes = []
    real_matmul = torch.Tensor.__matmul__

    def spy(a, b):
        out = real_matmul(a, b)
        shapes.append(tuple(out.shape))
        return out

    torch.Tensor.__matmul__ = spy
    try:
        got = support_gradient(g, x, index, block_rows=2)
    finally:
        torch.Tensor.__matmul__ = real_matmul
    torch.testing.assert_close(got, (g.t() @ x).view(-1)[index])
    assert shapes and max(s[0] for s in shapes) <= 2  # blocks of 2 rows; empty blocks skipped
    assert len(shapes) == 3  # rows 0-1, 2-3, 10-11 hold support entries


def test_sparse_low_rank_function_under_bf16_autocast():
    torch.manual_seed(0)
    layer = SparseLowRankLinear(16, 12, 4, scale=1.0, delta=0.3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = SparseLowRankFunction.apply(x, layer.lora_A, layer.lora_B, layer.sparse_values, layer.sparse_index, 1.0, 4)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.sparse_values.grad.dtype == torch.float32 and layer.lora_A.grad.dtype == torch.float32
    ref = torch.nn.functional.linear(x, layer.dense_weight())
    torch.testing.assert_close(y.float(), ref, rtol=0.05, atol=0.05)
