"""``lrpretrain estimate`` against measurement (``lrpretrain bench``) on CPU shapes, and the two CLIs."""

from __future__ import annotations

import json
import time

import pytest
import torch

from lrpretrain.errors import UserError
from lrpretrain.estimate import estimate, outside_layers_bytes, parse_budget
from lrpretrain.methods import available_methods, get_method
from lrpretrain.methods.toolkit import saved_activation_bytes
from lrpretrain.model import build_model, cast_parameters, lm_loss
from lrpretrain.train import load_config
from lrpretrain.train.recompute import apply_recompute

BUILTIN = ["full", "galore", "galore_dct", "fira", "apollo", "apollo_mini", "frugal", "lowrank", "lora", "relora",
           "periodic_lora", "sltrain", "switchlora", "sst", "cola", "cola_m", "crnet", "lost", "gradnorm_lorp", "loqt",
           "q_galore", "lr_qat", "dlrt", "loro"]
HAS_RANK = {"lowrank", "lora", "relora", "periodic_lora", "sltrain", "switchlora", "sst", "cola", "cola_m", "crnet",
            "lost", "q_galore", "lr_qat", "dlrt", "loro"}
SMALL = ["model=llama_tiny", "data.seq_len=64", "trainer.batch_size=2", "trainer.micro_batch_size=2",
         "trainer.threads=1"]


@pytest.fixture
def one_thread():
    """SST's SVDs stall on OpenMP barriers with 2 threads on a loaded machine (benchmarks/results/README.md)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_every_builtin_method_has_a_yaml_and_an_estimate():
    assert set(BUILTIN) <= set(available_methods())
    for name in BUILTIN:
        cfg, _ = load_config(["model=llama_7b", f"method={name}", "trainer.micro_batch_size=1", "trainer.batch_size=1"])
        e = estimate(cfg)
        assert e.peak > e.weights + e.optimizer_states > 0 and e.flops_per_token > 0, name


# The optimizer-side methods (galore_dct, fira, apollo, apollo_mini, frugal) train the plain model, as galore.
# LoQT runs no low-rank path before its first merge: tests/test_quantized_methods.py checks it after one.
@pytest.mark.parametrize("precision", ["fp32", "pure_bf16"])
@pytest.mark.parametrize("name", [m for m in BUILTIN if m not in ("galore_dct", "fira", "apollo", "apollo_mini", "frugal",
                                                                  "loqt")])
def test_activation_formulas_equal_saved_bytes(name, precision, one_thread):
    """Each method's activation model equals what autograd saves in its forward + loss, per recompute
    mode, with fp32 weights and with bf16 ones (trainer.precision=pure_bf16)."""
    torch.manual_seed(0)
    for recompute in ("none", "full", "method"):
        rank = ["method.rank=16"] if name in HAS_RANK else []
        try:
            cfg, _ = load_config(["model=llama_tiny", f"method={name}", "data.seq_len=64", f"trainer.recompute={recompute}",
                                  *rank])
        except UserError:  # no policy of its own
            continue
        plugin = get_method(name)(cfg.method, cfg.model)
        model = plugin.prepare_model(build_model(cfg.model, torch.device("cpu")))
        if precision == "pure_bf16":
            cast_parameters(model, torch.bfloat16)
        try:
            apply_recompute(model, recompute, 1, plugin)
        except UserError:  # CR-Net refuses block checkpointing; so must its activation model
            with pytest.raises(UserError):
                plugin.activation_bytes(cfg.model, recompute, 1, precision)
            continue
        ids = torch.randint(0, cfg.model.vocab_size, (2, 64))
        _, saved = saved_activation_bytes(model, lambda m=model, x=ids: lm_loss(m(x), x)[0])
        per_token = (plugin.activation_bytes(cfg.model, recompute, 1, precision)
                     + outside_layers_bytes(cfg.model, 64, precision))
        assert 2 * 64 * per_token == pytest.approx(saved, rel=1e-4), (name, recompute)


# (overrides, what it exercises): full, an optimizer-side method, reparameterizations, CoLA-M, CR-Net;
# recompute none/full/method; per-layer on/off; one with accumulation (all gradients held).
MEASURED = [
    ["method=full"],
    ["method=full", "trainer.recompute=full", "trainer.per_layer_update=true"],
    ["method=galore", "method.rank=32", "trainer.per_layer_update=true"],
    ["method=galore", "method.rank=32", "trainer.recompute=full", "method.state_bits=8"],
    ["method=lora", "method.rank=16", "trainer.per_layer_update=true", "trainer.per_layer_clip=param"],
    ["method=sltrain", "method.rank=16"],
    ["method=lost", "method.rank=16", "method.sparsity=0.1"],
    ["method=gradnorm_lorp", "method.rank=32", "method.state_bits=8", "trainer.per_layer_update=true"],
    ["method=cola_m", "method.rank=32", "trainer.per_layer_update=true"],
    ["method=cola", "method.rank=32", "trainer.recompute=full"],
    ["method=crnet", "method.rank=32", "trainer.recompute=method", "trainer.per_layer_update=true"],
    ["method=full", "trainer.batch_size=4", "trainer.per_layer_update=true"],
    ["method=cola_m", "method.rank=32", "trainer.precision=bf16"],  # autocast's cached bf16 weight copies
    # the whole-logits loss: the peak is in the S-step's second forward (dense gradients held)
    ["method=dlrt", "method.rank=16", "trainer.kernels=torch"],
    ["method=loro", "method.rank=16", "trainer.per_layer_update=true"],
    # pure bf16: DLRT's fp32 integrator beside bf16 factors; LORO measured at its exact step (update index 3)
    ["method=dlrt", "method.rank=16", "trainer.precision=pure_bf16", "trainer.bf16_update=kahan"],
    ["method=loro", "method.rank=16", "method.exact_every=4", "method.restart_warmup_steps=1",
     "trainer.precision=pure_bf16"],
    # pure bf16: bf16 weights and gradients, fp32 working copies of the stepped weight (chunked steps)
    ["method=full", "trainer.precision=pure_bf16"],
    ["method=galore", "method.rank=32", "method.state_bits=8", "trainer.per_layer_update=true",
     "trainer.precision=pure_bf16"],
    ["method=lora", "method.rank=16", "trainer.precision=pure_bf16", "trainer.bf16_update=kahan"],
    ["method=cola_m", "method.rank=32", "trainer.precision=pure_bf16", "trainer.recompute=full"],
    # quantized weights, measured at their costliest update (bench's measured update is the 4th, index 3):
    # LoQT's update step (its full gradient of W and SVD in the backward, then the merge); Q-GaLore's refresh
    ["method=loqt", "method.rank=16", "method.update_proj_gap=3", "trainer.per_layer_update=true",
     "trainer.precision=pure_bf16"],
    ["method=q_galore", "method.rank=32", "method.update_proj_gap=3"],
    ["method=q_galore", "method.rank=32", "method.update_proj_gap=3", "trainer.per_layer_update=true",
     "trainer.precision=pure_bf16"],
    # int8 codes in the weights, the rebuilt weight's temporaries in the backward (module_temp_bytes)
    ["method=lr_qat", "method.rank=16", "method.train_rest=false"],
    ["method=lr_qat", "method.rank=16", "trainer.precision=pure_bf16", "trainer.per_layer_update=true"],
    # the rows above run the chunked loss (trainer.kernels=auto on the CPU); these the loss from the whole logits
    ["method=full", "trainer.kernels=torch"],
    ["method=lora", "method.rank=16", "trainer.kernels=torch", "trainer.per_layer_update=true"],
]


@pytest.mark.parametrize("overrides", MEASURED, ids=lambda o: ",".join(x.split("=")[-1] for x in o))
def test_estimate_within_10_percent_of_measured(corpus, overrides):
    from lrpretrain.bench import bench

    precision = [] if any(o.startswith("trainer.precision") for o in overrides) else ["trainer.precision=fp32"]
    r = bench([*SMALL, *precision, *overrides], warmup=1, steps=1)
    e = r["estimate"]
    assert e["peak"] == pytest.approx(r["peak_bytes"], rel=0.10)
    assert e["weights"] == pytest.approx(r["param_bytes"] + r["buffer_bytes"], rel=0.01)
    assert e["optimizer_states"] == pytest.approx(r["optimizer_state_bytes"], rel=0.01)
    assert e["gradients"] == pytest.approx(r["peak_grad_bytes"], rel=0.10)
    # exact in fp32; under bf16 the CoLA terms are approximations
    assert e["activations"] == pytest.approx(r["activation_bytes"], rel=0.01 if r["precision"] == "fp32" else 0.10)
    assert r["step_s"] > 0 and 0 < r["mfu"] < 1.5


def test_llama_small_estimate_matches_measured(corpus):
    """A second shape (d 256, 4 layers, micro-batch 1): full rank with recompute and per-layer updates,
    where the gradients no longer set the peak."""
    from lrpretrain.bench import bench

    r = bench(["model=llama_small", "data.seq_len=128", "trainer.batch_size=1", "trainer.micro_batch_size=1",
               "trainer.threads=1", "trainer.precision=fp32", "trainer.recompute=full", "trainer.per_layer_update=true"],
              warmup=1, steps=1)
    assert r["estimate"]["peak"] == pytest.approx(r["peak_bytes"], rel=0.10)
    assert r["estimate"]["gradients"] == pytest.approx(r["peak_grad_bytes"], rel=0.01)  # the embedding's


def test_bench_cli_writes_json(cli, tmp_path):
    out = tmp_path / "b.json"
    res = cli("bench", *SMALL, "trainer.precision=fp32", "method=cola_m", "method.rank=32", "--warmup", "1",
              "--steps", "2", "--json", str(out))
    assert res.code == 0, res.err
    assert "tokens/s" in res.out and "MFU" in res.out and "peak" in res.out
    r = json.loads(out.read_text())
    assert len(r["steps_s"]) == 2 and r["tokens_per_s"] > 0 and r["peak_bytes"] > r["param_bytes"] > 0
    assert r["peak_flops_source"].startswith("measured") and "loadavg" in r["machine"]


def test_bench_cli_bad_values(cli):
    res = cli("bench", *SMALL, "--steps", "0")
    assert res.code == 2 and len(res.error_lines) == 1 and "--steps" in res.error_lines[0]
    res = cli("bench", *SMALL, "--frobnicate")
    assert res.code == 2 and "unknown option '--frobnicate'" in res.error_lines[0]
    res = cli("bench", *SMALL, "trainer.recompute=sometimes")
    assert res.code == 2 and "trainer.recompute" in res.error_lines[0]
    for bad in ("fast", "0", "nan"):
        res = cli("bench", *SMALL, "--peak-flops", bad)
        assert res.code == 2 and len(res.error_lines) == 1 and "--peak-flops" in res.error_lines[0], res.err


def test_parse_budget():
    assert parse_budget("24GB") == 24e9
    assert parse_budget("24GiB") == parse_budget("24G") == 24 * 2**30
    assert parse_budget("1.5 TB") == 1.5e12
    assert parse_budget("512MiB") == 512 * 2**20
    assert parse_budget("1000") == 1000
    for bad in ("24XB", "", "GB", "-3GB", "0", "24 G B", "1e"):
        with pytest.raises(UserError, match="--budget"):
            parse_budget(bad)


def test_estimate_cli_budget_and_errors(cli):
    base = ["experiment=galore_c4_7b", "method.state_bits=8", "trainer.per_layer_update=true",
            "trainer.micro_batch_size=1", "trainer.batch_size=1"]
    t0 = time.perf_counter()
    res = cli("estimate", *base, "--budget", "24GB")
    assert res.code == 0 and "does NOT fit" in res.out  # fp32 master weights alone: 25 GiB
    assert time.perf_counter() - t0 < 10  # nothing is built
    res = cli("estimate", *base, "--budget=24GB", "trainer.precision=pure_bf16")
    assert res.code == 0 and "-> fits" in res.out and "bf16 parameters" in res.out
    res = cli("estimate", *base, "--json")
    assert res.code == 0 and json.loads(res.out)["fits"] is None
    for args, key in [(["--budget", "24XB"], "--budget '24XB'"), (["--budget"], "--budget needs"),
                      (["--bogus"], "unknown option '--bogus'"), (["trainer.micro_batch_size=0"], "trainer.micro_batch_size"),
                      (["method=nope"], "unknown method 'nope'")]:
        res = cli("estimate", "model=llama_7b", *args)
        assert res.code == 2 and len(res.error_lines) == 1 and key in res.error_lines[0], res.err


def test_estimate_headline_numbers():
    """Against the papers (METHODS.md): 8-bit Adam states of LLaMA 7B ≈ 13 GB (GaLore Tab. 3 as APOLLO
    copies it); GaLore's per-layer 8-bit 7B run at micro-batch 1 x 256 under pure bf16 fits in the
    22.72 GB of its script, but not with fp32 master weights (bf16 autocast)."""
    def est(*o):
        cfg, _ = load_config(list(o) + ["trainer.micro_batch_size=1", "trainer.batch_size=1"])
        return estimate(cfg)

    adam8 = est("experiment=full_c4_7b", "optim.state_bits=8")
    assert adam8.optimizer_states == pytest.approx(13e9, rel=0.10)
    galore = est("experiment=galore_c4_7b", "method.state_bits=8", "trainer.per_layer_update=true",
                 "trainer.precision=pure_bf16")
    assert 20e9 < galore.peak <= 22.72e9
    assert galore.gradients == 2 * 32000 * 4096  # the largest gradient (embedding), bf16
    assert galore.weights == pytest.approx(2 * galore.params, rel=1e-3)
    ours = est("experiment=galore_c4_7b", "method.state_bits=8", "trainer.per_layer_update=true")
    assert ours.precision == "bf16" and ours.peak > 24 * 2**30 and ours.weights > 25e9


def test_third_party_plugin_gets_the_defaults(cli):
    """A plugin that implements none of the memory hooks is estimated as full-rank AdamW; one with its own
    recompute policy but no activation model gets one clear line for recompute=method."""
    import lrp_test_plugins  # noqa: F401  (registers test_recorder, test_recompute)

    plain, _ = load_config(["model=llama_small", "method=full"])
    e_full = estimate(plain)
    cfg, _ = load_config(["model=llama_small", "method=test_recorder"])
    e = estimate(cfg)
    assert (e.peak, e.optimizer_states, e.activations) == (e_full.peak, e_full.optimizer_states, e_full.activations)
    res = cli("estimate", "model=llama_small", "method=test_recompute", "trainer.recompute=method")
    assert res.code == 2 and len(res.error_lines) == 1 and "upper bound" in res.error_lines[0]
