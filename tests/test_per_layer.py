"""Per-layer (in-backward) updates (trainer.per_layer_update): step for step equal to the global step
for every optimizer, with accumulation, exact resume, the non-finite guard, recomputation; gradient
memory; per-parameter clipping; bad combinations refused."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_errors import one_line

from lrpretrain.errors import ConfigError
from lrpretrain.methods import get_method
from lrpretrain.model import build_model, lm_loss
from lrpretrain.optim import AdamW
from lrpretrain.optim.clip import CLIP_EPS
from lrpretrain.train import load_config
from lrpretrain.train.per_layer import PerLayerUpdate

import lrp_test_plugins  # noqa: F401  (registers test_fault, test_grad_fault, test_sgd)
from conftest import TINY, read_metrics

ONE = "trainer.threads=1"
PL = "trainer.per_layer_update=true"
# one micro-batch per update (no accumulation); clipping at 0.5 acts on every update (grad norms ~3)
BASE = [*TINY, ONE, "trainer.batch_size=2", "trainer.micro_batch_size=2", "trainer.max_steps=4",
        "trainer.ckpt_every=0", "optim.grad_clip=0.5", "optim.lr=0.003", "data.val_tokens=0"]


def _run(cli, run: Path, *args: str) -> dict:
    r = cli("train", *BASE, f"run.dir={run}", *args)
    assert r.code == 0, r.err
    last = sorted((run / "checkpoints").glob("step_*"), key=lambda p: int(p.name[5:]))[-1]
    return {"records": [x for x in read_metrics(run) if "loss" in x], "err": r.err,
            "model": load_file(str(last / "model.safetensors")),
            "optimizer": torch.load(last / "train_state.pt", weights_only=True)["optimizer"]["state"]}


def _assert_same_run(a: dict, b: dict) -> None:
    """Bit for bit: every logged loss and grad norm, the final weights and every optimizer state tensor."""
    assert [(x["step"], x["loss"], x["grad_norm"], x["lr"]) for x in a["records"]] == \
           [(x["step"], x["loss"], x["grad_norm"], x["lr"]) for x in b["records"]]
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["optimizer"].keys() == b["optimizer"].keys()
    for pid, sa in a["optimizer"].items():
        sb = b["optimizer"][pid]
        assert sa.keys() == sb.keys()
        for k, v in sa.items():
            assert torch.equal(v, sb[k]) if isinstance(v, torch.Tensor) else v == sb[k], (pid, k)


METHODS = {
    "full": ["method=full"],
    "full_8bit": ["method=full", "optim.state_bits=8"],
    "galore": ["method=galore", "method.update_proj_gap=2"],
    "galore_dct": ["method=galore_dct", "method.update_proj_gap=2"],
    "fira": ["method=fira", "method.update_proj_gap=2"],
    "apollo": ["method=apollo", "method.rank=32", "method.update_proj_gap=2"],
    "frugal": ["method=frugal", "method.update_proj_gap=2"],
    # reparameterizations and architectures: AdamW (or SwitchLoRA's vector-wise AdamW) on their factors,
    # with merges / unloads / switches / rounds inside the 4 updates
    "lowrank": ["method=lowrank", "method.rank=8"],
    "relora": ["method=relora", "method.rank=8", "method.merge_every=2", "method.restart_warmup_steps=1"],
    "periodic_lora": ["method=periodic_lora", "method.rank=8", "method.unload_every=2", "method.unload=momentum"],
    "sltrain": ["method=sltrain", "method.rank=8"],
    "lost": ["method=lost", "method.rank=8", "method.sparsity=0.1"],
    "gradnorm_lorp": ["method=gradnorm_lorp", "method.update_proj_gap=2"],
    "switchlora": ["method=switchlora", "method.rank=8", "method.interval=2", "method.adam_warm_step=1"],
    "sst": ["method=sst", "method.rank=8", "method.round_steps=2"],
    "cola": ["method=cola", "method.rank=8"],
    "crnet": ["method=crnet", "method.rank=8"],
    # LORO: lazy updates 1 and 3, exact Riemannian steps at 2 and 4 (the pair's second factor moves both)
    "loro": ["method=loro", "method.rank=8", "method.exact_every=2", "method.restart_warmup_steps=1"],
    # (DLRT is refused at config time: its integrator needs every layer's K- and L-step before the S-step)
    # quantized weights: LoQT's full gradient of W at updates 0 and 2 (taken in the first of the two
    # backward passes) and merges after them; Q-GaLore's INT8 weights rounded stochastically
    "loqt": ["method=loqt", "method.rank=8", "method.update_proj_gap=2", "method.compensation_iterations=2",
             "method.reset_optimizer=true"],
    "q_galore": ["method=q_galore", "method.rank=8", "method.update_proj_gap=2"],
    "lr_qat": ["method=lr_qat", "method.rank=8"],  # A, B and the scales' own group (its own LR)
}


@pytest.mark.parametrize("name", list(METHODS))
def test_equals_the_global_step_with_exact_global_clipping(cli, tmp_path, name):
    """per_layer_clip=global (the default) vs the global step with global-norm clipping that acts."""
    ref = _run(cli, tmp_path / "ref", *METHODS[name])
    assert all(x["grad_norm"] > 0.5 for x in ref["records"])  # clipping is active
    pl = _run(cli, tmp_path / "pl", *METHODS[name], PL)
    assert "per-layer updates inside the backward; the global gradient norm first" in pl["err"]
    _assert_same_run(ref, pl)


def test_param_clip_without_clipping_equals_the_global_step(cli, tmp_path):
    """One backward, no clipping (optim.grad_clip=0): the plain per-layer update is the global step's
    (AdamW: see the accumulation test)."""
    ref = _run(cli, tmp_path / "ref", *METHODS["galore"], "optim.grad_clip=0")
    pl = _run(cli, tmp_path / "pl", *METHODS["galore"], "optim.grad_clip=0", PL, "trainer.per_layer_clip=param")
    assert "one pass; no clipping" in pl["err"]
    _assert_same_run(ref, pl)


def test_param_clip_clips_each_gradient_on_its_own():
    """Every gradient reaching step_param has norm <= c; the ones under c are untouched."""
    cfg, _ = load_config(["model=llama_tiny"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    ids = torch.randint(0, cfg.model.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    lm_loss(model(ids), ids)[0].backward()
    raw = {id(p): torch.linalg.vector_norm(p.grad).item() for p in model.parameters()}
    model.zero_grad(set_to_none=True)
    c = sorted(raw.values())[len(raw) // 2]  # half the parameters are above it
    seen = {}

    class Spy(AdamW):
        def step_param(self, p, group):
            seen[id(p)] = torch.linalg.vector_norm(p.grad).item()
            super().step_param(p, group)

    opt = Spy(model.parameters(), lr=1e-3)
    update = PerLayerUpdate(model, opt, "param", c, accum_steps=1, reusable_graph=True)
    out = update.backward(lm_loss(model(ids), ids)[0], True, lambda: None)
    assert out.applied and out.stepped == len(raw) == len(seen)
    assert out.grad_norm == pytest.approx(math.sqrt(sum(n * n for n in raw.values())), rel=1e-5)
    for pid, n in raw.items():
        expected = n * min(1.0, c / (n + CLIP_EPS))
        assert seen[pid] == pytest.approx(expected, rel=1e-5)
        assert seen[pid] <= c * (1 + 1e-5)
    assert all(p.grad is None for p in model.parameters())


def test_param_clip_is_not_a_no_op(cli, tmp_path):
    """optim.grad_clip reaches the per-parameter clip: the run differs from one without clipping."""
    clipped = _run(cli, tmp_path / "a", PL, "trainer.per_layer_clip=param")
    unclipped = _run(cli, tmp_path / "b", PL, "trainer.per_layer_clip=param", "optim.grad_clip=0")
    assert "each gradient clipped to norm 0.5 on its own" in clipped["err"]
    loss = lambda r: [x["loss"] for x in r["records"]]  # noqa: E731
    assert loss(clipped)[:2] == loss(unclipped)[:2]  # same start (the first update has LR 0: warmup)
    assert all(a != b for a, b in zip(loss(clipped)[2:], loss(unclipped)[2:]))


@pytest.mark.parametrize("clip", ["param", "global"])
def test_accumulation_steps_once_per_update_at_the_boundary(cli, tmp_path, monkeypatch, clip):
    """2 micro-batches per update: each parameter steps once, from its complete gradient."""
    calls = []
    original = AdamW.step_param
    monkeypatch.setattr(AdamW, "step_param", lambda self, p, g: (calls.append(id(p)), original(self, p, g)))
    accum = ["trainer.batch_size=4", "trainer.micro_batch_size=2"]
    grad_clip = ["optim.grad_clip=0"] if clip == "param" else []
    ref = _run(cli, tmp_path / "ref", *accum, *grad_clip)
    n_params = len(ref["model"])
    assert len(calls) == 4 * n_params
    calls.clear()
    pl = _run(cli, tmp_path / "pl", *accum, *grad_clip, PL, f"trainer.per_layer_clip={clip}")
    assert len(calls) == 4 * n_params and len(set(calls)) == n_params
    assert all(int(s["step"]) == 4 for s in pl["optimizer"].values())
    if clip == "global":  # with accumulation the exact global clip runs the ordinary step after the last backward
        assert "the update runs after it as the ordinary step" in pl["err"]
    _assert_same_run(ref, pl)


def test_preempted_per_layer_run_resumes_bit_for_bit(cli, tmp_path):
    """SIGUSR1 after update 3 of 6 -> resume: the same run as without the stop, and as the global step."""
    common = ["method=test_fault", "trainer.max_steps=6", "trainer.eval_every=3", "data.val_tokens=2048"]
    straight = _run(cli, tmp_path / "straight", *common, PL)
    stop = cli("train", *BASE, f"run.dir={tmp_path / 'run'}", *common, PL, "method.signal_at=3")
    assert stop.code == 0 and "stopped by SIGUSR1 at step 3" in stop.err
    resumed = _run(cli, tmp_path / "run", *common, PL, "method.signal_at=3")
    assert "resumed from" in resumed["err"]
    _assert_same_run(straight, resumed)
    vals = lambda d: [(x["step"], x["val_loss"]) for x in read_metrics(d) if "val_loss" in x]  # noqa: E731
    assert vals(tmp_path / "run") == vals(tmp_path / "straight")
    _assert_same_run(_run(cli, tmp_path / "global", *common), straight)


def test_nonfinite_loss_steps_nothing(cli, tmp_path):
    """A NaN loss is known before the last backward: no parameter steps, in either clip mode."""
    ref = _run(cli, tmp_path / "ref", "method=test_fault", "method.nan_at=[2]")
    for clip in ("global", "param"):
        pl = _run(cli, tmp_path / clip, "method=test_fault", "method.nan_at=[2]", PL, f"trainer.per_layer_clip={clip}")
        assert pl["records"][1]["skipped"] is True and "partial_update" not in pl["records"][1]
        assert "non-finite loss at update 2" in pl["err"]
        if clip == "global":
            _assert_same_run(ref, pl)
        else:  # the skipped update is the same; later ones differ by per-parameter vs global clipping
            assert [x["loss"] for x in pl["records"][:3]] == [x["loss"] for x in ref["records"][:3]]


def test_nonfinite_gradient_with_global_clip_skips_the_whole_update(cli, tmp_path):
    """The loss is finite, one gradient is NaN: pass 1 sees it before any parameter steps."""
    args = ["method=test_grad_fault", "method.grad_nan_at=[2]"]
    ref = _run(cli, tmp_path / "ref", *args)
    pl = _run(cli, tmp_path / "pl", *args, PL)
    assert ref["records"][1]["skipped"] is True and pl["records"][1]["skipped"] is True
    assert "partial_update" not in pl["records"][1]
    assert "non-finite gradient norm at update 2" in pl["err"]
    _assert_same_run(ref, pl)


def test_nonfinite_gradient_with_param_clip_is_never_applied(cli, tmp_path):
    """One pass: parameters nearer the output stepped before the NaN gradient was seen; the NaN one
    and every later one did not; the update counts as skipped; nothing non-finite reaches the weights."""
    run = tmp_path / "run"
    out = _run(cli, run, "method=test_grad_fault", "method.grad_nan_at=[2]", PL, "trainer.per_layer_clip=param",
               "trainer.ckpt_every=1", "trainer.keep_last=10")
    rec = out["records"][1]
    n_params = len(out["model"])
    assert rec["skipped"] is True and 0 < rec["partial_update"] < n_params
    assert f"{rec['partial_update']} parameters had already stepped inside the backward" in out["err"]
    assert all(math.isfinite(x["loss"]) for x in out["records"])
    assert all(torch.isfinite(t).all() for t in out["model"].values())
    w1, w2 = (load_file(str(run / f"checkpoints/step_{s}/model.safetensors")) for s in (1, 2))
    assert torch.equal(w1["layers.0.attn.q_proj.weight"], w2["layers.0.attn.q_proj.weight"])  # the NaN one
    assert torch.equal(w1["embed_tokens.weight"], w2["embed_tokens.weight"])  # after it in the backward
    assert not torch.equal(w1["lm_head.weight"], w2["lm_head.weight"])  # before it: stepped
    assert torch.load(run / "checkpoints/step_4/train_state.pt", weights_only=True)["nonfinite"] == 1


def test_with_activation_recomputation(cli, tmp_path):
    """With full recomputation the exact global clip's second pass reuses the graph; with selective
    (whose saved outputs serve one backward only) it recomputes the forward. Both equal the global step."""
    ref = _run(cli, tmp_path / "ref", *METHODS["galore"])
    for recompute, how in (("full", "reusing the graph"), ("selective", "recomputing the forward")):
        pl = _run(cli, tmp_path / recompute, *METHODS["galore"], PL, f"trainer.recompute={recompute}")
        assert how in pl["err"]
        _assert_same_run(ref, pl)


@pytest.mark.parametrize("clip", ["global", "param"])
def test_live_gradient_bytes_stay_far_below_all_gradients(clip):
    """During backward, the bytes of live .grad tensors peak at about one parameter's, not all of them."""
    cfg, _ = load_config(["model=llama_tiny", "model.vocab_size=256", "model.n_layers=4"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    params = list(model.parameters())
    total = sum(p.numel() * p.element_size() for p in params)
    peak = [0]

    def measure(_p):  # registered first: runs before the update's own hook frees the gradient
        peak[0] = max(peak[0], sum(q.grad.numel() * q.grad.element_size() for q in params if q.grad is not None))

    for p in params:
        p.register_post_accumulate_grad_hook(measure)
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    lm_loss(model(ids), ids)[0].backward()
    assert peak[0] == total  # the global step: every gradient is alive at the end of the backward
    model.zero_grad(set_to_none=True)
    peak[0] = 0
    opt = get_method("full")(cfg.method, cfg.model).build_optimizer([{"params": params}], cfg.optim)
    update = PerLayerUpdate(model, opt, clip, 1.0, accum_steps=1, reusable_graph=True)
    out = update.backward(lm_loss(model(ids), ids)[0], True, lambda: None)
    assert out.applied and out.stepped == len(params)
    largest = max(p.numel() * p.element_size() for p in params)
    assert peak[0] == largest and peak[0] < total / 10
    assert all(p.grad is None for p in params)


@pytest.mark.parametrize("args, expected", [
    ([PL, "trainer.per_layer_clip=layer"], "trainer.per_layer_clip='layer' is invalid: allowed: global, param"),
    ([PL, "method=test_sgd"],
     "trainer.per_layer_update=True is invalid: the method's optimizer SGD is not a lrpretrain.optim.ParamwiseOptimizer"),
])
def test_bad_values_are_one_line(cli, tmp_path, args, expected):
    one_line(cli("train", *TINY, f"run.dir={tmp_path / 'run'}", *args), expected)
    assert not (tmp_path / "run").exists()


def test_per_layer_runs_under_ddp_and_fsdp2_config():
    """Several processes need a multi-process strategy; per-layer updates then pass config checks
    (their exactness under DDP/FSDP2: tests/test_distributed.py)."""
    base = ["model=llama_tiny", "trainer.batch_size=4", "trainer.micro_batch_size=2", PL]
    with pytest.raises(ConfigError, match=r"^distributed.strategy=single runs one process, but WORLD_SIZE=2"):
        load_config(base, world_size=2)
    for strategy in ("ddp", "fsdp2"):
        load_config([*base, f"distributed={strategy}"], world_size=2)
    load_config(["model=llama_tiny", PL], world_size=1)


def test_parameters_a_method_adds_later_are_hooked():
    """A method may add or freeze parameters after the optimizer is built (e.g. in after_step)."""
    lin = torch.nn.Linear(4, 4, bias=False)
    model = torch.nn.Sequential(lin)
    opt = AdamW(lin.parameters(), lr=0.1)
    update = PerLayerUpdate(model, opt, "param", 0.0, accum_steps=1, reusable_graph=True)
    extra = torch.nn.Parameter(torch.ones(4))
    model.register_parameter("extra", extra)
    opt.add_param_group({"params": [extra]})
    x = torch.ones(2, 4)
    out = update.backward((lin(x) * extra).sum(), True, lambda: None)
    assert out.stepped == 2 and lin.weight.grad is None and extra.grad is None
    assert not torch.equal(extra.detach(), torch.ones(4))
    extra.requires_grad_(False)
    assert update.backward(lin(x).sum(), True, lambda: None).stepped == 1


def test_group_of_follows_load_state_dict():
    """load_state_dict replaces the group dicts: group_of must hand out the new ones (the trainer sets
    their lr), also when it was called before the load."""
    p = torch.nn.Parameter(torch.ones(3))
    opt = AdamW([p], lr=0.1)
    assert opt.group_of(p) is opt.param_groups[0]
    opt.load_state_dict(opt.state_dict())
    assert opt.group_of(p) is opt.param_groups[0]
