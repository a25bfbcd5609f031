"""A grid of ``lrpretrain bench`` runs: model x method x recompute x per-layer updates x precision.

    python benchmarks/step_bench.py --name steps_llama_small_cpu --models llama_small \\
        --methods full galore cola cola_m crnet --recompute none full method --per-layer false true \\
        --set galore:method.rank=64 cola:method.rank=64 --rounds 2 -- trainer.threads=1 trainer.batch_size=4

Every cell runs in its own process (``lrpretrain bench --json``), the cells taking turns round after
round in rotated order so that all see the same machine load; the step time of a cell is the median
over all its timed updates, its memory figures are from its first round (they repeat exactly on the
CPU). Combinations the run refuses (``recompute=method`` for a method without a policy, ``full`` for
CR-Net) are skipped, not errors. ``recompute=method`` is shown as the method's own policy; for
``cola_m`` (always segmented) ``none`` is already its policy.

Writes ``benchmarks/results/<name>.json`` (every measurement, the estimate of each cell, the command,
the machine and the load average before and after) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def cell_overrides(model: str, method: str, recompute: str, per_layer: bool, precision: str) -> list[str]:
    return [f"model={model}", f"method={method}", f"trainer.recompute={recompute}",
            f"trainer.per_layer_update={str(per_layer).lower()}", f"trainer.precision={precision}"]


def run_cell(overrides: list[str], warmup: int, steps: int, memory: bool = True) -> dict | None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        proc = subprocess.run([sys.executable, "-m", "lrpretrain.cli.main", "bench", *overrides, "--warmup", str(warmup),
                               "--steps", str(steps), "--json", str(out), *([] if memory else ["--no-memory"])],
                              capture_output=True, text=True)
        if proc.returncode == 2:  # a combination the config refuses
            return {"refused": proc.stderr.strip().splitlines()[-1]}
        if proc.returncode != 0:
            raise RuntimeError(f"bench failed for {overrides}:\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def mib(x) -> str:
    return "–" if x is None else f"{x / 2**20:.1f}"


def table(cells: dict[str, dict]) -> str:
    head = ("| model | method | recompute | per-layer | step s (median) | tokens/s | MFU | peak MiB (measured) | "
            "peak MiB (estimate) | est/meas | params+buf MiB | opt states MiB | grads MiB (peak) | saved act. MiB |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in cells.values():
        if "refused" in r:
            continue
        e = r["estimate"]
        mfu = "–" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        row = (f"| {r['model']} | {r['method']} | {r['recompute']} | {'on' if r['per_layer_update'] else 'off'} | "
               f"{r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | {mfu} | ")
        if "peak_bytes" not in r:  # timing only
            rows.append(row + f"– | {mib(e['peak'])} | – | – | – | – | – |")
            continue
        rows.append(row + f"{mib(r['peak_bytes'])} | {mib(e['peak'])} | {e['peak'] / r['peak_bytes']:.3f} | "
                    f"{mib(r['param_bytes'] + r['buffer_bytes'])} | {mib(r['optimizer_state_bytes'])} | "
                    f"{mib(r['peak_grad_bytes'])} | {mib(r['activation_bytes'])} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", required=True)
    ap.add_argument("--models", nargs="+", default=["llama_small"])
    ap.add_argument("--methods", nargs="+", default=["full", "galore", "cola", "cola_m", "crnet"])
    ap.add_argument("--recompute", nargs="+", default=["none", "full", "method"])
    ap.add_argument("--per-layer", nargs="+", default=["false", "true"])
    ap.add_argument("--precision", nargs="+", default=["fp32"])
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-memory", action="store_true", help="time only (no memory measurement)")
    ap.add_argument("--set", nargs="*", default=[], metavar="METHOD:KEY=VALUE",
                    help="an override for one method's cells only, e.g. galore:method.rank=64")
    ap.add_argument("overrides", nargs="*", help="lrpretrain overrides shared by every cell")
    args = ap.parse_args()

    grid = list(itertools.product(args.models, args.methods, args.recompute,
                                  [p.lower() == "true" for p in args.per_layer], args.precision))
    load_before = os.getloadavg()
    cells: dict[str, dict] = {}
    loads: list[tuple[float, float, float]] = []
    for rnd in range(args.rounds):
        order = grid[rnd % len(grid):] + grid[:rnd % len(grid)]
        for cell in order:
            key = "|".join(map(str, cell))
            if key in cells and "refused" in cells[key]:
                continue
            loads.append(os.getloadavg())
            own = [s.split(":", 1)[1] for s in args.set if s.split(":", 1)[0] == cell[1]]
            r = run_cell([*cell_overrides(*cell), *args.overrides, *own], args.warmup, args.steps, not args.no_memory)
            if key not in cells:
                cells[key] = r
            elif "refused" not in r:
                cells[key]["steps_s"] += r["steps_s"]
                cells[key]["round_medians"] = cells[key].get("round_medians", [cells[key]["step_s"]]) + [r["step_s"]]
            print(key, "refused" if "refused" in r else f"{r['step_s']:.3f} s", flush=True)
    ok = [r for r in cells.values() if "refused" not in r]
    # On the CPU each cell measured the matmul peak under its own load: the best of them is the closest to
    # the machine's peak, and one figure for the whole grid keeps the MFUs comparable.
    measured = [r["peak_flops"] for r in ok if r["peak_flops"] and r["peak_flops_source"].startswith("measured")]
    for r in ok:
        r["step_s"] = statistics.median(r["steps_s"])
        r["tokens_per_s"] = r["batch_size"] * r["seq_len"] / r["step_s"]
        if measured:
            r["cell_peak_flops"], r["peak_flops"] = r["peak_flops"], max(measured)
        r["mfu"] = r["flops_per_token"] * r["tokens_per_s"] / r["peak_flops"] if r["peak_flops"] else None
    from lrpretrain.bench import machine

    result = {"name": args.name, "command": "python benchmarks/step_bench.py " + " ".join(sys.argv[1:]),
              "cells": cells, "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
              "loadavg_per_cell": loads, "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(table(cells))
    print(f"load average before {load_before}, after {result['loadavg_after']}")


if __name__ == "__main__":
    main()
