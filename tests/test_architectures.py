"""CoLA, CoLA-M and CR-Net: their math, exact parameter and FLOP counts, recomputation that changes
nothing but the saved activations (measured against the analytic count), and the CLI (training,
exact resume after SIGUSR1, one-line errors)."""

from __future__ import annotations

import math
import os
import re
import signal

import pytest
import torch
import torch.nn.functional as F
from test_errors import one_line

from lrpretrain.errors import UserError
from lrpretrain.methods import get_method
from lrpretrain.methods.cola import CoLABlock, CoLALinear, cola_m_saved_bytes
from lrpretrain.methods.crnet import CRNetLLaMA, CrossLayerLinear, crnet_saved_bytes
from lrpretrain.methods.toolkit import parameter_counts, saved_activation_bytes
from lrpretrain.model import build_model, lm_loss
from lrpretrain.train import load_config

from conftest import TINY, losses

ONE = "trainer.threads=1"  # 2-thread BLAS stalls on this loaded 2-core machine


pytestmark = pytest.mark.usefixtures("one_thread")


def prepared(*overrides: str, seed: int = 0, materialize: bool = True):
    cfg, _ = load_config(list(overrides))
    method = get_method(cfg.method.name)(cfg.method, cfg.model)
    torch.manual_seed(seed)
    return cfg, method, method.prepare_model(build_model(cfg.model, materialize=materialize))


def loss_and_grads(model, ids, bf16: bool = False):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits, saved = saved_activation_bytes(model, lambda: model(ids))
    loss_sum, n = lm_loss(logits, ids)
    (loss_sum / n).backward()
    return float(loss_sum.detach() / n), {k: p.grad.clone() for k, p in model.named_parameters()}, saved


def assert_same_grads(a, b):
    """Equal to fp32 rounding, relative to each gradient's own scale (some are ~1e-5 in all: an
    absolute tolerance would hide a wrong recomputation). On the CPU they are in fact bit-identical."""
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6 * float(a[k].abs().max()), msg=k)


# -- CoLA ---------------------------------------------------------------------------------------------


def test_cola_layer_is_b_silu_a_with_the_reference_init():
    torch.manual_seed(0)
    lin = CoLALinear(512, 1376, 128)
    assert lin.A.shape == (128, 512) and lin.B.shape == (1376, 128)
    std = 128**-0.25 * (512 + 1376) ** -0.25  # r^(-1/4)·(n + m)^(-1/4)
    for p in (lin.A, lin.B):
        p = p.detach()
        assert float(p.mean()) == pytest.approx(0, abs=0.01 * std) and float(p.std()) == pytest.approx(std, rel=0.02)
    assert float((lin.B @ lin.A).detach().var()) == pytest.approx(1 / (512 + 1376), rel=0.05)  # Xavier-like product
    x = torch.randn(3, 5, 512)
    torch.testing.assert_close(lin(x), torch.nn.functional.silu(x @ lin.A.T) @ lin.B.T)


@pytest.mark.parametrize("only_lr_act", [False, True])
def test_cola_block_keeps_swiglu_unless_only_lr_act(only_lr_act):
    cfg, _, model = prepared("model=llama_tiny", "method=cola", "method.rank=32", f"method.only_lr_act={only_lr_act}")
    block = model.layers[0]
    assert isinstance(block, CoLABlock) and all(isinstance(block.mlp.get_submodule(n), CoLALinear)
                                                for n in ("gate_proj", "up_proj", "down_proj"))
    x, cos, sin = torch.randn(2, 16, 128), model.rope_cos[:16], model.rope_sin[:16]
    a, m = block.attn, block.mlp
    h = x + a.o_proj(a.attend(a.q_proj(block.attn_norm(x)), a.k_proj(block.attn_norm(x)),
                              a.v_proj(block.attn_norm(x)), cos, sin))
    g, u = m.gate_proj(block.mlp_norm(h)), m.up_proj(block.mlp_norm(h))
    expected = h + m.down_proj((g if only_lr_act else F.silu(g)) * u)
    torch.testing.assert_close(block(x, cos, sin), expected)


@pytest.mark.parametrize("model", ["llama_tiny", "llama_60m", "llama_130m", "llama_350m", "llama_1b", "llama_7b"])
@pytest.mark.parametrize("method", [["method=cola"], ["method=cola", "method.targets=[mlp]"], ["method=cola_m"],
                                    ["method=crnet"], ["method=crnet", "method.targets=[q_proj,v_proj]"]],
                         ids=lambda m: "-".join(x.split("=")[1] for x in m))
def test_cost_is_exact(model, method):
    """cost(): params and trainable params are those of the prepared model (built on the meta device:
    no memory); flops_per_token is 6 x its matmul weights (LM head included) + causal attention."""
    overrides = [f"model={model}", *method] + (["method.rank=32"] if model == "llama_tiny" else [])
    cfg, plugin, m = prepared(*overrides, materialize=False)
    cost = plugin.cost(cfg.model, 256)
    counts = parameter_counts(m)
    assert cost["params"] == counts["total"] and cost["trainable_params"] == counts["trainable"]
    matmul = sum(p.numel() for n, p in m.named_parameters() if n.startswith("layers.") and p.ndim == 2)
    matmul += m.lm_head.weight.numel()
    assert cost["flops_per_token"] == 6 * matmul + 6 * cfg.model.n_layers * cfg.model.dim * 256


def test_cola_and_crnet_cost_about_half_the_flops_of_full_rank_at_1b():
    cfg, _ = load_config(["model=llama_1b"])
    full = get_method("full")(cfg.method, cfg.model).cost(cfg.model, 256)["flops_per_token"]
    for name in ("cola", "crnet"):
        c, _ = load_config(["model=llama_1b", f"method={name}", "method.rank=512"])
        ratio = get_method(name)(c.method, c.model).cost(c.model, 256)["flops_per_token"] / full
        assert 0.4 < ratio < 0.5, (name, ratio)  # the LM head stays full; CoLA's claim: ~2x less compute


@pytest.mark.parametrize("name", ["cola", "crnet"])
def test_dense_export_is_refused_with_one_line(name):
    _, plugin, model = prepared("model=llama_tiny", f"method={name}", "method.rank=32")
    with pytest.raises(UserError) as e:
        plugin.dense_weights(model)
    assert "\n" not in str(e.value) and "cannot be exported as dense LLaMA weights" in str(e.value)


# -- CoLA-M ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_cola_m_is_cola_with_the_same_loss_and_gradients(bf16):
    _, _, cola = prepared("model=llama_tiny", "method=cola", "method.rank=32")
    _, _, cola_m = prepared("model=llama_tiny", "method=cola_m", "method.rank=32")
    assert all(b.recompute for b in cola_m.layers) and not any(b.recompute for b in cola.layers)
    sa, sb = cola.state_dict(), cola_m.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)  # same parameters
    ids = torch.randint(0, 8192, (2, 48), generator=torch.Generator().manual_seed(1))
    la, ga, saved_a = loss_and_grads(cola, ids, bf16)
    lb, gb, saved_b = loss_and_grads(cola_m, ids, bf16)
    assert la == lb
    assert_same_grads(ga, gb)
    # whole model; under bf16 autocast the bf16 copy of the LM head's weight (2 MB, held for backward) dominates
    assert saved_b < saved_a / (1 if bf16 else 4)


@pytest.mark.parametrize("targets", ["[attn,mlp]", "[mlp]", "[q_proj,o_proj,down_proj]"])
def test_cola_m_keeps_only_the_residual_and_the_r_dim_activations(targets):
    """Measured bytes autograd keeps for one block = the analytic (d + 7r) x 4 bytes per token (fp32);
    a projection left dense keeps its input instead (the normed residual, attention output or SwiGLU
    product)."""
    cfg, plugin, model = prepared("model=llama_tiny", "method=cola", "method.rank=16", f"method.targets={targets}")
    B, T, d = 2, 32, cfg.model.dim
    x, cos, sin = torch.randn(B, T, d, requires_grad=True), model.rope_cos[:T], model.rope_sin[:T]
    block = model.layers[0]
    _, plain = saved_activation_bytes(model, lambda: block(x, cos, sin))
    plugin.recompute_policy()(model)
    out, segmented = saved_activation_bytes(model, lambda: block(x, cos, sin))
    assert segmented == B * T * cola_m_saved_bytes(cfg.model, 16, cfg.method.targets)
    if targets == "[attn,mlp]":
        assert segmented == B * T * 4 * (d + 7 * 16)
        assert plain > 8 * segmented
    out.sum().backward()  # the segments recompute and back-propagate
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_cola_m_policy_refuses_a_model_without_cola_blocks():
    cfg, _ = load_config(["model=llama_tiny", "method=cola"])
    with pytest.raises(UserError, match="needs a model prepared by method=cola"):
        get_method("cola")(cfg.method, cfg.model).recompute_policy()(build_model(cfg.model))


# -- CR-Net --------------------------------------------------------------------------------------------------


def test_crnet_projections_add_the_previous_layers_output_of_their_type():
    """Layer 1 dense; Y_l = sign(β)(|β| + ε)·Y_{l-1} + X_l A B for every type, with sign(0) = +1."""
    cfg, _, model = prepared("model=llama_tiny", "model.n_layers=3", "method=crnet", "method.rank=16", "method.eps=0.01")
    assert isinstance(model, CRNetLLaMA)
    assert isinstance(model.layers[0].attn.q_proj, torch.nn.Linear)
    assert all(isinstance(model.layers[i].get_submodule(f"{fam}.{n}"), CrossLayerLinear) for i in (1, 2)
               for fam, names in (("attn", ("q_proj", "k_proj", "v_proj", "o_proj")), ("mlp", ("gate_proj", "up_proj", "down_proj")))
               for n in names)
    assert {"layers.1.attn.q_proj.A", "layers.1.attn.q_proj.B", "layers.1.attn.q_proj.beta",
            "layers.0.attn.q_proj.weight"} <= set(model.state_dict())
    with torch.no_grad():
        model.layers[1].attn.q_proj.beta.fill_(-0.5)
        model.layers[2].mlp.down_proj.beta.fill_(0.0)
    x, cos, sin = torch.randn(2, 16, 128), model.rope_cos[:16], model.rope_sin[:16]
    l0, l1, l2 = model.layers
    x1, c1 = l0(x, cos, sin, None)
    torch.testing.assert_close(c1["q_proj"], F.linear(l0.attn_norm(x), l0.attn.q_proj.weight))
    x2, c2 = l1(x1, cos, sin, c1)
    q = l1.attn.q_proj
    torch.testing.assert_close(c2["q_proj"], -0.51 * c1["q_proj"] + l1.attn_norm(x1) @ q.A.T @ q.B.T)
    x3, c3 = l2(x2, cos, sin, c2)
    dn = l2.mlp.down_proj
    h = x2 + c3["o_proj"]
    swiglu = F.silu(c3["gate_proj"]) * c3["up_proj"]
    torch.testing.assert_close(c3["down_proj"], 0.01 * c2["down_proj"] + swiglu @ dn.A.T @ dn.B.T)  # s(0) = +ε
    torch.testing.assert_close(x3, h + c3["down_proj"])
    torch.testing.assert_close(model.forward_layers(x, cos, sin), x3)
    x3.sum().backward()
    assert dn.beta.grad != 0  # β = 0 is not a dead point


@pytest.mark.parametrize("group, bf16", [(2, False), (0, False), (1, False), (3, True)], ids=["k2", "auto", "k1", "k3-bf16"])
def test_crnet_recompute_gives_the_same_loss_and_gradients(group, bf16):
    cfg, plugin, model = prepared("model=llama_tiny", "model.n_layers=5", "method=crnet", "method.rank=16",
                                  f"method.recompute_group={group}")
    ids = torch.randint(0, 8192, (2, 32), generator=torch.Generator().manual_seed(1))
    la, ga, saved_plain = loss_and_grads(model, ids, bf16)
    plugin.recompute_policy()(model)
    assert model.recompute_group == (group or 2)  # round(sqrt(5 - 1))
    lb, gb, saved_recompute = loss_and_grads(model, ids, bf16)
    assert la == lb
    assert_same_grads(ga, gb)
    assert saved_recompute < saved_plain / (1 if bf16 else 2)  # bf16: see test_cola_m_is_cola_...


@pytest.mark.parametrize("group", [1, 2, 3, 4])
def test_crnet_recompute_keeps_what_the_design_says(group):
    """Measured bytes for the decoder = d (layer 1's input) + per group of k layers: k input residuals,
    the anchor carry (5d + 2f) and the Z's (7r) of every layer but the last (fp32)."""
    cfg, plugin, model = prepared("model=llama_tiny", "model.n_layers=5", "method=crnet", "method.rank=16",
                                  f"method.recompute_group={group}")
    B, T, d, f = 2, 32, cfg.model.dim, cfg.model.ffn_dim
    x, cos, sin = torch.randn(B, T, d, requires_grad=True), model.rope_cos[:T], model.rope_sin[:T]
    _, plain = saved_activation_bytes(model, lambda: model.forward_layers(x, cos, sin))
    plugin.recompute_policy()(model)
    out, saved = saved_activation_bytes(model, lambda: model.forward_layers(x, cos, sin))
    expected = crnet_saved_bytes(cfg.model, 16, cfg.method.targets, group)
    groups = [len(range(s, min(s + group, 5))) for s in range(1, 5, group)]
    assert expected == 4 * (d + sum(k * d + (5 * d + 2 * f) + (k - 1) * 7 * 16 for k in groups))
    assert saved == B * T * expected and saved < plain / 2
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_crnet_policy_refuses_a_model_it_did_not_prepare():
    cfg, _ = load_config(["model=llama_tiny", "method=crnet"])
    with pytest.raises(UserError, match="needs a model prepared by method=crnet"):
        get_method("crnet")(cfg.method, cfg.model).recompute_policy()(build_model(cfg.model))


# -- through the CLI -------------------------------------------------------------------------------------

RUN = {"cola": ["method=cola", "method.rank=32"], "cola_m": ["method=cola_m", "method.rank=32"],
       "crnet": ["method=crnet", "method.rank=32"]}


@pytest.mark.parametrize("name", list(RUN))
def test_each_architecture_trains_on_llama_tiny(cli, tmp_path, name):
    run = tmp_path / "run"
    r = cli("train", *TINY, ONE, f"run.dir={run}", *RUN[name], "optim.lr=0.005", "trainer.max_steps=16",
            "trainer.ckpt_every=0")
    assert r.code == 0, r.err
    loss = losses(run)
    assert sum(loss[k] for k in (14, 15, 16)) / 3 < loss[1] - 0.8, loss
    cfg, _ = load_config(["model=llama_tiny", *RUN[name]])
    cost = get_method(name)(cfg.method, cfg.model).cost(cfg.model, 64)
    logged = re.search(r"\(([\d.]+)M params, ([\d.]+)M trainable\)", r.err)
    assert logged and float(logged[1]) == round(cost["params"] / 1e6, 2) == float(logged[2])


@pytest.mark.parametrize("name", list(RUN))
def test_preempted_run_resumes_bit_for_bit(cli, tmp_path, monkeypatch, name):
    """SIGUSR1 after update 4 -> checkpoint -> resume=auto: the same losses as one run of 8."""
    common = [*TINY, ONE, *RUN[name], "optim.lr=0.005", "trainer.ckpt_every=100", "trainer.max_steps=8"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert cli("train", *common, f"run.dir={ref}").code == 0
    plugin = get_method(name)
    monkeypatch.setattr(plugin, "after_step",
                        lambda self, ctx: os.kill(os.getpid(), signal.SIGUSR1) if ctx.step == 4 else None)
    r = cli("train", *common, f"run.dir={run}")
    assert r.code == 0 and "stopped by SIGUSR1 at step 4" in r.err, r.err
    monkeypatch.undo()
    r = cli("train", *common, f"run.dir={run}")
    assert r.code == 0 and "resumed from" in r.err, r.err
    assert losses(run) == losses(ref)


@pytest.mark.parametrize("args, expected", [
    (["method=cola", "method.rank=0"], "method.rank=0 is invalid: must be > 0"),
    (["method=cola_m", "method.rank=-3"], "method.rank=-3 is invalid: must be > 0"),
    (["method=cola", "method.rank=200"], "method.rank=200 is invalid: must be <= min(m, n) = 128 for q_proj (128x128)"),
    (["method=cola", "method.targets=[attn,ffn]"], "method.targets: unknown target 'ffn'; allowed: attn, mlp, q_proj"),
    (["method=crnet", "method.rank=129"], "method.rank=129 is invalid: must be <= min(m, n) = 128 for q_proj"),
    (["method=crnet", "method.targets=[]"], "method.targets=[] is invalid: name at least one of attn, mlp"),
    (["method=crnet", "method.eps=0"], "method.eps=0.0 is invalid: must be > 0"),
    (["method=crnet", "method.eps=-0.1"], "method.eps=-0.1 is invalid: must be > 0"),
    (["method=crnet", "method.beta_init=nan"], "method.beta_init=nan is invalid: must be finite"),
    (["method=crnet", "method.recompute_group=-1"], "method.recompute_group=-1 is invalid: must be >= 0"),
    (["method=crnet", "model.n_layers=1"], "model.n_layers=1 is invalid: CR-Net needs at least 2 layers"),
])
def test_bad_values_are_one_line(cli, tmp_path, args, expected):
    one_line(cli("train", *TINY, f"run.dir={tmp_path / 'run'}", *args), expected)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["cola", "crnet"])
def test_trainer_recompute_method_applies_the_plugins_policy(cli, tmp_path, monkeypatch, name):
    """trainer.recompute=method installs the plugin's policy once on the prepared model; the losses
    are those of the run without recomputation."""
    common = [*TINY, ONE, *RUN[name], "model.n_layers=3", "optim.lr=0.005", "trainer.max_steps=4",
              "trainer.ckpt_every=0"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli("train", *common, f"run.dir={a}").code == 0
    plugin, applied = get_method(name), []
    policy = plugin.recompute_policy

    def recording(self):
        install = policy(self)

        def apply(model):
            install(model)
            applied.append(model)

        return apply

    monkeypatch.setattr(plugin, "recompute_policy", recording)
    r = cli("train", *common, f"run.dir={b}", "trainer.recompute=method")
    assert r.code == 0, r.err
    assert len(applied) == 1
    model = applied[0]
    assert all(block.recompute for block in model.layers) if name == "cola" else model.recompute_group == 1
    la, lb = losses(a), losses(b)
    assert la.keys() == lb.keys() and all(math.isclose(la[k], lb[k], rel_tol=1e-6) for k in la)


def test_generic_block_recompute_on_cola_and_a_clear_refusal_for_crnet(cli, tmp_path):
    """CoLA's blocks take trainer.recompute=full like LLaMA's (same losses); CR-Net's blocks carry
    the previous layer's outputs, so block-level recompute is refused in one line (its own policy
    is trainer.recompute=method)."""
    common = [*TINY, ONE, "model.n_layers=3", "optim.lr=0.005", "trainer.max_steps=3", "trainer.ckpt_every=0"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli("train", *common, *RUN["cola"], f"run.dir={a}").code == 0
    r = cli("train", *common, *RUN["cola"], f"run.dir={b}", "trainer.recompute=full")
    assert r.code == 0, r.err
    la, lb = losses(a), losses(b)
    assert la.keys() == lb.keys() and all(math.isclose(la[k], lb[k], rel_tol=1e-6) for k in la)
    r = cli("train", *common, *RUN["crnet"], f"run.dir={tmp_path / 'c'}", "trainer.recompute=full")
    assert r.code == 2 and "trainer.recompute=full" in r.error_lines[0], r.err
