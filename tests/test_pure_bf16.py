"""trainer.precision=pure_bf16: bf16 weights, gradients and activations without an fp32 master copy.

The rounding of the update (stochastic against a float64 reference, Kahan's compensation, nearest),
element-wise steps in chunks, the dtypes every method ends up with, exact resume with each rounding
rule, per-layer updates equal to the global step, checkpoints, and the refusals.
"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file
from test_errors import one_line
from test_estimate import BUILTIN, HAS_RANK
from test_per_layer import _assert_same_run, _run

import lrpretrain.train
from lrpretrain.optim import AdamW, GaLoreAdamW
from lrpretrain.optim import base as optim_base
from lrpretrain.optim.bf16 import Bf16Update, rounding_bits, stochastic_round
from lrpretrain.optim.loro import LOROAdamW
from lrpretrain.optim.projector import SVDBasis
from lrpretrain.train import build_trainer, load_config

from conftest import TINY, losses, read_metrics

RANKED = HAS_RANK | {"galore", "galore_dct", "fira", "apollo", "gradnorm_lorp", "loqt"}  # method.rank=8 fits llama_tiny
# quantized weights' storage (LoQT, Q-GaLore): fp32 absmax/scales/minima and LoQT's bf16 projection
QUANT_SCALES = ("_absmax", "_absmax_scale", "_absmax_offset", "_scales", "_mins", "proj_bf16")
BASES = (".U", ".V")  # DLRT's orthonormal bases: fp32 buffers (lrpretrain/methods/dlrt.py)
PURE = ["trainer.precision=pure_bf16"]
SMALL = ["model=llama_tiny", "data.seq_len=32", "trainer.batch_size=2", "trainer.micro_batch_size=2",
         "trainer.threads=1", "data.val_tokens=0", "trainer.eval_at_start=false", "logging.progress=none"]


# -- the rounding itself ------------------------------------------------------------------------------


def _bf16_neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two bf16 values around each (normal, non-zero) fp32 value of ``x``, in float64 arithmetic:
    the ulp is 2^(e - 7) for |x| in [2^e, 2^(e+1)) (bf16 keeps 7 mantissa bits)."""
    a = x.double().abs()
    ulp = torch.exp2(torch.floor(torch.log2(a)) - 7)
    low = torch.floor(a / ulp) * ulp
    sign = torch.sign(x.double())
    return sign * low, sign * (low + ulp)


def test_stochastic_rounding_is_unbiased_against_a_float64_reference():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(512, generator=g) * torch.exp2(torch.randint(-20, 20, (512,), generator=g).float())).float()
    lo, hi = _bf16_neighbours(x)
    p_hi = ((x.double() - lo) / (hi - lo)).abs()  # the probability of rounding away from zero
    draws = 4000
    ups = torch.zeros(512, dtype=torch.float64)
    mean = torch.zeros(512, dtype=torch.float64)
    for k in range(draws):
        r = stochastic_round(x, key=k).double()
        assert bool(((r == lo) | (r == hi)).all())  # always one of the two neighbours
        ups += (r == hi).double()
        mean += r / draws
    sigma = torch.sqrt(p_hi * (1 - p_hi) / draws).clamp(min=1.0 / draws)
    assert bool(((ups / draws - p_hi).abs() <= 5 * sigma).all())  # frequency of rounding up = the distance in ulps
    assert bool(((mean - x.double()).abs() <= 5 * sigma * (hi - lo).abs()).all())  # unbiased: E[round(x)] = x


def test_stochastic_rounding_keeps_exact_values_and_special_values():
    exact = torch.tensor([0.0, -0.0, 1.0, -2.5, 3.0e38, 1.5e-38]).bfloat16().float()
    special = torch.tensor([math.inf, -math.inf, math.nan])
    for k in range(20):
        assert torch.equal(stochastic_round(exact, key=k).float(), exact)
        r = stochastic_round(special, key=k).float()
        assert r[0] == math.inf and r[1] == -math.inf and math.isnan(r[2])


def test_rounding_bits_are_a_function_of_key_and_position():
    whole = rounding_bits(7, 0, 10_000, torch.device("cpu"))
    assert torch.equal(rounding_bits(7, 3000, 500, torch.device("cpu")), whole[3000:3500])  # chunks, shards
    assert torch.equal(rounding_bits(7, 0, 10_000, torch.device("cpu")), whole)  # deterministic
    assert not torch.equal(rounding_bits(8, 0, 10_000, torch.device("cpu")), whole)
    assert int(whole.min()) >= 0 and int(whole.max()) < 1 << 16
    assert abs(whole.double().mean().item() / 65535 - 0.5) < 0.02  # uniform over 16 bits
    assert len(torch.unique(whole)) > 7000


def _adamw_runs(rule: str | None, steps: int = 200, lr: float = 1e-4):
    """AdamW on 4096 weights that start at 1.0 with a constant gradient: every update (about lr) lies
    below half a bf16 ulp of 1.0 (2^-8)."""
    w = torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16 if rule else torch.float32))
    opt = AdamW([w], lr=lr)
    if rule:
        opt.bf16_update = Bf16Update(rule, seed=0)
    for _ in range(steps):
        w.grad = torch.ones_like(w)
        opt.step()
    return w, opt


def test_kahan_recovers_updates_below_bf16_resolution():
    ref, _ = _adamw_runs(None)
    assert ref.detach().mean().item() == pytest.approx(1 - 200 * 1e-4, abs=1e-5)
    nearest, _ = _adamw_runs("nearest")
    assert torch.equal(nearest.detach(), torch.ones_like(nearest))  # every update vanished
    kahan, opt = _adamw_runs("kahan")
    comp = opt.state[kahan]["bf16_comp"]
    assert comp.dtype == torch.bfloat16
    # the weight + its bf16 compensation keeps ~16 bits: each update's leftover is itself rounded to
    # bf16 (<= 2^-17 here); nearest lost the whole 0.02, kahan loses under 2% of it
    lost = (kahan.detach().float() + comp.float() - ref.detach()).abs().max().item()
    assert lost <= 0.02 * (200 * 1e-4)
    assert (kahan.detach().float() - ref.detach()).abs().max().item() <= 2.0**-8  # the bf16 weight itself: within an ulp
    stochastic, _ = _adamw_runs("stochastic")
    assert stochastic.detach().float().mean().item() == pytest.approx(ref.detach().mean().item(), abs=2e-4)


# -- element-wise steps in pieces -------------------------------------------------------------------------


def _step_twice(make_opt, weights: list[torch.Tensor], grads: list[torch.Tensor], rule: str | None):
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    opt = make_opt(params)
    if rule:
        opt.bf16_update = Bf16Update(rule, seed=3)
    for scale in (1.0, -0.5):
        for p, g in zip(params, grads):
            p.grad = (g * scale).to(p.dtype)
        opt.step()
    return params, opt


@pytest.mark.parametrize("case", ["adamw", "adamw_8bit", "galore_dense", "loro_8bit", "pure_stochastic", "pure_kahan"])
def test_chunked_elementwise_step_equals_the_whole_tensor_step(monkeypatch, case):
    g = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if case.startswith("pure") else torch.float32
    weights = [torch.randn(96, 130, generator=g).to(dtype), torch.randn(777, generator=g).to(dtype)]
    grads = [torch.randn(w.shape, generator=g) for w in weights]
    rule = case.split("_")[1] if case.startswith("pure") else None
    if case == "galore_dense":  # GaLore's plain-Adam groups (embeddings, norms): SubspaceAdam's own form
        make = lambda ps: GaLoreAdamW([{"params": ps}], SVDBasis())  # noqa: E731
    elif case == "loro_8bit":  # LOROAdamW's Adam (the reference's arithmetic) for its non-factor parameters
        make = lambda ps: LOROAdamW(ps, lr=1e-2, weight_decay=0.1, state_bits=8)  # noqa: E731
    else:
        make = lambda ps: AdamW(ps, lr=1e-2, weight_decay=0.1, state_bits=8 if case == "adamw_8bit" else 32)  # noqa: E731
    whole, opt_whole = _step_twice(make, weights, grads, rule)
    monkeypatch.setattr(optim_base, "CHUNK", 512)  # several pieces, a short last one; 8-bit blocks of 256
    pieces, opt_pieces = _step_twice(make, weights, grads, rule)
    for a, b in zip(whole, pieces):
        assert torch.equal(a, b)
    for a, b in zip(whole, pieces):
        sa, sb = opt_whole.state[a], opt_pieces.state[b]
        assert sa.keys() == sb.keys()
        for k, v in sa.items():
            assert torch.equal(v, sb[k]) if isinstance(v, torch.Tensor) else v == sb[k], k


# -- every method ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BUILTIN)
def test_dtypes_of_parameters_gradients_and_states(corpus, tmp_path, name, one_thread):
    """bf16 parameters (trained and frozen) and gradients; the RoPE tables and index buffers keep their
    dtype; optimizer moments fp32, stored GaLore-family bases bf16 (basis_dtype=auto)."""
    rank = ["method.rank=8"] if name in RANKED else []
    cfg, resolved = load_config([*SMALL, *PURE, f"run.dir={tmp_path / 'r'}", f"method={name}", *rank])
    trainer = build_trainer(cfg, resolved)
    try:
        grads: dict[str, torch.dtype] = {}
        for n, p in trainer.model.named_parameters():
            if p.requires_grad:
                p.register_hook(lambda g, n=n: grads.__setitem__(n, g.dtype))
        record = trainer.train_step()
        assert math.isfinite(record["loss"])
        assert {p.dtype for p in trainer.model.parameters()} == {torch.bfloat16}
        assert set(grads.values()) == {torch.bfloat16} and grads
        buffers = dict(trainer.model.named_buffers())
        assert buffers["rope_cos"].dtype == torch.float32
        assert all(not b.is_floating_point() for n, b in buffers.items()
                   if not n.startswith("rope_") and not n.endswith(QUANT_SCALES + BASES))
        assert all(b.dtype == torch.float32 for n, b in buffers.items() if n.endswith(BASES))
        floats = {k: v.dtype for s in trainer.optimizer.state.values() for k, v in s.items()
                  if isinstance(v, torch.Tensor) and v.is_floating_point()}
        for key, dtype in floats.items():
            expected = torch.bfloat16 if key in ("proj_left", "proj_right", "bf16_comp") else torch.float32
            assert dtype == expected, (key, dtype)
        assert any(k.startswith("exp_avg") for k in floats)
        if name in ("galore", "fira"):
            assert cfg.method.basis_dtype == "bf16" and "proj_left" in floats or "proj_right" in floats
        # Q-GaLore's INT8 weights round stochastically with their own counter (sr_updates), not into bf16
        assert all(s.get("bf16_updates") == 1 for s in trainer.optimizer.state.values()
                   if "exp_avg" in s and "sr_updates" not in s)
        assert all(s["sr_updates"] == 1 for s in trainer.optimizer.state.values() if "sr_updates" in s)
    finally:
        trainer.data.close()
        trainer.logger.close()


def test_basis_dtype_follows_the_precision_unless_set():
    assert load_config(["method=galore", *PURE])[0].method.basis_dtype == "bf16"
    assert load_config(["method=galore"])[0].method.basis_dtype == "fp32"
    assert load_config(["method=galore", *PURE, "method.basis_dtype=fp32"])[0].method.basis_dtype == "fp32"
    assert load_config(["method=frugal", "method.subspace=svd", *PURE])[0].method.basis_dtype == "bf16"


# -- runs through the CLI --------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["stochastic", "kahan", "nearest"])
def test_resume_is_exact_with_each_rounding_rule(cli, tmp_path, rule, monkeypatch):
    """4 updates in one go vs 2, a stop, and 2 more (with gradient accumulation): the same losses and
    the same bf16 weights and optimizer state, bit for bit. The checkpoint holds bf16 safetensors and
    (kahan) the compensation buffers; everything loads with weights_only=True."""
    common = [*TINY, "trainer.threads=1", *PURE, f"trainer.bf16_update={rule}", "trainer.ckpt_every=2",
              "method=galore", "method.rank=8", "method.update_proj_gap=3", "logging.progress=none"]
    assert cli("train", *common, "trainer.max_steps=4", f"run.dir={tmp_path / 'a'}").code == 0
    monkeypatch.setattr(lrpretrain.train, "cpu_has_bf16_matmul", lambda: False)
    r = cli("train", *common, "trainer.max_steps=2", f"run.dir={tmp_path / 'b'}")
    assert r.code == 0 and f"pure_bf16 ({rule} rounding of the updates)" in r.err
    assert r.err.count("warning: trainer.precision=pure_bf16 on a CPU without bf16 matrix instructions") == 1
    monkeypatch.setattr(lrpretrain.train, "cpu_has_bf16_matmul", lambda: True)
    r = cli("train", *common, "trainer.max_steps=4", f"run.dir={tmp_path / 'b'}")
    assert r.code == 0 and "bf16 matrix instructions" not in r.err
    assert losses(tmp_path / "a") == losses(tmp_path / "b") and len(losses(tmp_path / "a")) == 4
    for run in ("a", "b"):
        assert (tmp_path / run / "checkpoints" / "latest").read_text().strip() == "step_4"
    a, b = (tmp_path / x / "checkpoints" / "step_4" for x in "ab")
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert {t.dtype for t in wa.values()} == {torch.bfloat16}
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    sa = torch.load(a / "train_state.pt", weights_only=True)["optimizer"]["state"]
    sb = torch.load(b / "train_state.pt", weights_only=True)["optimizer"]["state"]
    for pid, s in sa.items():
        for k, v in s.items():
            assert torch.equal(v, sb[pid][k]) if isinstance(v, torch.Tensor) else v == sb[pid][k]
    keys = {k for s in sa.values() for k in s}
    assert ("bf16_comp" in keys) == (rule == "kahan") and ("bf16_updates" in keys) == (rule == "stochastic")
    g = cli("generate", f"run.dir={tmp_path / 'b'}", "prompt=To be", "max_new_tokens=4")  # reads bf16 checkpoints
    assert g.code == 0 and g.out.startswith("To be"), g.err


@pytest.mark.parametrize("args", [
    # ranks shrink by one at most updates (ϑ = 0.4 on a nearly flat spectrum of 8): the stop falls between
    # rank changes, with Kahan buffers shaped like the factors of the moment
    ["method=dlrt", "method.rank=8", "method.tol=0.4", "trainer.bf16_update=kahan"],
    # the exact Riemannian step at update 3, after the stop: both factors rounded stochastically
    ["method=loro", "method.rank=8", "method.exact_every=3", "method.restart_warmup_steps=1"],
], ids=["dlrt_kahan", "loro"])
def test_resume_is_exact_across_rank_changes_and_exact_steps(cli, tmp_path, args):
    common = [*TINY, "trainer.threads=1", *PURE, "trainer.ckpt_every=2", "logging.progress=none", *args]
    a, b = tmp_path / "a", tmp_path / "b"
    for run, steps in ((a, 4), (b, 2), (b, 4)):
        r = cli("train", *common, f"trainer.max_steps={steps}", f"run.dir={run}")
        assert r.code == 0, r.err
    assert losses(a) == losses(b) and len(losses(a)) == 4
    ranks = [x["ranks"] for x in read_metrics(a) if "ranks" in x]
    assert not ranks or ranks[0] != ranks[1] != ranks[3]
    wa, wb = (load_file(str(x / "checkpoints" / "step_4" / "model.safetensors")) for x in (a, b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    sa, sb = (torch.load(x / "checkpoints" / "step_4" / "train_state.pt", weights_only=True)["optimizer"]["state"]
              for x in (a, b))
    for pid, s in sa.items():
        for k, v in s.items():
            assert torch.equal(v, sb[pid][k]) if isinstance(v, torch.Tensor) else v == sb[pid][k]
    if "method=loro" in args:  # the refresh after update 3 restarted the moments, not the rounding's count
        assert all(s["adam_step"] == 1 and s["bf16_updates"] == 4 for s in sa.values())


@pytest.mark.parametrize("args", [
    ["method=full"],
    ["method=full", "optim.state_bits=8", "trainer.bf16_update=kahan"],
    ["method=galore", "method.update_proj_gap=2", "method.state_bits=8"],
    ["method=lora", "method.rank=8"],
    # LORO's exact steps at updates 2 and 4: the pair's second factor rounds both (stochastic, then kahan)
    ["method=loro", "method.rank=8", "method.exact_every=2", "method.restart_warmup_steps=1"],
    ["method=loro", "method.rank=8", "method.exact_every=2", "method.restart_warmup_steps=1",
     "trainer.bf16_update=kahan"],
], ids=["full", "full_8bit_kahan", "galore_8bit", "lora", "loro", "loro_kahan"])
def test_per_layer_updates_equal_the_global_step(cli, tmp_path, args):
    ref = _run(cli, tmp_path / "ref", *PURE, *args)
    pl = _run(cli, tmp_path / "pl", *PURE, *args, "trainer.per_layer_update=true")
    _assert_same_run(ref, pl)
    assert {t.dtype for t in ref["model"].values()} == {torch.bfloat16}


def test_loss_falls_and_stays_near_fp32(cli, tmp_path):
    """A few dozen updates: pure bf16 with stochastic rounding follows the fp32 run closely."""
    common = [*TINY, "trainer.threads=1", "trainer.max_steps=12", "trainer.ckpt_every=0", "optim.lr=0.003",
              "trainer.batch_size=2", "trainer.micro_batch_size=2", "data.seq_len=32"]
    assert cli("train", *common, f"run.dir={tmp_path / 'fp32'}").code == 0
    assert cli("train", *common, *PURE, f"run.dir={tmp_path / 'bf16'}").code == 0
    ref, got = losses(tmp_path / "fp32"), losses(tmp_path / "bf16")
    assert got[12] < got[1] - 0.5
    assert abs(got[12] - ref[12]) / ref[12] < 0.02
    assert read_metrics(tmp_path / "bf16")[-1]["step"] == 12


# -- refusals ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, expected", [
    (["trainer.bf16_update=up"], "trainer.bf16_update='up' is invalid: allowed: stochastic, nearest, kahan"),
    (["trainer.precision=fp16"], "trainer.precision='fp16' is invalid: allowed: auto, fp32, bf16, pure_bf16"),
    (["method=galore", "method.basis_dtype=fp16"], "method.basis_dtype='fp16' is invalid: allowed: auto, fp32, bf16"),
    ([*PURE, "distributed=deepspeed", "distributed.zero_stage=2"],
     "trainer.precision=pure_bf16 is not supported with distributed=deepspeed: DeepSpeed's bf16 mode keeps fp32 "
     "master weights"),
    ([*PURE, "distributed=fsdp2", "distributed.param_dtype=fp16"],
     "distributed.param_dtype=fp16 contradicts trainer.precision=pure_bf16"),
])
def test_bad_values_are_one_line(cli, tmp_path, args, expected):
    one_line(cli("train", *TINY, f"run.dir={tmp_path / 'r'}", *args), expected)


def test_estimate_has_no_separate_pure_bf16_flag(cli):
    one_line(cli("estimate", "model=llama_tiny", "--pure-bf16"), "use trainer.precision=pure_bf16")
