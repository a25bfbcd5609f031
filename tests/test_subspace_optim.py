"""Projected-gradient optimizers against small independent implementations of their equations.

Each reference below is written from the papers' / reference codes' equations with plain torch, for
one weight, over several steps across projection refreshes, for both orientations (m > n: the right
side is projected; m < n: the left side). Plus: SVD fallbacks, moments across refreshes, exact
resume between two refreshes, 8-bit states against fp32 ones.
"""

from __future__ import annotations

import io
import math

import pytest
import torch

from lrpretrain.optim import AdamW, Apollo, FiraAdamW, FrugalAdamW, GaLoreAdamW, moments, quant8
from lrpretrain.optim.projector import DCTBasis, dct_basis, next_seed, svd_bases

SHAPES = [(20, 12), (12, 20)]


pytestmark = pytest.mark.usefixtures("one_thread")
LR, BETAS, EPS, T, RANK = 0.01, (0.9, 0.999), 1e-6, 3, 4


def _grads(shape, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def _group(W, **kw):
    return {"params": [W], "projected": True, "rank": RANK, "update_proj_gap": T, "scale": 0.25, "proj_type": "std", **kw}


def _run(opt, params, grads_per_param):
    for step_grads in zip(*grads_per_param):
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()


class RefAdam:
    """Adam moments in the GaLore/transformers form: N = m / (sqrt(v) + eps), step lr·sqrt(bc2)/bc1."""

    def __init__(self):
        self.m = self.v = None
        self.t = 0

    def __call__(self, R, torch_form=False):
        if self.m is None:
            self.m, self.v = torch.zeros_like(R), torch.zeros_like(R)
        b1, b2 = BETAS
        self.t += 1
        self.m = b1 * self.m + (1 - b1) * R
        self.v = b2 * self.v + (1 - b2) * R * R
        bc1, bc2 = 1 - b1**self.t, 1 - b2**self.t
        if torch_form:
            return self.m / (self.v.sqrt() / math.sqrt(bc2) + EPS), 1 / bc1
        return self.m / (self.v.sqrt() + EPS), math.sqrt(bc2) / bc1


def svd_basis(G, rank):
    """(P, Q) of GaLore's std projection: right factor when m >= n, else left."""
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    return (None, Vh[:rank]) if G.shape[0] >= G.shape[1] else (U[:, :rank], None)


def down(G, P, Q):
    return P.T @ G if P is not None else G @ Q.T


def up(R, P, Q):
    return P @ R if P is not None else R @ Q


def galore_reference(W, grads, alpha=0.25, basis=svd_basis):
    adam = RefAdam()
    for i, G in enumerate(grads):
        if i % T == 0:
            P, Q = basis(G, RANK)
        N, f = adam(down(G, P, Q))
        W = W - LR * f * alpha * up(N, P, Q)
    return W


def limiter(x, prev, gamma=1.01):
    norm = x.norm()
    if prev is None:
        return x, norm
    ratio = norm / (prev + 1e-8)
    if ratio > gamma:
        return x * gamma / ratio, norm * gamma / ratio
    return x, norm


def fira_reference(W, grads, residual="reference", alpha=0.25):
    adam, prev = RefAdam(), None
    for i, G in enumerate(grads):
        if i % T == 0:
            P, Q = svd_basis(G, RANK)
        R = down(G, P, Q)
        N, f = adam(R)
        S = G - (alpha if residual == "reference" else 1.0) * up(R, P, Q)
        if P is not None:  # left projection: one factor per column
            phi = N.norm(dim=0) / (R.norm(dim=0) + 1e-8)
            S = S * phi[None, :]
        else:  # right projection: one factor per row
            phi = N.norm(dim=1) / (R.norm(dim=1) + 1e-8)
            S = S * phi[:, None]
        S, prev = limiter(S, prev)
        W = W - LR * f * (alpha * up(N, P, Q) + S)
    return W


@pytest.mark.parametrize("shape", SHAPES)
def test_galore_matches_reference(shape):
    grads = _grads(shape, 7)
    W0 = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    W = torch.nn.Parameter(W0.clone())
    _run(GaLoreAdamW([_group(W)], lr=LR, betas=BETAS, eps=EPS), [W], [grads])
    torch.testing.assert_close(W.detach(), galore_reference(W0, grads), rtol=1e-5, atol=1e-6)


def test_galore_dense_groups_are_adam_in_the_reference_form():
    b0 = torch.randn(9)
    b = torch.nn.Parameter(b0.clone())
    grads = _grads((9,), 5)
    _run(GaLoreAdamW([{"params": [b]}], lr=LR, betas=BETAS, eps=EPS), [b], [grads])
    adam, ref = RefAdam(), b0
    for G in grads:
        N, f = adam(G)
        ref = ref - LR * f * N
    torch.testing.assert_close(b.detach(), ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape", SHAPES)
def test_galore_dct_matches_reference(shape):
    def dct_top(G, rank):
        m, n = G.shape
        if m >= n:
            D = dct_basis(n, G.device, torch.float32)
            idx = (G @ D).norm(dim=0).argsort(descending=True)[:rank]
            return None, D[:, idx].T
        D = dct_basis(m, G.device, torch.float32)
        idx = (D.T @ G).norm(dim=1).argsort(descending=True)[:rank]
        return D[:, idx], None

    grads = _grads(shape, 7)
    W0 = torch.randn(*shape)
    W = torch.nn.Parameter(W0.clone())
    opt = GaLoreAdamW([_group(W)], basis=DCTBasis(), lr=LR, betas=BETAS, eps=EPS)
    _run(opt, [W], [grads])
    torch.testing.assert_close(W.detach(), galore_reference(W0, grads, basis=dct_top), rtol=1e-5, atol=1e-6)
    state = opt.state[W]
    assert not any(k in state for k in ("proj_left", "proj_right"))  # only indices are stored
    assert state[f"proj_{'right' if shape[0] >= shape[1] else 'left'}_index"].dtype == torch.int64


def test_dct_basis_is_orthonormal():
    D = dct_basis(24, torch.device("cpu"), torch.float64)
    torch.testing.assert_close(D.T @ D, torch.eye(24, dtype=torch.float64))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("residual", ["reference", "paper"])
def test_fira_matches_reference(shape, residual):
    grads = _grads(shape, 7)
    W0 = torch.randn(*shape)
    W = torch.nn.Parameter(W0.clone())
    _run(FiraAdamW([_group(W, residual=residual)], lr=LR, betas=BETAS, eps=EPS), [W], [grads])
    torch.testing.assert_close(W.detach(), fira_reference(W0, grads, residual), rtol=1e-5, atol=1e-6)


def test_fira_limiter_caps_norm_growth():
    W = torch.nn.Parameter(torch.zeros(16, 8))
    opt = FiraAdamW([_group(W, update_proj_gap=100)], lr=LR)
    G = torch.randn(16, 8)
    W.grad = G.clone()
    opt.step()
    first = opt.state[W]["limiter_norm"].item()
    W.grad = 50 * G  # a spike: the scaled residual would grow ~50x
    opt.step()
    assert opt.state[W]["limiter_norm"].item() == pytest.approx(1.01 * first, rel=1e-5)
    W.grad = 0.5 * G  # shrinking is never limited
    opt.step()
    assert opt.state[W]["limiter_norm"].item() < 1.01 * first


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mini", [False, True])
def test_apollo_matches_reference(shape, mini):
    """The update equations, given the random projections the optimizer drew (checked separately)."""
    grads = _grads(shape, 7)
    W0 = torch.randn(*shape)
    W = torch.nn.Parameter(W0.clone())
    kw = dict(rank=1, scale=128.0, scale_type="tensor", scale_front=True) if mini else dict(rank=RANK, scale=2.0)
    opt = Apollo([_group(W, **kw)], lr=LR, betas=BETAS, eps=EPS)
    bases = []
    for G in grads:
        W.grad = G.clone()
        opt.step()
        bases.append(opt.basis.get(opt.state[W], G, "right" if shape[0] >= shape[1] else "left", kw["rank"]))
    adam, prev, ref = RefAdam(), None, W0
    alpha = kw["scale"]
    for (P, Q), G in zip(bases, grads):
        R = down(G, P, Q)
        N, f = adam(R)
        if mini:
            s = N.norm() / (R.norm() + 1e-8)
        elif P is not None:
            s = (N.norm(dim=0) / (R.norm(dim=0) + 1e-8))[None, :]
        else:
            s = (N.norm(dim=1) / (R.norm(dim=1) + 1e-8))[:, None]
        scaled = G * s * (math.sqrt(alpha) if mini else 1.0)
        scaled, prev = limiter(scaled, prev)
        if not mini:
            scaled = scaled * math.sqrt(alpha)
        ref = ref - LR * f * scaled
    torch.testing.assert_close(W.detach(), ref, rtol=1e-5, atol=1e-6)


def test_apollo_projection_is_gaussian_seeded_and_resampled_every_T():
    W = torch.nn.Parameter(torch.zeros(600, 400))
    opt = Apollo([_group(W, rank=64)], lr=LR, seed=3)
    seen = []
    for _ in range(2 * T):
        W.grad = torch.randn(600, 400)
        opt.step()
        seen.append(opt.state[W]["proj_seed"])
    assert seen[:T] == [seen[0]] * T and seen[T:] == [next_seed(seen[0])] * T
    P, Q = opt.basis.get(opt.state[W], W.grad, "right", 64)
    assert P is None and Q.shape == (64, 400)
    assert abs(Q.std().item() - 1 / 8) < 0.01 and abs(Q.mean().item()) < 0.01  # N(0, 1/r)
    again = Apollo([_group(torch.nn.Parameter(torch.zeros(600, 400)), rank=64)], lr=LR, seed=3)
    p2 = again.param_groups[0]["params"][0]
    p2.grad = torch.randn(600, 400)
    again.step()
    assert again.state[p2]["proj_seed"] == seen[0]  # a seed reproduces the projection sequence


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rule", ["sign_sgd", "sgd"])
def test_frugal_svd_matches_reference(shape, rule):
    density = 0.25
    grads = _grads(shape, 7)
    W0 = torch.randn(*shape)
    W = torch.nn.Parameter(W0.clone())
    group = {"params": [W], "projected": True, "density": density, "update_proj_gap": T, "scale": 1.0,
             "proj_type": "std", "inactive_update_rule": rule}
    _run(FrugalAdamW([group], subspace="svd", lr=LR, betas=BETAS, eps=EPS), [W], [grads])
    rank = round(min(shape) * density)
    ref = W0
    for i, G in enumerate(grads):
        if i % T == 0:
            P, Q = svd_basis(G, rank)
            adam = RefAdam()  # reset_statistics: fresh moments and bias correction
        R = down(G, P, Q)
        N, f = adam(R, torch_form=True)
        residual = G - up(R, P, Q)
        free = residual.sign() if rule == "sign_sgd" else residual
        ref = ref - LR * f * up(N, P, Q) - LR * free
    torch.testing.assert_close(W.detach(), ref, rtol=1e-5, atol=1e-6)


def test_frugal_block_switches_whole_matrices():
    params = [torch.nn.Parameter(torch.randn(16, 8)) for _ in range(8)]
    group = {"params": params, "projected": True, "density": 0.25, "update_proj_gap": T, "scale": 1.0,
             "proj_type": "std", "block_order": "descending"}
    opt = FrugalAdamW([group], subspace="block", lr=LR, betas=BETAS, eps=EPS)
    start = [p.detach().clone() for p in params]
    grads = [_grads((16, 8), 2 * T, seed=i) for i in range(8)]
    for cycle in range(2):
        for step in range(T):
            for p, g in zip(params, grads):
                p.grad = g[cycle * T + step].clone()
            opt.step()
        active = [i for i, p in enumerate(params) if moments.has_moments(opt.state[p])]
        assert active == ([6, 7] if cycle == 0 else [4, 5])  # descending: the last matrices first
    # cycle 1: matrix 0 was inactive throughout: signSGD only
    expected = start[0] - LR * sum(g.sign() for g in grads[0])
    torch.testing.assert_close(params[0].detach(), expected, rtol=1e-6, atol=1e-6)
    # matrix 7 was active in cycle 0 (fresh Adam), inactive in cycle 1
    adam, ref = RefAdam(), start[7]
    for i in range(2 * T):
        if i < T:
            N, f = adam(grads[7][i], torch_form=True)
            ref = ref - LR * f * N
        else:
            ref = ref - LR * grads[7][i].sign()
    torch.testing.assert_close(params[7].detach(), ref, rtol=1e-5, atol=1e-6)


# -- SVD fallbacks --------------------------------------------------------------------------------


def test_zero_gradient_first_refresh_gives_a_finite_orthonormal_basis():
    W = torch.nn.Parameter(torch.randn(20, 12))
    opt = GaLoreAdamW([_group(W)], lr=LR)
    W.grad = torch.zeros(20, 12)
    opt.step()
    Q = opt.state[W]["proj_right"]
    torch.testing.assert_close(Q @ Q.T, torch.eye(RANK), atol=1e-5, rtol=0)
    assert torch.isfinite(W).all() and opt.svd_fallbacks() == 1


def test_zero_gradient_later_keeps_the_previous_basis():
    W = torch.nn.Parameter(torch.randn(12, 20))
    opt = GaLoreAdamW([_group(W)], lr=LR)
    for G in _grads((12, 20), T):
        W.grad = G
        opt.step()
    before = opt.state[W]["proj_left"].clone()
    W.grad = torch.zeros(12, 20)
    opt.step()
    assert torch.equal(opt.state[W]["proj_left"], before) and torch.isfinite(W).all()


def test_rank_deficient_gradient_needs_no_fallback():
    W = torch.nn.Parameter(torch.randn(20, 12))
    opt = GaLoreAdamW([_group(W)], lr=LR)
    u, v = torch.randn(20, 1), torch.randn(1, 12)
    for _ in range(2 * T):
        W.grad = u @ v  # rank 1 < r = 4
        opt.step()
    Q = opt.state[W]["proj_right"]
    torch.testing.assert_close(Q @ Q.T, torch.eye(RANK), atol=1e-5, rtol=0)
    assert torch.isfinite(W).all() and opt.svd_fallbacks() == 0


def test_svd_failure_falls_back_to_eigh_then_to_the_previous_basis(monkeypatch):
    G = torch.randn(20, 12)
    P_svd, Q_svd, fell = svd_bases(G, "full", RANK, (None, None), seed=0)
    assert not fell

    def broken(*a, **k):
        raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "svd", broken)
    P, Q, fell = svd_bases(G, "full", RANK, (None, None), seed=0)
    assert fell  # eigh of the Gram matrix spans the same subspaces
    torch.testing.assert_close(P @ P.T, P_svd @ P_svd.T, atol=1e-4, rtol=0)
    torch.testing.assert_close(Q.T @ Q, Q_svd.T @ Q_svd, atol=1e-4, rtol=0)
    monkeypatch.setattr(torch.linalg, "eigh", broken)
    P2, Q2, fell = svd_bases(G, "full", RANK, (P_svd, Q_svd), seed=0)
    assert fell and P2 is P_svd and Q2 is Q_svd
    W = torch.nn.Parameter(torch.randn(20, 12))  # and through the optimizer: no crash, finite weights
    opt = GaLoreAdamW([_group(W)], lr=LR)
    W.grad = G
    opt.step()
    assert torch.isfinite(W).all() and opt.svd_fallbacks() == 1


# -- moments across refreshes ---------------------------------------------------------------------


def _two_cycles(policy, shape=(20, 12)):
    W = torch.nn.Parameter(torch.randn(*shape))
    opt = GaLoreAdamW([_group(W, moments_on_refresh=policy)], lr=LR)
    grads = _grads(shape, T + 1, seed=5)
    snapshots = []
    for i, G in enumerate(grads):
        if i == T:
            snapshots.append({k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[W].items()})
        W.grad = G.clone()
        opt.step()
    return opt, W, snapshots[0], grads[T]


def test_reset_zeroes_moments_and_restarts_bias_correction():
    opt, W, before, G = _two_cycles("reset")
    state = opt.state[W]
    assert state["adam_step"] == 1 and before["adam_step"] == T
    Q = state["proj_right"]
    torch.testing.assert_close(state["exp_avg"], 0.1 * (G @ Q.T))  # one step from zero


def test_rotate_expresses_old_moments_in_the_new_basis():
    opt, W, before, G = _two_cycles("rotate")
    state = opt.state[W]
    Q_old, Q_new = before["proj_right"], state["proj_right"]
    A = Q_new @ Q_old.T
    m_rotated = before["exp_avg"] @ A.T
    torch.testing.assert_close(state["exp_avg"], 0.9 * m_rotated + 0.1 * (G @ Q_new.T), rtol=1e-5, atol=1e-7)
    assert (state["exp_avg_sq"] >= 0).all()


def test_rotate_is_the_identity_for_an_unchanged_basis():
    state = {}
    moments.init_moments(state, torch.empty(6, 4), 32)
    for _ in range(3):
        moments.update(state, torch.randn(6, 4), *BETAS)
    m, v = state["exp_avg"].clone(), state["exp_avg_sq"].clone()
    moments.change_basis(state, None, torch.eye(4), *BETAS)
    torch.testing.assert_close(state["exp_avg"], m)
    assert (state["exp_avg_sq"] >= v - 1e-7).all()  # v' = max(v, m^2-part): unchanged unless v < m̂^2
    perm = torch.eye(4)[[2, 0, 3, 1]]  # a permutation of coordinates moves moments exactly
    moments.change_basis(state, None, perm, *BETAS)
    torch.testing.assert_close(state["exp_avg"], m @ perm.T)


# -- resume between two refreshes ------------------------------------------------------------------


def _factories():
    dense = {"params": [], "weight_decay": 0.0}

    def galore(W, b, **kw):
        return GaLoreAdamW([{**dense, "params": [b]}, _group(W, **kw.pop("group", {}))], lr=LR, **kw)

    def frugal(sub):
        return lambda W, b: FrugalAdamW([{**dense, "params": [b]}, {"params": [W], "projected": True, "density": 0.25,
                                        "update_proj_gap": T, "scale": 1.0, "proj_type": "std"}], subspace=sub, lr=LR)

    return {
        "galore": galore,
        "galore_8bit": lambda W, b: galore(W, b, state_bits=8),
        "galore_rotate": lambda W, b: galore(W, b, group={"moments_on_refresh": "rotate"}),
        "galore_dct": lambda W, b: GaLoreAdamW([{**dense, "params": [b]}, _group(W)], basis=DCTBasis(), lr=LR),
        "fira": lambda W, b: FiraAdamW([{**dense, "params": [b]}, _group(W)], lr=LR),
        "apollo": lambda W, b: Apollo([{**dense, "params": [b]}, _group(W)], lr=LR),
        "apollo_mini": lambda W, b: Apollo([{**dense, "params": [b]}, _group(W, rank=1, scale_type="tensor",
                                                                              scale_front=True)], lr=LR),
        "frugal_svd": frugal("svd"),
        "frugal_random": frugal("random"),
        "frugal_block": frugal("block"),
        "adamw_8bit": lambda W, b: AdamW([W, b], lr=LR, state_bits=8),
    }


@pytest.mark.parametrize("name", list(_factories()))
def test_resume_between_refreshes_is_bit_exact(name):
    make = _factories()[name]
    shape = (96, 64)  # 8-bit moments need >= 4096 entries
    grads = _grads(shape, 2 * T + 2, seed=7)
    bgrads = _grads((5,), 2 * T + 2, seed=8)
    W0, b0 = torch.randn(*shape), torch.randn(5)

    def fresh():
        W, b = torch.nn.Parameter(W0.clone()), torch.nn.Parameter(b0.clone())
        return W, b, make(W, b)

    W, b, opt = fresh()
    _run(opt, [W, b], [grads, bgrads])
    W2, b2, opt2 = fresh()
    cut = T + 1  # between the refreshes at T and 2T
    _run(opt2, [W2, b2], [grads[:cut], bgrads[:cut]])
    buf = io.BytesIO()
    torch.save({"opt": opt2.state_dict(), "W": W2.detach(), "b": b2.detach()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    W3, b3, opt3 = fresh()
    with torch.no_grad():
        W3.copy_(saved["W"])
        b3.copy_(saved["b"])
    opt3.load_state_dict(saved["opt"])
    _run(opt3, [W3, b3], [grads[cut:], bgrads[cut:]])
    assert torch.equal(W3, W) and torch.equal(b3, b)


@pytest.mark.parametrize("name", ["galore", "fira", "apollo", "frugal_block"])
def test_per_parameter_steps_in_reverse_order_equal_step(name):
    make = _factories()[name]
    params_a = [torch.nn.Parameter(torch.randn(24, 16, generator=torch.Generator().manual_seed(i))) for i in range(3)]
    params_b = [torch.nn.Parameter(p.detach().clone()) for p in params_a]
    opt_a = make(params_a[0], torch.nn.Parameter(torch.zeros(3)))
    opt_a.add_param_group({**opt_a.param_groups[1], "params": params_a[1:]})
    opt_b = make(params_b[0], torch.nn.Parameter(torch.zeros(3)))
    opt_b.add_param_group({**opt_b.param_groups[1], "params": params_b[1:]})
    for step in range(2 * T):
        gs = _grads((24, 16), 3, seed=100 + step)
        for p, q, g in zip(params_a, params_b, gs):
            p.grad, q.grad = g.clone(), g.clone()
        opt_a.step()
        with torch.no_grad():
            for q in reversed(params_b):  # as in backward: the last layer first
                opt_b.step_param(q, opt_b.group_of(q))
    assert all(torch.equal(p, q) for p, q in zip(params_a, params_b))


# -- 8-bit states -----------------------------------------------------------------------------------


@pytest.mark.parametrize("signed", [True, False])
def test_quantiser_round_trip_error_is_bounded_per_block(signed):
    x = torch.randn(1000, 37) * torch.logspace(-3, 1, 37)  # columns on different scales
    x = x if signed else x.square()
    codes, absmax = quant8.quantize(x, signed)
    assert codes.dtype == torch.uint8 and absmax.dtype == torch.float32
    assert absmax.numel() == math.ceil(x.numel() / quant8.BLOCK)
    err = (quant8.dequantize(codes, absmax, signed) - x).abs().flatten()
    pad = -x.numel() % quant8.BLOCK
    bound = torch.nn.functional.pad(err, (0, pad)).view(-1, quant8.BLOCK).amax(1)
    assert (bound <= 0.0075 * absmax + 1e-12).all()  # dynamic map: spacing <= 1.5% of the block's absmax


def _regression(opt_factory, steps=150):
    g = torch.Generator().manual_seed(0)
    X, W_true = torch.randn(256, 96, generator=g), torch.randn(96, 64, generator=g)
    Y = X @ W_true
    W = torch.nn.Parameter(torch.zeros(96, 64))
    opt = opt_factory(W)
    losses = []
    for _ in range(steps):
        loss = ((X @ W - Y) ** 2).mean()
        W.grad = torch.autograd.grad(loss, W)[0]
        opt.step()
        losses.append(loss.item())
    return losses, W.detach()


@pytest.mark.parametrize("factory", [
    lambda bits: lambda W: AdamW([W], lr=0.05, state_bits=bits),
    lambda bits: lambda W: GaLoreAdamW([{**_group(W, rank=16, update_proj_gap=50, scale=1.0)}], lr=0.05,
                                       state_bits=bits),
], ids=["adamw", "galore"])
def test_8bit_states_track_fp32(factory):
    fp32, W32 = _regression(factory(32))
    int8, W8 = _regression(factory(8))
    assert int8[-1] < 0.1 * int8[0]  # it trains
    assert abs(int8[-1] - fp32[-1]) < 0.05 * fp32[0]
    assert (W8 - W32).norm() / W32.norm() < 0.05


def test_8bit_state_is_plain_uint8_and_smaller():
    W = torch.nn.Parameter(torch.randn(128, 96))
    norm = torch.nn.Parameter(torch.ones(96))
    opt = AdamW([W, norm], lr=0.01, state_bits=8)
    W.grad, norm.grad = torch.randn_like(W), torch.randn_like(norm)
    opt.step()
    assert opt.state[W]["exp_avg_q8"].dtype == torch.uint8 and "exp_avg" not in opt.state[W]
    assert opt.state[norm]["exp_avg"].dtype == torch.float32  # < 4096 entries: fp32 (bitsandbytes' min size)
    assert moments.state_bytes(opt.state[W]) < 0.3 * 2 * 4 * W.numel()
