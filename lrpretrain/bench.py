"""``lrpretrain bench``: step time, throughput, MFU and peak memory of a configuration, measured.

The run is built exactly as ``lrpretrain train`` builds it (:func:`lrpretrain.train.build_trainer`,
in a temporary run directory; evaluation and checkpoints off), then ``--warmup`` updates run untimed
and ``--steps`` timed; one more update is measured for memory. What is reported:

- ``step_s`` (median over the timed updates), ``tokens_per_s`` = batch_size x seq_len / step_s
  (every position, padding included, as the FLOPs count them);
- ``mfu`` = flops_per_token (the plugin's analytic ``cost()``) x tokens_per_s / peak FLOP/s. On CUDA
  the peak is the device's dense bf16 (or fp32) figure from :data:`PEAK_FLOPS`; on the CPU there is
  no such figure, so it is *measured*: the best of a few large fp32 matmuls on the run's threads
  (``peak_flops_source`` says which). ``--peak-flops`` gives the peak instead (a device missing from
  the table, or a peak measured once for many runs, as the GPU suite's CPU dry run does);
- ``warmup_s``: each warmup update's time (the first holds one-off work: CUDA start-up, GaLore's
  first SVDs, torch.compile);
- memory, on CUDA from the caching allocator: ``peak_bytes`` = ``torch.cuda.max_memory_allocated()``
  over the measured update (reserved bytes too). On the CPU there is no allocator statistic:
  ``peak_bytes`` = the exact bytes of every tensor alive when the update starts (parameters, buffers,
  optimizer states) + the highest running total of CPU tensor allocations minus frees during the
  update, from ``torch.profiler``'s memory events (every tensor allocation passes through them);
  ``rss_peak_delta`` is the resident-set growth over the update (process memory, allocator caching
  included);
- the breakdown, each measured on its own: ``param_bytes``, ``buffer_bytes``,
  ``optimizer_state_bytes`` (every tensor in the optimizer state), ``peak_grad_bytes`` (most bytes of
  live ``.grad`` tensors at any moment of the update, from gradient hooks), ``activation_bytes``
  (what autograd saves for the backward of one micro-batch, via ``saved_tensors_hooks``; not
  visible for ``trainer.recompute=selective``, whose kept outputs live in its own cache), and
  ``other_at_peak`` = peak - parameters - buffers - optimizer states (gradients, activations and
  temporaries alive at the peak).

The analytic estimate of the same configuration (:mod:`lrpretrain.estimate`) is reported beside it.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from lrpretrain.errors import UserError
from lrpretrain.estimate import estimate
from lrpretrain.methods.toolkit import saved_activation_bytes
from lrpretrain.options import split_options
from lrpretrain.train import build_trainer, load_config

# Dense (no sparsity) peak FLOP/s by device name substring: (bf16 tensor core, fp32 without TF32).
PEAK_FLOPS: dict[str, tuple[float, float]] = {
    "H200": (989e12, 67e12),
    "H100 PCIe": (756e12, 51e12),
    "H100": (989e12, 67e12),  # SXM
    "A100": (312e12, 19.5e12),
    "A10G": (70e12, 31.2e12),
    "L40S": (362e12, 91.6e12),
    "L4": (121e12, 30.3e12),
    "RTX 4090": (165e12, 82.6e12),
    "RTX 3090": (71e12, 35.6e12),
    "V100": (125e12, 15.7e12),  # fp16 tensor cores (no bf16)
}


def cuda_peak_flops(device: torch.device, bf16: bool) -> tuple[float | None, str]:
    name = torch.cuda.get_device_name(device)
    for key, (b, f) in PEAK_FLOPS.items():
        if key in name:
            return (b if bf16 else f), f"{name}: {'bf16' if bf16 else 'fp32'} peak from the datasheet table"
    return None, f"{name}: not in lrpretrain.bench.PEAK_FLOPS (no MFU)"


def cpu_peak_flops(size: int = 2048, repeats: int = 5) -> float:
    """Measured fp32 matmul FLOP/s on the current torch threads (best of ``repeats``)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2.0 * size**3 / best


class AllocationPeak:
    """Peak of live CPU tensor bytes during the region marked by :meth:`measure`, above its start,
    from torch.profiler's memory events.

    The profiler does not report the freeing of blocks allocated before it started, so one update is
    run under it first (8-bit optimizer states, for one, are reallocated at every step) and the peak is
    taken over the marked update only, relative to the running total where it starts.
    """

    MARK = "lrpretrain.bench.measured_update"

    def __enter__(self) -> AllocationPeak:
        from torch.profiler import ProfilerActivity, profile

        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._prof.__enter__()
        return self

    def measure(self):
        return torch.profiler.record_function(self.MARK)

    def __exit__(self, *exc) -> None:
        self._prof.__exit__(*exc)
        events = list(self._prof.profiler.kineto_results.events())
        start = min(e.start_ns() for e in events if e.name() == self.MARK)
        memory = [e for e in events if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
        running, base, peak = 0, None, 0
        for e in sorted(memory, key=lambda e: e.start_ns()):
            if base is None and e.start_ns() >= start:
                base = peak = running
            running += e.nbytes()
            if base is not None:
                peak = max(peak, running)
        self.peak = peak - base if base is not None else 0


def tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def optimizer_state_tensors(optimizer: torch.optim.Optimizer):
    for state in optimizer.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                yield v


def _status_kib(key: str) -> int | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    out = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
           "python": sys.version.split()[0], "loadavg": os.getloadavg()}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def bench(overrides: list[str], warmup: int = 2, steps: int = 5, memory: bool = True,
          peak_flops: float | None = None) -> dict[str, Any]:
    """Build the run as training does, time ``steps`` updates after ``warmup``, measure one more.
    ``peak_flops``: the FLOP/s that MFU is relative to (default: the CUDA table, or measured on the CPU)."""
    if warmup < 0 or steps < 1:
        raise UserError(f"--warmup={warmup} --steps={steps} is invalid: need warmup >= 0 and steps >= 1")
    if peak_flops is not None and not peak_flops > 0:
        raise UserError(f"--peak-flops={peak_flops} is invalid: need a FLOP/s figure > 0, e.g. 989e12")
    threads = torch.get_num_threads()  # trainer.threads sets it process-wide; restored on the way out
    with tempfile.TemporaryDirectory(prefix="lrpretrain-bench-") as tmp:
        forced = [f"run.dir={tmp}/run", "trainer.eval_at_start=false", "trainer.eval_every=0", "data.val_tokens=0",
                  "logging.progress=none", "logging.wandb=disabled", "trainer.resume=never",
                  f"trainer.max_steps={warmup + steps + 1}"]
        cfg, resolved = load_config([*overrides, *forced])
        trainer = build_trainer(cfg, resolved)
        try:
            return _measure(cfg, trainer, warmup, steps, memory, peak_flops)
        finally:
            trainer.data.close()
            trainer.logger.close()
            torch.set_num_threads(threads)


def _measure(cfg, trainer, warmup: int, steps: int, memory: bool, peak_flops: float | None) -> dict[str, Any]:
    device = trainer.device
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    tokens_per_update = cfg.trainer.batch_size * cfg.data.seq_len
    warmup_times = []
    for _ in range(warmup):
        t0 = time.perf_counter()
        trainer.train_step()
        sync()
        warmup_times.append(time.perf_counter() - t0)
    times, losses = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        losses.append(trainer.train_step()["loss"])
        sync()
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    bf16 = trainer.precision != "fp32"  # bf16 autocast or pure bf16: the bf16 peak
    if peak_flops is not None:
        source = "given (--peak-flops)"
    elif cuda:
        peak_flops, source = cuda_peak_flops(device, bf16)
    else:
        peak_flops = cpu_peak_flops()
        source = f"measured: best fp32 2048x2048 matmul on {torch.get_num_threads()} CPU thread(s)"
    out: dict[str, Any] = {
        "model": cfg.model.name, "method": cfg.method.name, "recompute": cfg.trainer.recompute,
        "per_layer_update": cfg.trainer.per_layer_update, "precision": trainer.precision, "device": str(device),
        "kernels": trainer.kernels.name,
        "micro_batch_size": cfg.trainer.micro_batch_size, "batch_size": cfg.trainer.batch_size,
        "seq_len": cfg.data.seq_len, "warmup": warmup, "steps": steps, "warmup_s": warmup_times, "step_s": step_s,
        "steps_s": times,
        "tokens_per_s": tokens_per_update / step_s, "flops_per_token": trainer.flops_per_token,
        "peak_flops": peak_flops, "peak_flops_source": source,
        "mfu": trainer.flops_per_token * tokens_per_update / step_s / peak_flops if peak_flops else None,
        "loss": losses[-1],
    }
    if memory:
        out.update(_memory(trainer, cuda))
    est = estimate(cfg, precision=trainer.precision, kernels=trainer.kernels)
    out["estimate"] = est.as_dict()
    return out


def _memory(trainer, cuda: bool) -> dict[str, Any]:
    model, opt = trainer.model, trainer.optimizer
    params = [p for p in model.parameters()]
    trainable = [p for p in params if p.requires_grad]
    mem: dict[str, Any] = {
        "param_bytes": tensor_bytes(params),
        "buffer_bytes": tensor_bytes(model.buffers()),
        "optimizer_state_bytes": tensor_bytes(optimizer_state_tensors(opt)),
    }
    peak_grad = [0]

    def grad_arrives(p, g):  # a tensor hook runs as p's gradient arrives, before it is accumulated
        live = sum(q.grad.numel() * q.grad.element_size() for q in trainable if q.grad is not None)
        peak_grad[0] = max(peak_grad[0], live + (g.numel() * g.element_size() if p.grad is None else 0))

    hooks = [p.register_hook(lambda g, p=p: grad_arrives(p, g)) for p in trainable]
    try:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = torch.cuda.memory_allocated()
            trainer.train_step()
            torch.cuda.synchronize()
            mem["peak_bytes"] = torch.cuda.max_memory_allocated()
            mem["start_bytes"] = start
            mem["peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
            mem["peak_source"] = "torch.cuda.max_memory_allocated() over one update"
        else:
            with AllocationPeak() as tracker:
                trainer.train_step()  # (see AllocationPeak)
                opt.zero_grad(set_to_none=True)
                mem["optimizer_state_bytes"] = tensor_bytes(optimizer_state_tensors(opt))
                static = mem["param_bytes"] + mem["buffer_bytes"] + mem["optimizer_state_bytes"]
                rss_ok = _reset_peak_rss()
                rss0 = _status_kib("VmRSS")
                with tracker.measure():
                    trainer.train_step()
                hwm = _status_kib("VmHWM")
            mem["peak_bytes"] = static + tracker.peak
            mem["start_bytes"] = static
            mem["rss_peak_delta"] = (hwm - rss0) * 1024 if rss_ok and hwm and rss0 else None
            mem["peak_source"] = ("parameters + buffers + optimizer states (exact) + peak of CPU tensor "
                                  "allocations minus frees during one update (torch.profiler memory events, "
                                  "after one profiled update)")
    finally:
        for h in hooks:
            h.remove()
    mem["peak_grad_bytes"] = peak_grad[0]
    mem["other_at_peak"] = mem["peak_bytes"] - mem["param_bytes"] - mem["buffer_bytes"] - mem["optimizer_state_bytes"]
    mem["activation_bytes"] = None
    if trainer.cfg.trainer.recompute != "selective":
        batch = next(trainer.data)
        loss, saved = saved_activation_bytes(model, lambda: trainer._loss(batch))
        del loss
        mem["activation_bytes"] = saved
    opt.zero_grad(set_to_none=True)
    return mem


def _gib(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x / 2**30:.3f} GiB" if abs(x) >= 2**30 else f"{x / 2**20:.1f} MiB"


def format_result(r: dict[str, Any]) -> str:
    e = r["estimate"]
    mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.2f}%"
    lines = [
        f"{r['model']} | method {r['method']} | recompute {r['recompute']} | per-layer "
        f"{'on' if r['per_layer_update'] else 'off'} | {r['precision']} | kernels {r.get('kernels', '-')} | {r['device']} | "
        f"{r['batch_size']} x {r['seq_len']} tokens per update (micro-batch {r['micro_batch_size']})",
        f"step time  {r['step_s']:.4f} s (median of {r['steps']} after {r['warmup']} warmup)",
        f"throughput {r['tokens_per_s']:,.0f} tokens/s   {r['flops_per_token'] * r['tokens_per_s'] / 1e12:.3f} TFLOP/s"
        f"   MFU {mfu} (peak {r['peak_flops'] / 1e12 if r['peak_flops'] else 0:.2f} TFLOP/s, {r['peak_flops_source']})",
    ]
    if "peak_bytes" in r:
        lines += [
            f"{'memory':<22} {'measured':>14} {'estimated':>14}",
            *(f"{k:<22} {_gib(m):>14} {_gib(x):>14}" for k, m, x in [
                ("peak", r["peak_bytes"], e["peak"]),
                ("parameters+buffers", r["param_bytes"] + r["buffer_bytes"], e["weights"]),
                ("optimizer states", r["optimizer_state_bytes"], e["optimizer_states"]),
                ("gradients (peak live)", r["peak_grad_bytes"], e["gradients"]),
                ("activations (saved)", r["activation_bytes"], e["activations"]),
                ("other at peak", r["other_at_peak"], e["peak"] - e["weights"] - e["optimizer_states"]),
            ]),
            f"peak source: {r['peak_source']}",
        ]
        if r.get("rss_peak_delta") is not None:
            lines.append(f"resident set grew by {_gib(r['rss_peak_delta'])} during the measured update")
    return "\n".join(lines)


def main(args: list[str]) -> int:
    """``lrpretrain bench [overrides] [--warmup N] [--steps N] [--no-memory] [--peak-flops F] [--json PATH]``."""
    opts, flags, overrides = split_options(args, "bench", {"--warmup": "N", "--steps": "N", "--json": "PATH",
                                                           "--peak-flops": "989e12"}, ("--no-memory",))
    memory = "--no-memory" not in flags
    try:
        warmup, steps = int(opts.get("--warmup", "2")), int(opts.get("--steps", "5"))
    except ValueError as e:
        raise UserError(f"--warmup and --steps must be integers ({e})") from e
    try:
        peak = float(opts["--peak-flops"]) if "--peak-flops" in opts else None
    except ValueError as e:
        raise UserError(f"--peak-flops must be a number of FLOP/s, e.g. 989e12 ({e})") from e
    result = bench(overrides, warmup, steps, memory, peak)
    result["machine"] = machine()
    result["command"] = "lrpretrain bench " + " ".join(args)
    print(format_result(result))
    if "--json" in opts:
        Path(opts["--json"]).write_text(json.dumps(result, indent=1) + "\n")
    return 0
