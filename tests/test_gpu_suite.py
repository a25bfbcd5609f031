"""benchmarks/gpu_suite.py and gpu_suite.sh: the rows, the summary, the deadline, failures, the wrapper.

The GPU rows themselves need a GPU; here every row's configuration is checked to load and be
estimated, and the suite runs end to end in its ``--cpu`` mode through the wrapper."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
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


def read_jsonl(path: Path) -> dict[str, dict]:
    return {r["row"]: r for r in map(json.loads, path.read_text().splitlines())}


def test_rows_cover_the_issue_and_every_gpu_config_loads():
    from lrpretrain.estimate import estimate
    from lrpretrain.train import load_config

    rows = gpu_suite.build_rows(cpu=False)
    names = [r.name for r in rows]
    assert len(names) == len(set(names))
    assert names[0] == "device"
    for want in ["full_60m", "full_130m", "full_350m", "full_1b", "full_1b_compile", "galore_refresh", "data_truncate",
                 "data_pack", *(f"m_{m}" for m in ["full", *gpu_suite.METHODS]),
                 *(f"mem_{m}_{v}" for m in ("full", "galore") for v in ("none", "full", "selective", "per_layer"))]:
        assert want in names
    assert [r.name for r in gpu_suite.build_rows(cpu=True)] == names  # --cpu runs the same rows
    for r in rows:
        if r.ref:
            assert r.ref in names[: names.index(r.name)], f"{r.name}: its reference must run before it"
        if r.kind == "device":
            continue
        ovr = [*r.overrides, *(gpu_suite._mb(r.candidates[0]) if r.candidates else [])]
        cfg, _ = load_config(ovr)
        assert cfg.data.seq_len == 256 and cfg.data.source == "embedded", r.name
        if r.kind == "bench":
            assert cfg.trainer.precision == "bf16", r.name
            assert estimate(cfg).peak > 0
    by = {r.name: r for r in rows}
    assert "method.update_proj_gap=1" in by["galore_refresh"].overrides
    assert "trainer.compile=true" in by["full_1b_compile"].overrides
    assert "method.state_bits=8" in by["m_galore_8bit"].overrides
    assert by["full_1b"].candidates == sorted(by["full_1b"].candidates, reverse=True)


def test_select_by_name_or_group():
    rows = gpu_suite.build_rows(cpu=True)
    assert [r.name for r in gpu_suite.select(rows, "full_1*")] == ["full_130m", "full_1b", "full_1b_compile"]
    assert {r.group for r in gpu_suite.select(rows, "memory, device")} == {"memory", "device"}
    assert gpu_suite.select(rows, None) == rows
    assert gpu_suite.select(rows, "nothing*") == []


def _bench(step_s: float, mb: int = 4, **kw) -> dict:
    return {"model": "llama_tiny", "method": "galore", "recompute": "none", "per_layer_update": False,
            "micro_batch_size": mb, "seq_len": 32, "step_s": step_s, "tokens_per_s": mb * 32 / step_s,
            "flops_per_token": 1e6, "mfu": 0.1, "peak_bytes": 2**30, "estimate": {"peak": 1.1 * 2**30}, **kw}


def test_summary_ratios_refresh_share_and_failures():
    rows = gpu_suite.select(gpu_suite.build_rows(cpu=True), "m_full,m_galore,m_lora,galore_refresh,data_pack")
    records = {
        "m_full": {"status": "ok", "result": _bench(0.1, method="full"), "ref": None},
        "m_galore": {"status": "ok", "result": _bench(0.125), "ref": "m_full"},
        "m_lora": {"status": "oom", "stderr_tail": "...\ntorch.OutOfMemoryError: CUDA out of memory", "ref": "m_full"},
        "galore_refresh": {"status": "ok", "result": _bench(0.5), "ref": "m_galore"},
    }
    md = gpu_suite.summary(records, rows, None, 450, 12.0, True, ["--cpu"], True)
    assert "| m_galore | llama_tiny | galore | none | 4 x 32 | 0.1250 | 1,024 |" in md
    assert "0.80x" in md  # 0.1 s / 0.125 s
    assert "**oom**: torch.OutOfMemoryError: CUDA out of memory" in md
    # (0.5 - 0.125) / 200 / 0.125 = 1.5% of the step at T = 200
    assert "costs 0.3750 s, amortised over T = 200 updates 1.50% of the step time" in md
    assert "| data_pack | – | – | – | – | – | – | not run |" in md
    assert "1.10" in md  # estimate / measured peak
    assert "3 ok, 1 oom, 1 not run" in md


@pytest.mark.slow
def test_deadline_skips_rows_and_still_writes_the_summary(tmp_path):
    # device (~4 s, expected 8 s) runs within the 9 s; nothing else fits in what is left
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cpu", "--out", str(tmp_path), "--deadline", "9",
                           "--rows", "device,full_60m,data_pack"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    recs = read_jsonl(tmp_path / "gpu_suite.jsonl")
    assert list(recs) == ["device", "full_60m", "data_pack"]
    assert recs["device"]["status"] in ("ok", "timeout")  # a loaded machine may need more than the 9 s
    assert recs["full_60m"]["status"] == recs["data_pack"]["status"] == "skipped: deadline"
    md = (tmp_path / "gpu_suite.md").read_text()
    assert "**skipped: deadline**" in md and "deadline 9 s" in md


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
def test_cpu_dry_run_through_the_wrapper_records_failures_and_goes_on(tmp_path, corpus):
    """The wrapper installs a wheels folder and runs the suite; an injected failure (a bench row and a
    child row) and injected out-of-memory errors are recorded and every later row still runs."""
    wheels = tmp_path / "wheels"
    (wheels / "cache" / "embedded").mkdir(parents=True)
    shutil.copytree(corpus, wheels / "cache" / "embedded" / corpus.name)
    _probe_wheel(wheels)
    out = tmp_path / "out"
    rows = "device,full_60m,m_full,m_galore,m_lora,galore_refresh,data_truncate,data_pack"  # in suite order
    env = {**os.environ, "GPU_WHEELS": str(wheels), "PYTHON": sys.executable,
           "GPU_SUITE_FAIL_ROWS": "m_lora,data_truncate", "GPU_SUITE_FAKE_OOM_ABOVE": "4"}
    env.pop("LRPRETRAIN_CACHE", None)  # the wrapper sets it to the carried cache
    proc = subprocess.run(["bash", str(WRAPPER), "--cpu", "--out", str(out), "--deadline", "400", "--rows", rows],
                          capture_output=True, text=True, env=env, timeout=420)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "cannot be imported" not in proc.stderr
    assert (wheels / "work" / "site" / "gpu_suite_probe" / "__init__.py").is_file()
    marker = wheels / "work" / "site" / "marker"
    marker.write_text("")
    again = subprocess.run(["bash", str(WRAPPER), "--cpu", "--list"], capture_output=True, text=True, env=env, timeout=120)
    assert again.returncode == 0 and "installing" not in again.stdout and marker.exists()  # same wheels: kept

    recs = read_jsonl(out / "gpu_suite.jsonl")
    assert list(recs) == rows.split(",")
    status = {k: r["status"] for k, r in recs.items()}
    assert status == {**{k: "ok" for k in recs}, "m_lora": "failed", "data_truncate": "failed"}, status
    assert "gpu_suite_injected_failure" in recs["m_lora"]["stderr_tail"]
    assert "injected failure" in recs["data_truncate"]["stderr_tail"]
    assert (out / "logs" / "m_lora.log").read_text().count("gpu_suite_injected_failure") >= 1

    dev = recs["device"]["result"]
    assert dev["lrpretrain_from"] == str(wheels / "work" / "pkg" / "lrpretrain")  # the checkout, via the wrapper
    assert dev["measured_bf16_flops"] > 0 and dev["torch"]

    fit = recs["full_60m"]
    assert [(a["micro_batch_size"], a["status"]) for a in fit["attempts"]] == [(8, "oom"), (4, "ok")]
    assert all(a["estimate_peak"] > 0 for a in fit["attempts"])
    r = fit["result"]
    assert r["micro_batch_size"] == 4 and r["tokens_per_s"] > 0 and r["peak_bytes"] > 0 and r["estimate"]["peak"] > 0
    assert recs["galore_refresh"]["result"]["steps"] == 2
    data = recs["data_pack"]["result"]
    assert data["mode"] == "pack" and data["positions_per_s"] > 0 and data["batches"] > 0

    md = (out / "gpu_suite.md").read_text()
    assert "- device: CPU: " in md and "dense bf16 matmul: measured" in md
    for name in recs:
        assert name == "device" or f"| {name} |" in md
    assert "**failed**" in md and "amortised over T = 200" in md and "8: oom, 4: ok" in md
    assert "6 ok, 2 failed" in md


@pytest.mark.slow
def test_a_row_past_its_cap_is_killed_and_the_suite_goes_on(tmp_path, monkeypatch):
    monkeypatch.setenv(gpu_suite.FAIL_ENV, "after")
    base = ["model=llama_tiny", "data=embedded", "data.seq_len=32", "trainer.micro_batch_size=4"]
    rows = [gpu_suite.Row("slow", "data", "data", base, expected_s=0, cap_s=1.0),  # importing alone takes longer
            gpu_suite.Row("after", "data", "data", base, expected_s=0)]
    suite = gpu_suite.Suite(tmp_path, 60, rows, cpu=True, argv=[])
    suite.run()
    recs = read_jsonl(tmp_path / "gpu_suite.jsonl")
    assert recs["slow"]["status"] == "timeout" and recs["slow"]["wall_s"] < 10
    assert recs["after"]["status"] == "failed" and "injected failure" in recs["after"]["stderr_tail"]
    assert "**timeout**" in (tmp_path / "gpu_suite.md").read_text()
