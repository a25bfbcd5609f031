"""Generation speed with and without the KV cache (``lrpretrain generate``'s decoding loop).

    python benchmarks/generate_bench.py --name generate_llama_small_cpu --model llama_small \\
        --prompt-lengths 16 256 --new-tokens 200 --rounds 3 --threads 2

A model of the preset (seeded random weights: the speed of a forward does not depend on the values)
greedily decodes ``--new-tokens`` tokens (no EOS stop) after a prompt of each length, with the cache
(prefill once, then one token per step) and without (the whole context recomputed per token). The
two modes take turns, round after round, so that both see the same machine load; each figure is the
median over the rounds, and the speed-up is the ratio of the medians. The outputs of the two modes
are checked to be identical. Writes ``benchmarks/results/<name>.json`` (every timing, the machine,
the load average before and after) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from lrpretrain.model import build_model, generate
from lrpretrain.train import load_config

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--name", default="generate_llama_small_cpu")
    ap.add_argument("--model", default="llama_small")
    ap.add_argument("--prompt-lengths", type=int, nargs="+", default=[16, 256])
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg, _ = load_config([f"model={args.model}"])
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = build_model(cfg.model, device).eval()
    load_before = os.getloadavg()
    rows = []
    for length in args.prompt_lengths:
        if length + args.new_tokens > cfg.model.max_seq_len:
            print(f"note: prompt {length} + {args.new_tokens} new tokens pass max_seq_len={cfg.model.max_seq_len}: "
                  "past it both modes recompute the window")
        prompt = torch.randint(0, cfg.model.vocab_size, (1, length), generator=torch.Generator().manual_seed(length))
        prompt = prompt.to(device)
        generate(model, prompt, 4, temperature=0)  # warm-up (allocator, kernels)
        times: dict[str, list[float]] = {"cache": [], "no_cache": []}
        outputs = {}
        for r in range(args.rounds):
            for mode in (("cache", "no_cache") if r % 2 == 0 else ("no_cache", "cache")):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                outputs[mode] = generate(model, prompt, args.new_tokens, temperature=0, use_cache=mode == "cache")
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[mode].append(time.perf_counter() - t0)
        assert torch.equal(outputs["cache"], outputs["no_cache"]), "the two modes decoded different tokens"
        med = {m: statistics.median(t) for m, t in times.items()}
        rows.append({"prompt_tokens": length, "new_tokens": args.new_tokens, "seconds": times,
                     "median_s": med, "tokens_per_s": {m: args.new_tokens / s for m, s in med.items()},
                     "speedup": med["no_cache"] / med["cache"]})
    result = {"name": args.name, "model": args.model, "device": str(device), "threads": torch.get_num_threads(),
              "rounds": args.rounds, "rows": rows, "torch": torch.__version__, "python": platform.python_version(),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "load_before": load_before, "load_after": os.getloadavg(),
              "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    print("| model | prompt tokens | new tokens | tokens/s, KV cache | tokens/s, no cache | speed-up |\n"
          "|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {args.model} | {r['prompt_tokens']} | {r['new_tokens']} | {r['tokens_per_s']['cache']:,.1f} | "
              f"{r['tokens_per_s']['no_cache']:,.1f} | {r['speedup']:.2f}x |")
    print(f"load average before {load_before[0]:.1f}, after {result['load_after'][0]:.1f}; "
          f"{torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
