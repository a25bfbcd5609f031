"""LORO: the exact Riemannian step against a dense tangent projection + truncated-SVD retraction written
here, the optimizer's lazy and exact updates against hand-written Adam, the refresh and LR restart,
per-layer order independence, export and bad values. (Learning and bit-for-bit resume through the CLI:
tests/test_reparam_cli.py.)"""

from __future__ import annotations

import math

import pytest
import torch
from test_errors import one_line

from lrpretrain.methods import StepContext, get_method
from lrpretrain.model import build_model
from lrpretrain.optim.loro import LOROAdamW, riemannian_step
from lrpretrain.train import load_config

from conftest import TINY

pytestmark = pytest.mark.usefixtures("one_thread")


def dense_loro_step(W: torch.Tensor, G: torch.Tensor, r: int, lr: float) -> torch.Tensor:
    """W - lr·P_T(G) retracted to rank r by its truncated SVD, all in dense float64 (P_T: the projection
    onto the tangent space of the rank-r manifold at W, from W's own singular vectors)."""
    W, G = W.double(), G.double()
    u, _, vh = torch.linalg.svd(W, full_matrices=False)
    pu, pv = u[:, :r] @ u[:, :r].T, vh[:r].T @ vh[:r]
    tangent = pu @ G + G @ pv - pu @ G @ pv
    u, s, vh = torch.linalg.svd(W - lr * tangent, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r]


@pytest.mark.parametrize("m,n,r", [(24, 10, 3), (10, 24, 3), (16, 16, 8), (12, 20, 7)])  # both orientations; 2r > n
def test_riemannian_step_is_tangent_projection_then_retraction(m, n, r):
    """Several steps of a quadratic loss ½‖W - T‖² (G = W - T): each exact step equals the dense
    reference, stays of rank r and leaves the factors balanced (BᵀB = AAᵀ = Σ)."""
    g = torch.Generator().manual_seed(m * 100 + n)
    B, A = torch.randn(m, r, generator=g), torch.randn(r, n, generator=g)
    target = torch.randn(m, n, generator=g)
    for _ in range(4):
        W = B @ A
        G = W - target
        expected = dense_loro_step(W, G, r, 0.3)
        B, A = riemannian_step(B, A, G @ A.T, B.T @ G, 0.3)  # the factors' gradients: ∇B = G Aᵀ, ∇A = Bᵀ G
        torch.testing.assert_close((B @ A).double(), expected, rtol=1e-4, atol=1e-4)
        assert torch.linalg.matrix_rank(B @ A).item() == r
        torch.testing.assert_close(B.T @ B, A @ A.T, rtol=1e-4, atol=1e-4)
        gram = B.T @ B
        torch.testing.assert_close(gram, torch.diag(torch.diagonal(gram)), rtol=1e-4, atol=1e-4)


def test_riemannian_step_with_zero_lr_keeps_the_product():
    g = torch.Generator().manual_seed(0)
    B, A = torch.randn(9, 2, generator=g), torch.randn(2, 7, generator=g)
    nb, na = riemannian_step(B, A, torch.randn(9, 2, generator=g), torch.randn(2, 7, generator=g), 0.0)
    torch.testing.assert_close(nb @ na, B @ A, rtol=1e-5, atol=1e-5)


def _adam_direction(m, v, t, b1, b2, eps):
    """The reference's Adam (transformers' form): m / (√v + eps) at step size √(1 - β₂ᵗ) / (1 - β₁ᵗ)."""
    return m / (v.sqrt() + eps) * (1 - b2**t) ** 0.5 / (1 - b1**t)


def test_optimizer_lazy_and_exact_updates_against_hand_written_adam():
    """K = 3: updates 0 and 1 are lazy (Adam at lr·scale), update 2 exact (the Riemannian step of the
    Adam-normalised directions at the unscaled lr); the dense parameter is plain Adam throughout."""
    g = torch.Generator().manual_seed(1)
    m, n, r = 11, 7, 2
    B = torch.nn.Parameter(torch.randn(m, r, generator=g))
    A = torch.nn.Parameter(torch.randn(r, n, generator=g))
    w = torch.nn.Parameter(torch.randn(5, generator=g))
    lr, scale, b1, b2, eps = 0.05, 0.25, 0.9, 0.999, 1e-8
    opt = LOROAdamW([{"params": [B, A], "loro": True, "lazy_scale": scale, "exact_every": 3},
                     {"params": [w]}], lr=lr, betas=(b1, b2), eps=eps)
    ref = {"B": B.detach().clone(), "A": A.detach().clone(), "w": w.detach().clone()}
    mom = {k: (torch.zeros_like(v), torch.zeros_like(v)) for k, v in ref.items()}
    for t in range(1, 4):
        grads = {"B": torch.randn(m, r, generator=g), "A": torch.randn(r, n, generator=g), "w": torch.randn(5, generator=g)}
        for p, k in ((B, "B"), (A, "A"), (w, "w")):
            p.grad = grads[k].clone()
        opt.step()
        opt.set_update(t)
        dirs = {}
        for k in ref:
            mk, vk = mom[k]
            mk, vk = b1 * mk + (1 - b1) * grads[k], b2 * vk + (1 - b2) * grads[k] ** 2
            mom[k] = (mk, vk)
            dirs[k] = _adam_direction(mk, vk, t, b1, b2, eps)
        ref["w"] = ref["w"] - lr * dirs["w"]
        if t < 3:
            ref["B"], ref["A"] = ref["B"] - lr * scale * dirs["B"], ref["A"] - lr * scale * dirs["A"]
        else:  # exact: W - lr·ξ with ξ built from the two directions, retracted (here: the same formula)
            ref["B"], ref["A"] = riemannian_step(ref["B"], ref["A"], dirs["B"], dirs["A"], lr)
        for p, k in ((B, "B"), (A, "A"), (w, "w")):
            torch.testing.assert_close(p.detach(), ref[k], rtol=1e-5, atol=1e-6)


def test_per_layer_order_of_a_pair_does_not_matter():
    """Per-layer updates step B and A one at a time, in backward order: the second one moves the pair."""
    g = torch.Generator().manual_seed(3)
    results = []
    for order in ("BA", "AB"):
        g.manual_seed(3)
        B = torch.nn.Parameter(torch.randn(9, 2, generator=g))
        A = torch.nn.Parameter(torch.randn(2, 6, generator=g))
        opt = LOROAdamW([{"params": [B, A], "loro": True, "lazy_scale": 0.5, "exact_every": 2}], lr=0.05)
        for t in range(4):
            grads = {"B": torch.randn(9, 2, generator=g), "A": torch.randn(2, 6, generator=g)}
            B.grad, A.grad = grads["B"], grads["A"]
            with torch.no_grad():  # as the per-layer hooks
                for k in order:
                    p = B if k == "B" else A
                    opt.step_param(p, opt.group_of(p))
            opt.set_update(t + 1)
        results.append((B.detach().clone(), A.detach().clone()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def _built(*overrides):
    cfg, _ = load_config(["model=llama_tiny", "method=loro", "method.rank=8", *overrides])
    torch.manual_seed(0)
    plugin = get_method("loro")(cfg.method, cfg.model)
    model = plugin.prepare_model(build_model(cfg.model))
    return cfg, plugin, model


def test_xavier_init_cost_and_lazy_scale():
    cfg, plugin, model = _built()
    q = model.layers[0].attn.q_proj
    assert q.lora_B.shape == (128, 8) and q.lora_A.shape == (8, 128)
    big_cfg, big, bigm = _built("model.dim=512", "model.ffn_dim=1024", "model.n_heads=8", "method.rank=64")
    for p in (bigm.layers[0].mlp.up_proj.lora_B, bigm.layers[0].mlp.up_proj.lora_A):  # xavier std sqrt(2/(fan_in+fan_out))
        assert p.std().item() == pytest.approx(math.sqrt(2.0 / sum(p.shape)), rel=0.05)
    counts = sum(p.numel() for p in model.parameters())
    cost = plugin.cost(cfg.model, 64)
    assert cost["params"] == cost["trainable_params"] == counts == plugin.trainable_parameters(model)
    assert plugin.lazy_scale == 8 / 128  # r / d


def test_refresh_and_lr_restart_after_each_exact_step():
    cfg, plugin, model = _built("method.exact_every=4", "method.restart_warmup_steps=2")
    opt = plugin.build_optimizer(plugin.param_groups(model, cfg.optim), cfg.optim)
    ids = torch.randint(0, cfg.model.vocab_size, (2, 16))
    logged = {}
    for step in range(1, 5):
        model(ids).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        plugin.after_step(StepContext(step, model, opt, 0.0, 0.0, logged.update))
        assert len(opt.state) == (0 if step == 4 else len(list(model.parameters())))  # every state refreshed at 4
    assert logged["loro_exact_steps"] == 1
    assert [plugin.lr_factor(s) for s in range(10)] == [1, 1, 1, 1, 0, 0.5, 1, 1, 0, 0.5]
    cfg, plugin, model = _built("method.exact_every=2", "method.restart_warmup_steps=1", "method.refresh=lowrank")
    opt = plugin.build_optimizer(plugin.param_groups(model, cfg.optim), cfg.optim)
    model(ids).logsumexp(-1).mean().backward()
    opt.step()
    plugin.after_step(StepContext(2, model, opt, 0.0, 0.0))
    assert all(p not in opt.state for p in plugin.factors()) and opt.state[model.embed_tokens.weight]


def test_bad_values_are_one_clear_line(cli, tmp_path):
    for args, expected in [
        (["method.rank=0"], "method.rank=0 is invalid: must be > 0"),
        (["method.rank=129"], "method.rank=129 is invalid: must be <= min(m, n) = 128 for q_proj"),
        (["method.exact_every=0"], "method.exact_every=0 is invalid: must be > 0"),
        (["method.exact_every=4", "method.restart_warmup_steps=5"],
         "method.restart_warmup_steps=5 is invalid: must be in [0, method.exact_every=4]"),
        (["method.refresh=some"], "method.refresh='some' is invalid: allowed: all, lowrank, none"),
        (["method.lazy_lr_scale=0"], "method.lazy_lr_scale=0.0 is invalid: must be > 0, or null"),
    ]:
        one_line(cli("train", *TINY, f"run.dir={tmp_path / 'run'}", "method=loro", *args), expected)
    assert not (tmp_path / "run").exists()
