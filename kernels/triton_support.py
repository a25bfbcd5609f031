"""Triton where it can run: the import, the interpreter, and where a kernel may launch.

Triton is a dependency on Linux only (pyproject.toml); elsewhere this module stands in for it, so the
kernel modules import and their PyTorch references run, and a Triton kernel is refused with one line
(:func:`triton_refusal`). Triton kernels launch on CUDA, or on the CPU in Triton's interpreter
(``TRITON_INTERPRET=1``: every kernel runs as NumPy, slowly; the tests use it). The interpreter is
chosen when a kernel is *defined* (``triton.jit`` reads the variable at import), so it must be in the
environment before lrpretrain is imported; :func:`triton_refusal` says so when it was set later.
Under the interpreter bf16 arithmetic is wrong (ENVIRONMENT.md): the kernels here load bf16 tensors
as int16 bit patterns and convert in integer arithmetic, or run in fp32/fp16.
"""

from __future__ import annotations

import os
import types

try:
    import triton
    import triton.language as tl

    TRITON_ERROR: str | None = None
except ImportError as _e:  # not Linux, or triton not installed: the references still run
    TRITON_ERROR = f"{type(_e).__name__}: {_e}"

    def _identity(fn=None, **_kw):  # @triton.jit / @triton.autotune(...): the kernel is never launched
        return fn if fn is not None else (lambda f: f)

    triton = types.SimpleNamespace(jit=_identity, autotune=lambda *a, **k: _identity, Config=lambda *a, **k: None)
    tl = types.SimpleNamespace(constexpr=object)

__all__ = ["triton", "tl", "TRITON_ERROR", "interpreting", "triton_refusal", "cdiv", "next_power_of_2"]

_TRUE = ("1", "true", "yes", "on")
INTERPRET_AT_IMPORT = os.environ.get("TRITON_INTERPRET", "").lower() in _TRUE


def interpreting() -> bool:
    """Whether Triton kernels run in Triton's interpreter (``TRITON_INTERPRET=1`` when they were defined)."""
    return INTERPRET_AT_IMPORT


def triton_refusal(cuda: bool) -> str | None:
    """Why a Triton kernel cannot launch in this process (on CUDA when ``cuda``), or None."""
    if TRITON_ERROR is not None:
        return f"Triton cannot be imported ({TRITON_ERROR})"
    now = os.environ.get("TRITON_INTERPRET", "").lower() in _TRUE
    if now != INTERPRET_AT_IMPORT:
        return ("TRITON_INTERPRET changed after lrpretrain was imported (Triton reads it when a kernel is defined): "
                "set it in the environment before starting the process")
    if not cuda and not INTERPRET_AT_IMPORT:
        return ("Triton kernels launch on CUDA only (no CUDA device here); TRITON_INTERPRET=1 runs them on the CPU "
                "in Triton's interpreter, slowly")
    return None


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())
