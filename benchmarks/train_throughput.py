"""Training throughput of a model x method x precision through the real trainer.

    python benchmarks/train_throughput.py --name llama_small_fp32 -- model=llama_small trainer.precision=fp32

Runs ``--warmup`` updates, then times ``--steps`` updates (data, forward, backward, clip, optimizer)
and writes ``benchmarks/results/<name>.json`` with the median and mean tokens/s, the command and the
machine. No evaluation or checkpoint is timed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", required=True, help="results file name")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("overrides", nargs="*", help="lrpretrain train overrides")
    args = ap.parse_args()

    from lrpretrain.train import build_trainer, load_config

    with tempfile.TemporaryDirectory() as tmp:
        overrides = [*args.overrides, f"run.dir={tmp}/run", "trainer.eval_at_start=false", "logging.progress=none",
                     f"trainer.max_steps={args.steps + args.warmup}"]
        cfg, resolved = load_config(overrides)
        trainer = build_trainer(cfg, resolved)
        times, tokens = [], []
        for i in range(args.warmup + args.steps):
            before = trainer.state.tokens
            t0 = time.perf_counter()
            trainer.train_step()
            if trainer.device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            if i >= args.warmup:
                times.append(dt)
                tokens.append(trainer.state.tokens - before)
        trainer.data.close()
        trainer.logger.close()
    per_step = tokens[0]
    result = {
        "name": args.name,
        "command": "python benchmarks/train_throughput.py " + " ".join(sys.argv[1:]),
        "model": cfg.model.name, "method": cfg.method.name, "precision": trainer.precision,
        "tokens_per_update": per_step, "steps_timed": args.steps,
        "median_step_s": statistics.median(times), "mean_step_s": statistics.fmean(times),
        "median_tokens_per_s": per_step / statistics.median(times),
        "mean_tokens_per_s": sum(tokens) / sum(times),
        "machine": machine(), "date": time.strftime("%Y-%m-%d"),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
