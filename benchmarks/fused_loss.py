"""The chunked LM-head loss (``trainer.kernels``, lrpretrain/kernels/head_loss.py) measured on this CPU:
peak memory of one update against the loss from the whole logits, beside ``lrpretrain estimate``.

    python benchmarks/fused_loss.py                   # llama_60m, 16 x 256 tokens, fp32
    python benchmarks/fused_loss.py --model llama_small --micro-batch 8

Each configuration runs through ``lrpretrain bench`` (built as ``train`` builds it; 1 warmup update,
1 timed, 1 measured for memory): the peak is the exact bytes of parameters, buffers and optimizer
states plus the peak of CPU tensor allocations during the measured update (torch.profiler's memory
events), with the activations autograd keeps (saved-tensor hooks). ``trainer.kernels=torch`` computes
the loss from the whole logits (tokens x 32000 fp32 values, their log-softmax and their gradient);
``trainer.kernels=auto`` on the CPU is the chunked loss. The estimate is computed for the same
configuration and kernels. Results: ``benchmarks/results/fused_loss_<model>_cpu.{json,md}``, with the
machine and its load (step times on this shared 2-core machine are indicative only; memory is not
affected by the load).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
MIB = 2**20


def machine() -> dict:
    sys.path.insert(0, str(Path(__file__).parent))
    from train_throughput import machine as base_machine  # same directory

    return base_machine()


def measure(model: str, micro_batch: int, seq_len: int, threads: int) -> dict:
    from lrpretrain.bench import bench

    base = [f"model={model}", "data=embedded", f"data.seq_len={seq_len}", f"trainer.micro_batch_size={micro_batch}",
            f"trainer.batch_size={micro_batch}", "trainer.precision=fp32", f"trainer.threads={threads}"]
    out = {}
    for name, kernels in (("whole logits (trainer.kernels=torch)", "torch"), ("chunked (trainer.kernels=auto)", "auto")):
        load0 = os.getloadavg()
        t0 = time.perf_counter()
        r = bench([*base, f"trainer.kernels={kernels}"], warmup=1, steps=1)
        e = r["estimate"]
        out[kernels] = {"name": name, "overrides": [*base, f"trainer.kernels={kernels}"], "kernels": r["kernels"],
                        "wall_s": time.perf_counter() - t0, "loadavg": [load0, os.getloadavg()],
                        "measured": {k: r.get(k) for k in ("peak_bytes", "param_bytes", "buffer_bytes",
                                                            "optimizer_state_bytes", "peak_grad_bytes",
                                                            "activation_bytes", "other_at_peak", "step_s", "loss")},
                        "estimate": {k: e[k] for k in ("peak", "peak_at", "activations", "transients", "gradients",
                                                       "weights", "optimizer_states")}}
        print(f"{name}: measured peak {r['peak_bytes'] / MIB:,.0f} MiB, estimate {e['peak'] / MIB:,.0f} MiB "
              f"({100 * (r['peak_bytes'] / e['peak'] - 1):+.1f}%), step {r['step_s']:.2f} s", flush=True)
    out["threads"] = threads
    full, chunked = out["torch"], out["auto"]
    out["saving"] = {
        "measured_bytes": full["measured"]["peak_bytes"] - chunked["measured"]["peak_bytes"],
        "estimated_bytes": full["estimate"]["peak"] - chunked["estimate"]["peak"],
        "measured_ratio": chunked["measured"]["peak_bytes"] / full["measured"]["peak_bytes"],
        "logits_bytes": micro_batch * seq_len * 32000 * 4,
    }
    return out


def write(data: dict, command: str, model: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    loads = [la for key in ("torch", "auto") for pair in data[key]["loadavg"] for la in pair[:1]]
    record = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": {**machine(), "torch_threads": data["threads"], "loadavg_1min": loads,
                          "note": f"shared machine, loaded by other jobs (1-min load average {min(loads):.1f}-"
                                  f"{max(loads):.1f} on {os.cpu_count()} cores): step times are indicative only; "
                                  "the memory figures do not depend on the load"}, **data}
    stem = RESULTS / f"fused_loss_{model}_cpu"
    stem.with_suffix(".json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    s = data["saving"]
    md = [f"# The chunked LM-head loss: peak memory of one update ({model}, CPU)", "",
          f"`{command}` — {record['date']}, {record['machine'].get('cpu')}, "
          f"{data['threads']} torch thread(s) (trainer.threads). Machine: {record['machine']['note']}.", "",
          "| loss | measured peak (MiB) | estimate (MiB) | est./meas. | activations kept, measured / estimated (MiB) "
          "| peak at (estimate) | step s | loss |", "|---|---|---|---|---|---|---|---|"]
    for key in ("torch", "auto"):
        r = data[key]
        m, e = r["measured"], r["estimate"]
        md.append(f"| {r['name']} | {m['peak_bytes'] / MIB:,.0f} | {e['peak'] / MIB:,.0f} | "
                  f"{e['peak'] / m['peak_bytes']:.3f} | {m['activation_bytes'] / MIB:,.0f} / {e['activations'] / MIB:,.0f} | "
                  f"{e['peak_at']} | {m['step_s']:.2f} | {m['loss']:.4f} |")
    md += ["", f"Saving: measured {s['measured_bytes'] / MIB:,.0f} MiB ({100 * (1 - s['measured_ratio']):.1f}% of the "
               f"peak), estimated {s['estimated_bytes'] / MIB:,.0f} MiB; one fp32 copy of the logits is "
               f"{s['logits_bytes'] / MIB:,.0f} MiB."]
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama_60m")
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1, help="trainer.threads (2 OpenMP threads stall on a loaded 2-core machine)")
    args = ap.parse_args()
    command = "python benchmarks/fused_loss.py " + " ".join(sys.argv[1:])
    write(measure(args.model, args.micro_batch, args.seq_len, args.threads), command, args.model)


if __name__ == "__main__":
    main()
