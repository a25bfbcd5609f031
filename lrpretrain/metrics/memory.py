"""Peak memory of a run: the CUDA allocator's, or the process's peak resident set on the CPU."""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def reset_peak_memory(device) -> None:
    """Start a new peak for :func:`peak_memory_mb` (each run of an in-process sweep gets its own)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: "5" resets the process's peak resident set size (VmHWM) to its current size
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory_mb(device) -> float | None:
    """Peak memory since :func:`reset_peak_memory`, in MiB: on CUDA the most the caching allocator had
    allocated to tensors (``torch.cuda.max_memory_allocated``); on the CPU the process's peak resident
    set size (VmHWM), which also counts the interpreter and libraries (~0.3-0.5 GiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS (never reset)
    return rss / (2**20 if sys.platform == "darwin" else 1024)
