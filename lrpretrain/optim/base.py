"""Optimizers whose update is a set of independent per-parameter steps.

Every optimizer in lrpretrain (AdamW, 8-bit AdamW, GaLore, Fira, ...) subclasses
:class:`ParamwiseOptimizer` and implements :meth:`~ParamwiseOptimizer.step_param`: the update of one
parameter from its gradient and its own state. :meth:`~ParamwiseOptimizer.step` is then just a loop,
and the per-layer (in-backward) update calls ``step_param`` for each parameter as soon as its
gradient is complete. One piece of code serves both, so they cannot drift apart.

The learning rate and every other hyperparameter are read from the parameter's group at the moment
of the step; the trainer sets ``group["lr"]`` (schedule x method factor) before stepping.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


class ParamwiseOptimizer(torch.optim.Optimizer):
    """Base class: subclasses implement :meth:`step_param`."""

    def step_param(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        """Update ``p`` in place from ``p.grad`` and ``self.state[p]`` with ``group``'s hyperparameters."""
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.step_param(p, group)
        return loss

    def group_of(self, p: torch.Tensor) -> dict[str, Any]:
        """The param group holding ``p`` (for per-parameter stepping outside :meth:`step`)."""
        index = getattr(self, "_group_index", None)
        if index is None or len(index) != sum(len(g["params"]) for g in self.param_groups):
            index = {id(q): g for g in self.param_groups for q in g["params"]}
            self._group_index = index
        return index[id(p)]
