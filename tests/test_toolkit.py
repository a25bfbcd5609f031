"""The shared low-rank toolkit: surgery, merges, export, accounting, optimizer-state resets."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lrpretrain.errors import ConfigError
from lrpretrain.methods import get_method
from lrpretrain.methods.base import dense_state_dict
from lrpretrain.methods.toolkit import (
    LoRALinear,
    LowRankLinear,
    check_rank,
    parameter_counts,
    reparameterize,
    reset_optimizer_state,
)
from lrpretrain.model import build_model
from lrpretrain.optim import AdamW
from lrpretrain.train import load_config


@pytest.fixture
def tiny():
    cfg, _ = load_config(["model=llama_tiny"])
    torch.manual_seed(0)
    return cfg, build_model(cfg.model)


def _lora(model):
    return reparameterize(model, ["attn", "mlp"], lambda q, lin: LoRALinear(lin, rank=8, scale=0.5))


def test_lora_starts_as_the_dense_model_and_exports_its_names(tiny):
    cfg, model = tiny
    ids = torch.randint(0, cfg.model.vocab_size, (2, 16))
    before = model(ids)
    plain_keys = set(model.state_dict())
    replaced = _lora(model)
    assert len(replaced) == 14 and all(isinstance(m, LoRALinear) for _, m in replaced)
    assert torch.equal(model(ids), before)  # B = 0: the adapter is a no-op
    exported = dense_state_dict(model)
    assert set(exported) == plain_keys
    dense = build_model(cfg.model)
    dense.load_state_dict(exported)
    torch.testing.assert_close(dense(ids), before)


def test_merge_preserves_the_function(tiny):
    cfg, model = tiny
    _lora(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2 and p.shape[1] == 8:  # the B factors: make the adapters non-trivial
                p.normal_(0, 0.05)
    ids = torch.randint(0, cfg.model.vocab_size, (2, 16))
    before = model(ids)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.merge_()
            assert torch.count_nonzero(m.lora_B) == 0
    torch.testing.assert_close(model(ids), before, rtol=1e-5, atol=1e-5)


def test_lora_adapters_get_gradients_from_the_first_step(tiny):
    cfg, model = tiny
    _lora(model)
    ids = torch.randint(0, cfg.model.vocab_size, (2, 16))
    model(ids).logsumexp(-1).mean().backward()
    for m in model.modules():
        if isinstance(m, LoRALinear):
            assert m.weight.grad is None  # W0 frozen
            assert m.lora_B.grad.abs().sum() > 0


def test_parameter_counts(tiny):
    _, model = tiny
    n = parameter_counts(model)
    assert n["frozen"] == 0 and n["trainable"] == n["total"]
    _lora(model)
    counts = parameter_counts(model)
    lora = sum(8 * (m.in_features + m.out_features) for m in model.modules() if isinstance(m, LoRALinear))
    assert counts["total"] == n["total"] + lora
    assert counts["frozen"] == sum(m.weight.numel() for m in model.modules() if isinstance(m, LoRALinear))


def test_lowrank_linear_dense_weight():
    m = LowRankLinear(6, 5, 2)
    nn.init.normal_(m.lora_A)
    nn.init.normal_(m.lora_B)
    x = torch.randn(3, 6)
    torch.testing.assert_close(m(x), x @ m.dense_weight().T)


def test_check_rank():
    assert check_rank(4, (8, 6), "q") == 4
    assert check_rank(9, (8, 6), "q", clamp=True) == 6
    with pytest.raises(ConfigError, match=r"method.rank=7 is invalid: must be <= min\(m, n\) = 6 for q \(8x6\)"):
        check_rank(7, (8, 6), "q")
    with pytest.raises(ConfigError, match="method.rank=0 is invalid: must be > 0"):
        check_rank(0, (8, 6), "q")


@pytest.mark.parametrize("mode,ratio", [("full", 1.0), ("magnitude", 0.9), ("random", 0.5)])
def test_reset_optimizer_state_zeroes_the_intended_fraction(mode, ratio):
    p = nn.Parameter(torch.randn(40, 50))
    opt = AdamW([p], lr=0.1)
    for _ in range(3):
        p.grad = torch.randn_like(p)
        opt.step()
    m = opt.state[p]["exp_avg"].clone()
    zeroed, seen = reset_optimizer_state(opt, [p], mode, ratio, torch.Generator().manual_seed(0))
    assert seen == 2 * p.numel()
    after = opt.state[p]["exp_avg"]
    if mode == "magnitude":  # exactly the 90% smallest |m| are gone, the rest untouched
        k = int(ratio * m.numel())
        assert zeroed == 2 * k
        keep = m.abs().flatten().argsort()[k:]
        assert torch.equal(after.flatten()[keep], m.flatten()[keep])
        assert int((after == 0).sum()) == k
    elif mode == "random":
        assert abs(zeroed / seen - ratio) < 0.05
    else:
        assert zeroed == seen and not after.any()
    assert int(opt.state[p]["step"]) == 3  # bias correction goes on


def test_full_method_exports_its_own_state(tiny):
    cfg, model = tiny
    method = get_method("full")(cfg.method, cfg.model)
    assert set(method.dense_weights(model)) == set(model.state_dict())
