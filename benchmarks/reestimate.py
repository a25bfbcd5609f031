"""Recompute the estimates beside recorded memory measurements, keeping the measurements.

    python benchmarks/reestimate.py benchmarks/results/quantized_7b_width_cpu.json ...

A 7B-width measurement (``pure_bf16.py measure``, ``quantized.py measure``, ``lr_qat.py measure``)
takes most of an hour of one-thread SVDs per row on this CPU, and what it measures (parameters,
buffers, optimizer states, the allocations of one update) does not change when only ``lrpretrain
estimate``'s model of the peak does. This rewrites each run's ``estimate`` and ``peak_ratio`` from
its recorded overrides on the current code (as ``lrpretrain bench`` computes it: the config's
precision and kernels resolved for the CPU; ``--set`` appends overrides, for a measurement whose
code had another default), notes when and at which commit, and rewrites the measured table of the
``.md`` beside the JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from lrpretrain.estimate import estimate
from lrpretrain.train import load_config

sys.path.insert(0, str(Path(__file__).parent))
from pure_bf16 import measured_table  # noqa: E402  (same directory: the table of measured runs)

TABLE_HEADER = "| run | measured peak (MiB)"


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def reestimate(path: Path, extra: list[str]) -> dict:
    record = json.loads(path.read_text())
    stamp = {"date": time.strftime("%Y-%m-%d %H:%M"), "commit": _commit()}
    for name, run in record["runs"].items():
        cfg, _ = load_config([*run["overrides"], *extra])
        e = estimate(cfg).as_dict()
        old = run["estimate"]["peak"]
        first = run.get("estimate_recomputed", {}).get("estimate_at_measurement", old)
        run["estimate"], run["peak_ratio"] = e, run["measured"]["peak_bytes"] / e["peak"]
        run["estimate_recomputed"] = {**stamp, "estimate_at_measurement": first, "extra_overrides": extra}
        print(f"{path.name} {name}: estimate {old / 2**20:,.0f} -> {e['peak'] / 2**20:,.0f} MiB ({e['peak_at']}), "
              f"measured {run['measured']['peak_bytes'] / 2**20:,.0f} MiB ({100 * (run['peak_ratio'] - 1):+.1f}%)")
    path.write_text(json.dumps(record, indent=1, default=str) + "\n")
    md = path.with_suffix(".md")
    if md.exists():
        lines = md.read_text().splitlines()
        start = next(i for i, x in enumerate(lines) if x.startswith(TABLE_HEADER))
        end = start
        while end < len(lines) and lines[end].startswith("|"):
            end += 1
        if lines[end:end + 1] == [""] and lines[end + 1:end + 2] and lines[end + 1].startswith("Estimates recomputed"):
            end += 2  # this script's note of an earlier run
        sets = "".join(f" --set {x}" for x in extra)
        note = (f"Estimates recomputed on {stamp['date']} at commit {stamp['commit']} "
                f"(`python benchmarks/reestimate.py {path.name}{sets}`); the measurements are those of the command above.")
        lines[start:end] = [*measured_table(record["runs"]), "", note]
        md.write_text("\n".join(lines) + "\n")
    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--set", action="append", default=[], metavar="OVERRIDE",
                    help="appended to every run's overrides: what the code of the measurement did by default and "
                         "today's does not (trainer.kernels=torch for runs measured before the fused loss)")
    args = ap.parse_args()
    for path in args.files:
        reestimate(path, args.set)


if __name__ == "__main__":
    main()
