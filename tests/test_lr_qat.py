"""LR-QAT (method=lr_qat): the straight-through gradient against a float64 autograd reference written
here (and per entry: the analytic gradient inside the clamp, zero outside), every precision, the
container's and the scale search's error bounds, the fused export (also through transformers), the warm
start from a full-rank run, the scales' own learning rate, frozen rest, and the bad values. Learning and
exact resume through the CLI: tests/test_reparam_cli.py; per-layer updates: tests/test_per_layer.py;
estimate vs measured: tests/test_estimate.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from test_errors import one_line
from torch import nn

from lrpretrain.export import hf_name
from lrpretrain.methods import get_method
from lrpretrain.methods.lr_qat import (
    LRQATLinear,
    fake_quantize,
    initial_scales,
    latent,
    lr_qat_modules,
    to_container,
)
from lrpretrain.model import build_model
from lrpretrain.train import build_trainer, load_config
from lrpretrain.train.trained import load_trained

from conftest import TINY

pytestmark = pytest.mark.usefixtures("one_thread")


def _module(m=48, n=64, rank=8, bits=4, container="int8", seed=0) -> LRQATLinear:
    torch.manual_seed(seed)
    return LRQATLinear(nn.Linear(n, m, bias=False), rank, 1.0, bits, container)


def _phi(module: LRQATLinear) -> torch.Tensor:
    """Φ₀ in float64, read from the container independently of the plugin's helpers."""
    if module.phi.dtype == torch.int8:
        return module.phi.double() / 2 ** (8 - module.bits)
    return module.phi.double()


def _reference(module: LRQATLinear, x, A, B, s):
    """y = x Ŵᵀ in float64 with the textbook straight-through estimator: z + (round(z) - z).detach()."""
    qmax = 2 ** (module.bits - 1) - 1
    z = _phi(module) + module.scaling * (B @ A)
    w = s.clamp(min=1e-8)[:, None] * torch.clamp(z + (torch.round(z) - z).detach(), -qmax - 1, qmax)
    return x @ w.T


def _leaves(*ts):
    return [t.detach().double().requires_grad_() for t in ts]


def test_gradients_equal_a_float64_autograd_reference():
    module = _module()
    with torch.no_grad():  # a spread of Z wide enough that many entries fall outside the grid
        module.lora_B.normal_(0, 100.0)
    x = torch.randn(2, 5, 64, requires_grad=True)
    y = module(x)
    gy = torch.randn_like(y)
    y.backward(gy)
    xd, A, B, s = _leaves(x, module.lora_A, module.lora_B, module.scale)
    yd = _reference(module, xd, A, B, s)
    yd.backward(gy.double())
    z = latent(module.phi, module.lora_A.detach(), module.lora_B.detach(), module.scaling, module.unit).round()
    assert 0.1 < float(((z < -8) | (z > 7)).double().mean()) < 0.9  # both sides of the clamp are exercised
    torch.testing.assert_close(y.double(), yd, rtol=1e-5, atol=1e-6)
    for got, want in [(x.grad, xd.grad), (module.lora_A.grad, A.grad), (module.lora_B.grad, B.grad),
                      (module.scale.grad, s.grad)]:
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_the_latent_gradient_is_the_analytic_one_inside_the_clamp_and_zero_outside():
    """With A = I (r = n) the gradient of B is (α/r)·dL/dZ entry by entry: s_i·(gyᵀx)_ij where
    q_min <= round(Z_ij) <= q_max (the rounding passes the gradient straight through), exactly 0 elsewhere."""
    m, n = 12, 16
    module = _module(m, n, rank=n, bits=3)
    with torch.no_grad():
        module.lora_A.copy_(torch.eye(n))
        module.lora_B.normal_(0, 6.0 / module.scaling)  # Z = Φ₀ + c·B: spread over [-4, 3] and beyond
    x = torch.randn(7, n, dtype=torch.float32)
    gy = torch.randn(7, m)
    module(x).backward(gy)
    z = (_phi(module) + module.scaling * module.lora_B.detach().double()).round()
    inside = (z >= -4) & (z <= 3)
    assert inside.any() and (~inside).any()
    analytic = module.scale.detach().double()[:, None] * (gy.double().T @ x.double())
    got = module.lora_B.grad.double() / module.scaling
    torch.testing.assert_close(got[inside], analytic[inside], rtol=1e-5, atol=1e-6)
    assert torch.all(got[~inside] == 0)


@pytest.mark.parametrize("precision", ["bf16", "pure_bf16"])
def test_bf16_precisions_follow_the_fp32_function(precision):
    """bf16 autocast (fp32 factors, bf16 matmul) and pure bf16 (bf16 factors): the output and every
    gradient near the fp32 reference of the same stored values, in the parameters' dtypes."""
    module = _module()
    with torch.no_grad():
        module.lora_B.normal_(0, 1.0)
    if precision == "pure_bf16":
        module.to(torch.bfloat16)  # the int8 codes stay int8
        assert module.phi.dtype == torch.int8
    x = torch.randn(4, 64, dtype=torch.bfloat16 if precision == "pure_bf16" else torch.float32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        y = module(x)
    assert y.dtype == torch.bfloat16
    gy = torch.randn_like(y)
    y.backward(gy)
    xd, A, B, s = _leaves(x, module.lora_A, module.lora_B, module.scale)
    yd = _reference(module, xd, A, B, s)
    yd.backward(gy.double())
    torch.testing.assert_close(y.double(), yd, rtol=2e-2, atol=2e-2 * yd.abs().max().item())
    for p, want in [(x, xd.grad), (module.lora_A, A.grad), (module.lora_B, B.grad), (module.scale, s.grad)]:
        assert p.grad.dtype == p.dtype
        torch.testing.assert_close(p.grad.double(), want, rtol=5e-2, atol=3e-2 * want.abs().max().item())


# -- quantisation: the container, the grid, the scale search ----------------------------------------------


@pytest.mark.parametrize("bits", range(2, 9))
def test_int8_container_round_trip_within_half_a_fixed_point_step(bits):
    qmax = 2 ** (bits - 1) - 1
    phi = torch.randn(64, 96) * qmax * 0.7
    codes = to_container(phi, bits, "int8")
    assert codes.dtype == torch.int8
    step = 2.0 ** -(8 - bits)
    back = codes.double() * step
    assert torch.all((back - phi.double().clamp(-qmax - 1, qmax)).abs() <= step / 2 + 1e-9)
    if bits == 8:  # no fraction bits: the integer grid itself
        assert torch.equal(back, back.round())


def test_float_containers_round_trip():
    phi = torch.randn(64, 96) * 20  # unclamped, as the reference's bf16 variant keeps it
    assert torch.equal(to_container(phi, 4, "fp32"), phi)
    bf = to_container(phi, 4, "bf16")
    assert bf.dtype == torch.bfloat16
    assert torch.all((bf.double() - phi.double()).abs() <= phi.double().abs() * 2.0 ** -8)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_fake_quantization_error_is_at_most_half_a_step_inside_the_range(bits):
    w = torch.randn(32, 128) * 0.02
    s = initial_scales(w, bits, "minmax")  # absmax / q_max: nothing is clipped
    q = fake_quantize(w, s, bits)
    assert torch.all((q - w).abs() <= s[:, None] / 2 * (1 + 1e-6))
    levels = (q / s[:, None]).round()
    assert levels.min() >= -(2 ** (bits - 1)) and levels.max() <= 2 ** (bits - 1) - 1


def test_lp_scale_search_finds_each_rows_best_candidate():
    """The grid search against a brute-force float64 search written here (100 thresholds absmax·k/100)."""
    torch.manual_seed(0)
    w = torch.randn(24, 80) * torch.rand(24, 1)
    bits, p = 4, 4.0
    got = initial_scales(w, bits, "lp", p, 100).double()
    wd = w.double()
    cand = wd.abs().amax(1, keepdim=True) * torch.arange(1, 101, dtype=torch.float64) / 100 / 7  # (rows, 100)
    q = (wd[:, None, :] / cand[:, :, None]).round().clamp(-8, 7) * cand[:, :, None]
    err = ((wd[:, None, :] - q).abs() ** p).sum(-1)
    best = err.min(1).values
    mine = ((wd - (wd / got[:, None]).round().clamp(-8, 7) * got[:, None]).abs() ** p).sum(1)
    assert torch.all(mine <= best * (1 + 1e-5))
    minmax = initial_scales(w, bits, "minmax").double()
    assert torch.all(mine <= ((wd - (wd / minmax[:, None]).round().clamp(-8, 7) * minmax[:, None]).abs() ** p).sum(1))


def test_a_fresh_module_is_the_quantised_initial_weight():
    """B = 0: Ŵ = s₀ · round(Φ₀) — the round-to-nearest quantisation of W₀ (up to the fixed-point step of Φ₀)."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 48, bias=False)
    module = LRQATLinear(lin, 8, 1.0, 4, "fp32")
    torch.testing.assert_close(module.dense_weight(), fake_quantize(lin.weight, module.scale, 4), rtol=0, atol=1e-7)
    s = module.scale.detach()[:, None]
    err, ratio = (module.dense_weight() - lin.weight).abs(), lin.weight.detach() / s
    inside = (ratio >= -8.5) & (ratio <= 7.5)  # within the grid's reach: at most half a step off
    assert torch.all(err[inside] <= (s / 2 * (1 + 1e-5)).expand_as(err)[inside])
    assert not inside.all()  # the L4 search clips the largest weights of a row
    clipped = module.dense_weight()[~inside] / s.expand_as(err)[~inside]
    assert torch.allclose(clipped.abs(), torch.where(clipped > 0, 7.0, 8.0))


# -- the fused weight and export ----------------------------------------------------------------------------


def test_fused_codes_give_the_training_time_function_exactly():
    module = _module()
    with torch.no_grad():
        module.lora_B.normal_(0, 2.0)
    codes = module.fused_codes()
    assert codes.dtype == torch.int8 and codes.min() >= -8 and codes.max() <= 7
    assert (codes.float() != module.phi.float() / 16).any()  # B·A moved some weights to other grid points
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(module(x), F.linear(x, module.dense_weight()))


@pytest.fixture(scope="module")
def qat_run(tiny_runs, tmp_path_factory):
    """LR-QAT of the session's trained full-rank tiny model (method.init_from), 3 updates."""
    from lrpretrain.cli.main import main

    run = tmp_path_factory.mktemp("lr_qat") / "run"
    assert main(["train", *TINY, "method=lr_qat", "method.rank=8", f"method.init_from={tiny_runs['full']}",
                 "trainer.max_steps=3", "optim.lr=0.01", "logging.progress=none", f"run.dir={run}"]) == 0
    return run


def test_init_from_quantises_the_full_rank_weights(tiny_runs, qat_run):
    cfg, _ = load_config([*TINY, "method=lr_qat", "method.rank=8", f"method.init_from={tiny_runs['full']}"])
    torch.manual_seed(123)  # the dense weights come from the checkpoint, not from this seed
    model = get_method("lr_qat")(cfg.method, cfg.model).prepare_model(build_model(cfg.model))
    full = load_trained(tiny_runs["full"]).model.state_dict()
    state = model.state_dict()
    for name, module in model.named_modules():
        if isinstance(module, LRQATLinear):
            # B = 0: round-to-nearest of W₀ on the LP-searched grid, up to Φ₀'s fixed-point step (a weight within
            # 1/32 of a rounding boundary may land on the neighbouring grid point)
            steps = (module.dense_weight() - fake_quantize(full[f"{name}.weight"], module.scale, 4)) / module.scale[:, None]
            assert torch.all(steps.abs().round() <= 1) and float((steps.abs() > 0.5).double().mean()) < 0.05
    for name in ("embed_tokens.weight", "norm.weight", "lm_head.weight", "layers.1.mlp_norm.weight"):
        assert torch.equal(state[name], full[name]), name


def test_export_equals_the_trained_function_in_transformers(qat_run, tmp_path, cli):
    transformers = pytest.importorskip("transformers")
    run = load_trained(qat_run)
    modules = lr_qat_modules(run.model)
    assert modules and any(m.lora_B.abs().max() > 0 for m in modules)  # the factors trained
    assert run.model.state_dict()["layers.0.attn.q_proj.phi"].dtype == torch.int8
    ckpt = load_file(str(run.checkpoint / "model.safetensors"))
    assert ckpt["layers.0.mlp.down_proj.phi"].dtype == torch.int8  # the codes as stored, a plain int8 tensor
    assert cli("export", f"run.dir={qat_run}", f"out={tmp_path / 'hf'}").code == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32,
                                                           local_files_only=True).eval()
    exported = load_file(str(tmp_path / "hf" / "model.safetensors"))
    for name, m in run.model.named_modules():
        if isinstance(m, LRQATLinear):  # every exported weight lies on its channel's grid: s · integer
            w = exported[hf_name(f"{name}.weight")]
            levels = (w / m.scale.detach()[:, None]).round()
            assert torch.equal(w, levels * m.scale.detach()[:, None]) and levels.abs().max() <= 8
    ids = torch.randint(0, run.cfg.model.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (run.model(ids) - hf(ids).logits).abs().max().item()
    assert diff <= 1e-5, diff


# -- parameter groups and frozen parts ------------------------------------------------------------------------


def test_scales_have_their_own_learning_rate(tmp_path):
    cfg, resolved = load_config([*TINY, "method=lr_qat", "method.rank=8", "method.scale_lr=0.0002",
                                 "optim.lr=0.01", "optim.weight_decay=0.1", "trainer.threads=1",
                                 f"run.dir={tmp_path / 'r'}"])
    trainer = build_trainer(cfg, resolved)
    try:
        scales = {id(m.scale) for m in lr_qat_modules(trainer.model)}
        factors = {id(p) for m in lr_qat_modules(trainer.model) for p in (m.lora_A, m.lora_B)}
        trainer.train_step()
        trainer.train_step()  # update 1: past the warmup's zero LR
        groups = {frozenset(id(p) for p in g["params"]): g for g in trainer.optimizer.param_groups}
        ratio = trainer.optimizer.param_groups[0]["lr"] / 0.01
        assert ratio > 0
        assert groups[frozenset(scales)]["lr"] == pytest.approx(0.0002 * ratio)
        assert groups[frozenset(scales)]["weight_decay"] == 0 and groups[frozenset(factors)]["weight_decay"] == 0
        assert groups[frozenset(factors)]["lr"] == pytest.approx(0.01 * ratio)
    finally:
        trainer.data.close()
        trainer.logger.close()


def test_train_rest_false_trains_only_the_factors_and_scales():
    cfg, _ = load_config(["model=llama_tiny", "method=lr_qat", "method.rank=8", "method.train_rest=false"])
    plugin = get_method("lr_qat")(cfg.method, cfg.model)
    model = plugin.prepare_model(build_model(cfg.model))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B", "scale")) for n in trainable)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == plugin.cost(cfg.model, 64)["trainable_params"]
    # the parameters, and beside them the frozen entries held as codes
    quantized = sum(b.numel() for n, b in model.named_buffers() if n.endswith(".phi"))
    assert sum(p.numel() for p in model.parameters()) == plugin.cost(cfg.model, 64)["params"]
    assert quantized == plugin.cost(cfg.model, 64)["quantized_params"]


@pytest.mark.parametrize("precision", ["fp32", "pure_bf16"])
def test_activation_model_with_the_rest_frozen(precision):
    """train_rest=false: frozen norms, embedding and head save less; the formula equals the saved bytes,
    with and without block checkpointing (every block, every second block)."""
    from lrpretrain.estimate import outside_layers_bytes
    from lrpretrain.methods.toolkit import saved_activation_bytes
    from lrpretrain.model import cast_parameters, lm_loss
    from lrpretrain.train.recompute import apply_recompute

    for recompute, every in [("none", 1), ("full", 1), ("full", 2)]:
        cfg, _ = load_config(["model=llama_tiny", "model.n_layers=3", "method=lr_qat", "method.rank=8",
                              "method.train_rest=false", "method.scale_init=minmax", "data.seq_len=32"])
        plugin = get_method("lr_qat")(cfg.method, cfg.model)
        torch.manual_seed(0)
        model = plugin.prepare_model(build_model(cfg.model))
        if precision == "pure_bf16":
            cast_parameters(model, torch.bfloat16)
        apply_recompute(model, recompute, every, plugin)
        ids = torch.randint(0, cfg.model.vocab_size, (2, 32))
        _, saved = saved_activation_bytes(model, lambda m=model, x=ids: lm_loss(m(x), x)[0])
        per_token = plugin.activation_bytes(cfg.model, recompute, every, precision) + outside_layers_bytes(cfg.model, 32, precision)
        assert 2 * 32 * per_token == pytest.approx(saved, rel=1e-4), (recompute, every)


# -- bad values ---------------------------------------------------------------------------------------------


def _bad_checkpoint(path):
    path.mkdir()
    save_file({"embed_tokens.weight": torch.zeros(3, 3)}, str(path / "model.safetensors"))
    return path


@pytest.mark.parametrize("args, expected", [
    (["method.bits=1"], "method.bits=1 is invalid: must be in [2, 8]"),
    (["method.bits=9"], "method.bits=9 is invalid: must be in [2, 8]"),
    (["method.rank=0"], "method.rank=0 is invalid: must be > 0"),
    (["method.rank=1000"], "method.rank=1000 is invalid: must be <= min(m, n) = 128"),
    (["method.container=int4"], "method.container='int4' is invalid: allowed: int8, bf16, fp32"),
    (["method.scale_init=mse"], "method.scale_init='mse' is invalid: allowed: lp, minmax"),
    (["method.scale_lr=-1"], "method.scale_lr=-1.0 is invalid: must be >= 0"),
    (["method.lora_alpha=0"], "method.lora_alpha=0.0 is invalid: must be > 0"),
    (["method.init_from=/nonexistent/run"], "method.init_from=/nonexistent/run is invalid: expected a checkpoint"),
    (["method.init_from=BAD"], "does not fit model=llama_tiny: it lacks"),
])
def test_bad_values_are_one_line(cli, tmp_path, args, expected):
    args = [a.replace("BAD", str(_bad_checkpoint(tmp_path / "bad"))) for a in args]
    one_line(cli("train", *TINY, "method=lr_qat", f"run.dir={tmp_path / 'r'}", *args), expected)
    assert not (tmp_path / "r").exists()
