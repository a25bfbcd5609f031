"""AdamW as a per-parameter step, with fp32 or blockwise 8-bit moments.

The arithmetic is that of ``torch.optim.AdamW(foreach=False)`` (decoupled weight decay, bias
correction folded into the step size and the denominator), operation for operation, so with fp32
moments it matches PyTorch's single-tensor implementation bit for bit (tests/test_optim.py). State per
parameter: ``step`` (a 0-d float32 tensor, as in PyTorch), ``exp_avg`` (m) and ``exp_avg_sq`` (v), all
plain tensors, so checkpoints load with ``torch.load(weights_only=True)``.

``state_bits=8`` (``optim.state_bits=8``) stores m and v of every tensor with at least 4096 entries as
blockwise 8-bit codes (:mod:`lrpretrain.optim.quant8`, bitsandbytes' format: 8-bit Adam); each step
dequantises them, runs the same arithmetic in fp32 and quantises back. The step is element-wise, so
it runs in pieces of a large tensor (:meth:`~lrpretrain.optim.ParamwiseOptimizer.elementwise_step`):
the same result, with one piece's temporaries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from lrpretrain.optim import moments, quant8
from lrpretrain.optim.base import AdamStep, ParamwiseOptimizer


class AdamW(ParamwiseOptimizer):
    """AdamW (Loshchilov & Hutter) with PyTorch's defaults and arithmetic."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, state_bits: int = 32):
        if lr < 0 or eps <= 0 or not all(0 <= b < 1 for b in betas) or weight_decay < 0 or state_bits not in (8, 32):
            raise ValueError(f"invalid AdamW hyperparameters: lr={lr}, betas={betas}, eps={eps}, "
                             f"weight_decay={weight_decay}, state_bits={state_bits}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
                                  "state_bits": state_bits})

    def step_param(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        self.elementwise_step(p, group)

    def elementwise(self, p: torch.Tensor, group: dict[str, Any]) -> bool:
        return True

    def begin_elementwise(self, p: torch.Tensor, group: dict[str, Any]) -> AdamWStep:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            if quant8.use_8bit(p.numel(), group["state_bits"]):
                moments.init_moments(state, p, 8)
            else:  # fp32 also for a bf16 weight (trainer.precision=pure_bf16)
                state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
        state["step"] += 1
        step = int(state["step"].item())
        beta1, beta2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        bc1, bc2_sqrt = 1 - beta1**step, math.sqrt(1 - beta2**step)
        return AdamWStep("adamw", beta1, beta2, eps, lr, wd, step_size=lr / bc1, denom_scale=bc2_sqrt,
                         bias_correction1=bc1)


@dataclass(frozen=True)
class AdamWStep(AdamStep):
    """torch.optim.AdamW's element-wise update (:func:`adamw_update_`)."""

    bias_correction1: float = 1.0

    def __call__(self, w: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor) -> None:
        adamw_update_(w, g, m, v, self.lr, self.beta1, self.beta2, self.eps, self.weight_decay,
                      self.bias_correction1, self.denom_scale)


def adamw_update_(p: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, lr: float,
                  beta1: float, beta2: float, eps: float, weight_decay: float,
                  bias_correction1: float | torch.Tensor, bias_correction2_sqrt: float | torch.Tensor) -> None:
    """One AdamW update of ``p`` in place, in the operation order of ``torch.optim.AdamW(foreach=False)``.

    The bias corrections are floats (one step counter per tensor) or tensors that broadcast against
    ``p`` (one counter per row or column, see :class:`~lrpretrain.optim.VectorwiseAdamW`).
    """
    if weight_decay != 0:
        p.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step_size = lr / bias_correction1
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    if isinstance(step_size, torch.Tensor):
        p.sub_(exp_avg * step_size / denom)
    else:
        p.addcdiv_(exp_avg, denom, value=-step_size)
