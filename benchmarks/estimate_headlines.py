"""``lrpretrain estimate`` for the papers' headline memory settings, beside the published figures.

    python benchmarks/estimate_headlines.py

Published figures are those of ../shared/METHODS.md (GaLore Tab. 2 and 3, its 7B scripts' comments,
GaLore 2's abstract, APOLLO's copy of GaLore Tab. 3). Each row is estimated in two of the trainer's
precisions: ``bf16`` (autocast over fp32 master weights) and ``pure_bf16`` (bf16 weights, gradients and
activations, no fp32 copy; what GaLore's scripts train in). The 7B table (full, GaLore, GaLore 8-bit
with per-layer updates; micro-batch 1 x 256) comes with a line-by-line account of the GaLore 8-bit
per-layer estimate. Writes ``benchmarks/results/estimate_headlines.{json,md}``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from lrpretrain.estimate import estimate
from lrpretrain.methods import get_method
from lrpretrain.methods.subspace import target_shapes
from lrpretrain.model.memory import llama_layer_bytes
from lrpretrain.train import load_config

RESULTS = Path(__file__).parent / "results"
GB, GiB = 1e9, 2**30
ONE = ["trainer.micro_batch_size=1", "trainer.batch_size=1"]

# (label, overrides, what the paper reports, which of our figures compares with it, the paper's figure in GB)
ROWS = [
    ("GaLore 7B, 8-bit, per-layer, micro-batch 1 (script: 22.72 GB; abstract: fits 24 GB)",
     ["experiment=galore_c4_7b", "method.state_bits=8", "trainer.per_layer_update=true", *ONE], "peak", 22.72),
    ("GaLore 7B, 8-bit, per-layer, recompute full, micro-batch 16 (script: 22.8 GB)",
     ["experiment=galore_c4_7b", "method.state_bits=8", "trainer.per_layer_update=true", "trainer.recompute=full",
      "trainer.micro_batch_size=16", "trainer.batch_size=16"], "peak", 22.8),
    ("Full-rank 7B BF16 baseline, one micro-batch (GaLore 2 abstract: >= 58 GB)",
     ["experiment=full_c4_7b", *ONE], "peak", 58.0),
    ("8-bit Adam 7B optimizer states (GaLore Tab. 3 via APOLLO: 13 GB)",
     ["experiment=full_c4_7b", "optim.state_bits=8", *ONE], "optimizer_states", 13.0),
    ("8-bit GaLore 7B optimizer states, r 1024 (GaLore Tab. 3 via APOLLO: 4.9 GB)",
     ["experiment=galore_c4_7b", "method.state_bits=8", *ONE], "optimizer_states", 4.9),
]
# The 7B comparison table of issue 14: bf16 (autocast, fp32 masters) against pure bf16.
TABLE_7B = [
    ("full-rank AdamW", ["experiment=full_c4_7b", *ONE]),
    ("full-rank AdamW, 8-bit states, per-layer", ["experiment=full_c4_7b", "optim.state_bits=8",
                                                  "trainer.per_layer_update=true", *ONE]),
    ("GaLore r 1024", ["experiment=galore_c4_7b", *ONE]),
    ("GaLore r 1024, 8-bit states, per-layer", ["experiment=galore_c4_7b", "method.state_bits=8",
                                                "trainer.per_layer_update=true", *ONE]),
]
# GaLore Tab. 2: "BF16 weights + optimizer states" estimates, 60M/130M/350M/1B (GB), at its ranks
TABLE2 = {"full": [0.36, 0.76, 2.06, 7.80], "galore": [0.24, 0.52, 1.22, 4.38]}
SIZES = ["60m", "130m", "350m", "1b"]
TABLE2_RANKS = [128, 256, 256, 512]  # Tab. 2's (the 1B script uses 1024)
PURE = "trainer.precision=pure_bf16"


def est(overrides: list[str], precision: str):
    cfg, _ = load_config([*overrides, f"trainer.precision={precision}"])
    return cfg, estimate(cfg)


def galore_account(overrides: list[str]) -> list[tuple[str, float]]:
    """Each term of the GaLore 8-bit per-layer pure-bf16 estimate, in bytes."""
    cfg, e = est(overrides, "pure_bf16")
    mc, T = cfg.model, cfg.data.seq_len
    plugin = get_method("galore")(cfg.method, mc)
    moments = plugin.state_bytes(mc, 8)
    bases = sum(plugin.basis_bytes(s) for s in target_shapes(mc, cfg.method.targets).values()) * mc.n_layers
    layers = mc.n_layers * llama_layer_bytes(mc, "none", "pure_bf16") * T
    terms = [
        ("bf16 weights (6.74B x 2 B) + RoPE tables", e.weights),
        ("optimizer: projected moments, 8-bit (r 1024, larger side x r), + embedding/head/norm Adam 8-bit",
         moments - bases),
        ("optimizer: projection bases, bf16 (r x smaller side, 224 matrices)", bases),
        ("gradient alive at the peak: the refreshing 11008 x 4096 weight's, bf16 (per-layer updates: the LM "
         "head's, 0.262, has been stepped and freed)", e.gradients_at_peak),
        ("activations: 32 blocks x 256 tokens x (24d + 8f + 4H + 8) B", layers),
        ("activations outside the blocks: embedding ids, final norm, the chunked loss's kept fp32 gradients "
         "(∂h, ∂W of the LM head)", e.activations - layers),
        (f"transients at the peak ({e.peak_at}): the costliest step's temporaries (a refresh of a 11008 x 4096 "
         "weight: its fp32 copies and SVD) - the loss's kept gradients, freed by then", e.transients),
    ]
    total = sum(x for _, x in terms)
    assert e.peak_at == "layer step" and abs(total - e.peak) < 1e3, (e.peak_at, total, e.peak)  # the terms are the peak
    return [*terms, ("peak", e.peak)]


def main() -> None:
    out = {"date": time.strftime("%Y-%m-%d"), "rows": [], "table_7b": [], "table2": []}
    md = ["# Headline memory estimates (`lrpretrain estimate`)", "",
          "`python benchmarks/estimate_headlines.py`; GB = 1e9 bytes, GiB = 2^30.", "",
          "## Papers' settings", "",
          "| setting | figure | paper (GB) | pure_bf16 (GB) | bf16 autocast (GB) |", "|---|---|---|---|---|"]
    for label, overrides, key, paper in ROWS:
        _, bf16 = est(overrides, "bf16")
        _, pure = est(overrides, "pure_bf16")
        rec = {"label": label, "overrides": overrides, "key": key, "paper_gb": paper,
               "bf16_gb": getattr(bf16, key) / GB, "pure_bf16_gb": getattr(pure, key) / GB,
               "bf16": bf16.as_dict(), "pure_bf16": pure.as_dict()}
        out["rows"].append(rec)
        md.append(f"| {label} | {key} | {paper:.2f} | {rec['pure_bf16_gb']:.2f} | {rec['bf16_gb']:.2f} |")

    md += ["", "## 7B, micro-batch 1 x 256: bf16 autocast vs pure bf16 (peak; weights / states / activations)", "",
           "| run | bf16 peak (GB) | pure_bf16 peak (GB) | pure_bf16 peak (GiB) | fits 24 GB? | "
           "pure_bf16 weights / states / activations (GB) |", "|---|---|---|---|---|---|"]
    for label, overrides in TABLE_7B:
        _, bf16 = est(overrides, "bf16")
        _, pure = est(overrides, "pure_bf16")
        out["table_7b"].append({"label": label, "overrides": overrides, "bf16": bf16.as_dict(), "pure_bf16": pure.as_dict()})
        md.append(f"| {label} | {bf16.peak / GB:.2f} | {pure.peak / GB:.2f} | {pure.peak / GiB:.2f} | "
                  f"{'yes' if pure.peak <= 24e9 else 'no'} | {pure.weights / GB:.2f} / {pure.optimizer_states / GB:.2f}"
                  f" / {pure.activations / GB:.2f} |")

    account = galore_account(TABLE_7B[-1][1])
    out["galore_7b_account"] = [{"term": t, "bytes": b} for t, b in account]
    md += ["", "## GaLore 7B, 8-bit, per-layer, pure bf16: the estimate term by term", "",
           "| term | GB |", "|---|---|"] + [f"| {t} | {b / GB:.3f} |" for t, b in account]

    md += ["", "## GaLore Tab. 2 (bf16 weights + optimizer states)", "",
           "| method, size | paper (GB) | pure_bf16 weights + states (GB) | without the bases (GB) |", "|---|---|---|---|"]
    for method, figures in TABLE2.items():
        for size, paper, rank in zip(SIZES, figures, TABLE2_RANKS):
            overrides = [f"experiment={method}_c4_{size}", *([f"method.rank={rank}"] if method != "full" else [])]
            cfg, pure = est(overrides, "pure_bf16")
            ours = pure.weights + pure.optimizer_states
            bases = 0.0
            if method == "galore":  # GaLore's stored projection bases, which Tab. 2 may not count
                plugin = get_method("galore")(cfg.method, cfg.model)
                bases = sum(plugin.basis_bytes(s) for s in target_shapes(cfg.model, cfg.method.targets).values())
                bases *= cfg.model.n_layers
            out["table2"].append({"method": method, "size": size, "paper_gb": paper,
                                  "pure_bf16_weights_states_gb": ours / GB, "bases_gb": bases / GB})
            md.append(f"| {method} {size} | {paper:.2f} | {ours / GB:.2f} | {(ours - bases) / GB:.2f} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "estimate_headlines.json").write_text(json.dumps(out, indent=1) + "\n")
    (RESULTS / "estimate_headlines.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
