"""AdamW with one step counter per row or column: the optimizer SwitchLoRA needs.

SwitchLoRA (Zhou et al., arXiv 2406.06564) replaces single LoRA vectors (rows a_i of A, columns b_i
of B) while training goes on. A replaced vector's counterpart must restart Adam on its own: its
moments are zeroed *and* its bias correction starts again from step 0, while every other vector of
the same matrix keeps its state. So the step counter, a scalar in AdamW, becomes a vector here (the
reference's ``StepAdamW``, switchlora/optimizer.py). On top, a vector can be frozen for a few updates
(its gradient is zeroed before the update), which is how SwitchLoRA lets the moments of a restarted
vector warm up while its counterpart is replaced.

A param group opts in with ``vectors="rows"`` (state["step"] has shape (rows, 1)) or
``vectors="columns"`` (shape (1, columns)); every other group is plain :class:`AdamW`, bit for bit
(``state_bits=8`` applies there; the per-vector groups, LoRA factors, keep fp32 moments).
State per opted-in parameter: ``step`` (float32, per vector), ``exp_avg``, ``exp_avg_sq``, ``frozen``
(updates left with a zeroed gradient, per vector) -- plain tensors, as every checkpoint needs.
"""

from __future__ import annotations

from typing import Any

import torch

from lrpretrain.optim.adamw import AdamW, adamw_update_

_AXES = ("rows", "columns")


class VectorwiseAdamW(AdamW):
    """AdamW; groups with ``vectors="rows"|"columns"`` get per-vector step counters and freezes."""

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        for group in self.param_groups:
            axis = group.get("vectors")
            if axis is not None and axis not in _AXES:
                raise ValueError(f"param group vectors={axis!r} is invalid; allowed: {', '.join(_AXES)}")
            if axis is not None and any(p.ndim != 2 for p in group["params"]):
                raise ValueError("param groups with per-vector state must hold matrices only")

    # -- the update ------------------------------------------------------------------------------
    def elementwise(self, p: torch.Tensor, group: dict[str, Any]) -> bool:
        return group.get("vectors") is None  # per-vector counters: stepped whole (LoRA factors are small)

    def step_param(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        axis = group.get("vectors")
        if axis is None:
            return super().step_param(p, group)
        state = self._vector_state(p, axis)
        frozen = state["frozen"]
        grad = p.grad.masked_fill(frozen > 0, 0)  # frozen vectors see a zero gradient (their moments still decay)
        frozen.sub_(1).clamp_(min=0)
        step = state["step"]
        if step.device != p.device:  # optimizer.load_state_dict leaves "step" where the checkpoint had it
            state["step"] = step = step.to(p.device)
        step += 1
        beta1, beta2 = group["betas"]
        adamw_update_(p, grad, state["exp_avg"], state["exp_avg_sq"], group["lr"], beta1, beta2, group["eps"],
                      group["weight_decay"], 1 - beta1**step, (1 - beta2**step).sqrt())

    # -- what SwitchLoRA does to single vectors --------------------------------------------------------
    @torch.no_grad()
    def restart_vectors(self, p: torch.Tensor, index: torch.Tensor) -> None:
        """Zero the moments and the step counter of the rows/columns ``index`` of ``p``."""
        state = self._vector_state(p)
        dim, index = self._dim(p), index.to(p.device)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            state[key].index_fill_(dim, index.to(state[key].device), 0)

    @torch.no_grad()
    def freeze_vectors(self, p: torch.Tensor, index: torch.Tensor, updates: int) -> None:
        """Zero the gradient of the rows/columns ``index`` of ``p`` in its next ``updates`` updates."""
        state = self._vector_state(p)
        state["frozen"].index_fill_(self._dim(p), index.to(p.device), float(updates))

    def frozen_vectors(self, p: torch.Tensor) -> torch.Tensor:
        """Bool per row/column of ``p``: is it frozen for the next update?"""
        return self._vector_state(p)["frozen"].flatten() > 0

    # -- helpers ---------------------------------------------------------------------------------------
    def _dim(self, p: torch.Tensor) -> int:
        axis = self.group_of(p).get("vectors")
        if axis is None:
            raise ValueError("this parameter has no per-vector state: put it in a group with vectors='rows'|'columns'")
        return 0 if axis == "rows" else 1

    def _vector_state(self, p: torch.Tensor, axis: str | None = None) -> dict[str, torch.Tensor]:
        state = self.state[p]
        if not state:
            dim = self._dim(p) if axis is None else _AXES.index(axis)
            shape = (p.shape[0], 1) if dim == 0 else (1, p.shape[1])
            state["step"] = torch.zeros(shape, dtype=torch.float32, device=p.device)
            # fp32 also for a bf16 weight (trainer.precision=pure_bf16): this state may be made outside a step
            # (a switch freezes vectors), where p is not the fp32 working copy that update_param hands the step
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
            state["frozen"] = torch.zeros(shape, dtype=torch.float32, device=p.device)
        return state
