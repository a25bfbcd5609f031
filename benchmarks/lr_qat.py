"""LR-QAT's memory: the 7B estimate, and the estimate checked against a measured update at 7B width.

    python benchmarks/lr_qat.py estimate   # LLaMA-7B, micro-batch 1 x 256, W4, r 32: every precision and setting
    python benchmarks/lr_qat.py measure    # 7B-width shapes, 2 layers: measured peak vs the estimate

``estimate``: ``lrpretrain estimate`` of ``experiment=lr_qat_c4_7b`` (W4 per channel, rank 32, int8 container,
AdamW with fp32 moments) at micro-batch 1 x 256 against a 24 GB budget: pure bf16 (the paper's
``--use-bf16 --use-bf16-ab``) with the rest of the model trained (our from-scratch default) and frozen
(``method.train_rest=false``, the paper's ``--param-group lora``), per-layer updates, and bf16 autocast /
fp32 (fp32 master weights of the non-integer parts) for comparison.

``measure``: a model of LLaMA-7B's width (dim 4096, ffn 11008, vocab 32000, 32 heads; ``model=llama_7b
model.n_layers=2``), micro-batch 1 x 256, one measured update through ``lrpretrain bench`` (peak = the
exact bytes of parameters, buffers and optimizer states + the peak of CPU tensor allocations during the
update, torch.profiler's memory events), within 10% of the estimate for the same shapes: then the
32-layer estimate is trusted. ``method.scale_init=minmax`` there: the L4 grid search of the scales costs
minutes per 7B-width layer on this CPU and changes no byte of the update.

Results: ``benchmarks/results/lr_qat_7b.{json,md}`` (estimate) and ``lr_qat_7b_width_cpu.{json,md}``
(measure), with the machine and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
MIB, GIB, GB = 2**20, 2**30, 1e9

ONE = ["trainer.micro_batch_size=1", "trainer.batch_size=1", "data.seq_len=256"]
ESTIMATES = {
    "pure_bf16": ["trainer.precision=pure_bf16"],
    "pure_bf16, rest frozen (paper)": ["trainer.precision=pure_bf16", "method.train_rest=false"],
    "pure_bf16, per-layer updates": ["trainer.precision=pure_bf16", "trainer.per_layer_update=true"],
    "pure_bf16, 8-bit states": ["trainer.precision=pure_bf16", "optim.state_bits=8"],
    "bf16 autocast (fp32 masters)": ["trainer.precision=bf16"],
    "bf16 autocast, rest frozen": ["trainer.precision=bf16", "method.train_rest=false"],
    "fp32": ["trainer.precision=fp32"],
}
WIDTH_7B = ["experiment=lr_qat_c4_7b", "model.n_layers=2", "data=embedded", *ONE, "trainer.threads=2",
            "method.scale_init=minmax"]
MEASURE = {
    "pure_bf16": [*WIDTH_7B, "trainer.precision=pure_bf16"],
    "pure_bf16_rest_frozen": [*WIDTH_7B, "trainer.precision=pure_bf16", "method.train_rest=false"],
}


sys.path.insert(0, str(Path(__file__).parent))


def machine() -> dict:
    from train_throughput import machine as base_machine  # same directory

    return base_machine()


def estimates() -> dict:
    from lrpretrain.estimate import estimate
    from lrpretrain.train import load_config

    out = {}
    for name, extra in ESTIMATES.items():
        overrides = ["experiment=lr_qat_c4_7b", *ONE, *extra]
        e = estimate(load_config(overrides)[0], budget=24 * GB)
        out[name] = {"overrides": overrides, **e.as_dict()}
    return out


def measure(names: list[str]) -> dict:
    from pure_bf16 import measure as measure_rows  # same directory: the same measurement, our rows

    return measure_rows(names, MEASURE)


def measured_table(runs: dict) -> list[str]:
    from pure_bf16 import measured_table as table  # same directory

    return table(runs)


def markdown(what: str, record: dict) -> str:
    md = [f"# LR-QAT: {what}", "", f"`{record['command']}` — {record['date']}, {record['machine'].get('cpu')}, "
          f"load average (1/5/15 min) at the end {tuple(round(x, 1) for x in record['machine']['loadavg'])}", ""]
    if what == "estimate":
        md += ["LLaMA-7B, micro-batch 1 x 256, W4 per channel (int8 container), rank 32, AdamW (fp32 moments unless "
               "said), `lrpretrain estimate experiment=lr_qat_c4_7b trainer.micro_batch_size=1 trainer.batch_size=1 "
               "<row's overrides> --budget 24GB`. GiB = 2^30 bytes; the budget is 24 GB = 22.35 GiB.", "",
               "| setting | weights | optimizer states | gradients | activations | transients | peak (GiB) | peak at | fits 24 GB |",
               "|---|---|---|---|---|---|---|---|---|"]
        for name, e in record["runs"].items():
            md.append(f"| {name} | {e['weights'] / GIB:.2f} | {e['optimizer_states'] / GIB:.2f} | "
                      f"{e['gradients'] / GIB:.2f} | {e['activations'] / GIB:.2f} | {e['transients'] / GIB:.2f} | "
                      f"**{e['peak'] / GIB:.2f}** | {e['peak_at']} | {'yes' if e['fits'] else 'no'} |")
    else:
        md += ["Machine loaded by other jobs (load average above): the step time is not a figure of this method.", "",
               *measured_table(record["runs"])]
    return "\n".join(md) + "\n"


def write(name: str, what: str, runs: dict, command: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    record = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M"),
              "machine": {**machine(), "loadavg": os.getloadavg()}, "runs": runs}
    (RESULTS / f"{name}.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    text = markdown(what, record)
    (RESULTS / f"{name}.md").write_text(text)
    print(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("estimate", "measure"))
    ap.add_argument("--runs", nargs="*", default=list(MEASURE),
                    help=f"measure: which of {list(MEASURE)} (the others' recorded rows are kept)")
    args = ap.parse_args()
    command = "python benchmarks/lr_qat.py " + " ".join(sys.argv[1:])
    if args.what == "estimate":
        write("lr_qat_7b", "estimate", estimates(), command)
    else:
        old = RESULTS / "lr_qat_7b_width_cpu.json"  # rows measured earlier stay unless measured again
        runs = json.loads(old.read_text())["runs"] if old.exists() else {}
        runs.update(measure(args.runs))
        write("lr_qat_7b_width_cpu", "measure", {k: runs[k] for k in MEASURE if k in runs}, command)


if __name__ == "__main__":
    main()
