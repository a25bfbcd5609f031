"""Optimizers: our per-parameter AdamW against PyTorch's, and the per-parameter step contract."""

from __future__ import annotations

import pytest
import torch

from lrpretrain.optim import AdamW, ParamwiseOptimizer


def _params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in ((7, 5), (5,), (3, 4, 2))]


def _grads(step: int, params) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=g) for p in params]


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_adamw_matches_torch_bit_for_bit(wd):
    ours, ref = _params(0), _params(0)
    kw = dict(lr=0.01, betas=(0.9, 0.95), eps=1e-6, weight_decay=wd)
    opt = AdamW([{"params": ours[:2]}, {"params": ours[2:], "weight_decay": 0.0}], **kw)
    ref_opt = torch.optim.AdamW([{"params": ref[:2]}, {"params": ref[2:], "weight_decay": 0.0}], foreach=False, **kw)
    for step in range(6):
        for group in (*opt.param_groups, *ref_opt.param_groups):
            group["lr"] = 0.01 * (step + 1) / 6  # the trainer sets the LR before each step
        for p, q, g in zip(ours, ref, _grads(step, ours)):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    for p, q in zip(ours, ref):
        assert torch.equal(p, q)
    for p, q in zip(ours, ref):
        assert torch.equal(opt.state[p]["exp_avg_sq"], ref_opt.state[q]["exp_avg_sq"])


def test_step_is_the_per_parameter_steps_in_any_order():
    a, b = _params(1), _params(1)
    opt_a, opt_b = AdamW(a, lr=0.01, weight_decay=0.1), AdamW(b, lr=0.01, weight_decay=0.1)
    assert isinstance(opt_a, ParamwiseOptimizer)
    for step in range(3):
        for p, q, g in zip(a, b, _grads(step, a)):
            p.grad, q.grad = g.clone(), g.clone()
        opt_a.step()
        with torch.no_grad():
            for q in reversed(b):  # as in backward: last layer first
                opt_b.step_param(q, opt_b.group_of(q))
    assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_state_is_plain_tensors_and_resumes_exactly(tmp_path):
    a, b = _params(2), _params(2)
    opt = AdamW(a, lr=0.01)
    for step in range(2):
        for p, g in zip(a, _grads(step, a)):
            p.grad = g
        opt.step()
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    with torch.no_grad():
        for p, q in zip(a, b):
            q.copy_(p)
    opt_b = AdamW(b, lr=0.01)
    opt_b.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    for step in range(2, 4):
        for p, q, g in zip(a, b, _grads(step, a)):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        opt_b.step()
    assert all(torch.equal(p, q) for p, q in zip(a, b))
