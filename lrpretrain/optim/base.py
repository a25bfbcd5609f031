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
from itertools import chain
from typing import Any

import torch


def adam_defaults(name: str, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                  state_bits: int) -> dict[str, Any]:
    """The default group of an Adam-family optimizer, its values checked (one ValueError naming ``name``)."""
    if lr < 0 or eps <= 0 or not all(0 <= b < 1 for b in betas) or weight_decay < 0 or state_bits not in (8, 32):
        raise ValueError(f"invalid {name} hyperparameters: lr={lr}, betas={betas}, eps={eps}, "
                         f"weight_decay={weight_decay}, state_bits={state_bits}")
    return {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay, "state_bits": state_bits}


class ParamwiseOptimizer(torch.optim.Optimizer):
    """Base class: subclasses implement :meth:`step_param`."""

    # True for an optimizer whose update needs the gradient at other parameter values, inside the step
    # (DLRT's S-step): the trainer then calls ``step(closure)`` with a closure that runs the update's
    # forward and backward again and returns the loss (torch's closure contract). Such an optimizer
    # steps the whole model at once and cannot serve per-layer updates.
    reevaluates: bool = False

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

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's, except that integer state tensors keep their dtype.

        torch.optim.Optimizer casts every state tensor to its parameter's dtype; the 8-bit codes
        (uint8) and subspace indices (int64) of our optimizers must not become floats.
        """
        held, floats = {}, {}
        for pid, s in state_dict["state"].items():
            held[pid] = {k: v for k, v in s.items() if isinstance(v, torch.Tensor) and not v.is_floating_point()
                         and k != "step"}
            floats[pid] = {k: v for k, v in s.items() if k not in held[pid]}
        super().load_state_dict({**state_dict, "state": floats})
        params = dict(zip(chain.from_iterable(g["params"] for g in state_dict["param_groups"]),
                          chain.from_iterable(g["params"] for g in self.param_groups)))
        for pid, tensors in held.items():
            p = params[pid]
            for k, v in tensors.items():
                self.state[p][k] = v.to(p.device)

    def group_of(self, p: torch.Tensor) -> dict[str, Any]:
        """The param group holding ``p`` (for per-parameter stepping outside :meth:`step`).

        Cached, and rebuilt when the groups change: :meth:`add_param_group` adds entries, and
        :meth:`load_state_dict` replaces every group dict (a stale index would hand out the old
        groups, whose ``lr`` the trainer no longer sets).
        """
        key = (id(self.param_groups), tuple(id(g) for g in self.param_groups),
               sum(len(g["params"]) for g in self.param_groups))
        cached = getattr(self, "_group_index", None)
        if cached is None or cached[0] != key:
            cached = (key, {id(q): g for g in self.param_groups for q in g["params"]})
            self._group_index = cached
        return cached[1][id(p)]
