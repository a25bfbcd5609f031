"""Optimizer-step time and optimizer-state bytes of each optimizer-side method, vs AdamW.

    python benchmarks/optim_bench.py --name optim_llama60m_cpu --model llama_60m

Builds the model once on its real shapes with fixed random gradients (no data, no forward/backward),
builds each method's optimizer on it exactly as training does (``param_groups`` + ``build_optimizer``),
and measures:

- ``step_s``: median time of a steady optimizer step (no projection refresh), the optimizers taking
  turns (round robin) on one shared model so that all see the same load of the shared machine;
- ``refresh_step_s``: median time of a step that refreshes every subspace (SVD, DCT scores, new
  random projection or block choice), measured with ``update_proj_gap=1``;
- ``amortised_step_s`` = step_s + (refresh_step_s - step_s) / T, with the method's T (200 here);
- ``state_bytes``: bytes of every tensor in the optimizer state after the steps (what a checkpoint
  holds), next to ``analytic_state_bytes`` from ``method.cost``; ``cache_bytes``: matrices that are
  regenerated from a seed and kept in memory between refreshes (APOLLO, FRUGAL random), not saved.

Ratios are against full-rank AdamW with fp32 states. Writes ``benchmarks/results/<name>.json`` with the
command, the machine and the load average (timings on a shared machine are noisy).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_throughput import RESULTS, machine  # noqa: E402

METHODS = {
    "adamw": ["method=full"],
    "adamw_8bit": ["method=full", "optim.state_bits=8"],
    "galore": ["method=galore"],
    "galore_8bit": ["method=galore", "method.state_bits=8"],
    "fira": ["method=fira"],
    "apollo": ["method=apollo", "method.rank=128"],  # APOLLO's 60M script: rank 128
    "apollo_mini": ["method=apollo_mini"],
    "frugal_block": ["method=frugal"],
    "frugal_svd": ["method=frugal", "method.subspace=svd"],
    "galore_dct": ["method=galore_dct"],
}


def configure(model_name: str, overrides: list[str], gap: int | None):
    from lrpretrain.methods import get_method
    from lrpretrain.train import load_config

    extra = [f"method.update_proj_gap={gap}"] if gap else []
    cfg, _ = load_config([f"model={model_name}", *overrides, *extra])
    return cfg, get_method(cfg.method.name)(cfg.method, cfg.model)


def shared_model(model_name: str):
    """The model on its real shapes with fixed random gradients, shared by every optimizer."""
    from lrpretrain.model import build_model
    from lrpretrain.train import load_config

    cfg, _ = load_config([f"model={model_name}"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    return model


def round_robin(optimizers: dict, reps: int) -> dict[str, list[float]]:
    """Time one step of each optimizer in turn, ``reps`` times, rotating the order, so that every
    method sees the same machine load (the machine is shared)."""
    names = list(optimizers)
    times: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            t0 = time.perf_counter()
            optimizers[name].step()
            times[name].append(time.perf_counter() - t0)
    return times


def state_bytes(optimizer) -> int:
    return sum(t.numel() * t.element_size() for s in optimizer.state.values() for k, t in s.items()
               if isinstance(t, torch.Tensor) and k != "step")


def cache_bytes(optimizer) -> int:
    cache = getattr(getattr(optimizer, "basis", None), "_cache", {})
    return sum(t.numel() * t.element_size() for _, bases in cache.values() for t in bases if t is not None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", required=True)
    ap.add_argument("--model", default="llama_60m")
    ap.add_argument("--steps", type=int, default=5, help="timed steady steps per method")
    ap.add_argument("--refresh-steps", type=int, default=3, help="timed refresh steps per method")
    ap.add_argument("--methods", nargs="*", default=list(METHODS))
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; 1 by default: on an oversubscribed machine OpenMP barriers make "
                         "2-thread LAPACK calls ~100x slower (an SVD of 344x128: 280 ms vs 2 ms)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    load_before = os.getloadavg()
    model = shared_model(args.model)
    results: dict[str, dict] = {}
    # steady steps: every optimizer on the same weights and gradients (the weights drift; timing only)
    optimizers, gaps = {}, {}
    for name in args.methods:
        cfg, method = configure(args.model, METHODS[name], None)
        optimizers[name] = method.build_optimizer(method.param_groups(model, cfg.optim), cfg.optim)
        optimizers[name].step()  # builds the state and refreshes every subspace
        gaps[name] = getattr(cfg.method, "update_proj_gap", None)
        results[name] = {"overrides": METHODS[name], "state_bytes": state_bytes(optimizers[name]),
                         "analytic_state_bytes": method.cost(cfg.model, cfg.data.seq_len).get("optimizer_state_bytes"),
                         "cache_bytes": cache_bytes(optimizers[name])}
    for name, times in round_robin(optimizers, args.steps).items():
        results[name].update(step_s=statistics.median(times), step_min_s=min(times), steps_s=times)
    optimizers.clear()
    # refresh steps: update_proj_gap=1, so that every step recomputes every subspace
    refreshing = {}
    for name in args.methods:
        if gaps[name]:
            cfg, method = configure(args.model, METHODS[name], 1)
            refreshing[name] = method.build_optimizer(method.param_groups(model, cfg.optim), cfg.optim)
            refreshing[name].step()
    for name, times in round_robin(refreshing, args.refresh_steps).items():
        row, refresh = results[name], statistics.median(times)
        row.update(update_proj_gap=gaps[name], refresh_step_s=refresh, refresh_steps_s=times,
                   amortised_step_s=row["step_s"] + (refresh - row["step_s"]) / gaps[name])
    refreshing.clear()
    for name, row in results.items():
        print(f"{name:13s} step {row['step_s'] * 1e3:8.1f} ms  refresh {row.get('refresh_step_s', 0) * 1e3:9.1f} ms  "
              f"state {row['state_bytes'] / 2**20:8.1f} MiB  (analytic {(row['analytic_state_bytes'] or 0) / 2**20:8.1f})  "
              f"cache {row['cache_bytes'] / 2**20:6.1f} MiB", flush=True)
    base = results.get("adamw")
    if base:
        for row in results.values():
            row["state_ratio_vs_adamw"] = row["state_bytes"] / base["state_bytes"]
            row["step_overhead_vs_adamw"] = row.get("amortised_step_s", row["step_s"]) / base["step_s"] - 1
    out = {"command": "python " + " ".join(sys.argv), "model": args.model, "machine": machine(),
           "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "results": results}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{args.name}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
