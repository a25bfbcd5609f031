"""Activation recomputation (trainer.recompute): the same losses and gradients as without it, less
saved activation memory, the RNG replayed, the method's own policy applied, bad values refused."""

from __future__ import annotations

import copy
from dataclasses import fields

import pytest
import torch
import torch.nn.functional as F
from test_errors import one_line
from test_estimate import BUILTIN

from lrpretrain.errors import UserError
from lrpretrain.methods import get_method
from lrpretrain.model import build_model, lm_loss
from lrpretrain.train import load_config
from lrpretrain.train.recompute import apply_recompute

import lrp_test_plugins  # noqa: F401  (registers test_recompute)
from conftest import TINY, losses
from lrp_test_plugins import OwnRecompute

ONE = "trainer.threads=1"
B, T = 2, 64


@pytest.fixture(scope="module")
def tiny():
    cfg, _ = load_config(["model=llama_tiny"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    ids = torch.randint(0, cfg.model.vocab_size, (B, T), generator=torch.Generator().manual_seed(1))
    return cfg, model, get_method("full")(cfg.method, cfg.model), ids


def _loss_and_grads(model, ids, pack=None):
    if pack is None:
        loss = lm_loss(model(ids), ids)[0]
    else:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = lm_loss(model(ids), ids)[0]
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def _counting_forwards(model) -> list[int]:
    calls = [0] * len(model.layers)
    for i, block in enumerate(model.layers):
        block.register_forward_pre_hook(lambda *_a, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


@pytest.mark.parametrize("mode, every, forwards", [
    ("full", 1, [2, 2]), ("full", 2, [2, 1]), ("selective", 1, [2, 2]), ("selective", 2, [2, 1]),
])
def test_same_loss_and_gradients_as_none(tiny, mode, every, forwards):
    """Bit for bit on the CPU; the chosen blocks really run their forward again in the backward."""
    cfg, base, method, ids = tiny
    ref_loss, ref_grads = _loss_and_grads(copy.deepcopy(base), ids)
    model = copy.deepcopy(base)
    apply_recompute(model, mode, every, method)
    calls = _counting_forwards(model)
    loss, grads = _loss_and_grads(model, ids)
    assert calls == forwards
    assert torch.equal(loss, ref_loss)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=0, atol=0, msg=name)
    assert model.state_dict().keys() == base.state_dict().keys()  # no wrapper: checkpoints unchanged
    with torch.no_grad():  # evaluation runs the blocks once
        model(ids)
    assert calls == [c + 1 for c in forwards]


def test_full_recompute_saves_fewer_activation_bytes(tiny):
    """Saved-tensor bytes (unique storages, parameters excluded) seen by autograd's pack hook.

    Without recomputation the blocks keep many activations each (norms, q/k/v, attention, SwiGLU);
    with it they keep only their input x (B·T·d fp32) and the RoPE tables: the rest of the graph
    (embedding, final norm, head, loss) is unchanged, so the difference is the blocks' share.
    """
    cfg, base, method, ids = tiny

    def saved_bytes(mode, every=1):
        model = copy.deepcopy(base)
        apply_recompute(model, mode, every, method)
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        in_block, seen, flag = {}, {}, [False]
        for block in model.layers:
            block.register_forward_pre_hook(lambda *_a: flag.__setitem__(0, True))
            block.register_forward_hook(lambda *_a: flag.__setitem__(0, False))

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params:
                seen[ptr] = t.untyped_storage().nbytes()
                if flag[0]:
                    in_block[ptr] = seen[ptr]
            return t

        _loss_and_grads(model, ids, pack)
        return sum(seen.values()), sum(in_block.values())

    none, none_blocks = saved_bytes("none")
    full, _ = saved_bytes("full")
    half, _ = saved_bytes("full", every=2)
    x_bytes = B * T * cfg.model.dim * 4
    rope_bytes = 2 * cfg.model.max_seq_len * (cfg.model.dim // cfg.model.n_heads) * 4
    assert none_blocks > 10 * cfg.model.n_layers * x_bytes  # the blocks' activations matter
    kept_by_blocks = full - (none - none_blocks)
    assert kept_by_blocks <= cfg.model.n_layers * x_bytes + rope_bytes
    assert full < half < none


def test_recompute_replays_the_rng(tiny):
    """A block that draws random numbers (dropout) recomputes the same mask: gradients are unchanged."""
    cfg, base, method, ids = tiny

    def run(mode):
        model = copy.deepcopy(base)
        for block in model.layers:
            block.mlp.register_forward_hook(lambda _m, _i, out: F.dropout(out, 0.5, training=True))
        apply_recompute(model, mode, 1, method)
        torch.manual_seed(123)
        return _loss_and_grads(model, ids)

    (l0, g0), (l1, g1) = run("none"), run("full")
    assert torch.equal(l0, l1)
    assert all(torch.equal(g0[n], g1[n]) for n in g0)


def test_method_policy_is_applied_and_changes_nothing_else(cli, tmp_path):
    common = [*TINY, ONE, "method=test_recompute", "trainer.max_steps=3", "trainer.ckpt_every=0"]
    OwnRecompute.calls.clear()
    assert cli("train", *common, f"run.dir={tmp_path / 'ref'}").code == 0
    assert OwnRecompute.calls == []  # recompute=none: the policy is not applied
    r = cli("train", *common, f"run.dir={tmp_path / 'own'}", "trainer.recompute=method")
    assert r.code == 0, r.err
    assert "activation recomputation: method" in r.err
    # applied once, then every block is checkpointed in each forward: 3 updates x 2 micro-batches x 2 blocks
    assert OwnRecompute.calls == ["apply"] + ["checkpoint"] * 12
    assert losses(tmp_path / "own") == losses(tmp_path / "ref")


def test_full_and_selective_through_the_cli(cli, tmp_path):
    common = [*TINY, ONE, "trainer.max_steps=3", "trainer.ckpt_every=0"]
    assert cli("train", *common, f"run.dir={tmp_path / 'ref'}").code == 0
    for mode, every in (("full", 2), ("selective", 1)):
        run = tmp_path / mode
        r = cli("train", *common, f"run.dir={run}", f"trainer.recompute={mode}", f"trainer.recompute_every={every}")
        assert r.code == 0, r.err
        assert losses(run) == losses(tmp_path / "ref")


def test_recompute_may_change_on_resume(cli, tmp_path):
    """Recomputation changes memory, not what is trained: a run may resume with another setting."""
    run = tmp_path / "run"
    assert cli("train", *TINY, ONE, f"run.dir={run}", "trainer.max_steps=2").code == 0
    r = cli("train", *TINY, ONE, f"run.dir={run}", "trainer.max_steps=3", "trainer.recompute=full")
    assert r.code == 0, r.err
    assert "resumed from" in r.err and "trainer.recompute: none -> full" in r.err


@pytest.mark.parametrize("args, expected", [
    (["trainer.recompute=method"],
     "trainer.recompute='method' is invalid: method 'full' has no recompute policy of its own; allowed: none, full, "
     "selective"),
    (["method=galore", "trainer.recompute=method"], "method 'galore' has no recompute policy of its own"),
    (["trainer.recompute=all"], "trainer.recompute='all' is invalid: allowed: none, full, selective, method"),
    (["trainer.recompute=full", "trainer.recompute_every=0"],
     "trainer.recompute_every=0 is invalid: must be >= 1 (1 checkpoints every block, k every k-th)"),
])
def test_bad_values_are_one_line(cli, tmp_path, args, expected):
    one_line(cli("train", *TINY, f"run.dir={tmp_path / 'run'}", *args), expected)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", BUILTIN)
def test_every_method_recomputes_to_the_same_loss_and_gradients(name, one_thread):
    """Each built-in method's prepared model under full, selective and its own policy gives the loss and
    gradients of no recomputation (selective recomputation once broke SLTrain's in-place scaling)."""
    rank = ["method.rank=8"] if "rank" in {f.name for f in fields(get_method(name).Config)} else []
    cheap = ["method.scale_init=minmax"] if name == "lr_qat" else []  # its L4 grid search: 100 quantisations
    cfg, _ = load_config(["model=llama_tiny", f"method={name}", ONE, *rank, *cheap])
    torch.manual_seed(0)
    method = get_method(name)(cfg.method, cfg.model)
    base = method.prepare_model(build_model(cfg.model))
    ids = torch.randint(0, cfg.model.vocab_size, (B, T), generator=torch.Generator().manual_seed(1))
    results = {}
    for mode in ("none", "full", "selective", "method"):
        model = copy.deepcopy(base)
        try:
            apply_recompute(model, mode, 1, method)
        except UserError:  # no policy of its own, or blocks that refuse checkpointing (CR-Net)
            continue
        torch.manual_seed(2)  # dropout masks (LoRA's) drawn alike in every mode
        loss = lm_loss(model(ids), ids)[0]
        loss.backward()
        results[mode] = loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    ref_loss, ref_grads = results.pop("none")
    assert results, f"{name}: no recomputation mode accepted"
    for mode, (loss, grads) in results.items():
        torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0, msg=f"{name} {mode}")
        assert grads.keys() == ref_grads.keys(), f"{name} {mode}"
        for n, g in grads.items():
            torch.testing.assert_close(g, ref_grads[n], rtol=1e-6, atol=1e-7, msg=f"{name} {mode} {n}")
