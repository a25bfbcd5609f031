"""The GPU benchmark suite: one command that measures what only a GPU can show, within a deadline.

    python benchmarks/gpu_suite.py --out gpu-results [--deadline 450] [--rows PATTERN[,PATTERN...]] [--cpu] [--list]
    benchmarks/gpu_suite.sh --out gpu-results --deadline 450   # on a bare machine: installs .gpu-wheels/ first

Rows run one after another, each in its own process (``lrpretrain bench --json``; the device probe and
the data-stream row run this file as a child): an out-of-memory error, a crash or a timeout in one row
is recorded with its status and the tail of its stderr, and the suite goes on. Each finished row is
appended to ``OUT/gpu_suite.jsonl`` at once, and ``OUT/gpu_suite.md`` (the summary) is rewritten after
every row, so a suite cut short by its deadline, or killed, still leaves both. Every child's full
output is kept in ``OUT/logs/<row>.log``.

The deadline (default 450 s; 900 s with ``--cpu``): a row whose expected cost (``Row.expected_s``, a guess for an H100/H200-class GPU; in
``--cpu`` mode measured on a 2-core CPU) exceeds the time left is recorded as ``skipped: deadline``;
a row that runs is killed (its whole process group) when it passes ``min(Row.cap_s, time left)``.
Rows come in order of value: device probe, full rank by size, the methods relative to full, GaLore's
refresh, the data stream, recompute / per-layer updates, ``torch.compile``.

"The largest micro-batch that fits": a row with candidates tries them largest first, each in its own
process, skipping those whose analytic estimate (:mod:`lrpretrain.estimate`) exceeds 92% of the
device's memory (when the device row ran); the first that does not run out of memory wins, and every
attempt is recorded.

Data: the rows read the embedded corpus (Shakespeare, prepared by ``lrpretrain prepare-data`` and
carried in ``.gpu-wheels/cache``) with its byte-level BPE (vocab 8192, within every model's 32000),
through the same pipeline as training: the GaLore protocol's one document per row truncated to 256
tokens (``experiment=<method>_c4_<size> data=embedded``), real token batches, not synthetic ones.

``--cpu``: every row at tiny sizes (llama_tiny, 32 tokens per row, 1 warmup + 2 timed updates) on the
CPU, so that the whole suite can be exercised without a GPU (tests/test_gpu_suite.py).

Test hooks (environment): ``GPU_SUITE_FAIL_ROWS=PATTERN`` makes the matching rows fail (a bench row
gets an unknown config key, other rows a child that exits 1); ``GPU_SUITE_FAKE_OOM_ABOVE=N`` makes
every bench attempt with a micro-batch above N end as an out-of-memory error would.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
SIZES = ("60m", "130m", "350m", "1b")
# Methods compared with full rank (galore_8bit = galore with method.state_bits=8).
METHODS = ("galore", "galore_8bit", "fira", "apollo_mini", "frugal", "galore_dct", "lowrank", "lora", "relora",
           "sltrain", "sst", "cola", "cola_m", "crnet")
NO_RANK = ("frugal", "apollo_mini")  # no rank key / keep their own rank in --cpu mode
OOM = re.compile(r"OutOfMemoryError|CUDA out of memory|CUBLAS_STATUS_ALLOC_FAILED|out of memory", re.I)
FAIL_ENV, OOM_ENV = "GPU_SUITE_FAIL_ROWS", "GPU_SUITE_FAKE_OOM_ABOVE"
MEMORY_MARGIN = 0.92  # a candidate micro-batch whose estimate exceeds this share of device memory is not tried
TAIL = 1500  # characters of stderr kept in the JSONL record of a row that did not succeed


@dataclass
class Row:
    name: str
    group: str  # device | full | methods | refresh | data | memory | compile
    kind: str  # device | bench | data
    overrides: list[str] = field(default_factory=list)
    candidates: list[int] = field(default_factory=list)  # micro-batches, largest first ([]: fixed by overrides)
    warmup: int = 2
    steps: int = 3
    memory: bool = True
    expected_s: float = 30.0  # cost guess for the deadline
    cap_s: float = 120.0  # a row running longer is killed
    ref: str | None = None  # the row this one is compared with (tokens/s ratio)
    note: str = ""


def _mb(n: int) -> list[str]:
    return [f"trainer.micro_batch_size={n}", f"trainer.batch_size={n}"]


def preset(method: str, size: str) -> list[str]:
    """The paper's settings for ``method`` at ``size`` (ranks, scales) where a preset exists."""
    presets = {p.stem for p in (HERE.parent / "conf" / "experiment").glob("*.yaml")}
    base = "galore" if method == "galore_8bit" else method
    out = [f"experiment={base}_c4_{size}"] if f"{base}_c4_{size}" in presets else [f"experiment=full_c4_{size}",
                                                                                 f"method={base}"]
    return [*out, "data=embedded", *(["method.state_bits=8"] if method == "galore_8bit" else [])]


def build_rows(cpu: bool, methods_size: str = "350m", memory_size: str = "1b") -> list[Row]:
    """Every row of the suite, in the order it runs."""
    if cpu:
        base = ["model=llama_tiny", "data=embedded", "data.seq_len=32", "trainer.device=cpu", "trainer.precision=fp32",
                "trainer.threads=2"]

        def spec(method: str, size: str) -> list[str]:
            m = "galore" if method == "galore_8bit" else method
            return [*base, f"method={m}", *(["method.rank=8"] if m not in NO_RANK and m != "full" else []),
                    *(["method.state_bits=8"] if method == "galore_8bit" else [])]

        full_mb = {s: [8, 4] for s in SIZES}
        fixed_methods, fixed_memory, t = 4, 4, dict(warmup=1, steps=2)
        cost = dict(device=8, full=12, method=8, refresh=8, data=8, memory=8, compile=45)  # measured, 2 cores
    else:
        def spec(method: str, size: str) -> list[str]:
            return [*preset(method, size), "trainer.precision=bf16"]  # device auto: CUDA (checked by the device row)

        full_mb = {"60m": [512, 256, 128], "130m": [512, 256, 128], "350m": [256, 128, 64], "1b": [128, 64, 32, 16]}
        fixed_methods, fixed_memory, t = {"60m": 128, "130m": 128, "350m": 64, "1b": 32}[methods_size], 32, {}
        cost = dict(device=15, full=25, method=18, refresh=30, data=20, memory=25, compile=150)
    rows = [Row("device", "device", "device", expected_s=cost["device"], cap_s=90,
                note="device, driver, versions, measured dense bf16 matmul peak")]
    for s in SIZES:
        rows.append(Row(f"full_{s}", "full", "bench", spec("full", s), full_mb[s], expected_s=cost["full"],
                        cap_s=240, **t))
    ms, mm = methods_size, memory_size
    rows.append(Row("m_full", "methods", "bench", [*spec("full", ms), *_mb(fixed_methods)], expected_s=cost["method"],
                    cap_s=180, **t))
    for m in METHODS:
        rows.append(Row(f"m_{m}", "methods", "bench", [*spec(m, ms), *_mb(fixed_methods)], expected_s=cost["method"],
                        cap_s=180, ref="m_full", **t))
    rows.append(Row("galore_refresh", "refresh", "bench", [*spec("galore", ms), *_mb(fixed_methods),
                                                            "method.update_proj_gap=1"],
                    warmup=1, steps=2 if cpu else 3, memory=False, expected_s=cost["refresh"], cap_s=240,
                    ref="m_galore", note="every update recomputes GaLore's projections (T = 1)"))
    for mode in ("truncate", "pack"):
        rows.append(Row(f"data_{mode}", "data", "data", [*(base if cpu else preset("full", "350m")),
                                                           f"data.mode={mode}", *_mb(16 if cpu else 64)],
                        expected_s=cost["data"], cap_s=60, note="token stream alone, on the CPU"))
    for m in ("full", "galore"):
        for rc, pl in (("none", False), ("full", False), ("selective", False), ("none", True)):
            name = f"mem_{m}_{'per_layer' if pl else rc}"
            rows.append(Row(name, "memory", "bench", [*spec(m, mm), *_mb(fixed_memory), f"trainer.recompute={rc}",
                                                       f"trainer.per_layer_update={str(pl).lower()}"],
                            expected_s=cost["memory"], cap_s=180, ref=None if (rc, pl) == ("none", False) else
                            f"mem_{m}_none", **t))
    rows.append(Row(f"full_{mm}_compile", "compile", "bench", [*spec("full", mm), *_mb(fixed_memory),
                                                               "trainer.compile=true"],
                    expected_s=cost["compile"], cap_s=420, ref="mem_full_none", **t))
    if cpu:  # memory through torch.profiler costs ~5 s a row on the CPU: measured where the dry run checks it
        for r in rows:
            r.memory = r.memory and (r.group == "full" or r.name in ("m_full", "m_galore"))
    return rows


def select(rows: list[Row], pattern: str | None) -> list[Row]:
    """Rows whose name or group matches one of the comma-separated fnmatch patterns."""
    if not pattern:
        return rows
    pats = [p.strip() for p in pattern.split(",") if p.strip()]
    return [r for r in rows if any(fnmatch.fnmatchcase(r.name, p) or fnmatch.fnmatchcase(r.group, p) for p in pats)]


# ---------------------------------------------------------------------------------------------- children
# Imports of torch and lrpretrain are deferred: the suite's own process needs lrpretrain only for the
# analytic estimates that choose micro-batches (nothing is built there) and must outlive whatever a row
# does; each child below imports what its row needs, when it runs.
def child_device(out: Path, cpu: bool) -> None:
    """Device, driver and versions, and the measured dense bf16 matmul peak (best of several)."""
    import torch

    import lrpretrain

    info: dict = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                  "cores": os.cpu_count(), "platform": platform.platform(),
                  "lrpretrain_from": str(Path(lrpretrain.__file__).parent)}
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as e:  # noqa: BLE001 - recorded, not fatal
        info["triton"] = f"not importable ({type(e).__name__})"
    try:
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                           if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor() or "unknown"
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,power.limit,clocks.max.sm",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        info["nvidia_smi"] = q.stdout.strip() if q.returncode == 0 else f"exit {q.returncode}: {q.stderr.strip()}"
    except (OSError, subprocess.TimeoutExpired) as e:
        info["nvidia_smi"] = f"not available ({type(e).__name__})"
    if not cpu and torch.cuda.is_available():
        from lrpretrain.bench import cuda_peak_flops

        dev = torch.device("cuda", 0)
        props = torch.cuda.get_device_properties(dev)
        info.update(device=props.name, memory_bytes=props.total_memory, sm_count=props.multi_processor_count,
                    capability=f"{props.major}.{props.minor}")
        info["nominal_bf16_flops"], info["nominal_source"] = cuda_peak_flops(dev, True)
        n, inner, repeats = 8192, 20, 6
    else:
        dev = torch.device("cpu")
        info.update(device=f"CPU: {info['cpu']}", memory_bytes=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
                    nominal_bf16_flops=None, nominal_source="no datasheet figure for a CPU")
        n, inner, repeats = 512, 2, 3
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            a @ b
        sync()
        best = min(best, (time.perf_counter() - t0) / inner)
    info["matmul"] = f"bf16 {n}x{n} @ {n}x{n}, best of {repeats} x {inner}"
    info["measured_bf16_flops"] = 2.0 * n**3 / best
    out.write_text(json.dumps(info, indent=1) + "\n")


def child_data(out: Path, seconds: float, overrides: list[str]) -> None:
    """Tokens per second of the training token stream alone (tokenize + pack/truncate + collate)."""
    from lrpretrain.data import TokenStream, load_tokenizer
    from lrpretrain.train import load_config

    cfg, _ = load_config(overrides)
    tok = load_tokenizer(cfg.data.tokenizer, cfg.data.eos_token, cfg.data.pad_token)
    stream = TokenStream(cfg.data, tok, cfg.trainer.micro_batch_size, vocab_size=cfg.model.vocab_size)
    try:
        next(stream)  # start-up (opening the source, the prefetch thread) is not timed
        positions = tokens = batches = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            b = next(stream)
            positions += b.input_ids.numel()
            tokens += b.tokens
            batches += 1
        dt = time.perf_counter() - t0
    finally:
        stream.close()
    out.write_text(json.dumps({"mode": cfg.data.mode, "seq_len": cfg.data.seq_len,
                               "micro_batch_size": cfg.trainer.micro_batch_size, "batches": batches, "seconds": dt,
                               "positions_per_s": positions / dt, "tokens_per_s": tokens / dt,
                               "cores": os.cpu_count()}, indent=1) + "\n")


# ---------------------------------------------------------------------------------------------- running
class Suite:
    def __init__(self, out: Path, deadline: float, rows: list[Row], cpu: bool, argv: list[str]):
        self.out, self.deadline, self.rows, self.cpu, self.argv = out.resolve(), deadline, rows, cpu, argv
        self.t0 = time.monotonic()
        self.records: dict[str, dict] = {}
        self.device: dict | None = None
        self.proc: subprocess.Popen | None = None
        (self.out / "logs").mkdir(parents=True, exist_ok=True)
        self.jsonl = self.out / "gpu_suite.jsonl"
        self.jsonl.write_text("")
        self.fail = os.environ.get(FAIL_ENV, "")
        self.fake_oom = int(os.environ[OOM_ENV]) if os.environ.get(OOM_ENV) else None
        git = subprocess.run(["git", "-C", str(HERE.parent), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True)
        self.commit = git.stdout.strip() if git.returncode == 0 else "unknown (no git)"

    def left(self) -> float:
        return self.deadline - (time.monotonic() - self.t0)

    # one child process, in its own process group (killed whole on timeout: compile workers too)
    def spawn(self, cmd: list[str], timeout: float, log: Path) -> tuple[str, int | None, str, float]:
        t = time.monotonic()
        with open(log, "a") as f:
            f.write(f"$ {' '.join(cmd)}\n")
            f.flush()
            # cwd: the results folder, not the checkout, whose lrpretrain/ would shadow the package on
            # PYTHONPATH (gpu_suite.sh maps conf/, kernels/, data_recipes/ into it as an install does)
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.PIPE, text=True, start_new_session=True,
                                         cwd=self.out)
            try:
                _, err = self.proc.communicate(timeout=max(timeout, 1.0))
                status = "ok" if self.proc.returncode == 0 else ("oom" if OOM.search(err or "") else "failed")
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                _, err = self.proc.communicate()
                status = "timeout"
            finally:
                rc = self.proc.returncode
                self.proc = None
            f.write(err or "")
        return status, rc, err or "", time.monotonic() - t

    def injected(self, row: Row) -> bool:
        return bool(self.fail) and bool(select([row], self.fail))

    def run_row(self, row: Row) -> dict:
        rec: dict = {"row": row.name, "group": row.group, "kind": row.kind, "overrides": row.overrides,
                     "note": row.note, "ref": row.ref}
        left = self.left()
        if not self.cpu and self.device is not None and not self.device.get("sm_count"):
            return {**rec, "status": "skipped: no CUDA device", "wall_s": 0.0,
                    "detail": "the device row found no CUDA device (--cpu runs the dry run)"}
        if left < row.expected_s:
            return {**rec, "status": "skipped: deadline", "wall_s": 0.0,
                    "detail": f"{left:.0f} s left, row expects {row.expected_s:.0f} s"}
        log = self.out / "logs" / f"{row.name}.log"
        log.write_text("")
        t = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="gpu-suite-") as tmp:
            res = Path(tmp) / "result.json"
            if row.kind == "bench":
                rec.update(self.run_bench(row, res, log))
            else:
                if self.injected(row):
                    cmd = [sys.executable, "-c", f"import sys; sys.exit('injected failure ({FAIL_ENV})')"]
                elif row.kind == "device":
                    cmd = [sys.executable, __file__, "--child", "device", "--json", str(res),
                           *(["--cpu"] if self.cpu else [])]
                else:
                    cmd = [sys.executable, __file__, "--child", "data", "--json", str(res),
                           "--seconds", "2" if self.cpu else "8", "--", *row.overrides]
                rec["command"] = " ".join(cmd)
                status, rc, err, _ = self.spawn(cmd, min(row.cap_s, self.left()), log)
                rec.update(status=status, returncode=rc)
                if status == "ok":
                    rec["result"] = json.loads(res.read_text())
                else:
                    rec["stderr_tail"] = err[-TAIL:]
        rec["wall_s"] = time.monotonic() - t
        if row.kind == "device" and rec["status"] == "ok":
            self.device = rec["result"]
        return rec

    def bench_cmd(self, row: Row, overrides: list[str], res: Path, mb: int | None) -> list[str]:
        if self.fake_oom is not None and mb is not None and mb > self.fake_oom:
            msg = f"torch.OutOfMemoryError: CUDA out of memory (injected by {OOM_ENV}={self.fake_oom})"
            return [sys.executable, "-c", f"import sys; sys.exit({msg!r})"]
        extra = ["trainer.gpu_suite_injected_failure=1"] if self.injected(row) else []
        return [sys.executable, "-m", "lrpretrain.cli.main", "bench", *overrides, *extra, "--warmup", str(row.warmup),
                "--steps", str(row.steps), "--json", str(res), *([] if row.memory else ["--no-memory"])]

    def run_bench(self, row: Row, res: Path, log: Path) -> dict:
        if not row.candidates:
            cmd = self.bench_cmd(row, row.overrides, res, None)
            status, rc, err, _ = self.spawn(cmd, min(row.cap_s, self.left()), log)
            out = {"status": status, "returncode": rc, "command": " ".join(cmd)}
            if status == "ok":
                out["result"] = json.loads(res.read_text())
            else:
                out["stderr_tail"] = err[-TAIL:]
            return out
        attempts: list[dict] = []
        out: dict = {"attempts": attempts}
        t = time.monotonic()
        for mb in row.candidates:
            ovr = [*row.overrides, *_mb(mb)]
            est = self.estimated_peak(ovr)
            a: dict = {"micro_batch_size": mb, "estimate_peak": est}
            if est is not None and self.device and est > MEMORY_MARGIN * self.device["memory_bytes"]:
                attempts.append({**a, "status": "not tried: estimate above memory"})
                continue
            left = min(row.cap_s - (time.monotonic() - t), self.left())
            if left < 1:
                attempts.append({**a, "status": "skipped: deadline"})
                break
            cmd = self.bench_cmd(row, ovr, res, mb)
            status, rc, err, wall = self.spawn(cmd, left, log)
            attempts.append({**a, "status": status, "wall_s": wall})
            out.update(status=status, returncode=rc, command=" ".join(cmd))
            if status == "ok":
                out["result"] = json.loads(res.read_text())
                out.pop("stderr_tail", None)
                break
            out["stderr_tail"] = err[-TAIL:]
            if status != "oom":
                break  # a crash or timeout is not cured by a smaller micro-batch
        if "status" not in out:
            out["status"] = "failed"
            out["stderr_tail"] = "no candidate micro-batch fits by the estimate"
        elif out["status"] == "oom":
            out["status"] = "oom"  # every candidate ran out of memory
        return out

    def estimated_peak(self, overrides: list[str]) -> float | None:
        try:
            from lrpretrain.estimate import estimate
            from lrpretrain.train import load_config

            cfg, _ = load_config(overrides)
            return float(estimate(cfg).peak)
        except Exception as e:  # noqa: BLE001 - without an estimate every candidate is tried
            print(f"gpu_suite: no estimate for {' '.join(overrides)}: {type(e).__name__}: {e}", file=sys.stderr)
            return None

    def run(self) -> None:
        try:
            for row in self.rows:
                rec = self.run_row(row)
                self.records[row.name] = rec
                with open(self.jsonl, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                print(f"[{time.monotonic() - self.t0:6.1f} s] {row.name:<22} {rec['status']}"
                      + (f" ({rec['wall_s']:.1f} s)" if rec.get("wall_s") else ""), flush=True)
                self.write_md()
        except KeyboardInterrupt:
            if self.proc is not None:
                os.killpg(self.proc.pid, signal.SIGKILL)
            print("interrupted: the summary holds the rows that finished", file=sys.stderr)
        finally:
            self.write_md(final=True)

    # ------------------------------------------------------------------------------------------ summary
    def write_md(self, final: bool = False) -> None:
        (self.out / "gpu_suite.md").write_text(summary(self.records, self.rows, self.device, self.deadline,
                                                       time.monotonic() - self.t0, self.cpu, self.argv, final,
                                                       self.commit))


def _gib(x) -> str:
    return "–" if x is None else f"{x / 2**30:.2f}"


def _status(rec: dict | None) -> str:
    if rec is None:
        return "not run"
    s = rec["status"]
    if s == "ok":
        return "ok"
    why = rec.get("detail") or (rec.get("stderr_tail") or "").strip().splitlines()[-1:] or [""]
    why = why if isinstance(why, str) else why[0]
    return f"**{s}**" + (f": {why[:160]}".replace("|", "/") if why else "")


def _ratio(rec: dict, records: dict, key: str = "tokens_per_s") -> str:
    ref = records.get(rec.get("ref") or "")
    if rec.get("status") != "ok" or not ref or ref.get("status") != "ok":
        return "–"
    a, b = rec["result"], ref["result"]
    same = a["micro_batch_size"] == b["micro_batch_size"] and a["seq_len"] == b["seq_len"]
    return f"{a[key] / b[key]:.2f}x" + ("" if same else " (other batch)")


def _bench_cells(rec: dict, measured_peak: float | None) -> list[str]:
    if rec.get("status") != "ok":
        return ["–"] * 8
    r = rec["result"]
    est = r["estimate"]["peak"]
    mfu = "–" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    achieved = r["flops_per_token"] * r["tokens_per_s"]
    vs_meas = f"{100 * achieved / measured_peak:.1f}%" if measured_peak else "–"
    peak = r.get("peak_bytes")
    return [f"{r['micro_batch_size']} x {r['seq_len']}", f"{r['step_s']:.4f}", f"{r['tokens_per_s']:,.0f}", mfu,
            vs_meas, _gib(peak), _gib(est), "–" if not peak else f"{est / peak:.2f}"]


BENCH_HEAD = ["micro-batch x seq", "step s (median)", "tokens/s", "MFU (nominal)", "MFU (measured peak)",
              "peak GiB", "estimate GiB", "est/meas"]


def _table(head: list[str], lines: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(c) + " |" for c in lines)]


def summary(records: dict, rows: list[Row], device: dict | None, deadline: float, wall: float, cpu: bool,
            argv: list[str], final: bool, commit: str = "unknown") -> str:
    d = device or {}
    measured = d.get("measured_bf16_flops")
    nominal = d.get("nominal_bf16_flops")
    counts: dict[str, int] = {}
    for r in rows:
        s = records[r.name]["status"].split(":")[0] if r.name in records else "not run"
        counts[s] = counts.get(s, 0) + 1
    lines = [f"# GPU suite ({'CPU dry run, tiny sizes' if cpu else 'GPU'}) — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
             "", f"Command: `python benchmarks/gpu_suite.py {' '.join(argv)}` (commit {commit})", ""]
    if device:
        lines += [f"- device: {d.get('device')} ({_gib(d.get('memory_bytes'))} GiB"
                  + (f", {d['sm_count']} SMs, compute capability {d['capability']}" if "sm_count" in d else "") + ")",
                  f"- nvidia-smi (name, driver, memory, power limit, max SM clock): {d.get('nvidia_smi')}",
                  f"- torch {d.get('torch')} (CUDA {d.get('cuda')}), triton {d.get('triton')}, Python {d.get('python')}",
                  f"- host CPU: {d.get('cpu')}, {d.get('cores')} cores; lrpretrain from {d.get('lrpretrain_from')}",
                  f"- dense bf16 matmul: measured {measured / 1e12:.3g} TFLOP/s ({d.get('matmul')}); nominal "
                  + (f"{nominal / 1e12:.0f} TFLOP/s ({d.get('nominal_source')}), measured/nominal "
                     f"{measured / nominal:.2f}" if nominal else f"– ({d.get('nominal_source')})")]
    else:
        lines.append(f"- device: unknown (device row {_status(records.get('device'))})")
    lines += [f"- deadline {deadline:.0f} s, wall {wall:.0f} s" + ("" if final else " (still running)") + "; rows: "
              + ", ".join(f"{v} {k}" for k, v in counts.items()),
              "- data: the embedded corpus (Shakespeare) with its BPE, real token batches through the training "
              "pipeline",
              "- MFU (nominal): `lrpretrain bench`'s figure, against lrpretrain.bench.PEAK_FLOPS on CUDA (on the CPU "
              "against its measured fp32 matmul); MFU (measured peak): the same FLOP/s against the bf16 matmul above", ""]
    by_group: dict[str, list[Row]] = {}
    for r in rows:
        by_group.setdefault(r.group, []).append(r)
    titles = {"full": "Full rank by size (largest micro-batch that fits among the candidates)",
              "methods": "Methods against full rank (same model, micro-batch and sequence length)",
              "refresh": "GaLore's projection refresh",
              "data": "Data stream alone (CPU: tokenize, truncate/pack, collate)",
              "memory": "Activation recomputation and per-layer updates",
              "compile": "torch.compile (trainer.compile=true)"}
    for group, grows in by_group.items():
        if group == "device":
            continue
        lines += [f"## {titles.get(group, group)}", ""]
        if group == "data":
            cells = []
            for r in grows:
                rec = records.get(r.name)
                x = rec["result"] if rec and rec["status"] == "ok" else None
                cells.append([r.name, *([x["mode"], str(x["seq_len"]), str(x["micro_batch_size"]),
                                         f"{x['positions_per_s']:,.0f}", f"{x['tokens_per_s']:,.0f}",
                                         str(x["cores"])] if x else ["–"] * 6), _status(rec)])
            lines += _table(["row", "mode", "seq", "rows/batch", "positions/s", "non-pad tokens/s", "CPU cores",
                             "status"], cells)
        else:
            cells = []
            for r in grows:
                rec = records.get(r.name) or {}
                res = rec.get("result") or {}
                what = [res.get("model", "–"), res.get("method", "–"),
                        f"{res['recompute']}{', per-layer' if res['per_layer_update'] else ''}" if res else "–"]
                extra = [_ratio(rec, records) if r.ref else "–"]
                if r.candidates:
                    extra.append(", ".join(f"{a['micro_batch_size']}: {a['status'].split(':')[0]}"
                                           for a in rec.get("attempts", [])) or "–")
                cells.append([r.name, *what, *_bench_cells(rec, measured), *extra, _status(rec or None)])
            head = ["row", "model", "method", "recompute", *BENCH_HEAD, "tokens/s vs ref"]
            if any(r.candidates for r in grows):
                head.append("micro-batches tried")
            lines += _table([*head, "status"], cells)
            if group == "refresh":
                lines += ["", galore_refresh_line(records)]
            refs = sorted({r.ref for r in grows if r.ref})
            if refs:
                lines += ["", f"Reference rows (tokens/s vs ref): {', '.join(refs)}."]
        lines.append("")
    return "\n".join(lines) + "\n"


def galore_refresh_line(records: dict) -> str:
    """Refresh step time (T = 1: every update recomputes the projections) against the plain step, and
    the refresh's amortised share of the step time at T = 200."""
    ref, plain = records.get("galore_refresh"), records.get("m_galore")
    if not (ref and plain and ref["status"] == "ok" and plain["status"] == "ok"):
        return "Amortised refresh share: – (needs rows galore_refresh and m_galore)."
    tr, tp = ref["result"]["step_s"], plain["result"]["step_s"]
    share = (tr - tp) / 200 / tp
    return (f"Refresh step {tr:.4f} s (T = 1) vs plain step {tp:.4f} s (m_galore, T = 200): the refresh costs "
            f"{tr - tp:.4f} s, amortised over T = 200 updates {100 * share:.2f}% of the step time.")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="results folder (gpu_suite.jsonl, gpu_suite.md, logs/)")
    ap.add_argument("--deadline", type=float, help="seconds for the whole suite (default 450; with --cpu 900)")
    ap.add_argument("--rows", help="comma-separated fnmatch patterns of row names or groups (default: all)")
    ap.add_argument("--cpu", action="store_true", help="every row at tiny sizes on the CPU (a dry run)")
    ap.add_argument("--methods-model", default="350m", choices=SIZES, help="size of the methods rows (default 350m)")
    ap.add_argument("--memory-model", default="1b", choices=SIZES,
                    help="size of the recompute / per-layer / compile rows (default 1b)")
    ap.add_argument("--list", action="store_true", help="print the rows and their expected costs, run nothing")
    ap.add_argument("--child", choices=("device", "data"), help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--seconds", type=float, default=8.0, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "device":
        child_device(args.json, args.cpu)
        return 0
    if args.child == "data":
        child_data(args.json, args.seconds, args.overrides)
        return 0
    rows = select(build_rows(args.cpu, args.methods_model, args.memory_model), args.rows)
    if not rows:
        ap.error(f"--rows {args.rows!r} matches no row")
    if args.list:
        for r in rows:
            print(f"{r.name:<22} {r.group:<8} expected {r.expected_s:4.0f} s  cap {r.cap_s:4.0f} s  "
                  f"{' '.join(r.overrides)}" + (f"  micro-batches {r.candidates}" if r.candidates else ""))
        print(f"sum of expected costs: {sum(r.expected_s for r in rows):.0f} s")
        return 0
    if args.out is None:
        ap.error("--out DIR is required")
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    deadline = args.deadline if args.deadline is not None else (900.0 if args.cpu else 450.0)
    suite = Suite(args.out, deadline, rows, args.cpu, sys.argv[1:])
    suite.run()
    print(f"wrote {args.out / 'gpu_suite.jsonl'} and {args.out / 'gpu_suite.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
