"""Fused kernels for the hot paths of low-rank training, each beside its PyTorch reference
(``trainer.kernels=auto|torch|triton``; README "Kernels").

Importable as ``lrpretrain.kernels`` (pyproject's package-dir maps this folder there; never as
``kernels``, a PyPI package of that name exists and transformers imports it).

- :mod:`~lrpretrain.kernels.head_loss`: the LM head and the cross-entropy in token chunks, so the
  tokens x vocab logits never exist whole (PyTorch ``chunked``; liger-kernel's Triton one on CUDA);
- :mod:`~lrpretrain.kernels.sparse_lowrank`: SLTrain's y = x (s·B·A + S)ᵀ with the sparse S never made
  dense (Triton), and the PyTorch op that rebuilds the dense weight (the reference);
- :mod:`~lrpretrain.kernels.lowrank_act`: CoLA's B·σ(A·x) with SiLU in the first matmul's epilogue and
  σ recomputed in the backward from the r-dimensional pre-activation (Triton);
- :mod:`~lrpretrain.kernels.adam`: one element-wise Adam(W) step of a piece of a tensor in one kernel:
  fp32 or blockwise 8-bit moments (dequantise, update, requantise) and fp32 or bf16 weights (rounded
  to nearest, stochastically with the bits of lrpretrain/optim/bf16.py, or Kahan-compensated).

:func:`choose` turns ``trainer.kernels`` into what runs: ``auto`` runs the Triton kernels and
liger's loss on CUDA and the PyTorch references elsewhere, with the chunked loss (its memory saving
everywhere); ``torch`` runs today's PyTorch paths (the loss from the whole logits); ``triton`` runs the
Triton kernels, on CUDA or (``TRITON_INTERPRET=1``) in Triton's interpreter on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

from lrpretrain.kernels.head_loss import liger_refusal
from lrpretrain.kernels.triton_support import interpreting, triton_refusal

CHOICES = ("auto", "torch", "triton")


@dataclass(frozen=True)
class KernelChoice:
    """What ``trainer.kernels`` resolves to on a device."""

    triton: bool  # Triton kernels for the methods' ops and the optimizer step
    head_loss: str  # the loss: full (the model's logits) | chunked (PyTorch) | liger (Triton)
    note: str | None = None  # why auto fell back to a reference on CUDA

    @property
    def name(self) -> str:
        return ("triton" if self.triton else "torch") + f" (loss: {self.head_loss})"


def choose(kernels: str, cuda: bool, check: bool = True) -> KernelChoice:
    """``trainer.kernels`` on a device (``cuda``). With ``check``, what cannot run here is looked at:
    ``auto`` then falls back (and says why in ``note``), ``triton`` is refused (:func:`refusal`);
    without it (``lrpretrain estimate`` for a GPU from any machine) Triton and liger are assumed."""
    if kernels == "torch":
        return KernelChoice(False, "full")
    if kernels == "triton":
        return KernelChoice(True, "liger")
    if not cuda:
        return KernelChoice(False, "chunked")
    no_triton = triton_refusal(True) if check else None
    no_liger = (no_triton or liger_refusal()) if check else None
    note = "; ".join(f"trainer.kernels=auto: {what} ({why})" for what, why in (
        ("the PyTorch references run", no_triton), ("the loss is the chunked PyTorch one", no_liger)) if why)
    return KernelChoice(no_triton is None, "chunked" if no_liger else "liger", note or None)


def refusal(kernels: str, cuda: bool) -> str | None:
    """One line saying why ``trainer.kernels=kernels`` cannot run on this device, or None."""
    if kernels != "triton":
        return None
    why = triton_refusal(cuda) or liger_refusal()
    return None if why is None else f"trainer.kernels=triton cannot run here: {why}; allowed here: auto, torch"


__all__ = ["CHOICES", "KernelChoice", "choose", "refusal", "interpreting"]
