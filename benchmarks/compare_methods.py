"""Train several methods (and full-rank) with the same seed, data and token budget; tabulate them.

    python benchmarks/compare_methods.py --name methods_llama_small_cpu --steps 100 --rank 64 \\
        --methods full lowrank lora relora periodic_lora sltrain \\
        --set relora:method.merge_every=50 relora:method.restart_warmup_steps=10 \\
        -- optim.lr=0.003 optim.warmup_steps=10

Every method runs through the real CLI (in this process, one after another) on ``--model`` with the
same overrides: seed, data order, batch, sequence length, steps, LR schedule, validation tokens.
``--rank R`` sets ``method.rank=R`` for every method whose config has a rank; ``--set
METHOD:KEY=VALUE`` adds an override for one method only; ``--methods ROW=METHOD`` runs a method a
second time under another row name (its own ``--set ROW:...``, e.g. a warm start from an earlier row's
checkpoint kept with ``--keep``). For each method the table gives the final
validation perplexity, the trainable and total parameters (counted on the built model), the median
step time and tokens/s over the updates after ``--skip`` warm-up updates, and the analytic training
FLOPs per token of the method's ``cost()``, and the bytes of the weights (parameters and buffers:
quantized codes included) and of the optimizer's state, measured on the run's last checkpoint.
Results go to ``benchmarks/results/<name>.json`` and
``<name>.md`` with the command, the machine and the load average around each run (timings taken
while other jobs share the CPU are noisy: compare them only within one table).

It shows that each method learns and how fast it runs here, not how the methods rank at scale.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import fields
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def machine() -> dict:
    from train_throughput import machine as base_machine  # same directory

    return base_machine()


def count_parameters(overrides: list[str]) -> dict[str, int]:
    """Total and trainable parameters of the model the method builds (a CPU build, same seed)."""
    import torch

    from lrpretrain.methods import get_method
    from lrpretrain.methods.toolkit import parameter_counts
    from lrpretrain.model import build_model
    from lrpretrain.train import load_config

    cfg, _ = load_config(overrides)
    torch.manual_seed(cfg.seed)
    plugin = get_method(cfg.method.name)(cfg.method, cfg.model)
    model = plugin.prepare_model(build_model(cfg.model))
    counts = parameter_counts(model)
    cost = plugin.cost(cfg.model, cfg.data.seq_len)
    return {"params": counts["total"], "trainable_params": counts["trainable"], "flops_per_token": cost["flops_per_token"]}


def method_overrides(method: str, rank: int | None, extra: dict[str, list[str]]) -> list[str]:
    from lrpretrain.methods import get_method

    out = [f"method={method}"]
    if rank is not None and "rank" in {f.name for f in fields(get_method(method).Config)}:
        out.append(f"method.rank={rank}")
    return out + extra.get(method, [])


def run_one(method: str, overrides: list[str], run_dir: Path, skip: int) -> dict:
    from lrpretrain.cli.main import main as cli

    load_before = os.getloadavg()
    t0 = time.perf_counter()
    try:
        code, error = cli(["train", *overrides, f"run.dir={run_dir}"]), None
    except Exception as e:  # one method's crash must not lose the others' results
        code, error = 1, f"{type(e).__name__}: {e}"
    wall = time.perf_counter() - t0
    row: dict = {"method": method, "overrides": overrides, "exit_code": code, "wall_s": wall,
                 "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    if code != 0:
        row["error"] = error
        return row
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    steady = train[skip:] or train
    step_s = statistics.median(r["step_time"] for r in steady)
    tokens_per_update = train[-1]["tokens"] // len(train)
    row.update({
        "steps": len(train), "tokens": train[-1]["tokens"],
        "final_val_loss": evals[-1]["val_loss"], "final_val_ppl": evals[-1]["val_ppl"],
        "final_train_loss": statistics.fmean(r["loss"] for r in train[-10:]),
        "median_step_s": step_s, "median_tokens_per_s": tokens_per_update / step_s,
        "mean_tokens_per_s": tokens_per_update * len(steady) / sum(r["step_time"] for r in steady),
    })
    row.update(count_parameters(overrides))
    if "ranks" in train[-1]:  # a rank-adaptive method (DLRT): every target's rank after the last update, and
        row["final_ranks"] = train[-1]["ranks"]  # the trajectory (step, mean, min, max rank) of every update
        row["rank_trajectory"] = [(r["step"], r["rank_mean"], min(r["ranks"]), max(r["ranks"])) for r in train]
    row.update(stored_bytes(run_dir))
    return row


def stored_bytes(run_dir: Path) -> dict[str, int]:
    """Bytes of the weights (parameters and buffers, quantized codes included) and of the optimizer's
    state at the end of the run, measured on its last checkpoint's tensors."""
    import torch
    from safetensors import safe_open

    last = max((run_dir / "checkpoints").glob("step_*"), key=lambda p: int(p.name[5:]))
    with safe_open(str(last / "model.safetensors"), framework="pt") as f:
        weights = sum(f.get_tensor(k).nbytes for k in f.keys())
    state = torch.load(last / "train_state.pt", weights_only=True)["optimizer"]["state"]
    states = sum(v.nbytes for s in state.values() for v in s.values() if isinstance(v, torch.Tensor))
    return {"weight_bytes": weights, "optimizer_state_bytes": states}


def markdown(result: dict) -> str:
    lines = [f"### {result['name']} ({result['date']})", "",
             f"Command: `{result['command']}`", "",
             f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, torch "
             f"{result['machine']['torch']} ({result['machine']['torch_threads']} threads). Budget: "
             f"{result['tokens_per_method']:,} tokens per method ({result['steps']} updates). Load average "
             "(1 min) before each run in the last column: timings are comparable within this table only.", "",
             "| method | final val ppl | trainable params | total params | weights | optimizer states | "
             "step time (median) | tokens/s | GFLOPs/token (analytic) | load |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    mib = lambda r, k: f"{r[k] / 2**20:.2f} MiB" if k in r else "-"  # noqa: E731  (older results lack them)
    for r in result["rows"]:
        if r["exit_code"] != 0:
            lines.append(f"| {r['method']} | failed (exit {r['exit_code']}) | | | | | | | | |")
            continue
        lines.append(f"| {r['method']} | {r['final_val_ppl']:.1f} | {r['trainable_params'] / 1e6:.2f}M | "
                     f"{r['params'] / 1e6:.2f}M | {mib(r, 'weight_bytes')} | {mib(r, 'optimizer_state_bytes')} | "
                     f"{r['median_step_s']:.2f} s | {r['median_tokens_per_s']:,.0f} | "
                     f"{r['flops_per_token'] / 1e9:.4f} | {r['loadavg_before'][0]:.1f} |")
    for r in result["rows"]:
        if "final_ranks" in r:
            traj = r["rank_trajectory"]
            marks = sorted({0, len(traj) // 4, len(traj) // 2, 3 * len(traj) // 4, len(traj) - 1})
            lines += ["", f"{r['method']}: final rank of every target (model order) {r['final_ranks']}; mean rank "
                      "(min-max) after update " + ", ".join(f"{traj[i][0]}: {traj[i][1]:.1f} ({traj[i][2]}-{traj[i][3]})"
                                                          for i in marks)]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", required=True, help="results file name (benchmarks/results/<name>.json/.md)")
    ap.add_argument("--methods", nargs="+", default=["full", "lowrank", "lora", "relora", "periodic_lora", "sltrain"],
                    help="methods in order; ROW=METHOD runs METHOD under the row name ROW")
    ap.add_argument("--model", default="llama_small")
    ap.add_argument("--steps", type=int, default=100, help="optimizer updates per method")
    ap.add_argument("--tokens", type=int, default=None, help="token budget per method (sets --steps)")
    ap.add_argument("--batch-size", type=int, default=16, help="sequences per update")
    ap.add_argument("--micro-batch-size", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--val-tokens", type=int, default=32768)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rank", type=int, default=None, help="method.rank for every method that has one")
    ap.add_argument("--skip", type=int, default=3, help="warm-up updates left out of the timing")
    ap.add_argument("--set", nargs="*", default=[], metavar="METHOD:KEY=VALUE", help="per-method overrides")
    ap.add_argument("--keep", type=Path, default=None, help="keep the run directories here")
    ap.add_argument("overrides", nargs="*", help="lrpretrain train overrides for every method")
    args = ap.parse_args()

    steps = args.tokens // (args.batch_size * args.seq_len) if args.tokens else args.steps
    extra: dict[str, list[str]] = {}
    for item in args.set:
        method, _, override = item.partition(":")
        if not override or "=" not in override:
            ap.error(f"--set {item!r}: expected METHOD:KEY=VALUE")
        extra.setdefault(method, []).append(override)
    common = [f"model={args.model}", "data=embedded", f"data.seq_len={args.seq_len}", f"seed={args.seed}",
              f"trainer.max_steps={steps}", f"trainer.batch_size={args.batch_size}",
              f"trainer.micro_batch_size={args.micro_batch_size or args.batch_size}",
              f"data.val_tokens={args.val_tokens}", "trainer.eval_every=0", "trainer.eval_at_start=false",
              "trainer.ckpt_every=0", "logging.progress=none", "logging.wandb=disabled", *args.overrides]

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        for item in args.methods:
            row_name, _, method = item.partition("=")
            method = method or row_name
            overrides = [*common, *method_overrides(method, args.rank, {}), *extra.get(row_name, [])]
            print(f"== {row_name}: {' '.join(overrides)}", file=sys.stderr, flush=True)
            row = run_one(row_name, overrides, root / row_name, args.skip)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "overrides"}), file=sys.stderr, flush=True)
    result = {
        "name": args.name,
        "command": "python benchmarks/compare_methods.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "model": args.model, "steps": steps, "tokens_per_method": steps * args.batch_size * args.seq_len,
        "common_overrides": common, "rows": rows, "machine": machine(), "date": time.strftime("%Y-%m-%d"),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / f"{args.name}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
