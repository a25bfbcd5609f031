"""DLRT: the factorised layer's gradients against dense autograd, the integrator's update against a
basis-update & Galerkin step written here (SGD: several steps, both orientations, rank-adaptive and
fixed; Adam: its first step and the moments' re-projection), the truncation rule, orthonormal factors,
checkpoints that carry the ranks, export and bad values. (Learning and bit-for-bit resume across rank
changes through the CLI: tests/test_reparam_cli.py.)"""

from __future__ import annotations

import copy

import pytest
import torch
from test_errors import one_line

from lrpretrain.methods import StepContext, get_method
from lrpretrain.methods.dlrt import BUGIntegrator, DLRTLinear, truncation_rank
from lrpretrain.model import build_model, lm_loss
from lrpretrain.train import load_config

from conftest import TINY

pytestmark = pytest.mark.usefixtures("one_thread")


def orthonormal(rows: int, cols: int, g: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=dtype))[0]


def layer_at(m: int, n: int, r: int, g: torch.Generator, dtype=torch.float32) -> DLRTLinear:
    layer = DLRTLinear(n, m, r, dtype=dtype)
    sigma = torch.sort(torch.rand(r, generator=g, dtype=dtype) + 0.5, descending=True).values
    layer.set_factors_(orthonormal(m, r, g, dtype), torch.diag(sigma), orthonormal(n, r, g, dtype))
    return layer


def dense_grad(W: torch.Tensor, loss_fn) -> torch.Tensor:
    """G = ∂loss/∂W by autograd on a dense W (the independent reference)."""
    W = W.detach().clone().requires_grad_(True)
    loss_fn(W).backward()
    return W.grad


def orth(X: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of X's column space (its numerical rank's leading left singular vectors)."""
    u = torch.linalg.svd(X, full_matrices=False)[0]
    return u[:, :torch.linalg.matrix_rank(X)]


def hand_written_bug(U, S, V, G_at, h, tol, adaptive, max_rank, min_rank=1):
    """One step of the basis-update & Galerkin integrator with explicit Euler substeps (Ceruti, Kusch &
    Lubich's rank-adaptive version, or the fixed-rank one), G_at(W) the loss's gradient in W. Plain QRs:
    any orthonormal bases of the same spans give the same W (SGD is basis-invariant)."""
    W0 = U @ S @ V.T
    G = G_at(W0)
    K1, L1 = U @ S - h * G @ V, V @ S.T - h * G.T @ U
    if adaptive:
        U_hat, V_hat = orth(torch.cat([K1, U], 1)), orth(torch.cat([L1, V], 1))
    else:
        U_hat, V_hat = torch.linalg.qr(K1)[0], torch.linalg.qr(L1)[0]
    S_tilde = (U_hat.T @ U) @ S @ (V.T @ V_hat)
    G = G_at(U_hat @ S_tilde @ V_hat.T)  # the same W: the S-step's gradient at the same point
    S1 = S_tilde - h * U_hat.T @ G @ V_hat
    if not adaptive:
        return U_hat, S1, V_hat
    P, sigma, Qh = torch.linalg.svd(S1)
    r = next(j for j in range(len(sigma) + 1) if torch.linalg.vector_norm(sigma[j:]) <= tol * torch.linalg.vector_norm(sigma))
    r = max(min(r, max_rank), min_rank)
    return U_hat @ P[:, :r], torch.diag(sigma[:r]), V_hat @ Qh[:r].T


def toy_problem(m, n, g, dtype=torch.float32):
    x, target = torch.randn(32, n, generator=g, dtype=dtype), torch.randn(32, m, generator=g, dtype=dtype)
    return x, target, (lambda W: 0.5 * (x @ W.T - target).square().sum())


def run_integrator(layer: DLRTLinear, x, target, **kw) -> BUGIntegrator:
    """One update as the trainer runs it: first pass, then step(closure) with the second pass."""
    opt = BUGIntegrator([{"params": [layer.K, layer.L, layer.S], "dlrt": True}], [layer], **kw)

    def loss():
        return 0.5 * (layer(x) - target).square().sum()

    def closure():
        value = loss()
        value.backward()
        return value.item()

    loss().backward()
    opt.step(closure)
    return opt


@pytest.mark.parametrize("m,n", [(20, 12), (12, 20)])
def test_layer_gradients_are_the_integrators_products(m, n):
    """K.grad = G V, L.grad = Gᵀ U, x.grad = dy W (first pass), S̃.grad = Ûᵀ G V̂ (second pass); no G formed."""
    g = torch.Generator().manual_seed(0)
    layer = layer_at(m, n, 4, g)
    x = torch.randn(3, 5, n, generator=g, requires_grad=True)
    dy = torch.randn(3, 5, m, generator=g)
    W = layer.dense_weight()
    torch.testing.assert_close(layer(x), x @ W.T, rtol=1e-5, atol=1e-5)
    layer(x).backward(dy)
    G = dense_grad(W, lambda w: (x.detach() @ w.T * dy).sum())
    torch.testing.assert_close(layer.K.grad, G @ layer.V)
    torch.testing.assert_close(layer.L.grad, G.T @ layer.U)
    torch.testing.assert_close(x.grad, dy @ W)
    assert layer.S.grad is None
    U_hat, V_hat = orthonormal(m, 8, g), orthonormal(n, 8, g)
    core = layer.begin_galerkin(U_hat, torch.randn(8, 8, generator=g), V_hat)
    layer(x.detach()).backward(dy)
    G2 = dense_grad(layer.dense_weight(), lambda w: (x.detach() @ w.T * dy).sum())
    torch.testing.assert_close(core.grad, U_hat.T @ G2 @ V_hat)


def test_layer_under_bf16_autocast():
    g = torch.Generator().manual_seed(1)
    layer = layer_at(16, 12, 4, g)
    x = torch.randn(2, 3, 12, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.K.grad.dtype == torch.float32 and layer.L.grad.dtype == torch.float32
    torch.testing.assert_close(y.float(), x @ layer.dense_weight().T, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("adaptive", [True, False])
@pytest.mark.parametrize("m,n", [(24, 14), (14, 24)])
def test_integrator_step_equals_a_hand_written_bug_step(m, n, adaptive):
    """kls_optimizer=sgd: five updates of a least-squares loss, each equal to the hand-written step (the
    same W, the same rank), the factors orthonormal throughout; in fp64, where the two ways of building
    the augmented bases agree to many digits."""
    g = torch.Generator().manual_seed(m)
    x, target, loss_of = toy_problem(m, n, g, torch.float64)
    layer = layer_at(m, n, 3, g, torch.float64)
    U, S, V = layer.U.clone(), layer.S.detach().clone(), layer.V.clone()
    h, tol, max_rank = 2e-3, 0.02, 6
    ranks = []
    for _ in range(5):
        run_integrator(layer, x, target, lr=h, kls_optimizer="sgd", adaptive=adaptive, tol=tol, min_rank=1,
                       max_rank=max_rank if adaptive else 3)
        U, S, V = hand_written_bug(U, S, V, lambda w: dense_grad(w, loss_of), h, tol, adaptive, max_rank)
        assert layer.rank == S.shape[0]
        torch.testing.assert_close(layer.dense_weight(), (U @ S @ V.T).float(), rtol=1e-5, atol=1e-6)
        eye = torch.eye(layer.rank, dtype=torch.float64)
        torch.testing.assert_close(layer.U.T @ layer.U, eye, rtol=0, atol=1e-12)
        torch.testing.assert_close(layer.V.T @ layer.V, eye, rtol=0, atol=1e-12)
        torch.testing.assert_close(layer.K.detach(), layer.U @ layer.S.detach())
        ranks.append(layer.rank)
    assert ranks != [3] * 5 if adaptive else ranks == [3] * 5  # the tolerance lets the rank grow


def test_adam_first_update_and_the_moments_follow_the_bases():
    """kls_optimizer=adam, update 1 written out: each substep moves by lr·g/(|g| + eps) (Adam's first
    step), the augmented bases put the old basis first. Then K's first moment, (1-β₁)∇K in the old V's
    coordinates, is re-projected exactly into the new V; S's moments shrink to the new rank."""
    g = torch.Generator().manual_seed(5)
    m, n, r, lr, eps = 18, 11, 3, 0.01, 1e-8
    x, target, loss_of = toy_problem(m, n, g)
    layer = layer_at(m, n, r, g)
    U, S, V = layer.U.clone(), layer.S.detach().clone(), layer.V.clone()

    def adam1(p, grad):
        return p - lr * grad / (grad.abs() + eps)

    def aug(B, C):  # orth([B | C]) with a non-negative diagonal: B's columns first, kept as they are
        q, rr = torch.linalg.qr(torch.cat([B, C], 1))
        return q * torch.sign(torch.diagonal(rr))

    G = dense_grad(U @ S @ V.T, loss_of)
    K1, L1 = adam1(U @ S, G @ V), adam1(V @ S.T, G.T @ U)
    U_hat, V_hat = aug(U, K1), aug(V, L1)
    S_tilde = (U_hat.T @ U) @ S @ (V.T @ V_hat)
    S1 = adam1(S_tilde, U_hat.T @ G @ V_hat)
    P, sigma, Qh = torch.linalg.svd(S1)
    opt = run_integrator(layer, x, target, lr=lr, eps=eps, tol=0.05, min_rank=1, max_rank=6)
    r1 = truncation_rank(sigma, 0.05, 1, 6)
    assert layer.rank == r1
    torch.testing.assert_close(layer.dense_weight(), (U_hat @ P[:, :r1] * sigma[:r1]) @ (V_hat @ Qh[:r1].T).T,
                               rtol=1e-4, atol=1e-5)
    V1 = layer.V
    torch.testing.assert_close(opt.state[layer.K]["exp_avg"], 0.1 * (G @ V) @ (V.T @ V1), rtol=1e-4, atol=1e-6)
    assert opt.state[layer.L]["exp_avg"].shape == (n, r1) and opt.state[layer.S]["exp_avg"].shape == (r1, r1)


def test_truncation_keeps_exactly_the_rank_the_tolerance_asks_for():
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        k = int(torch.randint(2, 30, (1,), generator=g))
        sigma = torch.sort(torch.rand(k, generator=g) ** 3, descending=True).values
        total = torch.linalg.vector_norm(sigma)
        for tol in (0.01, 0.1, 0.3, 0.7):
            r = truncation_rank(sigma, tol, 1, k)
            assert torch.linalg.vector_norm(sigma[r:]) <= tol * total  # what it discards is within tolerance
            assert r == 1 or torch.linalg.vector_norm(sigma[r - 1:]) > tol * total  # and one fewer would not be
    sigma = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.5])
    assert truncation_rank(sigma, 0.5, 1, 5) == 2  # ‖(2, 1, .5)‖ = 2.29 <= 0.5·5.70, ‖(3, 2, 1, .5)‖ > 2.85
    assert truncation_rank(sigma, 0.5, 3, 5) == 3 and truncation_rank(sigma, 0.01, 1, 4) == 4  # the bounds
    assert truncation_rank(torch.zeros(4), 0.1, 2, 4) == 2


def _built(*overrides):
    cfg, _ = load_config(["model=llama_tiny", "method=dlrt", "method.rank=8", *overrides])
    torch.manual_seed(0)
    plugin = get_method("dlrt")(cfg.method, cfg.model)
    dense = build_model(cfg.model)
    model = build_model(cfg.model)
    model.load_state_dict(dense.state_dict())
    return cfg, plugin, plugin.prepare_model(model), dense


def test_init_is_the_truncated_svd_and_the_cost_counts_the_model():
    cfg, plugin, model, dense = _built()
    w = dense.layers[1].mlp.down_proj.weight.detach()
    u, s, vh = torch.linalg.svd(w)
    torch.testing.assert_close(model.layers[1].mlp.down_proj.dense_weight(), (u[:, :8] * s[:8]) @ vh[:8],
                               rtol=1e-4, atol=1e-5)
    cost = plugin.cost(cfg.model, 64)
    assert cost["params"] == cost["trainable_params"] == sum(p.numel() for p in model.parameters())
    assert plugin.trainable_parameters(model) == cost["params"]
    bases = sum(b.numel() for name, b in model.named_buffers() if name.endswith((".U", ".V")))
    assert cost["buffer_bytes"] == 4 * bases + sum(4 * b.numel() for name, b in model.named_buffers()
                                                   if not name.endswith((".U", ".V")))


def test_checkpoint_carries_the_ranks_and_ranks_are_logged():
    """After updates that change ranks, the model's state loads into a freshly built model (the layers take
    the ranks from the tensors' shapes) and so does the optimizer's; both continue identically."""
    cfg, plugin, model, _ = _built("method.max_rank=16", "method.tol=0.01", "method.min_rank=1", "optim.lr=0.01")
    opt = plugin.build_optimizer(plugin.param_groups(model, cfg.optim), cfg.optim)
    ids = torch.randint(0, cfg.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))

    def update(mdl, o, plg, step):
        loss = lambda: mdl(ids).logsumexp(-1).mean()  # noqa: E731
        loss().backward()

        def closure():
            value = loss()
            value.backward()
            return value.item()

        o.step(closure)
        o.zero_grad(set_to_none=True)
        logged = {}
        plg.after_step(StepContext(step, mdl, o, 0.0, 0.0, logged.update))
        return logged

    for step in (1, 2):
        logged = update(model, opt, plugin, step)
    assert logged["ranks"] == plugin.ranks() and len(logged["ranks"]) == 14 and set(logged["ranks"]) != {8}
    state, opt_state = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())  # as from a file
    _, fresh_plugin, fresh, _ = _built("method.max_rank=16", "method.tol=0.01", "method.min_rank=1", "optim.lr=0.01")
    fresh.load_state_dict(state, strict=True)
    assert fresh_plugin.ranks() == plugin.ranks()
    fresh_opt = fresh_plugin.build_optimizer(fresh_plugin.param_groups(fresh, cfg.optim), cfg.optim)
    fresh_opt.load_state_dict(opt_state)
    update(fresh, fresh_opt, fresh_plugin, 3)
    update(model, opt, plugin, 3)
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("args, expected", [
    (["method.rank=0"], "method.rank=0 is invalid: must be > 0"),
    (["method.rank=129"], "method.rank=129 is invalid: must be <= min(m, n) = 128 for q_proj"),
    (["method.max_rank=200"], "method.max_rank=200 is invalid: must be <= min(m, n) = 128 for q_proj"),
    (["method.rank=16", "method.max_rank=8"], "method.max_rank=8 is invalid: must be >= method.rank=16"),
    (["method.tol=0"], "method.tol=0.0 is invalid: must be in (0, 1)"),
    (["method.tol=1"], "method.tol=1.0 is invalid: must be in (0, 1)"),
    (["method.min_rank=0"], "method.min_rank=0 is invalid: must be in [1, method.rank=128]"),
    (["method.rank=8", "method.min_rank=9"], "method.min_rank=9 is invalid: must be in [1, method.rank=8]"),
    (["method.integrator=implicit"], "method.integrator='implicit' is invalid: allowed: adaptive, fixed"),
    (["method.kls_optimizer=lion"], "method.kls_optimizer='lion' is invalid: allowed: adam, sgd"),
    (["method.rank=8", "trainer.per_layer_update=true"],
     "trainer.per_layer_update=True is invalid: method 'dlrt' cannot update per layer: the BUG integrator"),
])
def test_bad_values_are_one_clear_line(cli, tmp_path, args, expected):
    one_line(cli("train", *TINY, f"run.dir={tmp_path / 'run'}", "method=dlrt", *args), expected)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_recompute_leaves_both_passes_unchanged(mode):
    """Block recomputation re-runs the factorised forward in both passes: the update (new ranks, factors)
    is the one without it, bit for bit."""
    from lrpretrain.train.recompute import apply_recompute

    ids = torch.randint(0, 8192, (2, 32), generator=torch.Generator().manual_seed(0))
    states = []
    for recompute in ("none", mode):
        cfg, plugin, model, _ = _built("method.rank=16", "method.tol=0.3", "optim.lr=0.01")
        apply_recompute(model, recompute, 1, plugin)
        opt = plugin.build_optimizer(plugin.param_groups(model, cfg.optim), cfg.optim)
        lm_loss(model(ids), ids)[0].backward()

        def closure(m=model):
            loss = lm_loss(m(ids), ids)[0]
            loss.backward()
            return loss.item()

        opt.step(closure)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    assert plugin.ranks() != [16] * 14
    assert states[0].keys() == states[1].keys() and all(torch.equal(states[0][k], states[1][k]) for k in states[0])
