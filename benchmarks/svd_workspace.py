"""What one fp32 SVD costs in memory on the CPU, seen by torch's allocation trace and by the resident set.

    python benchmarks/svd_workspace.py [--shapes 11008x4096 4096x11008 4096x4096 8192x2048]

``lrpretrain bench`` measures a CPU update's peak from torch.profiler's memory events: every tensor
allocation. ``torch.linalg.svd(A, full_matrices=False)`` allocates, as tensors, a column-major copy of
A (LAPACK overwrites its input) and U, S, Vh; gesdd's workspace is allocated by LAPACK itself and is not
in the trace. Each shape runs in a fresh process, one thread: the resident set's high-water mark over
the SVD, above the resident set before it (A already resident), against the trace's peak over the same
call, and against ``lrpretrain.optim.memory.svd_temp_bytes`` (what ``estimate`` counts: the copy,
U, S, Vh and 3k² + 4k values of workspace, k = min(m, n)). Large blocks come from mmap and go back to
the system when freed, so for tensors of this size the resident set is the memory in use.

Results: ``benchmarks/results/svd_workspace_cpu.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
MIB = 2**20

CHILD = r"""
import json, sys, torch
from lrpretrain.bench import AllocationPeak, _reset_peak_rss, _status_kib  # bench's own RSS readings
from lrpretrain.optim.memory import svd_temp_bytes
torch.set_num_threads(1)
m, n = int(sys.argv[1]), int(sys.argv[2])
torch.linalg.svd(torch.randn(64, 16), full_matrices=False)  # LAPACK loaded, the profiler's first use below
A = torch.randn(m, n)
with AllocationPeak() as trace:
    torch.linalg.svd(torch.randn(16, 8), full_matrices=False)
    assert _reset_peak_rss(), "cannot reset the resident set's high-water mark (/proc/self/clear_refs)"
    before = 1024 * _status_kib("VmRSS")
    with trace.measure():
        U, S, Vh = torch.linalg.svd(A, full_matrices=False)
        del U, S, Vh
    hwm = 1024 * _status_kib("VmHWM")
print(json.dumps({"shape": [m, n], "rss_growth": hwm - before, "trace_peak": trace.peak,
                  "estimate": svd_temp_bytes((m, n))}))
"""


def measure(shape: tuple[int, int]) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(shape[0]), str(shape[1])], capture_output=True, text=True,
                         check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    m, n = shape
    k = min(m, n)
    r["outputs_and_copy"] = 4.0 * (m * n + m * k + k + k * n)
    r["workspace"] = r["rss_growth"] - r["trace_peak"]  # what the trace does not see
    r["workspace_per_k2"] = r["workspace"] / (4.0 * k * k)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["11008x4096", "4096x11008", "4096x4096", "8192x2048"])
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from train_throughput import machine  # same directory

    rows = [measure(tuple(int(x) for x in s.split("x"))) for s in args.shapes]
    command = "python benchmarks/svd_workspace.py " + " ".join(sys.argv[1:])
    record = {"command": command.strip(), "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(), "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "svd_workspace_cpu.json").write_text(json.dumps(record, indent=1) + "\n")
    md = [f"# One fp32 SVD's memory on the CPU (`{record['command']}`, {record['date']}, "
          f"{record['machine'].get('cpu')}, torch {record['machine'].get('torch')}, one thread)", "",
          "| m x n | trace peak (MiB): copy + U, S, Vh | resident-set growth (MiB) | LAPACK workspace, not in the "
          "trace (MiB) | workspace / k² floats | estimate's `svd_temp_bytes` (MiB) |", "|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['shape'][0]} x {r['shape'][1]} | {r['trace_peak'] / MIB:,.0f} | {r['rss_growth'] / MIB:,.0f} | "
                  f"{r['workspace'] / MIB:,.0f} | {r['workspace_per_k2']:.1f} | {r['estimate'] / MIB:,.0f} |")
    (RESULTS / "svd_workspace_cpu.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
