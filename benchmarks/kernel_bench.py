"""Each fused kernel (lrpretrain/kernels) against its PyTorch reference: time, peak memory, agreement.

    python benchmarks/kernel_bench.py --kernel loss|sltrain|cola|adam8|adam_bf16|all [--size 1b|tiny] [--out FILE]

Shapes: ``1b`` is llama_1b (dim 2048, ffn 5461, vocab 32000; SLTrain rank 512, δ 0.03; CoLA rank 512)
with 32 x 256 tokens, the GPU suite's memory rows' micro-batch; the MLP's up projection (2048 -> 5461)
stands for the targets; the optimizer rows step one 5461 x 2048 matrix and the 32000 x 2048 embedding.
``tiny`` is small enough for Triton's interpreter on the CPU (the GPU suite's ``--cpu`` dry run).

For each variant (the reference and the kernel; for the loss also the chunked PyTorch loss):
forward + backward (or one optimizer step) timed as the median of a few runs after a warmup (CUDA
synchronised), the peak memory above what existed before (``torch.cuda.max_memory_allocated``; on
the CPU not measured), the bytes autograd keeps for the backward (saved-tensor hooks), and the largest
difference from the reference in the outputs and gradients (relative to the reference's largest
magnitude). Run by the GPU suite's ``kernels`` rows (benchmarks/gpu_suite.py) on a GPU; results
there, or with ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch

SHAPES = {
    "1b": {"tokens": 32 * 256, "dim": 2048, "ffn": 5461, "vocab": 32000, "rank": 512, "delta": 0.03},
    "tiny": {"tokens": 96, "dim": 48, "ffn": 80, "vocab": 300, "rank": 16, "delta": 0.1},
}
KERNELS = ("loss", "sltrain", "cola", "adam8", "adam_bf16")


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn: Callable[[], object], dev: torch.device, repeats: int) -> tuple[float, float | None]:
    """(median seconds, peak bytes above the start on CUDA) of ``fn`` after one warmup call."""
    fn()
    _sync(dev)
    peak = None
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        times.append(time.perf_counter() - t0)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - start
    return statistics.median(times), peak


def _saved_bytes(fn: Callable[[], torch.Tensor], inputs: list[torch.Tensor]) -> int:
    """Bytes autograd keeps for the backward of ``fn()``, each storage once, the inputs' own left out."""
    own = {t.untyped_storage().data_ptr() for t in inputs}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        if t.untyped_storage().data_ptr() not in own:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def _rel(a: torch.Tensor | None, b: torch.Tensor | None) -> float | None:
    if a is None or b is None:
        return None
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def _autograd_case(variants: dict[str, Callable[..., torch.Tensor]], inputs: list[torch.Tensor], dev: torch.device,
                   repeats: int, autocast: bool) -> dict:
    """Forward + backward of each variant on the same inputs; agreement with the first (the reference)."""
    ctx = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if autocast else torch.enable_grad
    out: dict = {}
    ref_vals: list | None = None
    cotangents: dict[tuple, torch.Tensor] = {}

    def probe(y: torch.Tensor) -> torch.Tensor:  # a fixed random cotangent per output shape
        if tuple(y.shape) not in cotangents:
            g = torch.Generator(y.device).manual_seed(1)
            cotangents[tuple(y.shape)] = torch.randn(y.shape, device=y.device, generator=g)
        return cotangents[tuple(y.shape)]

    for name, fn in variants.items():
        def step(fn=fn):
            for t in inputs:
                t.grad = None
            with ctx():
                y = fn(*inputs)
            loss = y if y.dim() == 0 else (y.float() * probe(y)).sum()
            loss.backward()
            return y

        seconds, peak = _timed(step, dev, repeats)
        y = step()
        vals = [y.detach(), *(t.grad for t in inputs)]
        with ctx():
            saved = _saved_bytes(lambda fn=fn: fn(*inputs), inputs)
        rec = {"seconds": seconds, "peak_bytes": peak, "saved_bytes": saved}
        if ref_vals is None:
            ref_vals = vals
        else:
            rec["max_rel_diff"] = {k: _rel(v, r) for k, v, r in zip(["out", *(f"grad{i}" for i in range(len(inputs)))],
                                                                 vals, ref_vals)}
        out[name] = rec
    return out


def bench_loss(s: dict, dev: torch.device, repeats: int) -> dict:
    from lrpretrain.kernels.head_loss import (
        chunked_head_loss,
        liger_head_loss,
        liger_refusal,
        reference_head_loss,
    )

    g = torch.Generator(dev).manual_seed(0)
    B = 32 if s["tokens"] % 256 == 0 else 4  # rows of 256 tokens (tiny: 4 rows)
    h = torch.randn(B, s["tokens"] // B, s["dim"], device=dev, generator=g).requires_grad_()
    W = (0.02 * torch.randn(s["vocab"], s["dim"], device=dev, generator=g)).requires_grad_()
    labels = torch.randint(0, s["vocab"], (B, s["tokens"] // B), device=dev, generator=g)
    labels[:, -3:] = -100  # some padding
    variants = {"reference": lambda h, W: reference_head_loss(h, W, labels),
                "chunked": lambda h, W: chunked_head_loss(h, W, labels)}
    if liger_refusal() is None:
        variants["liger"] = lambda h, W: liger_head_loss(h, W, labels)
    return _autograd_case(variants, [h, W], dev, repeats, autocast=dev.type == "cuda")


def bench_sltrain(s: dict, dev: torch.device, repeats: int) -> dict:
    from lrpretrain.kernels.sparse_lowrank import SparseLowRankFunction, sparse_lowrank_triton, support_layout

    g = torch.Generator(dev).manual_seed(0)
    n, m, r = s["dim"], s["ffn"], s["rank"]
    x = torch.randn(s["tokens"], n, device=dev, generator=g).requires_grad_()
    A = (torch.randn(r, n, device=dev, generator=g) / n**0.5).requires_grad_()
    B = (0.01 * torch.randn(m, r, device=dev, generator=g)).requires_grad_()
    nnz = int(s["delta"] * m * n)
    index = torch.randperm(m * n, device=dev, generator=g)[:nnz].sort().values
    values = (torch.rand(nnz, device=dev, generator=g) * 2 / n**0.5 - 1 / n**0.5).requires_grad_()
    layout = support_layout(index, m, n)
    block_rows = max(1, (1 << 22) // n)
    variants = {"reference": lambda x, A, B, v: SparseLowRankFunction.apply(x, A, B, v, index, 0.0625, block_rows),
                "triton": lambda x, A, B, v: sparse_lowrank_triton(x, A, B, v, index, 0.0625, layout)}
    out = _autograd_case(variants, [x, A, B, values], dev, repeats, autocast=dev.type == "cuda")
    out["layout_bytes"] = layout.nbytes
    return out


def bench_cola(s: dict, dev: torch.device, repeats: int) -> dict:
    from lrpretrain.kernels.lowrank_act import cola_linear, cola_linear_reference

    g = torch.Generator(dev).manual_seed(0)
    n, m, r = s["dim"], s["ffn"], s["rank"]
    x = torch.randn(s["tokens"], n, device=dev, generator=g).requires_grad_()
    std = (r * (n + m)) ** -0.25
    A = (std * torch.randn(r, n, device=dev, generator=g)).requires_grad_()
    B = (std * torch.randn(m, r, device=dev, generator=g)).requires_grad_()
    return _autograd_case({"reference": cola_linear_reference, "triton": cola_linear}, [x, A, B], dev, repeats,
                          autocast=dev.type == "cuda")


def bench_adam(s: dict, dev: torch.device, repeats: int, bits: int, pure_bf16: bool) -> dict:
    """One AdamW step of a (ffn x dim) matrix and the (vocab x dim) embedding: the PyTorch step against the
    fused kernel (fp32 weights with 8-bit moments, or bf16 weights with stochastic rounding)."""
    from lrpretrain.kernels.adam import fused_adam_step
    from lrpretrain.optim import AdamW
    from lrpretrain.optim.bf16 import Bf16Update

    dtype = torch.bfloat16 if pure_bf16 else torch.float32
    out: dict = {}
    weights = {}
    for name, fused in (("reference", None), ("triton", fused_adam_step)):
        g = torch.Generator(dev).manual_seed(0)
        params = [torch.nn.Parameter((0.02 * torch.randn(*shape, device=dev, generator=g)).to(dtype))
                  for shape in ((s["ffn"], s["dim"]), (s["vocab"], s["dim"]))]
        for p in params:
            p.grad = (1e-3 * torch.randn(p.shape, device=dev, generator=g)).to(dtype)
        opt = AdamW(params, lr=1e-3, weight_decay=0.1, state_bits=bits)
        opt.fused_adam = fused
        if pure_bf16:
            opt.bf16_update = Bf16Update("stochastic", seed=0)
        seconds, peak = _timed(opt.step, dev, repeats)
        out[name] = {"seconds": seconds, "peak_bytes": peak}
        weights[name] = [p.detach().clone() for p in params]
    equal = sum(int((a == b).sum()) for a, b in zip(weights["reference"], weights["triton"]))
    total = sum(a.numel() for a in weights["reference"])
    out["triton"]["weights_bitwise_equal"] = equal / total
    out["triton"]["max_rel_diff"] = {"weights": max(_rel(a, b) for a, b in zip(weights["triton"], weights["reference"]))}
    return out


def run(kernel: str, size: str, repeats: int | None = None) -> dict:
    dev = _device()
    s = SHAPES[size]
    reps = repeats or (5 if dev.type == "cuda" else 1)
    fn = {"loss": lambda: bench_loss(s, dev, reps), "sltrain": lambda: bench_sltrain(s, dev, reps),
          "cola": lambda: bench_cola(s, dev, reps), "adam8": lambda: bench_adam(s, dev, reps, 8, False),
          "adam_bf16": lambda: bench_adam(s, dev, reps, 32, True)}[kernel]
    t0 = time.perf_counter()
    res = fn()
    ref = res.get("reference", {}).get("seconds")
    for rec in res.values():
        if isinstance(rec, dict) and rec.get("seconds") and ref:
            rec["speedup_vs_reference"] = ref / rec["seconds"]
    return {"kernel": kernel, "size": size, "shapes": s, "device": str(dev),
            "gpu": torch.cuda.get_device_name(0) if dev.type == "cuda" else None, "torch": torch.__version__,
            "variants": res, "wall_s": time.perf_counter() - t0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernel", default="all", choices=[*KERNELS, "all"])
    ap.add_argument("--size", default="1b", choices=list(SHAPES))
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--out", help="write the results as JSON")
    args = ap.parse_args()
    results = [run(k, args.size, args.repeats) for k in (KERNELS if args.kernel == "all" else [args.kernel])]
    text = json.dumps(results, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
