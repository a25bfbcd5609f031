"""Activation memory and forward+backward time of the architectures (CoLA, CoLA-M, CR-Net) vs full rank.

    python benchmarks/activation_bench.py --name activations_llama_small_cpu --model llama_small --rank 64

For each variant the model is built and prepared exactly as in training (same seed), then on one
micro-batch of ``--batch`` x ``--seq`` random tokens:

- ``saved_bytes``: bytes of the activations autograd holds for backward at the end of the forward
  (``toolkit.saved_activation_bytes``: every saved tensor, each storage once, parameters and buffers
  left out), next to the analytic count of the recomputation policies where there is one
  (``cola_m_saved_bytes`` per block, ``crnet_saved_bytes`` for the decoder) plus the part outside the
  decoder (token ids, final norm, LM head input), which is the same for every variant;
- ``fwd_bwd_s``: median time of forward + backward of that micro-batch (no optimizer step), the
  variants taking turns (round robin) so that all see the same load of the shared machine.

Writes ``benchmarks/results/<name>.json`` with the command, the machine and the load average.
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

VARIANTS = {
    "full": (["method=full"], False),
    "cola": (["method=cola"], False),
    "cola_m": (["method=cola_m"], False),
    "crnet": (["method=crnet"], False),
    "crnet_recompute": (["method=crnet"], True),  # crnet + its recompute_policy() (trainer.recompute=method)
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", required=True)
    ap.add_argument("--model", default="llama_small")
    ap.add_argument("--rank", type=int, required=True, help="method.rank of cola, cola_m, crnet (≈ d/4)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from lrpretrain.methods import get_method
    from lrpretrain.methods.cola import cola_m_saved_bytes
    from lrpretrain.methods.crnet import crnet_saved_bytes
    from lrpretrain.methods.toolkit import parameter_counts, saved_activation_bytes
    from lrpretrain.model import build_model, lm_loss
    from lrpretrain.train import load_config

    load_before = os.getloadavg()
    built, rows = {}, {}
    tokens = args.batch * args.seq
    ids = torch.randint(0, 8192, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))  # every vocab >= 8192
    for name, (overrides, recompute) in VARIANTS.items():
        rank = [] if name == "full" else [f"method.rank={args.rank}"]
        cfg, _ = load_config([f"model={args.model}", *overrides, *rank])
        plugin = get_method(cfg.method.name)(cfg.method, cfg.model)
        torch.manual_seed(0)
        model = plugin.prepare_model(build_model(cfg.model))
        if recompute:
            plugin.recompute_policy()(model)
        logits, saved = saved_activation_bytes(model, lambda m=model: m(ids))
        del logits
        cost = plugin.cost(cfg.model, args.seq)
        row = {"params": parameter_counts(model)["total"], "flops_per_token": cost["flops_per_token"],
               "saved_bytes": saved, "saved_bytes_per_token": saved / tokens}
        if name == "cola_m":
            row["analytic_decoder_bytes"] = tokens * cfg.model.n_layers * cola_m_saved_bytes(
                cfg.model, args.rank, cfg.method.targets)
        if name == "crnet_recompute":
            row["analytic_decoder_bytes"] = tokens * crnet_saved_bytes(cfg.model, args.rank, cfg.method.targets,
                                                                       plugin.group_size(cfg.model.n_layers))
            row["recompute_group"] = plugin.group_size(cfg.model.n_layers)
        built[name], rows[name] = model, row

    # outside the decoder (same for all): measured on the full model minus its decoder
    full = built["full"]
    x = torch.randn(args.batch, args.seq, full.cfg.dim, requires_grad=True)
    cos, sin = full.rope_cos[:args.seq], full.rope_sin[:args.seq]

    def decoder():
        h = x
        for layer in full.layers:
            h = layer(h, cos, sin)
        return h

    _, full_decoder = saved_activation_bytes(full, decoder)
    outside = rows["full"]["saved_bytes"] - full_decoder
    for row in rows.values():
        if "analytic_decoder_bytes" in row:
            row["analytic_bytes"] = row["analytic_decoder_bytes"] + outside

    def fwd_bwd(model) -> float:
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss_sum, n = lm_loss(model(ids), ids)
        (loss_sum / n).backward()
        return time.perf_counter() - t0

    for model in built.values():
        fwd_bwd(model)  # warm up
    times: dict[str, list[float]] = {name: [] for name in built}
    for _ in range(args.repeats):
        for name, model in built.items():
            times[name].append(fwd_bwd(model))
    base_t, base_saved = statistics.median(times["full"]), rows["full"]["saved_bytes"]
    for name, row in rows.items():
        row["fwd_bwd_s"] = statistics.median(times[name])
        row["tokens_per_s"] = tokens / row["fwd_bwd_s"]
        row["throughput_vs_full"] = base_t / row["fwd_bwd_s"]
        row["saved_vs_full"] = row["saved_bytes"] / base_saved
    result = {
        "name": args.name, "command": "python benchmarks/activation_bench.py " + " ".join(sys.argv[1:]),
        "model": args.model, "rank": args.rank, "batch": args.batch, "seq_len": args.seq, "precision": "fp32",
        "outside_decoder_bytes": outside, "variants": rows, "fwd_bwd_times_s": times,
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'variant':<16} {'params':>10} {'saved MiB':>10} {'vs full':>8} {'analytic MiB':>13} {'fwd+bwd s':>10} {'speed vs full':>14}")
    for name, r in rows.items():
        analytic = f"{r['analytic_bytes'] / 2**20:.3f}" if "analytic_bytes" in r else "-"
        print(f"{name:<16} {r['params']:>10} {r['saved_bytes'] / 2**20:>10.3f} {r['saved_vs_full']:>8.3f} "
              f"{analytic:>13} {r['fwd_bwd_s']:>10.3f} {r['throughput_vs_full']:>14.2f}")


if __name__ == "__main__":
    main()
