"""LOST and GradNormLoRP: their math against independent implementations written here (random
matrices, both orientations m > n and m < n), accounting against the built model, dense export, and
through the real CLI: they learn, resume bit for bit from a stop between subspace refreshes, and reject
bad values with one line (their CLI runs that learn and resume bit for bit are cases of
tests/test_reparam_cli.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_errors import one_line
from torch import nn

from lrpretrain.methods import get_method
from lrpretrain.methods.gradnorm_lorp import WeightNormLinear
from lrpretrain.methods.lost import LOSTLinear
from lrpretrain.methods.toolkit import parameter_counts
from lrpretrain.model import build_model
from lrpretrain.optim import GaLoreAdamW
from lrpretrain.train import load_config

from conftest import TINY

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = [(40, 24), (24, 40)]  # m > n and m < n (out x in)


def linear(m: int, n: int, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(n, m, bias=False)


# -- LOST ------------------------------------------------------------------------------------------------


def reference_split(w: np.ndarray, r: int, k: int):
    """The split as the docstring states it, in float64 numpy: L = best rank-r approximation, R = W - L,
    the k input channels (columns) with the largest ‖R_{:,j}‖."""
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    low = (u[:, :r] * s[:r]) @ vt[:r]
    residual = w - low
    norms = np.linalg.norm(residual, axis=0)
    channels = np.sort(np.argsort(-norms, kind="stable")[:k])
    return low, residual, norms, channels


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rank, sparsity", [(6, 0.25), (3, 0.1), (6, 1.0)])
def test_lost_split_reconstructs_the_initial_weight(shape, rank, sparsity):
    m, n = shape
    base = linear(m, n)
    w = base.weight.detach().double().numpy()
    layer = LOSTLinear(base, rank, sparsity)
    k = max(1, int(sparsity * n))
    low, residual, norms, channels = reference_split(w, rank, k)

    assert layer.sparse_channels.tolist() == channels.tolist() and layer.sparse_weight.shape == (m, k)
    np.testing.assert_allclose((layer.lora_B @ layer.lora_A).detach().double().numpy(), low, atol=1e-5)
    # the factors share √σ evenly (balanced): ‖B_{:,i}‖ = ‖A_{i,:}‖
    torch.testing.assert_close(layer.lora_B.norm(dim=0), layer.lora_A.norm(dim=1))
    dense = layer.dense_weight().detach().double().numpy()
    kept = np.zeros(n, dtype=bool)
    kept[channels] = True
    np.testing.assert_allclose(dense[:, kept], w[:, kept], atol=1e-5)  # exact on the kept channels
    np.testing.assert_allclose(dense[:, ~kept], low[:, ~kept], atol=1e-5)  # the rank-r part elsewhere
    # the error left is the smallest any k channels can leave: the n - k smallest residual columns
    err = np.linalg.norm(w - dense) ** 2
    assert err == pytest.approx(np.sort(norms ** 2)[: n - k].sum(), rel=1e-4, abs=1e-8)
    if sparsity == 1.0:
        np.testing.assert_allclose(dense, w, atol=1e-5)


def test_lost_full_rank_reconstructs_exactly():
    base = linear(24, 40)
    layer = LOSTLinear(base, 24, 0.05)  # r = min(m, n): nothing is left for the sparse part
    torch.testing.assert_close(layer.dense_weight(), base.weight.detach(), atol=1e-5, rtol=1e-5)
    assert layer.sparse_weight.abs().max() < 1e-5


@pytest.mark.parametrize("shape", SHAPES)
def test_lost_forward_and_gradients_equal_the_dense_form(shape):
    """y = x(BA + S·Eᵀ)ᵀ, with E scattering S's columns onto the kept channels (float64, autograd)."""
    m, n = shape
    layer = LOSTLinear(linear(m, n), 5, 0.2).double()
    with torch.no_grad():  # make the parts independent of the init
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(3, 7, n, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 7, m, dtype=torch.float64)
    (layer(x) * g).sum().backward()

    A, B, S = (t.detach().clone().requires_grad_() for t in (layer.lora_A, layer.lora_B, layer.sparse_weight))
    x2 = x.detach().clone().requires_grad_()
    scatter = torch.zeros(n, S.shape[1], dtype=torch.float64)
    scatter[layer.sparse_channels, torch.arange(S.shape[1])] = 1.0
    W = B @ A + S @ scatter.T
    (x2 @ W.T * g).sum().backward()
    torch.testing.assert_close(layer.dense_weight().double(), W.detach())
    for got, want in [(x.grad, x2.grad), (layer.lora_A.grad, A.grad), (layer.lora_B.grad, B.grad),
                      (layer.sparse_weight.grad, S.grad)]:
        torch.testing.assert_close(got, want)


def built(method: str, *overrides: str, model: str = "llama_tiny"):
    cfg, _ = load_config([f"model={model}", f"method={method}", *overrides])
    torch.manual_seed(0)
    plugin = get_method(method)(cfg.method, cfg.model)
    return cfg, plugin, plugin.prepare_model(build_model(cfg.model))


@pytest.mark.parametrize("method, overrides", [
    ("lost", ["method.rank=8", "method.sparsity=0.1"]),
    ("lost", ["method.rank=16", "method.sparsity=1.0", "method.targets=[attn,down_proj]"]),
    ("gradnorm_lorp", ["method.rank=8"]),
    ("gradnorm_lorp", ["method.rank=8", "method.targets=[mlp]"]),
])
def test_cost_matches_the_built_model_and_export_keeps_the_function(method, overrides):
    cfg, plugin, model = built(method, *overrides)
    counts = parameter_counts(model)
    cost = plugin.cost(cfg.model, 64)
    assert cost["params"] == counts["total"]
    assert cost["trainable_params"] == counts["trainable"] == plugin.trainable_parameters(model)
    buffers = sum(b.numel() * b.element_size() for _, b in model.named_buffers())
    assert cost.get("buffer_bytes", buffers) == buffers
    # FLOPs: 6 per trained matmul entry and token (LOST: r(m+n) + m·k per target instead of mn);
    # GradNormLoRP's normalisation is per step, not per token: a dense model's
    expected = get_method("full")(cfg.method, cfg.model).cost(cfg.model, 64)["flops_per_token"]
    if method == "lost":
        for _name, mod in model.named_modules():
            if isinstance(mod, LOSTLinear):
                m, n = mod.out_features, mod.in_features
                expected += 6 * (mod.rank * (m + n) + m * mod.sparse_channels.numel() - m * n)
    assert cost["flops_per_token"] == expected
    with torch.no_grad():  # move every part off its init
        for p in model.parameters():
            p.mul_(1 + 0.1 * torch.randn_like(p))
    ids = torch.randint(0, cfg.model.vocab_size, (2, 16))
    dense = build_model(cfg.model)
    dense.load_state_dict(plugin.dense_weights(model), strict=True)
    torch.testing.assert_close(dense(ids), model(ids), rtol=1e-5, atol=1e-5)


def test_both_start_at_the_standard_init():
    """LOST with sparsity 1 and GradNormLoRP reproduce the plain model's initial function."""
    cfg, _ = load_config(["model=llama_tiny"])
    torch.manual_seed(0)
    plain = build_model(cfg.model)
    ids = torch.randint(0, cfg.model.vocab_size, (2, 16))
    for method, overrides in [("lost", ["method.rank=8", "method.sparsity=1.0"]), ("gradnorm_lorp", [])]:
        _, _, model = built(method, *overrides)
        torch.testing.assert_close(model(ids), plain(ids), rtol=1e-4, atol=1e-4)


# -- GradNormLoRP ----------------------------------------------------------------------------------------


def naive_weight(V: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """W = M ⊙ V / ‖V‖_c, one magnitude and one norm per output channel (row of the m x n weight)."""
    return M[:, None] * V / V.pow(2).sum(dim=1, keepdim=True).sqrt()


@pytest.mark.parametrize("shape", SHAPES)
def test_gradnorm_column_norms_and_gradients(shape):
    m, n = shape
    base = linear(m, n)
    layer = WeightNormLinear(base)
    torch.testing.assert_close(layer.dense_weight(), base.weight.detach())  # starts at the init
    with torch.no_grad():
        layer.weight.mul_(1 + 0.3 * torch.randn(m, n))
        layer.magnitude.copy_(torch.rand(m) + 0.5)
    # every output channel of W has norm M_i, whatever the direction's norms
    torch.testing.assert_close(layer.dense_weight().norm(dim=1), layer.magnitude.detach())
    x = torch.randn(4, 6, n, requires_grad=True)
    g = torch.randn(4, 6, m)
    (layer(x) * g).sum().backward()

    V = layer.weight.detach().double().requires_grad_()
    M = layer.magnitude.detach().double().requires_grad_()
    x2 = x.detach().double().requires_grad_()
    y = x2 @ naive_weight(V, M).T
    torch.testing.assert_close(layer(x.detach()).double(), y.detach(), rtol=1e-5, atol=1e-5)
    (y * g.double()).sum().backward()
    for got, want in [(x.grad, x2.grad), (layer.weight.grad, V.grad), (layer.magnitude.grad, M.grad)]:
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    # the direction's gradient is orthogonal to it, row by row (W does not depend on ‖V_i‖)
    assert (layer.weight.grad * layer.weight).sum(dim=1).abs().max() < 1e-5


class HandWritten:
    """GradNormLoRP's update written out in float64: W = M ⊙ V/‖V‖_c; G_V, G_M by autograd of that formula;
    V: GaLore (top-r singular vectors of G_V on the smaller side at steps 0, T, 2T, ..., moments kept,
    Adam on the projection, V -= lr·√(1-β2^t)/(1-β1^t)·α·project_back(m/(√v + eps))); M: the same Adam
    without projection. Only the arbitrary sign of each singular vector is taken from the optimizer's
    basis, after checking that both span the same directions."""

    def __init__(self, V, M, rank, alpha, gap, lr, betas=(0.9, 0.999), eps=1e-6):
        self.V, self.M = V.double().clone(), M.double().clone()
        self.rank, self.alpha, self.gap, self.lr, self.betas, self.eps = rank, alpha, gap, lr, betas, eps
        self.t = 0
        self.mV = self.vV = None
        self.mM, self.vM = torch.zeros_like(self.M), torch.zeros_like(self.M)

    def step(self, x, g, their_basis):
        V, M = self.V.clone().requires_grad_(), self.M.clone().requires_grad_()
        ((x @ naive_weight(V, M).T) * g).sum().backward()
        GV, GM = V.grad, M.grad
        m, n = GV.shape
        right = m >= n  # std: project the smaller side
        if self.t % self.gap == 0:
            u, _, vt = torch.linalg.svd(GV, full_matrices=False)
            basis = vt[: self.rank] if right else u[:, : self.rank].T  # rows: the r directions
            cos = (basis * their_basis).sum(dim=1)
            torch.testing.assert_close(cos.abs(), torch.ones_like(cos), atol=1e-4, rtol=0)
            self.basis = basis * torch.sign(cos)[:, None]
            if self.mV is None:
                shape = (m, self.rank) if right else (self.rank, n)
                self.mV, self.vV = torch.zeros(shape, dtype=torch.float64), torch.zeros(shape, dtype=torch.float64)
        R = GV @ self.basis.T if right else self.basis @ GV
        b1, b2 = self.betas
        self.t += 1
        f = math.sqrt(1 - b2 ** self.t) / (1 - b1 ** self.t)
        self.mV = b1 * self.mV + (1 - b1) * R
        self.vV = b2 * self.vV + (1 - b2) * R * R
        N = self.mV / (self.vV.sqrt() + self.eps)
        self.V -= self.lr * f * self.alpha * (N @ self.basis if right else self.basis.T @ N)
        self.mM = b1 * self.mM + (1 - b1) * GM
        self.vM = b2 * self.vM + (1 - b2) * GM * GM
        self.M -= self.lr * f * self.mM / (self.vM.sqrt() + self.eps)


@pytest.mark.parametrize("shape", SHAPES)
def test_gradnorm_projected_update_equals_a_hand_written_step(shape):
    """Seven updates with T = 3 (refreshes at steps 0, 3, 6, moments kept) through the plugin's groups
    and optimizer, against :class:`HandWritten`."""
    m, n = shape
    rank, alpha, gap, lr = 4, 0.25, 3, 0.02
    cfg, _ = load_config(["model=llama_tiny", "method=gradnorm_lorp", f"method.rank={rank}", f"method.scale={alpha}",
                          f"method.update_proj_gap={gap}", f"optim.lr={lr}", "optim.eps=1e-6"])
    plugin = get_method("gradnorm_lorp")(cfg.method, cfg.model)
    holder = nn.Module()  # a model whose one target is a weight-normalised layer (select_targets' layout)
    holder.layers = nn.ModuleList([nn.Module()])
    holder.layers[0].attn = nn.Module()
    holder.layers[0].attn.q_proj = linear(m, n)
    plugin.prepare_model(holder)
    layer = holder.layers[0].attn.q_proj
    assert isinstance(layer, WeightNormLinear)
    optimizer = plugin.build_optimizer(plugin.param_groups(holder, cfg.optim), cfg.optim)
    assert isinstance(optimizer, GaLoreAdamW)
    ref = HandWritten(layer.weight.detach(), layer.magnitude.detach(), rank, alpha, gap, lr)
    gen = torch.Generator().manual_seed(1)
    for step in range(7):
        x, g = torch.randn(5, n, generator=gen), torch.randn(5, m, generator=gen)
        (layer(x) * g).sum().backward()
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state = optimizer.state[layer.weight]
        basis = state["proj_right"] if m >= n else state["proj_left"].T  # (r, n) or (r, m): rows
        ref.step(x.double(), g.double(), basis.double())
        assert state["step"] == step + 1
        assert state["exp_avg"].shape == ((m, rank) if m >= n else (rank, n))  # r-dimensional moments
        torch.testing.assert_close(layer.weight.detach().double(), ref.V, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(layer.magnitude.detach().double(), ref.M, rtol=1e-4, atol=1e-6)


def test_gradnorm_moves_within_a_rank_r_subspace_between_refreshes():
    """The low-rank part I·J: with T = 4, V_6 - V_4 = P·J has rank <= r (P the basis refreshed at step 4)."""
    m, n, rank = 40, 24, 3
    cfg, _ = load_config(["model=llama_tiny", "method=gradnorm_lorp", f"method.rank={rank}", "method.update_proj_gap=4",
                          "optim.lr=0.01"])
    plugin = get_method("gradnorm_lorp")(cfg.method, cfg.model)
    layer = WeightNormLinear(linear(m, n))
    optimizer = plugin.make_optimizer([{"params": [layer.weight], "projected": True, **plugin.group_options()},
                                       {"params": [layer.magnitude]}], lr=0.01)
    gen = torch.Generator().manual_seed(2)
    snapshots = []
    for _ in range(6):
        x, g = torch.randn(8, n, generator=gen), torch.randn(8, m, generator=gen)
        (layer(x) * g).sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        snapshots.append(layer.weight.detach().double().clone())
    # updates 5 and 6, both in the subspace of the refresh at step 4: singular values past r are fp32 noise
    within = torch.linalg.svdvals(snapshots[5] - snapshots[3])
    assert within[rank] < 1e-4 * within[0]
    across = torch.linalg.svdvals(snapshots[5] - snapshots[0])  # a refresh between: more than r directions
    assert across[rank] > 1e-2 * across[0]


def test_8bit_gradnorm_lorp_fits_llama_7b_on_a_24_gib_gpu():
    """The paper's headline (8-bit GradNormLoRP pre-trains LLaMA 7B on an RTX 4090, 24 GiB) under
    trainer.precision=pure_bf16 with per-layer updates at micro-batch 1; its optimizer state is GaLore's
    plus the magnitudes' moments, under 15% of 32-bit Adam's."""
    from lrpretrain.estimate import estimate

    def est(*overrides: str, precision: str = "pure_bf16"):
        cfg, _ = load_config([*overrides, "trainer.micro_batch_size=1", "trainer.batch_size=1",
                              f"trainer.precision={precision}"])
        return estimate(cfg)

    ours = est("experiment=gradnorm_lorp_c4_7b", "trainer.per_layer_update=true")
    assert ours.state_bits == 8 and ours.peak < 24 * 2**30 and ours.precision == "pure_bf16"
    galore = est("experiment=galore_c4_7b", "method.state_bits=8", "method.update_proj_gap=250")
    magnitudes = 32 * (4 * 4096 + 2 * 11008 + 4096)  # one per output channel of each projection
    assert ours.params - galore.params == magnitudes
    adam = est("experiment=full_c4_7b", precision="bf16")  # fp32 moments
    assert galore.optimizer_states < ours.optimizer_states < 0.15 * adam.optimizer_states


# -- through the CLI (learning and bit-for-bit resume between refreshes: tests/test_reparam_cli.py) ------


@pytest.mark.parametrize("args, expected", [
    (["method=lost", "method.rank=0"], "method.rank=0 is invalid: must be > 0"),
    (["method=lost", "method.rank=129"],
     "method.rank=129 is invalid: must be <= min(m, n) = 128 for q_proj of model=llama_tiny (128x128)"),
    (["method=lost", "method.sparsity=0"], "method.sparsity=0.0 is invalid: must be in (0, 1]"),
    (["method=lost", "method.sparsity=1.5"], "method.sparsity=1.5 is invalid: must be in (0, 1]"),
    (["method=lost", "method.sparsity=-0.2"], "method.sparsity=-0.2 is invalid: must be in (0, 1]"),
    (["method=lost", "method.targets=[lm_head]"], "method.targets: unknown target 'lm_head'"),
    (["method=gradnorm_lorp", "method.rank=-1"], "method.rank=-1 is invalid: must be > 0"),
    (["method=gradnorm_lorp", "method.rank=200"], "method.rank=200 is invalid: must be <= min(m, n) = 128"),
    (["method=gradnorm_lorp", "method.update_proj_gap=0"], "method.update_proj_gap=0 is invalid: must be > 0"),
    (["method=gradnorm_lorp", "method.scale=0"], "method.scale=0.0 is invalid: must be > 0"),
    (["method=gradnorm_lorp", "method.state_bits=4"], "method.state_bits=4 is invalid: allowed: 32, 8"),
    (["method=gradnorm_lorp", "method.proj_type=diagonal"], "method.proj_type='diagonal' is invalid"),
])
def test_bad_values_are_one_clear_line(cli, tmp_path, args, expected):
    one_line(cli("train", *TINY, f"run.dir={tmp_path / 'run'}", *args), expected)
    assert not (tmp_path / "run").exists()  # rejected before anything was created
