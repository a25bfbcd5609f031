"""benchmarks/gpu_suite.py and gpu_suite.sh: the rows, the summary, the deadline, failures, the wrapper.

The GPU rows themselves need a GPU; here every row's configuration is checked to load and be
estimated, and the whole suite runs end to end in its ``--cpu`` mode through the wrapper, with
injected failures, crashes, hangs and out-of-memory errors."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_suite.py"
WRAPPER = REPO / "benchmarks" / "gpu_suite.sh"
_spec = importlib.util.spec_from_file_location("gpu_suite", SCRIPT)
gpu_suite = importlib.util.module_from_spec(_spec)
sys.modules["gpu_suite"] = gpu_suite  # (dataclasses look their module up)
_spec.loader.exec_module(gpu_suite)
SIZES = {gpu_suite.METHODS: "350m", gpu_suite.MEMORY: "1b"}


def read_jsonl(path: Path) -> dict[str, dict]:
    return {r["row"]: r for r in map(json.loads, path.read_text().splitlines())}


@pytest.mark.slow  # composes every GPU row (~0.5 s each)
def test_rows_cover_the_issue_and_every_gpu_config_loads():
    from lrpretrain.estimate import estimate
    from lrpretrain.train import load_config

    rows = gpu_suite.ROWS
    names = [r.name for r in rows]
    assert len(names) == len(set(names))
    assert names[0] == "device"
    for want in ["full_60m", "full_130m", "full_350m", "full_1b", "full_1b_compile", "galore_refresh", "data_truncate",
                 "data_pack", *(f"m_{m}" for m in ["full", "galore", "galore_8bit", "fira", "apollo_mini", "frugal",
                                                   "galore_dct", "lowrank", "lora", "relora", "sltrain", "sst", "cola",
                                                   "cola_m", "crnet"]),
                 *(f"mem_{m}_{v}" for m in ("full", "galore") for v in ("none", "full", "selective", "per_layer")),
                 *(f"k_{k}" for k in ("loss", "sltrain", "cola", "adam8", "adam_bf16")),
                 *(f"e_{m}_{k}" for m in ("full", "sltrain", "cola") for k in ("torch", "triton"))]:
        assert want in names
    # the deadline's budget: every default row, with ~20 s for the suite's imports (~8 s measured), within the
    # default 450 s; the rows left out of the default run (the kernels group) within a run of their own
    default = [r for r in rows if r.default]
    assert sum(r.gpu_s for r in default) + 20 <= 450, "a new row needs budget: cut another or raise the deadline"
    groups = {r.group for r in rows if not r.default}
    assert groups == {"kernels", "new_methods", "quantized"}
    for g in groups:  # each a run of its own, with the device row and the references it names
        extra = {r.ref for r in rows if r.group == g and r.ref} - {r.name for r in rows if r.group == g}
        refs = sum(r.gpu_s for r in rows if r.name in extra)
        assert sum(r.gpu_s for r in rows if r.group == g) + refs + 5 + 20 <= 450, g
    by_name = {r.name: r for r in rows}
    for m in ("lost", "gradnorm_lorp", "dlrt", "loro"):
        assert by_name[f"m_{m}"].group == "new_methods"
    for m in ("loqt", "q_galore", "lr_qat"):
        assert {f"q_{m}_1b", f"q_{m}_7b_2l"} <= by_name.keys()
    for r in rows:
        if r.ref:
            # the summary is written from every record, so a reference may run later (the pure-bf16 rows')
            assert r.ref in names and r.ref != r.name, f"{r.name}: its reference is not a row"
        assert (r.fit == tuple(sorted(r.fit, reverse=True)) and bool(r.fit) != bool(r.mb)
                or r.kind in ("device", "kernel"))
        if r.kind in ("device", "kernel"):
            continue
        ovr = gpu_suite.row_overrides(r, False, SIZES)
        cfg, _ = load_config([*ovr, *(gpu_suite._mb(r.fit[0]) if r.fit else [])])
        assert cfg.data.seq_len == 256 and cfg.data.source == "embedded", r.name
        if r.kind == "bench":
            pure = "trainer.precision=pure_bf16" in r.overrides  # the precision group's rows
            assert cfg.trainer.precision == ("pure_bf16" if pure else "bf16") and cfg.method.name == r.method, r.name
            assert estimate(cfg).peak > 0
    by = {r.name: r for r in rows}
    assert "method.update_proj_gap=1" in by["galore_refresh"].overrides
    assert "trainer.compile=true" in by["full_1b_compile"].overrides
    assert "experiment=galore_c4_350m" in gpu_suite.row_overrides(by["m_galore_8bit"], False, SIZES)
    assert "method.state_bits=8" in gpu_suite.row_overrides(by["m_galore_8bit"], True, SIZES)
    assert "experiment=galore_c4_1b" in gpu_suite.row_overrides(by["mem_galore_per_layer"], False, SIZES)
    assert "experiment=galore_c4_1b" in gpu_suite.row_overrides(by["mem_galore_none"], False,
                                                                {**SIZES, gpu_suite.MEMORY: "1b"})
    for m in ("full", "sltrain", "cola"):
        for k in ("torch", "triton"):
            ovr = gpu_suite.row_overrides(by[f"e_{m}_{k}"], False, SIZES)
            assert f"trainer.kernels={k}" in ovr and load_config(ovr)[0].model.name == "llama_1b"
        assert by[f"e_{m}_triton"].ref == f"e_{m}_torch"


def test_select_by_name_or_group():
    rows = gpu_suite.ROWS
    assert [r.name for r in gpu_suite.select(rows, "full_1*")] == ["full_130m", "full_1b", "full_1b_compile"]
    assert {r.group for r in gpu_suite.select(rows, "memory, device")} == {"memory", "device"}
    assert gpu_suite.select(rows, None) == [r for r in rows if r.default] != list(rows)
    assert {r.name for r in gpu_suite.select(rows, "kernels")} == {r.name for r in rows if r.group == "kernels"}
    assert gpu_suite.select(rows, "nothing*") == []


def _bench(step_s: float, mb: int = 4, **kw) -> dict:
    return {"model": "llama_tiny", "method": "galore", "recompute": "none", "per_layer_update": False,
            "micro_batch_size": mb, "seq_len": 32, "step_s": step_s, "tokens_per_s": mb * 32 / step_s,
            "flops_per_token": 1e6, "mfu": 0.1, "peak_bytes": 2**30, "estimate": {"peak": 1.1 * 2**30},
            "warmup_s": [2.5, step_s], **kw}


def test_summary_ratios_refresh_share_and_failures():
    rows = gpu_suite.select(gpu_suite.ROWS, "m_full,m_galore,m_lora,galore_refresh,data_pack")
    records = {
        "m_full": {"status": "ok", "result": _bench(0.1, method="full"), "ref": None, "budget_s": 5, "wall_s": 4.0},
        "m_galore": {"status": "ok", "result": _bench(0.125), "ref": "m_full", "budget_s": 9, "wall_s": 8.5},
        "m_lora": {"status": "oom", "stderr_tail": "...\ntorch.OutOfMemoryError: CUDA out of memory", "ref": "m_full",
                   "budget_s": 5, "wall_s": 3.0},
        "galore_refresh": {"status": "ok", "result": _bench(0.5), "ref": "m_galore", "budget_s": 20, "wall_s": 12.0},
    }
    md = gpu_suite.summary(records, rows, None, 450, 12.0, True, ["--cpu"], True)
    assert "| m_galore | llama_tiny | galore | none | 4 x 32 | 0.1250 | 1,024 |" in md
    assert "0.80x" in md  # 0.1 s / 0.125 s
    assert "**oom**: torch.OutOfMemoryError: CUDA out of memory" in md
    # (0.5 - 0.125) / 200 / 0.125 = 1.5% of the step at T = 200
    assert "costs 0.3750 s, amortised over T = 200 updates 1.50% of the step time" in md
    assert "m_galore (llama_tiny): first update 2.500 s (step-0 SVDs and start-up) vs median step 0.1250 s" in md
    assert "| data_pack | – | – | – | – | – | – | not run |" in md
    assert "1.10" in md  # estimate / measured peak
    assert "3 ok, 1 oom, 1 not run" in md
    assert "| m_galore | 9 | 8.5 | ok |" in md and "| data_pack | – | – | not run |" in md  # wall vs budget


@pytest.mark.slow
def test_wrapper_without_wheels_says_what_to_do(tmp_path):
    proc = subprocess.run(["bash", str(WRAPPER), "--cpu", "--out", str(tmp_path)], capture_output=True, text=True,
                          env={**os.environ, "GPU_WHEELS": str(tmp_path / "missing")}, timeout=60)
    assert proc.returncode == 2
    assert "make gpu-wheels" in proc.stderr


def test_wrapper_maps_the_package_dirs_of_pyproject():
    line = re.search(r"^package-dir = \{(.*)\}$", (REPO / "pyproject.toml").read_text(), re.M).group(1)
    mapping = dict(re.findall(r'"([\w.]+)" = "([\w.]+)"', line))
    assert len(mapping) == 4, mapping
    text = WRAPPER.read_text()
    for pkg, folder in mapping.items():
        if pkg != "lrpretrain":
            assert f'ln -s "$ROOT/{folder}" "$PKG/{pkg.split(".", 1)[1]}"' in text, pkg


def _probe_wheel(folder: Path) -> None:
    """A minimal pure-Python wheel, installed by the wrapper as the real ones are."""
    dist = "gpu_suite_probe-0.1.dist-info"
    files = {"gpu_suite_probe/__init__.py": "VALUE = 1\n",
             f"{dist}/METADATA": "Metadata-Version: 2.1\nName: gpu-suite-probe\nVersion: 0.1\n",
             f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{dist}/RECORD"] = "".join(f"{name},,\n" for name in files) + f"{dist}/RECORD,,\n"
    with zipfile.ZipFile(folder / "gpu_suite_probe-0.1-py3-none-any.whl", "w") as z:
        for name, text in files.items():
            z.writestr(name, text)


@pytest.mark.slow
def test_cpu_dry_run_of_every_row_through_the_wrapper(tmp_path, corpus):
    """The wrapper installs a wheels folder and runs the whole suite in --cpu mode: every row runs;
    an injected failure (a bench row and a child row), a crash (SIGSEGV) and out-of-memory errors are
    recorded and every later row still runs."""
    wheels = tmp_path / "wheels"
    (wheels / "cache" / "embedded").mkdir(parents=True)
    shutil.copytree(corpus, wheels / "cache" / "embedded" / corpus.name)
    _probe_wheel(wheels)
    out = tmp_path / "out"
    env = {**os.environ, "GPU_WHEELS": str(wheels), "PYTHON": sys.executable,
           "GPU_SUITE_FAIL_ROWS": "m_lora,data_truncate", "GPU_SUITE_CRASH_ROWS": "m_cola",
           "GPU_SUITE_FAKE_OOM_ABOVE": "4"}
    env.pop("LRPRETRAIN_CACHE", None)  # the wrapper sets it to the carried cache
    proc = subprocess.run(["bash", str(WRAPPER), "--cpu", "--out", str(out), "--deadline", "600"],
                          capture_output=True, text=True, env=env, timeout=660)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "cannot be imported" not in proc.stderr and "preloading failed" not in proc.stderr
    assert (wheels / "work" / "site" / "gpu_suite_probe" / "__init__.py").is_file()
    marker = wheels / "work" / "site" / "marker"
    marker.write_text("")
    again = subprocess.run(["bash", str(WRAPPER), "--cpu", "--list"], capture_output=True, text=True, env=env, timeout=120)
    assert again.returncode == 0 and "installing" not in again.stdout and marker.exists()  # same wheels: kept

    recs = read_jsonl(out / "gpu_suite.jsonl")
    assert list(recs) == [r.name for r in gpu_suite.ROWS if r.default]  # every default row, in order
    status = {k: r["status"] for k, r in recs.items()}
    assert status == {**{k: "ok" for k in recs}, "m_lora": "failed", "data_truncate": "failed",
                      "m_cola": "failed"}, status
    assert "gpu_suite_injected_failure" in recs["m_lora"]["stderr_tail"]
    assert "injected failure" in recs["data_truncate"]["stderr_tail"]
    assert recs["m_cola"]["returncode"] == -11 and recs["m_cola"]["detail"] == "killed by SIGSEGV"
    assert (out / "logs" / "m_lora.log").read_text().count("gpu_suite_injected_failure") >= 1

    dev = recs["device"]["result"]
    assert dev["lrpretrain_from"] == str(wheels / "work" / "pkg" / "lrpretrain")  # the checkout, via the wrapper
    assert dev["measured_bf16_flops"] > 0 and dev["cpu_fp32_flops"] > 0 and dev["torch"]

    for name in ("full_60m", "full_130m", "full_350m", "full_1b"):
        fit = recs[name]
        assert [(a["micro_batch_size"], a["status"]) for a in fit["attempts"]] == [(8, "oom"), (4, "ok")], name
        assert all(a["estimate_peak"] > 0 for a in fit["attempts"])
    r = recs["full_60m"]["result"]
    assert r["micro_batch_size"] == 4 and r["tokens_per_s"] > 0 and r["peak_bytes"] > 0 and r["estimate"]["peak"] > 0
    for name, rec in recs.items():
        if rec["kind"] == "bench" and rec["status"] == "ok":
            res = rec["result"]
            assert res["peak_flops"] == dev["cpu_fp32_flops"] and res["peak_flops_source"] == "given (--peak-flops)"
            assert res["model"] == "llama_tiny" and len(res["warmup_s"]) == 1 and res["steps"] == 1, name
    assert recs["m_galore_8bit"]["result"]["estimate"]["state_bits"] == 8
    assert recs["mem_galore_per_layer"]["result"]["per_layer_update"] is True
    assert "trainer.compile_backend=aot_eager" in recs["full_1b_compile"]["overrides"]
    data = recs["data_pack"]["result"]
    assert data["mode"] == "pack" and data["positions_per_s"] > 0 and data["batches"] > 0

    md = (out / "gpu_suite.md").read_text()
    assert "- device: CPU: " in md and "dense bf16 matmul: measured" in md and "forks of the suite's process" in md
    for name in recs:
        assert name == "device" or f"| {name} |" in md
    assert "**failed**: killed by SIGSEGV" in md and "amortised over T = 200" in md and "8: oom, 4: ok" in md
    assert f"{len(recs) - 3} ok, 3 failed" in md


def _gone(pid: int) -> bool:
    """Whether ``pid`` has ended (a zombie counts: killed, waiting for init to reap it)."""
    for _ in range(100):
        try:
            if open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def _grandchild(log: Path) -> int:
    return int(re.search(r"grandchild pid (\d+)", log.read_text()).group(1))


@pytest.mark.slow
def test_a_row_past_its_cap_or_the_deadline_is_killed_with_its_process_group(tmp_path, monkeypatch):
    monkeypatch.setenv(gpu_suite.HANG_ENV, "hang")
    monkeypatch.setenv(gpu_suite.FAIL_ENV, "after")
    Row = gpu_suite.Row
    rows = [Row("hang", "data", 0, kind="data", cap_s=2, cpu_s=0),
            Row("after", "data", 0, kind="data", cpu_s=0),
            Row("too_big", "data", 0, kind="data", cpu_s=1e6)]
    gpu_suite.Suite(tmp_path / "a", 120, rows, cpu=True, argv=[]).run()
    recs = read_jsonl(tmp_path / "a" / "gpu_suite.jsonl")
    assert recs["hang"]["status"] == "timeout" and 2 <= recs["hang"]["wall_s"] < 10
    assert recs["after"]["status"] == "failed" and "injected failure" in recs["after"]["stderr_tail"]
    assert recs["too_big"]["status"] == "skipped: deadline" and recs["too_big"]["wall_s"] == 0
    md = (tmp_path / "a" / "gpu_suite.md").read_text()
    assert "**timeout**" in md and "**skipped: deadline**" in md and "deadline 120 s" in md
    assert _gone(_grandchild(tmp_path / "a" / "logs" / "hang.log")), "the row's grandchild survived its timeout"

    # the deadline, not the row's cap, ends a row that would run past it
    t = time.monotonic()
    gpu_suite.Suite(tmp_path / "b", 3, [Row("hang", "data", 0, kind="data", cap_s=100, cpu_s=0)], cpu=True,
                    argv=[]).run()
    assert read_jsonl(tmp_path / "b" / "gpu_suite.jsonl")["hang"]["status"] == "timeout"
    assert time.monotonic() - t < 10
    assert _gone(_grandchild(tmp_path / "b" / "logs" / "hang.log"))


@pytest.mark.slow
def test_cpu_dry_run_of_the_kernel_rows(tmp_path, corpus):
    """`--rows device,k_*,e_cola_* --cpu`: each kernel against its reference at tiny shapes (Triton's
    interpreter, which --cpu switches on), and one method's end-to-end rows with trainer.kernels torch
    and triton; the summary's kernel table. (The other end-to-end rows differ only in their method,
    whose training with the kernels test_kernels.py runs through the CLI: ~30 s of Triton's interpreter
    here saved.)"""
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the suite sets it itself
    rows = ["device", *(r.name for r in gpu_suite.ROWS if r.group == "kernels" and not r.name.startswith("e_")),
            "e_cola_torch", "e_cola_triton"]
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cpu", "--out", str(out), "--rows", "device,k_*,e_cola_*"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    recs = read_jsonl(out / "gpu_suite.jsonl")
    assert list(recs) == rows and len(rows) == 8
    assert {k: r["status"] for k, r in recs.items()} == {k: "ok" for k in recs}, {k: r.get("stderr_tail") for k, r in recs.items()}
    for name in ("k_loss", "k_sltrain", "k_cola"):
        variants = recs[name]["result"]["variants"]
        assert variants["reference"]["seconds"] > 0
        for v in variants.values():
            if isinstance(v, dict) and "max_rel_diff" in v:
                assert all(x is None or x < 1e-4 for x in v["max_rel_diff"].values()), (name, v)
    assert recs["k_cola"]["result"]["variants"]["triton"]["saved_bytes"] < recs["k_cola"]["result"]["variants"]["reference"]["saved_bytes"]
    assert recs["k_adam_bf16"]["result"]["variants"]["triton"]["weights_bitwise_equal"] > 0.999
    assert recs["e_cola_triton"]["result"]["kernels"].startswith("triton")
    assert recs["e_cola_torch"]["result"]["kernels"] == "torch (loss: full)"
    md = (out / "gpu_suite.md").read_text()
    assert "| k_loss | chunked |" in md and "| e_cola_triton |" in md


@pytest.mark.slow
def test_exec_mode_starts_fresh_interpreters(tmp_path):
    """--exec (also the fallback should CUDA ever be initialised in the suite's process) runs the same
    jobs in fresh interpreters."""
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cpu", "--exec", "--out", str(tmp_path), "--rows",
                           "data_pack"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, gpu_suite.CRASH_ENV: "nothing"})
    assert proc.returncode == 0, proc.stderr
    rec = read_jsonl(tmp_path / "gpu_suite.jsonl")["data_pack"]
    assert rec["status"] == "ok" and rec["result"]["positions_per_s"] > 0
    assert "fresh interpreters (--exec)" in (tmp_path / "gpu_suite.md").read_text()


@pytest.mark.slow
def test_candidates_above_the_device_memory_are_not_tried_and_no_cuda_skips_the_gpu_rows(tmp_path):
    from lrpretrain.estimate import estimate
    from lrpretrain.train import load_config

    row = next(r for r in gpu_suite.ROWS if r.name == "full_60m")
    # the loss from the whole logits: llama_tiny's peak then grows with the micro-batch (with the chunked
    # loss, trainer.kernels=auto on the CPU, the optimizer step sets it at both)
    row = dataclasses.replace(row, cpu_overrides=(*row.cpu_overrides, "trainer.kernels=torch"))
    ovr = gpu_suite.row_overrides(row, True, SIZES)
    est = {mb: estimate(load_config([*ovr, *gpu_suite._mb(mb)])[0]).peak for mb in (8, 4)}
    assert est[8] > est[4]
    suite = gpu_suite.Suite(tmp_path / "fit", 120, [row], cpu=True, argv=[])
    suite.device = {"memory_bytes": (est[8] + est[4]) / 2 / gpu_suite.MEMORY_MARGIN}  # 8 does not fit, 4 does
    suite.run()
    rec = read_jsonl(tmp_path / "fit" / "gpu_suite.jsonl")["full_60m"]
    assert rec["status"] == "ok" and rec["result"]["micro_batch_size"] == 4
    assert [(a["micro_batch_size"], a["status"]) for a in rec["attempts"]] == [
        (8, "not tried: estimate above memory"), (4, "ok")]
    assert rec["attempts"][0]["estimate_peak"] == pytest.approx(est[8])

    # without --cpu on a machine without CUDA: the device row says so and the GPU rows are skipped
    rows = gpu_suite.select(gpu_suite.ROWS, "device,full_60m")
    gpu_suite.Suite(tmp_path / "gpu", 120, rows, cpu=False, argv=[]).run()
    recs = read_jsonl(tmp_path / "gpu" / "gpu_suite.jsonl")
    assert recs["device"]["status"] == "ok" and "sm_count" not in recs["device"]["result"]
    assert recs["full_60m"]["status"] == "skipped: no CUDA device"
