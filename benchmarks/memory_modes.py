"""Memory and step time of activation recomputation and per-layer updates, through the real trainer.

    python benchmarks/memory_modes.py --name memory_modes_llama_small_cpu -- model=llama_small

Each configuration (``trainer.recompute`` x ``trainer.per_layer_update`` x ``trainer.per_layer_clip``)
runs in its own process: ``--warmup`` updates, then ``--steps`` timed updates; ``--rounds`` times, the
configurations taking turns in rotated order (the machine is shared: the step time is the median over
every timed update of every round). What is measured, on
the CPU, where there are no allocator statistics:

- ``step_s``: median time of an update;
- ``peak_rss_delta_mib``: peak resident memory during the timed updates (VmHWM, reset after the
  warmup) minus the resident memory between updates (weights, optimizer states, data), i.e. what an
  update adds: gradients, activations and temporaries. glibc's mmap threshold is pinned
  (``MALLOC_MMAP_THRESHOLD_``) so that freed tensors leave the resident set at once;
- ``peak_grad_mib``: the largest total of live ``.grad`` tensors as each gradient arrives (tensor
  hooks on the parameters);
- ``saved_activation_mib``: bytes that autograd's saved-tensor hooks see during one micro-batch's
  forward (unique storages, parameters excluded). Selective checkpointing keeps its saved op outputs
  outside those hooks, so no figure is given for it.

Writes ``benchmarks/results/<name>.json`` with the command, the machine and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_throughput import RESULTS, machine  # noqa: E402

CONFIGS = {
    "global": [],
    "global+full": ["trainer.recompute=full"],
    "global+selective": ["trainer.recompute=selective"],
    "per_layer(global clip)": ["trainer.per_layer_update=true"],
    "per_layer(param clip)": ["trainer.per_layer_update=true", "trainer.per_layer_clip=param"],
    "per_layer(global clip)+full": ["trainer.per_layer_update=true", "trainer.recompute=full"],
    "per_layer(global clip)+selective": ["trainer.per_layer_update=true", "trainer.recompute=selective"],
    "per_layer(param clip)+full": ["trainer.per_layer_update=true", "trainer.per_layer_clip=param",
                                   "trainer.recompute=full"],
}


def status_mib(key: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> None:
    """Reset VmHWM (the peak resident set) to the current resident set (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure_one(overrides: list[str], warmup: int, steps: int) -> dict:
    from lrpretrain.train import build_trainer, load_config

    with tempfile.TemporaryDirectory() as tmp:
        cfg, resolved = load_config([*overrides, f"run.dir={tmp}/run", "trainer.eval_at_start=false",
                                     "logging.progress=none", f"trainer.max_steps={warmup + steps}"])
        trainer = build_trainer(cfg, resolved)
        params = [p for p in trainer.model.parameters() if p.requires_grad]
        peak_grad = [0]

        def grad_bytes(p, g):  # a tensor hook runs as p's gradient arrives, before it is accumulated
            live = sum(q.grad.numel() * q.grad.element_size() for q in params if q.grad is not None)
            peak_grad[0] = max(peak_grad[0], live + (g.numel() * g.element_size() if p.grad is None else 0))

        hooks = [p.register_hook(lambda g, p=p: grad_bytes(p, g)) for p in params]
        times = []
        for i in range(warmup + steps):
            if i == warmup:  # optimizer states exist now; lazy one-time allocations are done
                reset_peak_rss()
                base = status_mib("VmRSS")
            t0 = time.perf_counter()
            trainer.train_step()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        peak = status_mib("VmHWM")
        for h in hooks:
            h.remove()
        saved = None
        if cfg.trainer.recompute in ("none", "full"):
            batch = next(trainer.data)
            weights = {p.untyped_storage().data_ptr() for p in trainer.model.parameters()}
            seen: dict[int, int] = {}

            def pack(t):
                ptr = t.untyped_storage().data_ptr()
                if ptr not in weights:
                    seen[ptr] = t.untyped_storage().nbytes()
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                trainer._loss(batch)
            saved = sum(seen.values()) / 2**20
        trainer.data.close()
        trainer.logger.close()
    return {"step_s": statistics.median(times), "steps_s": times, "peak_rss_delta_mib": peak - base,
            "peak_grad_mib": peak_grad[0] / 2**20, "saved_activation_mib": saved,
            "param_mib": sum(p.numel() * p.element_size() for p in params) / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", required=True)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2, help="runs of every configuration, in rotated order")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one configuration (JSON overrides)
    ap.add_argument("overrides", nargs="*", help="lrpretrain train overrides shared by every configuration")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure_one(json.loads(args.one), args.warmup, args.steps)))
        return
    load_before = os.getloadavg()
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    results: dict[str, dict] = {}
    names = list(CONFIGS)
    for r in range(args.rounds):  # configurations take turns (rotated each round) so all see the same load
        for name in names[r % len(names):] + names[:r % len(names)]:
            out = subprocess.run([sys.executable, __file__, "--name", args.name, "--steps", str(args.steps),
                                  "--warmup", str(args.warmup), "--one", json.dumps([*args.overrides, *CONFIGS[name]])],
                                 env=env, capture_output=True, text=True, check=True)
            one = json.loads(out.stdout.strip().splitlines()[-1])
            kept = results.setdefault(name, {**one, "steps_s": [], "peak_rss_delta_mib_rounds": []})
            kept["steps_s"] += one["steps_s"]
            kept["peak_rss_delta_mib_rounds"].append(one["peak_rss_delta_mib"])
    for name, res in results.items():
        res["step_s"] = statistics.median(res["steps_s"])
        res["peak_rss_delta_mib"] = statistics.median(res["peak_rss_delta_mib_rounds"])
        print(f"{name:36s} {res['step_s']:.3f} s  peak +{res['peak_rss_delta_mib']:.0f} MiB  "
              f"grads {res['peak_grad_mib']:.1f} MiB  saved {res['saved_activation_mib']}", flush=True)
    result = {"name": args.name, "command": "python benchmarks/memory_modes.py " + " ".join(sys.argv[1:]),
              "overrides": args.overrides, "configs": {k: v for k, v in CONFIGS.items()}, "results": results,
              "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "machine": machine(),
              "date": time.strftime("%Y-%m-%d")}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
