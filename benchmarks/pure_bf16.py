"""trainer.precision=pure_bf16 measured on this machine: memory against ``lrpretrain estimate`` at 7B
width, and quality against fp32.

    python benchmarks/pure_bf16.py measure   # 7B-width shapes, 2 layers: measured peak vs the estimate
    python benchmarks/pure_bf16.py quality   # llama_tiny on the embedded corpus: fp32 vs the three roundings
    python benchmarks/pure_bf16.py accum     # pure bf16 with bf16 gradient accumulation vs one micro-batch

``measure``: a model of LLaMA-7B's width (dim 4096, ffn 11008, vocab 32000, 32 heads; ``model=llama_7b
model.n_layers=2``), micro-batch 1 x 256, one measured update through ``lrpretrain bench`` (peak = the
exact bytes of parameters, buffers and optimizer states + the peak of CPU tensor allocations during
the update, torch.profiler's memory events), for full-rank AdamW and for GaLore (r 1024, 8-bit states,
per-layer updates), both in pure bf16: within 10% of the estimate for the same shapes, the 32-layer
estimate (benchmarks/estimate_headlines.py) is trusted.

``quality``: the same seed, data order and token budget in fp32 and in pure bf16 with each rounding rule
(``trainer.bf16_update``); final training loss (mean of the last 20 updates) and validation loss.

``accum``: under pure bf16 the gradients of micro-batches accumulate in bf16 (autograd adds each
micro-batch's gradient into the parameter's bf16 ``.grad``). The same updates with 1 micro-batch and
with 4 show what that costs in loss; its memory is 2 bytes per parameter (fp32 accumulation would be 4).

Results: ``benchmarks/results/pure_bf16_<what>_cpu.{json,md}`` with the machine and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
MIB, GB = 2**20, 1e9

WIDTH_7B = ["model=llama_7b", "model.n_layers=2", "data=embedded", "data.seq_len=256", "trainer.micro_batch_size=1",
            "trainer.batch_size=1", "trainer.precision=pure_bf16", "trainer.threads=1"]  # 2: OpenMP stalls under load
MEASURE = {
    "full": ["experiment=full_c4_7b", *WIDTH_7B],
    # update_proj_gap=2: the measured update (bench's third) refreshes the bases, GaLore's costliest step,
    # which the estimate takes as the peak
    "galore_8bit_per_layer": ["experiment=galore_c4_7b", *WIDTH_7B, "method.state_bits=8",
                              "trainer.per_layer_update=true", "method.update_proj_gap=2"],
}
TINY = ["model=llama_tiny", "data.seq_len=128", "trainer.threads=1", "trainer.eval_at_start=false",
        "trainer.ckpt_every=0", "logging.progress=none", "optim.lr=0.003", "optim.warmup_steps=30",
        "data.val_tokens=65536", "seed=0"]


def machine() -> dict:
    sys.path.insert(0, str(Path(__file__).parent))
    from train_throughput import machine as base_machine  # same directory

    return base_machine()


def measure(names: list[str], table: dict[str, list[str]] | None = None, command: str | None = None) -> dict:
    """One ``lrpretrain bench`` update per name (overrides from ``table``, default :data:`MEASURE`):
    measured memory beside the estimate (benchmarks/quantized.py measures its rows with it too). With
    ``command`` (this script's own rows) each run is written as soon as it finishes, beside the runs an
    earlier command measured: a 7B-width GaLore update takes most of an hour here (one-thread SVDs)."""
    from lrpretrain.bench import bench

    table = MEASURE if table is None else table
    old = RESULTS / "pure_bf16_measure_cpu.json"
    out = json.loads(old.read_text())["runs"] if command and old.exists() else {}
    for name in names:
        load0 = os.getloadavg()
        t0 = time.perf_counter()
        r = bench(table[name], warmup=0, steps=1)
        e = r["estimate"]
        out[name] = {"overrides": table[name], "wall_s": time.perf_counter() - t0, "loadavg": [load0, os.getloadavg()],
                     "measured": {k: r.get(k) for k in ("peak_bytes", "param_bytes", "buffer_bytes",
                                                         "optimizer_state_bytes", "peak_grad_bytes", "activation_bytes",
                                                         "other_at_peak", "rss_peak_delta", "step_s")},
                     "estimate": e, "peak_ratio": r["peak_bytes"] / e["peak"]}
        print(f"{name}: measured peak {r['peak_bytes'] / MIB:,.0f} MiB, estimate {e['peak'] / MIB:,.0f} MiB "
              f"({100 * (r['peak_bytes'] / e['peak'] - 1):+.1f}%)", flush=True)
        if command:
            write("measure", {"runs": out}, command)
    return out


def measured_table(runs: dict) -> list[str]:
    """The markdown rows of measured runs (:func:`measure`'s records) beside their estimates, term by term
    (also benchmarks/quantized.py's and benchmarks/lr_qat.py's)."""
    out = ["| run | measured peak (MiB) | estimate (MiB) | difference | measured weights / states / grads / "
           "activations (MiB) | estimate's weights / states / grads / activations (MiB) | weights + states + resident "
           "set growth in the update (MiB), vs the estimate | step (s) |",
           "|---|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        m, e = r["measured"], r["estimate"]
        rss = "–"  # not recorded before 2026-12-05
        if m.get("rss_peak_delta") is not None:
            resident = m["param_bytes"] + m["buffer_bytes"] + m["optimizer_state_bytes"] + m["rss_peak_delta"]
            rss = f"{resident / MIB:,.0f} ({100 * (resident / e['peak'] - 1):+.1f}%)"
        out.append(f"| {name} | {m['peak_bytes'] / MIB:,.0f} | {e['peak'] / MIB:,.0f} | {100 * (r['peak_ratio'] - 1):+.1f}% | "
                   f"{(m['param_bytes'] + m['buffer_bytes']) / MIB:,.0f} / {m['optimizer_state_bytes'] / MIB:,.0f} / "
                   f"{m['peak_grad_bytes'] / MIB:,.0f} / {(m['activation_bytes'] or 0) / MIB:,.0f} | "
                   f"{e['weights'] / MIB:,.0f} / {e['optimizer_states'] / MIB:,.0f} / {e['gradients'] / MIB:,.0f} / "
                   f"{e['activations'] / MIB:,.0f} | {rss} | {m['step_s']:.1f} |")
    return out


def _train(args: list[str], run: Path) -> list[dict]:
    from lrpretrain.cli.main import main

    code = main(["train", *args, f"run.dir={run}"])
    if code != 0:
        raise SystemExit(f"training failed ({code}): {args}")
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def _summary(records: list[dict]) -> dict:
    losses = [r["loss"] for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    return {"final_train_loss": statistics.mean(losses[-20:]), "val_loss": evals[-1]["val_loss"],
            "val_ppl": evals[-1]["val_ppl"], "step_s": statistics.median(r["step_time"] for r in records if "step_time" in r)}


def quality(steps: int) -> dict:
    runs = {"fp32": ["trainer.precision=fp32"],
            **{f"pure_bf16_{rule}": ["trainer.precision=pure_bf16", f"trainer.bf16_update={rule}"]
               for rule in ("stochastic", "kahan", "nearest")}}
    common = [*TINY, f"trainer.max_steps={steps}", "trainer.batch_size=8", "trainer.micro_batch_size=8",
              f"trainer.eval_every={steps}"]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in runs.items():
            out[name] = _summary(_train([*common, *extra], Path(tmp) / name))
            print(name, out[name], flush=True)
    ref = out["fp32"]
    for r in out.values():
        r["train_loss_vs_fp32_pct"] = 100 * (r["final_train_loss"] / ref["final_train_loss"] - 1)
        r["val_loss_vs_fp32_pct"] = 100 * (r["val_loss"] / ref["val_loss"] - 1)
    return out


def accum(steps: int) -> dict:
    out = {}
    common = [*TINY, f"trainer.max_steps={steps}", "trainer.batch_size=8", f"trainer.eval_every={steps}",
              "trainer.precision=pure_bf16"]
    with tempfile.TemporaryDirectory() as tmp:
        for name, mb in (("one_micro_batch", 8), ("accumulation_4", 2)):
            out[name] = _summary(_train([*common, f"trainer.micro_batch_size={mb}"], Path(tmp) / name))
            print(name, out[name], flush=True)
    out["val_loss_difference_pct"] = 100 * (out["accumulation_4"]["val_loss"] / out["one_micro_batch"]["val_loss"] - 1)
    return out


def write(what: str, data: dict, command: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    record = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(),
              "loadavg": os.getloadavg(), **data}
    (RESULTS / f"pure_bf16_{what}_cpu.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    md = [f"# pure bf16: {what} (CPU)", "", f"`{command}` — {record['date']}, {record['machine'].get('cpu')}, "
          f"load average (1/5/15 min) at the end {tuple(round(x, 1) for x in record['loadavg'])}: the machine was shared, "
          "so step times are not figures of the methods", ""]
    if what == "measure":
        md += measured_table(data["runs"])
    elif what == "quality":
        md += ["| run | final train loss (last 20) | val loss | val ppl | train loss vs fp32 | val loss vs fp32 |",
               "|---|---|---|---|---|---|"]
        for name, r in data["runs"].items():
            md.append(f"| {name} | {r['final_train_loss']:.4f} | {r['val_loss']:.4f} | {r['val_ppl']:.2f} | "
                      f"{r['train_loss_vs_fp32_pct']:+.2f}% | {r['val_loss_vs_fp32_pct']:+.2f}% |")
    else:
        md += ["| run | final train loss (last 20) | val loss | val ppl |", "|---|---|---|---|"]
        for name in ("one_micro_batch", "accumulation_4"):
            r = data["runs"][name]
            md.append(f"| {name} | {r['final_train_loss']:.4f} | {r['val_loss']:.4f} | {r['val_ppl']:.2f} |")
        md += ["", f"val loss, accumulation 4 vs one micro-batch: {data['runs']['val_loss_difference_pct']:+.2f}%"]
    (RESULTS / f"pure_bf16_{what}_cpu.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["measure", "quality", "accum"])
    ap.add_argument("--runs", nargs="+", default=list(MEASURE), help="measure: which of " + ", ".join(MEASURE))
    ap.add_argument("--steps", type=int, default=400, help="quality/accum: updates per run")
    args = ap.parse_args()
    command = "python benchmarks/pure_bf16.py " + " ".join(sys.argv[1:])
    if args.what == "measure":
        measure(args.runs, command=command)
        return
    if args.what == "quality":
        data = quality(args.steps)
    else:
        data = accum(args.steps)
    write(args.what, {"runs": data}, command)


if __name__ == "__main__":
    main()
