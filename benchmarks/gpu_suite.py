"""The GPU benchmark suite: one command that measures what only a GPU can show, within a deadline.

    python benchmarks/gpu_suite.py --out gpu-results [--deadline 450] [--rows PATTERN[,PATTERN...]] [--cpu] [--list]
    benchmarks/gpu_suite.sh --out gpu-results --deadline 450   # on a bare machine: installs .gpu-wheels/ first

The rows are the table :data:`ROWS` (one entry per row, in the order they run, with what each costs);
they run one after another, each in its own process: an out-of-memory error, a crash (a signal), a
non-zero exit or a timeout in one row is recorded with its status and the tail of its stderr, and
the suite goes on. Each finished row is appended to ``OUT/gpu_suite.jsonl`` at once and
``OUT/gpu_suite.md`` (the summary) is rewritten after every row, so a suite cut short by its
deadline, or killed, still leaves both. Every child's output is kept in ``OUT/logs/<row>.log``.

Processes: the suite imports torch, lrpretrain and their heavy dependencies (Hydra, datasets,
pandas, pyarrow, ...) once, composes one configuration (Hydra's first compose is its slowest), adds
``torch._dynamo`` once the device row's child has imported it without touching CUDA
(:data:`PRELOAD_PROBED`), and ``os.fork()``s one child per row and per micro-batch candidate; the child runs the row in
Python (``lrpretrain bench``'s entry point, :func:`lrpretrain.cli.main.main`), writes its JSON result
to a file and exits. A fresh interpreter per row costs 5-10 s of imports each; a fork costs
milliseconds (the CPU dry run of all rows: 865 s before, 114 s now, on a loaded 2-core machine:
benchmarks/results/README.md). The child starts
its own session (process group), so a timeout kills it with everything it started (torch.compile's
workers, a data prefetcher), and nothing a row does can take the suite down with it.
CUDA is never initialised in the suite's own process: CUDA's state does not survive fork, so a child
forked after the parent touched CUDA fails on its first CUDA call ("Cannot re-initialize CUDA in
forked subprocess"). The parent only imports and composes (no tensor work: that also keeps
OpenMP's thread pool unstarted), sets ``PYTORCH_NVML_BASED_CUDA_CHECK=1`` so that a
``torch.cuda.is_available()`` anywhere in it asks NVML instead of initialising the driver, and checks
``torch.cuda.is_initialized()`` before every fork; should it ever be true, the remaining rows run in
fresh interpreters instead (``--exec``, also available by hand), and the summary says so. Each child
initialises CUDA for itself. This is the state PyTorch's DataLoader forks its workers from (torch
imported, no CUDA), the most used fork path of torch; torch's and pyarrow's idle helper threads,
which exist at that point, are fork-aware.

The deadline (default 450 s, so that the suite with the wrapper's install ends within 8 minutes;
300 s with ``--cpu``) counts from the suite's start, its imports included. A row whose expected cost
(``Row.gpu_s``, or ``Row.cpu_s`` with ``--cpu``) exceeds the time left is recorded as
``skipped: deadline``; a running row is killed (its process group) at ``min(Row.cap_s, time left)``.
The rows are ordered by value for the time they take: the device, full rank by size, the methods
against full rank, GaLore's refresh, the data stream, recomputation / per-layer updates, and
``torch.compile`` (the largest, least certain single cost) last. See :data:`ROWS` for the budget.
Rows with ``Row.default`` false run only when ``--rows`` names them: the ``kernels`` group (each fused
kernel of lrpretrain/kernels against its PyTorch reference at llama_1b shapes, through
benchmarks/kernel_bench.py, and full, sltrain and cola end to end at llama_1b with ``trainer.kernels``
torch and triton), whose ~135 s do not fit the default deadline beside the rest:
``--rows device,kernels``, a second run of its own.

"The largest micro-batch that fits": a row with candidates (``Row.fit``) tries them largest first,
each in its own child, which first computes the analytic estimate (:mod:`lrpretrain.estimate`) and
does not run a candidate whose estimate exceeds 92% of the device's memory; the first candidate
that does not run out of memory wins, and every attempt is recorded.

Data: the rows read the embedded corpus (Shakespeare, prepared by ``lrpretrain prepare-data`` and
carried in ``.gpu-wheels/cache``) with its byte-level BPE (vocab 8192, within every model's 32000),
through the same pipeline as training: the GaLore protocol's one document per row truncated to 256
tokens (``experiment=<method>_c4_<size> data=embedded``), real token batches, not synthetic ones.

``--cpu``: every row at tiny sizes (llama_tiny, 32 tokens per row, one thread, 1 warmup + 1 timed
update; memory measured on a few rows) on the CPU, so that the whole suite runs without a GPU
(tests/test_gpu_suite.py runs all of it). MFU there is against the CPU's fp32 matmul peak measured
once by the device row (``lrpretrain bench --peak-flops``), and ``torch.compile`` uses the
``aot_eager`` backend (Dynamo's tracing and AOTAutograd, the part shared with the GPU run; inductor's
CPU code generation is C++, not the GPU's Triton, and costs a minute of compiler time here). The
kernel rows run there at tiny shapes with the Triton kernels in Triton's interpreter (``--cpu`` sets
``TRITON_INTERPRET=1`` before anything imports them).

Test hooks (environment, each a ``--rows``-style pattern of rows): ``GPU_SUITE_FAIL_ROWS`` makes the
rows fail (a bench row gets an unknown config key, other rows exit 1), ``GPU_SUITE_CRASH_ROWS`` kills
them with SIGSEGV, ``GPU_SUITE_HANG_ROWS`` makes them start a grandchild (``sleep``) and hang;
``GPU_SUITE_FAKE_OOM_ABOVE=N`` makes every bench attempt with a micro-batch above N end as an
out-of-memory error would.
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib
import importlib.util
import json
import os
import platform
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
SIZES = ("60m", "130m", "350m", "1b")
METHODS, MEMORY = "{methods}", "{memory}"  # Row.size: the --methods-model / --memory-model size
OOM = re.compile(r"OutOfMemoryError|CUDA out of memory|CUBLAS_STATUS_ALLOC_FAILED|out of memory", re.I)
FAIL_ENV, CRASH_ENV, HANG_ENV, OOM_ENV = ("GPU_SUITE_FAIL_ROWS", "GPU_SUITE_CRASH_ROWS", "GPU_SUITE_HANG_ROWS",
                                          "GPU_SUITE_FAKE_OOM_ABOVE")
MEMORY_MARGIN = 0.92  # a candidate micro-batch whose estimate exceeds this share of device memory is not tried
TAIL = 1500  # characters of stderr kept in the JSONL record of a row that did not succeed


@dataclass(frozen=True)
class Row:
    """One row of the suite. On the GPU: ``experiment=<method>_c4_<size>`` (the paper's settings; full
    rank's preset with ``method=<method>`` where a method has none), ``data=embedded``, bf16 autocast,
    then ``overrides``. With ``--cpu``: llama_tiny with ``method=<method>`` (rank 8), then
    ``overrides`` and ``cpu_overrides``."""

    name: str
    group: str  # the summary's section (device, full, methods, refresh, data, memory, compile, or a new one)
    gpu_s: float  # expected seconds on an H100/H200-class GPU: the deadline's budget (see ROWS)
    kind: str = "bench"  # bench (lrpretrain bench) | device | data (the token stream alone)
    method: str = "full"
    size: str = ""  # 60m | 130m | 350m | 1b, or METHODS / MEMORY
    overrides: tuple[str, ...] = ()
    cpu_overrides: tuple[str, ...] = ()
    mb: int = 0  # micro-batch (= batch: one micro-batch per update); 0 with ``fit``
    fit: tuple[int, ...] = ()  # micro-batch candidates, largest first: the largest that fits
    warmup: int = 2
    steps: int = 3
    memory: bool = True  # measure peak memory (one more update, and the activations' bytes)
    cpu_memory: bool = False  # measure it in the --cpu dry run too (torch.profiler: ~2 s a row there)
    ref: str | None = None  # tokens/s is reported relative to this row (earlier or later: the summary has all)
    cap_s: float = 180.0  # killed past this
    cpu_s: float = 3.0  # expected seconds in the --cpu dry run (2 busy cores)
    seconds: float = 5.0  # data rows: seconds of streaming measured (1 with --cpu)
    note: str = ""
    kernel: str = ""  # kernel rows: benchmarks/kernel_bench.py's kernel (loss, sltrain, cola, adam8, adam_bf16)
    default: bool = True  # run without --rows; False: only when --rows names the row or its group


def _m(method: str, gpu_s: float, *overrides: str) -> Row:
    """A methods row: ``method`` at the methods size, micro-batch 64, against m_full."""
    name = "m_" + method + ("_8bit" if "method.state_bits=8" in overrides else "")
    return Row(name, "methods", gpu_s, method=method, size=METHODS, overrides=overrides, mb=64,
               ref=None if name == "m_full" else "m_full",
               cpu_memory=name in ("m_full", "m_galore"))


def _mem(method: str, recompute: str, per_layer: bool, gpu_s: float) -> Row:
    """A memory row at the memory size, micro-batch 32, against the same method without either."""
    name = f"mem_{method}_{'per_layer' if per_layer else recompute}"
    return Row(name, "memory", gpu_s, method=method, size=MEMORY, mb=32,
               overrides=(f"trainer.recompute={recompute}", f"trainer.per_layer_update={str(per_layer).lower()}"),
               ref=None if (recompute, per_layer) == ("none", False) else f"mem_{method}_none")


def _p(name: str, method: str, size: str, gpu_s: float, *overrides: str, ref: str | None = None, mb: int = 32) -> Row:
    """A pure-bf16 row (trainer.precision=pure_bf16: bf16 weights, no fp32 master copy), compared with
    ``ref``, its bf16-autocast twin where the suite has one."""
    return Row(name, "precision", gpu_s, method=method, size=size, mb=mb,
               overrides=(*overrides, "trainer.precision=pure_bf16"), ref=ref, cpu_s=4.0, cap_s=300.0)


def _k(kernel: str, gpu_s: float, note: str) -> Row:
    """A kernel row: benchmarks/kernel_bench.py, the kernel against its PyTorch reference at llama_1b shapes."""
    return Row(f"k_{kernel}", "kernels", gpu_s, kind="kernel", kernel=kernel, cap_s=180, cpu_s=12, note=note,
               default=False)


def _e(method: str, kernels: str, gpu_s: float) -> Row:
    """An end-to-end kernels row at the memory size (1b), micro-batch 32, trainer.kernels=torch|triton;
    the triton row against its torch twin."""
    return Row(f"e_{method}_{kernels}", "kernels", gpu_s, method=method, size=MEMORY, mb=32,
               overrides=(f"trainer.kernels={kernels}",), ref=f"e_{method}_torch" if kernels == "triton" else None,
               cap_s=240, cpu_s=6 if kernels == "torch" else 20, default=False)


def _n(method: str, gpu_s: float) -> Row:
    """A methods row of a method added after the first rows (``new_methods``, not in the default run): as
    :func:`_m`, against m_full."""
    return Row(f"m_{method}", "new_methods", gpu_s, method=method, size=METHODS, mb=64, ref="m_full", default=False)


def _q(method: str, size: str, gpu_s: float) -> Row:
    """A quantized-weights row (``quantized``, not in the default run): pure bf16 as the papers train, at
    the memory size (micro-batch 32, against p_full_1b_pure) or at LLaMA-7B's width with 2 layers
    (micro-batch 1 x 256 and per-layer updates as the 7B headlines, against p_full8pl_7b_2l_pure)."""
    if size == "7b":
        return Row(f"q_{method}_7b_2l", "quantized", gpu_s, method=method, size=size, mb=1, ref="p_full8pl_7b_2l_pure",
                   overrides=("model.n_layers=2", "trainer.per_layer_update=true", "trainer.precision=pure_bf16"),
                   cap_s=300, cpu_s=6, default=False)
    return Row(f"q_{method}_1b", "quantized", gpu_s, method=method, size=size, mb=32, ref="p_full_1b_pure",
               overrides=("trainer.precision=pure_bf16",), cap_s=300, cpu_s=6, default=False)


GALORE8_PL = ("method.state_bits=8", "trainer.per_layer_update=true")

# The rows, in the order they run: adding a row is adding an entry (a later issue's pure-bf16, quantised
# or Triton-kernel rows: a group of their own, or an existing one). ``gpu_s`` is what the deadline
# budgets for a row on an H100/H200-class GPU; until the first GPU run (whose summary lists every
# row's wall time beside its budget, to replace these with) the figures are derived, not measured:
# - a bench child starts in ~3 s: the fork (milliseconds), CUDA's context (1-1.5 s with lazy module
#   loading), composing the config (~0.3 s), opening the data stream (~0.5 s), the model built on
#   the meta device and initialised on the GPU (well under 1 s even for the 1.34B parameters of
#   llama_1b: nothing is built on the CPU), and its exit;
# - then 6.5 updates (2 warmup, 3 timed, 1 for memory, ~0.5 for the activation bytes' forward) at
#   flops_per_token x tokens / (35% of 989 TFLOP/s): full rank 0.10 s at 60m x 512, 0.25 s at
#   130m x 512, 0.39 s at 350m x 256, 0.73 s at 1b x 128 (full_*: 1-5 s); 0.1 s at 350m x 64
#   (methods: < 1 s); 0.18 s at 1b x 32 (memory rows: 1-2 s);
# - one-offs: the first update's CUDA/cuBLAS start-up (~0.5 s); a candidate micro-batch that runs out
#   of memory after all (+~4 s, budgeted on the three rows whose largest candidate is estimated
#   at ~120 GB); GaLore's and Fira's SVD of every target gradient at step 0 (168 cuSOLVER fp32 SVDs:
#   ~4 s at 350m, ~17-20 s at 1b: 96 of 2048^2 and 72 of 5461 x 2048, the least certain figure here), SST's SVD of the weights at build
#   (~4 s at 350m), bitsandbytes' start-up (~1 s); torch.compile of llama_1b's forward and backward
#   (24 blocks traced as one graph; inductor's kernels are compiled once per distinct kernel, in
#   parallel on the host's cores) with a cold cache: ~90 s;
# - the data rows: no CUDA, ~1 s of start-up and 5 s of streaming; the device row: CUDA's context,
#   nvidia-smi and 126 bf16 matmuls of 8192^3 (~0.2 s).
# Together 426 s, with the suite's own imports (~8 s) 434 s of the 450 s deadline (the rest is slack).
ROWS: tuple[Row, ...] = (
    Row("device", "device", 5, kind="device", cap_s=90, cpu_s=5,
        note="device, driver, versions, measured dense bf16 matmul peak"),
    Row("full_60m", "full", 6, size="60m", fit=(512, 256, 128), cap_s=240, cpu_memory=True),
    Row("full_130m", "full", 10, size="130m", fit=(512, 256, 128), cap_s=240),
    Row("full_350m", "full", 11, size="350m", fit=(256, 128, 64), cap_s=240),
    Row("full_1b", "full", 14, size="1b", fit=(128, 64, 32, 16), cap_s=240),
    _m("full", 5),
    _m("galore", 9),
    _m("galore", 10, "method.state_bits=8"),
    _m("fira", 9),
    _m("apollo_mini", 5),
    _m("frugal", 5),
    _m("galore_dct", 5),
    _m("lowrank", 5),
    _m("lora", 5),
    _m("relora", 5),
    _m("sltrain", 6),
    _m("sst", 9),
    _m("cola", 5),
    _m("cola_m", 5),
    _m("crnet", 5),
    # trainer.precision=pure_bf16 beside bf16 autocast: at 1B against the memory rows of the same config
    # (which run later: the ratio appears once both have run), and the 7B memory headline's shapes (GaLore
    # 8-bit + per-layer updates, micro-batch 1 x 256) with 2 layers, as measured on the CPU
    # (benchmarks/pure_bf16.py); full depth: `--rows` with the command in README "Measuring on a GPU"
    _p("p_full_1b_pure", "full", MEMORY, 6, ref="mem_full_none"),
    _p("p_galore_1b_pl_pure", "galore", MEMORY, 20, "trainer.per_layer_update=true", ref="mem_galore_per_layer"),
    _p("p_full8pl_7b_2l_pure", "full", "7b", 8, "model.n_layers=2", "optim.state_bits=8",
       "trainer.per_layer_update=true", mb=1),
    _p("p_galore8pl_7b_2l_pure", "galore", "7b", 10, "model.n_layers=2", *GALORE8_PL, mb=1),
    Row("galore_refresh", "refresh", 20, method="galore", size=METHODS, overrides=("method.update_proj_gap=1",),
        mb=64, warmup=1, steps=3, memory=False, cap_s=240, ref="m_galore",
        note="every update recomputes GaLore's projections (T = 1)"),
    Row("data_truncate", "data", 6, kind="data", size="350m", overrides=("data.mode=truncate",), mb=64, cap_s=60,
        cpu_s=2, note="token stream alone, on the CPU"),
    Row("data_pack", "data", 6, kind="data", size="350m", overrides=("data.mode=pack",), mb=64, cap_s=60, cpu_s=2,
        note="token stream alone, on the CPU"),
    _mem("full", "none", False, 5),
    _mem("full", "full", False, 6),
    _mem("full", "selective", False, 6),
    _mem("full", "none", True, 6),
    _mem("galore", "none", False, 22),
    _mem("galore", "full", False, 22),
    _mem("galore", "selective", False, 22),
    _mem("galore", "none", True, 22),
    Row("full_1b_compile", "compile", 100, size=MEMORY, overrides=("trainer.compile=true",),
        cpu_overrides=("trainer.compile_backend=aot_eager",), mb=32, cap_s=240, cpu_s=8, ref="mem_full_none"),
    # The fused kernels (lrpretrain/kernels, trainer.kernels): not in the default run, whose deadline the rows
    # above fill; `--rows device,kernels` runs them (README "Measuring on a GPU"). Budgets: the Triton kernels'
    # first launches compile (CoLA's two GEMMs autotune over 5 configurations each: the largest figures).
    _k("loss", 12, "LM head + cross-entropy: whole logits vs chunked PyTorch vs liger, 8192 tokens, vocab 32000"),
    _k("sltrain", 15, "SLTrain up projection 2048 -> 5461, r 512, delta 0.03: dense rebuild vs sparse Triton"),
    _k("cola", 25, "CoLA up projection 2048 -> 5461, r 512: PyTorch vs SiLU-epilogue GEMMs"),
    _k("adam8", 8, "AdamW step with 8-bit moments, 5461 x 2048 and 32000 x 2048: PyTorch vs one kernel a piece"),
    _k("adam_bf16", 8, "AdamW step of bf16 weights, stochastic rounding: PyTorch vs one kernel a piece"),
    _e("full", "torch", 6),
    _e("full", "triton", 8),
    _e("sltrain", "torch", 8),
    _e("sltrain", "triton", 14),
    _e("cola", "torch", 6),
    _e("cola", "triton", 25),
    # The methods added after the first rows (not in the default run either: `--rows
    # device,m_full,p_full_1b_pure,p_full8pl_7b_2l_pure,new_methods,quantized` runs them beside their
    # references). Budgets: LOST's SVD of every weight at build and GradNormLoRP's and DLRT's first
    # decompositions as GaLore's at 350m (~4 s); LoQT's first update step (every target's full gradient and
    # its SVD) and Q-GaLore's first refresh as GaLore's at 1b (~17-20 s); LR-QAT's scale search (100
    # quantisations of each weight) a few seconds at 1b.
    _n("lost", 10),
    _n("gradnorm_lorp", 9),
    _n("dlrt", 10),
    _n("loro", 6),
    _q("loqt", MEMORY, 25),
    _q("q_galore", MEMORY, 25),
    _q("lr_qat", MEMORY, 12),
    _q("loqt", "7b", 12),
    _q("q_galore", "7b", 12),
    _q("lr_qat", "7b", 8),
)

CPU_BASE = ["model=llama_tiny", "data=embedded", "data.seq_len=32", "trainer.device=cpu", "trainer.precision=fp32",
            "trainer.threads=1"]  # one thread: two stall on OpenMP barriers on a loaded 2-core machine
CPU_FIT, CPU_MB, CPU_DATA_MB = (8, 4), 4, 16
NO_RANK = ("full", "frugal", "apollo_mini")  # no rank key / keep their own in --cpu mode


def _mb(n: int) -> list[str]:
    return [f"trainer.micro_batch_size={n}", f"trainer.batch_size={n}"]


def preset(method: str, size: str) -> list[str]:
    """The paper's settings for ``method`` at ``size`` (ranks, scales) where a preset exists."""
    presets = {p.stem for p in (HERE.parent / "conf" / "experiment").glob("*.yaml")}
    exp = f"{method}_c4_{size}"
    return [*([f"experiment={exp}"] if exp in presets else [f"experiment=full_c4_{size}", f"method={method}"]),
            "data=embedded"]


def row_overrides(row: Row, cpu: bool, sizes: dict[str, str]) -> list[str]:
    """The row's Hydra overrides, its micro-batch included when fixed."""
    if row.kind in ("device", "kernel"):
        return []
    if cpu:
        spec = [*CPU_BASE, f"method={row.method}", *([] if row.method in NO_RANK else ["method.rank=8"])]
        mb = CPU_DATA_MB if row.kind == "data" else CPU_MB
        return [*spec, *row.overrides, *row.cpu_overrides, *([] if row.fit else _mb(mb))]
    spec = preset(row.method, sizes.get(row.size, row.size))
    return [*spec, *([] if row.kind == "data" else ["trainer.precision=bf16"]), *row.overrides,
            *(_mb(row.mb) if row.mb else [])]


def row_candidates(row: Row, cpu: bool) -> list[int]:
    return list(CPU_FIT if cpu and row.fit else row.fit)


def row_cost(row: Row, cpu: bool) -> float:
    return row.cpu_s if cpu else row.gpu_s


def select(rows: list[Row] | tuple[Row, ...], pattern: str | None) -> list[Row]:
    """Rows whose name or group matches one of the comma-separated fnmatch patterns; without a pattern
    the default rows (``Row.default``)."""
    if not pattern:
        return [r for r in rows if r.default]
    pats = [p.strip() for p in pattern.split(",") if p.strip()]
    return [r for r in rows if any(fnmatch.fnmatchcase(r.name, p) or fnmatch.fnmatchcase(r.group, p) for p in pats)]


# ---------------------------------------------------------------------------------------------- the jobs
# What a child runs: a job (a dict, so that --exec can hand it to a fresh interpreter as JSON).
# Imports of torch and lrpretrain happen here, in the child; after the suite's preload they are
# already in sys.modules (or fail again, with their traceback, in every row's record).
def run_job(job: dict) -> int:
    inject = job.get("inject")
    if inject == "crash":
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file in the results folder
        os.kill(os.getpid(), signal.SIGSEGV)
    if inject == "hang":  # a grandchild (as torch.compile's workers are) that the timeout must end too
        sleeper = subprocess.Popen(["sleep", "600"])
        print(f"injected hang ({HANG_ENV}): grandchild pid {sleeper.pid}", flush=True)
        time.sleep(3600)
    if inject == "fail" and job["kind"] != "bench":
        sys.exit(f"injected failure ({FAIL_ENV})")
    if job["kind"] == "device":
        job_device(Path(job["result"]), job["cpu"])
        return 0
    if job["kind"] == "data":
        job_data(Path(job["result"]), job["seconds"], job["overrides"])
        return 0
    if job["kind"] == "kernel":
        job_kernel(Path(job["result"]), job["kernel"], "tiny" if job["cpu"] else "1b")
        return 0
    return job_bench(job)


def job_bench(job: dict) -> int:
    """One micro-batch candidate (or a fixed row): the estimate first, where the row searches for the
    largest micro-batch that fits, then ``lrpretrain bench``."""
    from lrpretrain.cli.main import main as lrpretrain_main

    overrides = job["overrides"]
    if job.get("estimate"):
        record: dict = {"estimate_peak": None, "tried": True}
        try:
            from lrpretrain.estimate import estimate
            from lrpretrain.train import load_config

            record["estimate_peak"] = float(estimate(load_config(overrides)[0]).peak)
        except Exception as e:  # noqa: BLE001 - without an estimate the candidate is tried; bench says what is wrong
            print(f"gpu_suite: no estimate: {type(e).__name__}: {e}", file=sys.stderr)
        limit = job.get("memory_limit")
        record["tried"] = not (limit and record["estimate_peak"] and record["estimate_peak"] > limit)
        Path(job["estimate"]).write_text(json.dumps(record))
        if not record["tried"]:
            return 0
    if job.get("fake_oom"):
        sys.exit(f"torch.OutOfMemoryError: CUDA out of memory (injected by {OOM_ENV})")
    args = bench_args(job)
    print("$ lrpretrain " + " ".join(args), flush=True)
    return lrpretrain_main(args)


def bench_args(job: dict) -> list[str]:
    """``lrpretrain bench``'s arguments for a bench job."""
    extra = ["trainer.gpu_suite_injected_failure=1"] if job.get("inject") == "fail" else []
    return ["bench", *job["overrides"], *extra, "--warmup", str(job["warmup"]), "--steps", str(job["steps"]),
            "--json", job["result"], *([] if job["memory"] else ["--no-memory"]),
            *(["--peak-flops", repr(job["peak_flops"])] if job.get("peak_flops") else [])]


def job_device(out: Path, cpu: bool) -> None:
    """Device, driver and versions, and the measured dense bf16 matmul peak (best of several); on the
    CPU also the fp32 peak that the dry run's MFU is relative to."""
    import torch

    import lrpretrain

    probe = probe_imports(PRELOAD_PROBED)  # before anything here touches CUDA (see PRELOAD_PROBED)
    info: dict = {"preload_probe": probe, "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
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
        from lrpretrain.bench import cpu_peak_flops

        torch.set_num_threads(1)  # the dry run's rows run on one thread (CPU_BASE)
        dev = torch.device("cpu")
        info.update(device=f"CPU: {info['cpu']}", memory_bytes=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
                    nominal_bf16_flops=None, nominal_source="no datasheet figure for a CPU",
                    cpu_fp32_flops=cpu_peak_flops(), cpu_threads=torch.get_num_threads())
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


def job_kernel(out: Path, kernel: str, size: str) -> None:
    """A kernel against its reference (benchmarks/kernel_bench.py; on the CPU in Triton's interpreter)."""
    spec = importlib.util.spec_from_file_location("kernel_bench", HERE / "kernel_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out.write_text(json.dumps(bench.run(kernel, size), indent=1) + "\n")


def job_data(out: Path, seconds: float, overrides: list[str]) -> None:
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


# ---------------------------------------------------------------------------------------------- processes
# What the suite imports once, before the first fork: everything a row imports on its way to its first
# update (measured: torch, lrpretrain's CLI with bench/train/estimate, Hydra, omegaconf, and datasets
# with pandas and pyarrow, which the data pipeline imports on first use), but nothing that touches
# CUDA on import (bitsandbytes, imported by the 8-bit rows, stays in their children).
PRELOAD = ("torch", "lrpretrain.cli.main", "lrpretrain.bench", "lrpretrain.data", "hydra", "omegaconf", "datasets")
# Imported by every row as well (initialising a model built on the meta device goes through torch._refs,
# which wraps itself in torch._dynamo.disable: Dynamo, Inductor's config and triton, ~1 s), but whether
# that import leaves CUDA alone on a CUDA build cannot be checked without one: the device row's child
# imports them first and reports; the suite imports them only if CUDA stayed untouched there.
PRELOAD_PROBED = ("torch._dynamo",)


def libcuda_mapped() -> bool:
    """Whether the CUDA driver library is loaded in this process (cuInit needs it; torch and triton
    load it lazily, so that they import where there is no driver)."""
    try:
        return "libcuda.so" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def probe_imports(names: tuple[str, ...] | list[str]) -> dict:
    """Import ``names`` and say whether that initialised CUDA or loaded its driver."""
    import torch

    before = libcuda_mapped()
    for name in names:
        importlib.import_module(name)
    untouched = not torch.cuda.is_initialized() and (before or not libcuda_mapped())
    return {"modules": list(names), "cuda_untouched": untouched}


@dataclass
class Outcome:
    status: str  # ok | failed | oom | timeout
    returncode: int | None
    stderr: str
    wall_s: float
    detail: str = ""  # the signal that ended the child, where one did


def cuda_initialised() -> bool:
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_initialized())


class Children:
    """Runs each job in a child process of its own session: forked from this (preloaded) process, or a
    fresh interpreter (``exec_children``, and after CUDA was found initialised here)."""

    def __init__(self, out: Path, exec_children: bool):
        self.out, self.exec_children = out, exec_children
        self.pid: int | None = None
        self.preload_s = 0.0
        self.preload_error: str | None = None
        self.fallback: str | None = None  # why the rows run in fresh interpreters after all
        self.probed = "not preloaded: no device row"  # what became of PRELOAD_PROBED

    def preload(self) -> None:
        os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # (see the module docstring)
        if self.exec_children:
            return
        t = time.monotonic()
        try:
            for name in PRELOAD:
                importlib.import_module(name)
            from lrpretrain.train import load_config

            load_config(["data=embedded"])  # Hydra's first compose: plugin discovery, the search path
        except Exception as e:  # noqa: BLE001 - every row's child imports again and records what fails
            self.preload_error = f"{type(e).__name__}: {e}"
            print(f"gpu_suite: warning: preloading failed ({self.preload_error}); every row will say why",
                  file=sys.stderr)
        self.preload_s = time.monotonic() - t

    def preload_probed(self, probe: dict | None) -> None:
        """The second stage: PRELOAD_PROBED, once a child imported it without touching CUDA."""
        if self.exec_children or self.preload_error or not (probe and probe.get("cuda_untouched")):
            self.probed = "not preloaded: " + ("the device row did not report" if not probe else
                                               "importing it touched CUDA in the device row's child"
                                               if not probe.get("cuda_untouched") else "no preload")
            return
        t = time.monotonic()
        try:
            for name in probe["modules"]:
                importlib.import_module(name)
            self.probed = f"preloaded after the device row's check ({time.monotonic() - t:.1f} s)"
        except Exception as e:  # noqa: BLE001 - the rows import it themselves
            self.probed = f"not preloaded: {type(e).__name__}: {e}"
        self.preload_s += time.monotonic() - t

    def run(self, job: dict, timeout: float, log: Path, scratch: Path) -> Outcome:
        """Run ``job`` in a child; kill its process group after ``timeout`` seconds."""
        if not self.exec_children and cuda_initialised():  # (cannot happen by design: see the docstring)
            self.exec_children = True
            self.fallback = "CUDA was initialised in the suite's process, so forks could not use it"
            print(f"gpu_suite: warning: {self.fallback}; the remaining rows start fresh interpreters", file=sys.stderr)
        err_path, job_path = scratch / "stderr", scratch / "job.json"
        job_path.write_text(json.dumps(job))
        t = time.monotonic()
        with open(log, "a") as log_f, open(err_path, "w+") as err_f:
            sys.stdout.flush()
            sys.stderr.flush()
            with warnings.catch_warnings():  # Python 3.12 warns of forking with threads: torch's and
                warnings.simplefilter("ignore", DeprecationWarning)  # pyarrow's idle helpers (see above)
                pid = os.fork()
            if pid == 0:
                self._child(job, log_f.fileno(), err_f.fileno(), job_path)
            self.pid = pid
            try:
                timed_out = self._wait(pid, max(timeout, 1.0))
            finally:
                self.kill()  # whatever the row left running in its session
                _, wait_status = os.waitpid(pid, 0)
                self.pid = None
            rc = os.waitstatus_to_exitcode(wait_status)
            err_f.seek(0)
            err = err_f.read()
            log_f.write(err)
        detail = ""
        if rc < 0 and not timed_out:
            name = signal.Signals(-rc).name
            detail = f"killed by {name}" + (" (the host's out-of-memory killer sends SIGKILL)" if name == "SIGKILL"
                                            else "")
        status = ("timeout" if timed_out else "ok" if rc == 0 else "oom" if OOM.search(err) else "failed")
        return Outcome(status, rc, err, time.monotonic() - t, detail)

    def _child(self, job: dict, log_fd: int, err_fd: int, job_path: Path) -> None:
        rc = 1
        try:
            os.setsid()
            for s in (signal.SIGTERM, signal.SIGINT):
                signal.signal(s, signal.SIG_DFL)
            os.dup2(log_fd, 1)
            os.dup2(err_fd, 2)
            # Python's streams onto the new descriptors (whatever the parent had made of sys.stdout)
            sys.stdout = open(1, "w", buffering=1, closefd=False)
            sys.stderr = open(2, "w", buffering=1, closefd=False)
            # the results folder: not the checkout, whose lrpretrain/ would shadow the package that
            # gpu_suite.sh puts on PYTHONPATH (it maps conf/, kernels/, data_recipes/ as an install does)
            os.chdir(self.out)
            if self.exec_children:
                os.execv(sys.executable, [sys.executable, str(Path(__file__).resolve()), "--job", str(job_path)])
            rc = run_job(job)
        except SystemExit as e:
            if isinstance(e.code, int) or e.code is None:
                rc = e.code or 0
            else:
                print(e.code, file=sys.stderr)
        except BaseException:  # noqa: BLE001 - the child reports everything and exits
            traceback.print_exc()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:  # not sys.exit: the parent's exit handlers (its temporary folders) are not the child's
                os._exit(rc)

    @staticmethod
    def _wait(pid: int, timeout: float) -> bool:
        """Wait for the child to exit, without reaping it (so its pid, the process group's id, cannot be
        reused before the group is killed). Returns whether it timed out."""
        end = time.monotonic() + timeout
        while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            if time.monotonic() >= end:
                return True
            time.sleep(0.02)
        return False

    def kill(self) -> None:
        if self.pid is not None:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


# ---------------------------------------------------------------------------------------------- the suite
class Suite:
    def __init__(self, out: Path, deadline: float, rows: list[Row], cpu: bool, argv: list[str],
                 sizes: dict[str, str] | None = None, exec_children: bool = False):
        self.t0 = time.monotonic()
        self.out, self.deadline, self.rows, self.cpu, self.argv = out.resolve(), deadline, rows, cpu, argv
        self.sizes = sizes or {METHODS: "350m", MEMORY: "1b"}
        self.records: dict[str, dict] = {}
        self.device: dict | None = None
        (self.out / "logs").mkdir(parents=True, exist_ok=True)
        self.jsonl = self.out / "gpu_suite.jsonl"
        self.jsonl.write_text("")
        self.inject = {how: os.environ.get(env, "") for how, env in (("fail", FAIL_ENV), ("crash", CRASH_ENV),
                                                                    ("hang", HANG_ENV))}
        self.fake_oom = int(os.environ[OOM_ENV]) if os.environ.get(OOM_ENV) else None
        git = subprocess.run(["git", "-C", str(HERE.parent), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True)
        self.commit = git.stdout.strip() if git.returncode == 0 else "unknown (no git)"
        self.children = Children(self.out, exec_children)

    def left(self) -> float:
        return self.deadline - (time.monotonic() - self.t0)

    def injected(self, row: Row) -> str | None:
        return next((how for how, pat in self.inject.items() if pat and select([row], pat)), None)

    def job(self, row: Row, kind: str, scratch: Path, **kw) -> dict:
        return {"kind": kind, "result": str(scratch / "result.json"), "cpu": self.cpu, "inject": self.injected(row),
                **kw}

    def run_row(self, row: Row) -> dict:
        cost = row_cost(row, self.cpu)
        rec: dict = {"row": row.name, "group": row.group, "kind": row.kind,
                     "overrides": row_overrides(row, self.cpu, self.sizes), "note": row.note, "ref": row.ref,
                     "budget_s": cost}
        if not self.cpu and self.device is not None and not self.device.get("sm_count"):
            return {**rec, "status": "skipped: no CUDA device", "wall_s": 0.0,
                    "detail": "the device row found no CUDA device (--cpu runs the dry run)"}
        left = self.left()
        if left < cost:
            return {**rec, "status": "skipped: deadline", "wall_s": 0.0,
                    "detail": f"{left:.0f} s left, row expects {cost:.0f} s"}
        log = self.out / "logs" / f"{row.name}.log"
        log.write_text("")
        t = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="gpu-suite-") as tmp:
            scratch = Path(tmp)
            if row.kind == "bench":
                rec.update(self.run_bench(row, rec["overrides"], scratch, log))
            else:
                job = self.job(row, row.kind, scratch, overrides=rec["overrides"],
                               seconds=1.0 if self.cpu else row.seconds, kernel=row.kernel)
                res = self.children.run(job, min(row.cap_s, self.left()), log, scratch)
                rec.update(self.outcome(res, job))
        rec["wall_s"] = time.monotonic() - t
        if row.kind == "device" and rec["status"] == "ok":
            self.device = rec["result"]
            self.children.preload_probed(self.device.get("preload_probe"))
        return rec

    @staticmethod
    def outcome(res: Outcome, job: dict) -> dict:
        out: dict = {"status": res.status, "returncode": res.returncode}
        if job["kind"] == "bench":  # what reproduces the row (its JSON goes to a temporary file here)
            out["command"] = "lrpretrain " + " ".join(bench_args(job))
        if res.detail:
            out["detail"] = res.detail
        if res.status == "ok":
            out["result"] = json.loads(Path(job["result"]).read_text())
        else:
            out["stderr_tail"] = res.stderr[-TAIL:]
        return out

    def bench_job(self, row: Row, overrides: list[str], scratch: Path, mb: int | None) -> dict:
        peak = (self.device or {}).get("cpu_fp32_flops") if self.cpu else None
        limit = MEMORY_MARGIN * self.device["memory_bytes"] if self.device and mb is not None else None
        return self.job(row, "bench", scratch, overrides=overrides, warmup=1 if self.cpu else row.warmup,
                        steps=1 if self.cpu else row.steps, memory=row.cpu_memory if self.cpu else row.memory,
                        peak_flops=peak, estimate=str(scratch / "estimate.json") if mb is not None else None,
                        memory_limit=limit, fake_oom=self.fake_oom is not None and mb is not None and mb > self.fake_oom)

    def run_bench(self, row: Row, overrides: list[str], scratch: Path, log: Path) -> dict:
        candidates = row_candidates(row, self.cpu)
        if not candidates:
            job = self.bench_job(row, overrides, scratch, None)
            return self.outcome(self.children.run(job, min(row.cap_s, self.left()), log, scratch), job)
        attempts: list[dict] = []
        out: dict = {"attempts": attempts}
        t = time.monotonic()
        for mb in candidates:
            left = min(row.cap_s - (time.monotonic() - t), self.left())
            if left < 1:
                attempts.append({"micro_batch_size": mb, "status": "skipped: deadline"})
                break
            job = self.bench_job(row, [*overrides, *_mb(mb)], scratch, mb)
            Path(job["estimate"]).unlink(missing_ok=True)
            res = self.children.run(job, left, log, scratch)
            est = json.loads(Path(job["estimate"]).read_text()) if Path(job["estimate"]).exists() else {}
            a = {"micro_batch_size": mb, "estimate_peak": est.get("estimate_peak"), "status": res.status,
                 "wall_s": res.wall_s}
            if res.status == "ok" and not est.get("tried", True):
                attempts.append({**a, "status": "not tried: estimate above memory"})
                continue
            attempts.append(a)
            out.update(self.outcome(res, job))
            out.pop("stderr_tail" if res.status == "ok" else "result", None)
            if res.status != "oom":
                break  # success; or a crash or timeout, which a smaller micro-batch does not cure
        if "status" not in out:
            out.update(status="failed", stderr_tail="no candidate micro-batch fits by the estimate")
        return out

    def run(self) -> None:
        try:
            self.children.preload()
            for row in self.rows:
                rec = self.run_row(row)
                self.records[row.name] = rec
                with open(self.jsonl, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                print(f"[{time.monotonic() - self.t0:6.1f} s] {row.name:<22} {rec['status']}"
                      + (f" ({rec['wall_s']:.1f} s)" if rec.get("wall_s") else ""), flush=True)
                self.write_md()
        except KeyboardInterrupt:
            self.children.kill()
            print("interrupted: the summary holds the rows that finished", file=sys.stderr)
        finally:
            self.write_md(final=True)

    # ------------------------------------------------------------------------------------------ summary
    def write_md(self, final: bool = False) -> None:
        c = self.children
        how = ("fresh interpreters (--exec)" if c.exec_children and not c.fallback else
               f"fresh interpreters after all: {c.fallback}" if c.fallback else
               f"forks of the suite's process, which imported torch and lrpretrain once ({c.preload_s:.1f} s; "
               f"{', '.join(PRELOAD_PROBED)} {c.probed})"
               + (f"; preloading failed: {c.preload_error}" if c.preload_error else ""))
        (self.out / "gpu_suite.md").write_text(summary(self.records, self.rows, self.device, self.deadline,
                                                       time.monotonic() - self.t0, self.cpu, self.argv, final,
                                                       self.commit, how))


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
TITLES = {"full": "Full rank by size (largest micro-batch that fits among the candidates)",
          "methods": "Methods against full rank (same model, micro-batch and sequence length)",
          "refresh": "GaLore's projection refresh",
          "data": "Data stream alone (CPU: tokenize, truncate/pack, collate)",
          "memory": "Activation recomputation and per-layer updates",
          "compile": "torch.compile (trainer.compile=true)",
          "precision": "bf16 autocast vs pure bf16 (trainer.precision=pure_bf16; tokens/s vs the bf16 twin)",
          "kernels": "Fused kernels (trainer.kernels; lrpretrain/kernels): each against its PyTorch reference at llama_1b "
                     "shapes, then end to end at llama_1b with kernels off (torch) and on (triton)"}


def _table(head: list[str], lines: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(c) + " |" for c in lines)]


def summary(records: dict, rows: list[Row], device: dict | None, deadline: float, wall: float, cpu: bool,
            argv: list[str], final: bool, commit: str = "unknown", processes: str = "") -> str:
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
                  f"- host CPU: {d.get('cpu')}, {d.get('cores')} cores; lrpretrain from {d.get('lrpretrain_from')}"]
        if measured:
            lines.append(f"- dense bf16 matmul: measured {measured / 1e12:.3g} TFLOP/s ({d.get('matmul')}); nominal "
                         + (f"{nominal / 1e12:.0f} TFLOP/s ({d.get('nominal_source')}), measured/nominal "
                            f"{measured / nominal:.2f}" if nominal else f"– ({d.get('nominal_source')})"))
        if d.get("cpu_fp32_flops"):
            lines.append(f"- CPU fp32 matmul peak (the dry run's MFU denominator, lrpretrain bench --peak-flops): "
                         f"{d['cpu_fp32_flops'] / 1e9:.1f} GFLOP/s on {d.get('cpu_threads')} thread(s)")
    else:
        lines.append(f"- device: unknown (device row {_status(records.get('device'))})")
    lines += [f"- deadline {deadline:.0f} s, wall {wall:.0f} s" + ("" if final else " (still running)") + "; rows: "
              + ", ".join(f"{v} {k}" for k, v in counts.items()),
              *([f"- each row in its own process: {processes}"] if processes else []),
              "- data: the embedded corpus (Shakespeare) with its BPE, real token batches through the training "
              "pipeline",
              "- MFU (nominal): `lrpretrain bench`'s figure, against lrpretrain.bench.PEAK_FLOPS on CUDA (on the CPU "
              "against its measured fp32 matmul); MFU (measured peak): the same FLOP/s against the bf16 matmul above", ""]
    by_group: dict[str, list[Row]] = {}
    for r in rows:
        by_group.setdefault(r.group, []).append(r)
    for group, grows in by_group.items():
        if group == "device":
            continue
        lines += [f"## {TITLES.get(group, group)}", ""]
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
            kernel_rows = [r for r in grows if r.kind == "kernel"]
            if kernel_rows:
                lines += [*kernel_lines(kernel_rows, records), ""]
            grows = [r for r in grows if r.kind != "kernel"]
            cells = []
            for r in grows:
                rec = records.get(r.name) or {}
                res = rec.get("result") or {}
                what = [res.get("model", "–"), res.get("method", "–"),
                        f"{res['recompute']}{', per-layer' if res['per_layer_update'] else ''}"
                        f"{', ' + res['precision'] if res.get('precision', 'bf16') != 'bf16' else ''}" if res else "–"]
                extra = [_ratio(rec, records) if r.ref else "–"]
                if r.fit:
                    extra.append(", ".join(f"{a['micro_batch_size']}: {a['status'].split(':')[0]}"
                                           for a in rec.get("attempts", [])) or "–")
                cells.append([r.name, *what, *_bench_cells(rec, measured), *extra, _status(rec or None)])
            head = ["row", "model", "method", "recompute", *BENCH_HEAD, "tokens/s vs ref"]
            if any(r.fit for r in grows):
                head.append("micro-batches tried")
            lines += _table([*head, "status"], cells)
            if group == "refresh":
                lines += ["", galore_refresh_line(records), *first_update_lines(records)]
            refs = sorted({r.ref for r in grows if r.ref})
            if refs:
                lines += ["", f"Reference rows (tokens/s vs ref): {', '.join(refs)}."]
        lines.append("")
    lines += ["## Wall time per row", "",
              "Budget: the row's expected cost in the deadline (`Row.gpu_s`, with --cpu `Row.cpu_s`); a first GPU "
              "run's wall times are the figures to put there.", ""]
    cells = [[r.name, f"{records[r.name].get('budget_s', 0):.0f}" if r.name in records else "–",
              f"{records[r.name]['wall_s']:.1f}" if r.name in records else "–",
              records[r.name]["status"].split(":")[0] if r.name in records else "not run"] for r in rows]
    lines += _table(["row", "budget s", "wall s", "status"], cells)
    return "\n".join(lines) + "\n"


def kernel_lines(rows: list[Row], records: dict) -> list[str]:
    """One line per variant of each kernel row: time, speed-up over the reference, peak memory, bytes kept
    for the backward, largest difference from the reference."""
    cells = []
    for r in rows:
        rec = records.get(r.name)
        variants = ((rec or {}).get("result") or {}).get("variants") or {}
        if not variants:
            cells.append([r.name, "–", "–", "–", "–", "–", "–", _status(rec)])
            continue
        for name, v in variants.items():
            if not isinstance(v, dict):
                continue
            diff = v.get("max_rel_diff") or {}
            worst = max((x for x in diff.values() if x is not None), default=None)
            eq = v.get("weights_bitwise_equal")
            cells.append([r.name, name, f"{v['seconds'] * 1e3:.2f}", f"{v.get('speedup_vs_reference', 1.0):.2f}x",
                          _gib(v.get("peak_bytes")),
                          "–" if v.get("saved_bytes") is None else f"{v['saved_bytes'] / 2**20:.1f}",
                          "–" if worst is None else f"{worst:.1e}" + ("" if eq is None else f" ({100 * eq:.2f}% bit-equal)"),
                          _status(rec)])
    return _table(["row", "variant", "ms (median)", "vs reference", "peak GiB", "kept for backward MiB",
                   "max rel. diff vs reference", "status"], cells)


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


def first_update_lines(records: dict) -> list[str]:
    """The first warmup update of GaLore's rows (its step-0 SVDs, with one-off start-up work) against
    their median step: the refresh at the memory rows' size, where no T = 1 row runs."""
    out = []
    for name in ("m_galore", "mem_galore_none"):
        rec = records.get(name) or {}
        r = rec.get("result") or {}
        if rec.get("status") == "ok" and r.get("warmup_s"):
            out.append(f"- {name} ({r['model']}): first update {r['warmup_s'][0]:.3f} s (step-0 SVDs and start-up) "
                       f"vs median step {r['step_s']:.4f} s")
    return ["", "First updates:", *out] if out else []


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="results folder (gpu_suite.jsonl, gpu_suite.md, logs/)")
    ap.add_argument("--deadline", type=float, help="seconds for the whole suite (default 450; with --cpu 300)")
    ap.add_argument("--rows", help="comma-separated fnmatch patterns of row names or groups (default: all)")
    ap.add_argument("--cpu", action="store_true", help="every row at tiny sizes on the CPU (a dry run)")
    ap.add_argument("--methods-model", default="350m", choices=SIZES, help="size of the methods rows (default 350m)")
    ap.add_argument("--memory-model", default="1b", choices=SIZES,
                    help="size of the recompute / per-layer / compile rows (default 1b)")
    ap.add_argument("--exec", action="store_true", dest="exec_children",
                    help="start every row in a fresh interpreter instead of forking the preloaded suite (slower)")
    ap.add_argument("--list", action="store_true", help="print the rows and their expected costs, run nothing")
    ap.add_argument("--job", type=Path, help=argparse.SUPPRESS)  # a child started by --exec
    args = ap.parse_args()
    if args.job:
        return run_job(json.loads(args.job.read_text()))
    sizes = {METHODS: args.methods_model, MEMORY: args.memory_model}
    rows = select(ROWS, args.rows)
    if not rows:
        ap.error(f"--rows {args.rows!r} matches no row")
    if args.list:
        for r in rows:
            fit = row_candidates(r, args.cpu)
            print(f"{r.name:<22} {r.group:<8} expected {row_cost(r, args.cpu):4.0f} s  cap {r.cap_s:4.0f} s  "
                  f"{' '.join(row_overrides(r, args.cpu, sizes))}" + (f"  micro-batches {fit}" if fit else ""))
        print(f"sum of expected costs: {sum(row_cost(r, args.cpu) for r in rows):.0f} s")
        return 0
    if args.out is None:
        ap.error("--out DIR is required")
    if args.cpu:  # the kernel rows' Triton kernels run in Triton's interpreter, which must be chosen before import
        os.environ.setdefault("TRITON_INTERPRET", "1")
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    deadline = args.deadline if args.deadline is not None else (300.0 if args.cpu else 450.0)
    suite = Suite(args.out, deadline, rows, args.cpu, sys.argv[1:], sizes, args.exec_children)
    suite.run()
    print(f"wrote {args.out / 'gpu_suite.jsonl'} and {args.out / 'gpu_suite.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
