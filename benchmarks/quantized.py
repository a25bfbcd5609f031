"""The quantized-weight methods' memory: LoQT (``loqt``) and Q-GaLore (``q_galore``) at 7B, estimated and
measured on this CPU at 7B width.

    python benchmarks/quantized.py estimate   # LLaMA-7B, micro-batch 1 x 256: the papers' GPUs (24 GB, 16 GB)
    python benchmarks/quantized.py measure    # 7B-width shapes, 2 layers: measured peak vs the estimate

``estimate``: ``lrpretrain estimate`` of the 7B presets (pure bf16, micro-batch 1 x 256) with the papers'
single-GPU settings: LoQT with NF4 weights and projections, double quantisation, 8-bit Adam and
per-layer updates (its 7B memory claim: a 24 GB GPU); Q-GaLore with INT8 weights, INT4 bases, 8-bit
Adam and per-layer updates (scripts/single_gpu/llama_7b.sh: "Memory cost: 15.08 G"; abstract: 16 GB);
GaLore 8-bit per-layer beside them. Each row has its terms, and the update step's own work that the
peak includes (LoQT: the full gradient of the largest weight with its SVD at an update step; Q-GaLore:
the SVD of a refresh and a target's dequantized step).

``measure``: a model of LLaMA-7B's width (dim 4096, ffn 11008, vocab 32000, 32 heads; ``model=llama_7b
model.n_layers=2``), micro-batch 1 x 256, pure bf16, through ``lrpretrain bench`` (peak = the exact
bytes of parameters, buffers and optimizer states + the peak of CPU tensor allocations during one
update, torch.profiler's memory events). The measured update is each method's costliest: bench runs
updates 0 (timed), 1 (profiled) and 2 (measured), and the schedules put a LoQT update step (full
gradient, SVD, merge with error compensation) and a Q-GaLore refresh (SVD) at update 2. Within 10% of
the estimate for the same shapes, the 32-layer estimate is trusted.

Results: ``benchmarks/results/quantized_7b_estimate.{json,md}`` and
``benchmarks/results/quantized_7b_width_cpu.{json,md}`` with the machine and the load average (the CPU
is shared: timings are not the point here, memory is).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
MIB, GB, GiB = 2**20, 1e9, 2**30
ONE = ["trainer.micro_batch_size=1", "trainer.batch_size=1"]

# (label, overrides, the paper's GPU in GB)
ESTIMATES = [
    ("LoQT 7B: NF4 + double quant, NF4 P, r 1024, 8-bit Adam, per-layer (paper: a 24 GB GPU)",
     ["experiment=loqt_c4_7b", "trainer.per_layer_update=true", *ONE], 24.0),
    ("LoQT 7B: as above without per-layer updates",
     ["experiment=loqt_c4_7b", *ONE], 24.0),
    ("LoQT 7B: int8 weights, bf16 P, 8-bit Adam, per-layer",
     ["experiment=loqt_c4_7b", "trainer.per_layer_update=true", "method.quant_type=int8", "method.projection=bf16",
      *ONE], 24.0),
    ("Q-GaLore 7B: INT8 weights, INT4 bases, r 1024, 8-bit Adam, per-layer (script: 15.08 G; paper: 16 GB)",
     ["experiment=q_galore_c4_7b", "trainer.per_layer_update=true", *ONE], 16.0),
    ("Q-GaLore 7B: as above without per-layer updates",
     ["experiment=q_galore_c4_7b", *ONE], 16.0),
    ("GaLore 7B 8-bit per-layer, pure bf16 (reference row; script: 22.72 GB)",
     ["experiment=galore_c4_7b", "method.state_bits=8", "trainer.per_layer_update=true", "trainer.precision=pure_bf16",
      *ONE], 24.0),
]

sys.path.insert(0, str(Path(__file__).parent))
from pure_bf16 import WIDTH_7B, measure, measured_table  # noqa: E402  (same directory: the 7B-width shapes, one bench update a row)

MEASURE = {
    # update steps 0, 2, 5, ...: bench's measured update (index 2) takes W's full gradient and merges
    "loqt_nf4_8bit_per_layer": ["experiment=loqt_c4_7b", *WIDTH_7B, "trainer.per_layer_update=true",
                                "method.update_proj_gap=2"],
    # refreshes at 0, 2, 4, ...: the measured update refreshes every basis (SVD)
    "q_galore_per_layer": ["experiment=q_galore_c4_7b", *WIDTH_7B, "trainer.per_layer_update=true",
                           "method.update_proj_gap=2"],
}


def machine() -> dict:
    sys.path.insert(0, str(Path(__file__).parent))
    from train_throughput import machine as base_machine  # same directory

    return base_machine()


def run_estimates() -> dict:
    from lrpretrain.estimate import estimate
    from lrpretrain.methods import get_method
    from lrpretrain.train import load_config

    rows = []
    for label, overrides, gpu in ESTIMATES:
        cfg, _ = load_config(overrides)
        e = estimate(cfg)
        plugin = get_method(cfg.method.name)(cfg.method, cfg.model)
        tokens = cfg.trainer.micro_batch_size * cfg.data.seq_len
        method_temp = plugin.backward_temp_bytes(cfg.model, cfg.optim, e.precision, tokens, e.accumulation,
                                                 cfg.trainer.recompute, cfg.trainer.recompute_every)
        step_temp = plugin.step_temp_bytes(cfg.model, cfg.optim, e.precision)
        rows.append({"label": label, "overrides": overrides, "gpu_gb": gpu, "fits": e.peak <= gpu * GB,
                     "estimate": e.as_dict(), "method_backward_temp_bytes": method_temp,
                     "step_temp_bytes": step_temp})
        print(f"{label}: {e.peak / GB:.2f} GB ({e.peak / GiB:.2f} GiB), {'fits' if e.peak <= gpu * GB else 'does NOT fit'} "
              f"{gpu:g} GB", flush=True)
    return {"rows": rows}


def run_measure(names: list[str], command: str) -> dict:
    runs = measure(names, MEASURE)
    for r in runs.values():
        r["command"], r["measured_at"] = command, time.strftime("%Y-%m-%d %H:%M")
    return runs


def _gb(x: float) -> str:
    return f"{x / GB:.2f} GB"


def estimate_markdown(result: dict) -> str:
    lines = [f"### LoQT and Q-GaLore at 7B: lrpretrain estimate ({result['date']})", "",
             f"Command: `{result['command']}`. LLaMA-7B, micro-batch 1 x 256, trainer.precision=pure_bf16 (the "
             "presets'), GB = 10^9 bytes. The peak includes the costliest update's own work: LoQT's update step "
             "(the full gradient of the largest weight, 11008 x 4096, with its fp32 SVD, in the backward: "
             "`backward_temp_bytes`) and Q-GaLore's refresh (the SVD) and INT8 step (dequantized fp32 weight "
             "and gradient, GaLore's step, stochastic re-quantization: `step_temp_bytes`).", "",
             "| configuration | weights | optimizer states | gradients | activations | transients | peak | GPU | fits |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        e = r["estimate"]
        lines.append(f"| {r['label']} | {_gb(e['weights'])} | {_gb(e['optimizer_states'])} | {_gb(e['gradients'])} | "
                     f"{_gb(e['activations'])} | {_gb(e['transients'])} ({e['peak_at']}) | **{_gb(e['peak'])}** | "
                     f"{r['gpu_gb']:g} GB | {'yes' if r['fits'] else 'NO'} |")
    lines += ["", "Terms of the LoQT and Q-GaLore per-layer rows (weights: parameters in bf16 + buffers: the quantized "
              "codes with their absmax or scales and minima, LoQT's NF4 projections, RoPE):", ""]
    for r in result["rows"][:4:3]:
        e = r["estimate"]
        lines.append(f"- {r['label'].split(':')[0]}: {e['params'] / 1e6:,.0f} M parameters in bf16 "
                     f"({2 * e['params'] / GB:.2f} GB) + {e['quantized_params'] / 1e6:,.0f} M weights stored quantized "
                     f"(buffers: {(e['weights'] - 2 * e['params']) / GB:.2f} GB); the method's own work in the backward "
                     f"{r['method_backward_temp_bytes'] / GB:.2f} GB; the costliest single-parameter step "
                     f"{r['step_temp_bytes'] / GB:.2f} GB.")
    return "\n".join(lines) + "\n"


def measure_markdown(result: dict) -> str:
    lines = [f"### LoQT and Q-GaLore measured at 7B width on the CPU ({result['date']})", "",
             "Commands: " + "; ".join(f"`{r.get('command', result['command'])}` ({name}"
                                      + (f", {r['measured_at']})" if "measured_at" in r else ")")
                                      for name, r in result["runs"].items()) + ". "
             f"Machine: {result['machine'].get('cpu')}, "
             f"{result['machine'].get('cores')} cores (shared with other jobs: load average in the JSON). "
             "LLaMA-7B width with 2 layers, micro-batch 1 x 256, pure bf16; the measured update is each method's "
             "costliest (LoQT's update step, Q-GaLore's refresh). MiB.", "",
             *measured_table(result["runs"]), "",
             "The allocation trace (measured peak) cannot see LAPACK's SVD workspace, which LAPACK allocates "
             "itself (one SVD of 11008 x 4096: 277 MiB, `svd_workspace_cpu.md`). The resident set's growth "
             "during the update sees it, but also what the C allocator keeps after frees: an upper bound, far "
             "above the live peak for LoQT's update step."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["estimate", "measure"])
    ap.add_argument("--runs", nargs="*", default=list(MEASURE), choices=list(MEASURE))
    args = ap.parse_args()
    RESULTS.mkdir(exist_ok=True)
    command = "python benchmarks/quantized.py " + " ".join(sys.argv[1:])
    date = time.strftime("%Y-%m-%d")
    if args.what == "estimate":
        result = {"command": command, "date": date, **run_estimates()}
        (RESULTS / "quantized_7b_estimate.json").write_text(json.dumps(result, indent=1) + "\n")
        (RESULTS / "quantized_7b_estimate.md").write_text(estimate_markdown(result))
        print(estimate_markdown(result))
    else:
        old = RESULTS / "quantized_7b_width_cpu.json"  # rows measured earlier stay unless measured again
        runs = json.loads(old.read_text())["runs"] if old.exists() else {}
        runs.update(run_measure(args.runs, command))
        result = {"command": command, "date": date, "machine": machine(), "runs": {k: runs[k] for k in MEASURE if k in runs}}
        (RESULTS / "quantized_7b_width_cpu.json").write_text(json.dumps(result, indent=1) + "\n")
        (RESULTS / "quantized_7b_width_cpu.md").write_text(measure_markdown(result))
        print(measure_markdown(result))


if __name__ == "__main__":
    main()
