"""Optimizers whose update is a set of independent per-parameter steps.

Every optimizer in lrpretrain (AdamW, 8-bit AdamW, GaLore, Fira, ...) subclasses
:class:`ParamwiseOptimizer` and implements :meth:`~ParamwiseOptimizer.step_param`: the update of one
parameter from its gradient and its own state. :meth:`~ParamwiseOptimizer.step` is then just a loop,
and the per-layer (in-backward) update calls ``step_param`` for each parameter as soon as its
gradient is complete. One piece of code serves both, so they cannot drift apart.

The learning rate and every other hyperparameter are read from the parameter's group at the moment
of the step; the trainer sets ``group["lr"]`` (schedule x method factor) before stepping.

Under ``trainer.precision=pure_bf16`` the trainer attaches a :class:`~lrpretrain.optim.bf16.Bf16Update`
(``bf16_update``): :meth:`ParamwiseOptimizer.update_param`, which the global and the per-layer step
both call, then runs ``step_param`` on an fp32 working copy of each bf16 weight and rounds the result
back (nearest, stochastic or Kahan-compensated). The steps themselves never see bf16 weights, so
their state (moments, bases) is fp32 as in any other run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain
from typing import Any

import torch

from lrpretrain.comm import local
from lrpretrain.optim import moments, quant8
from lrpretrain.optim.bf16 import Bf16Update

# Entries per piece of an element-wise step (a multiple of the 8-bit block of 256 entries).
CHUNK = 1 << 22
# update(w, g, m, v): one element-wise step of a piece of a weight, in place
ElementwiseUpdate = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]
# fused_adam(w, g, constants, m=..., v=... | m_codes=..., ..., rule=..., bits=..., comp=...): a piece's whole step
# in one kernel (trainer.kernels; lrpretrain.kernels.adam.fused_adam_step)
FusedAdam = Callable[..., None]


@dataclass(frozen=True)
class AdamStep:
    """One element-wise Adam update of a tensor, as :meth:`ParamwiseOptimizer.begin_elementwise` returns
    it: callable as ``update(w, g, m, v)`` (the PyTorch arithmetic, in the subclasses), and described by
    :meth:`kernel_constants` for a fused kernel that runs the same arithmetic on a whole piece.

    Both forms update m <- m.lerp(g, 1 - β1), v <- β2·v + (1 - β2)·g² and decay w <- w·(1 - lr·wd):
    ``adamw`` (torch.optim.AdamW): w <- w - (lr / bc1)·m / (√v / √bc2 + ε);
    ``direction`` (the GaLore family's dense Adam): w <- w + α·m / (√v / s + ε), α = -lr·f (f, s:
    :func:`~lrpretrain.optim.moments.normalized`'s form)."""

    form: str  # adamw | direction
    beta1: float
    beta2: float
    eps: float
    lr: float
    weight_decay: float
    step_size: float  # adamw: lr / bc1; direction: α
    denom_scale: float  # adamw: √bc2; direction: s

    def __call__(self, w: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor) -> None:
        raise NotImplementedError

    def kernel_constants(self) -> dict[str, Any]:
        return {"form": self.form, "lerp_weight": 1 - self.beta1, "beta2": self.beta2, "c2": 1 - self.beta2,
                "eps": self.eps, "decay": 1 - self.lr * self.weight_decay if self.weight_decay != 0 else None,
                "step": -self.step_size if self.form == "adamw" else self.step_size, "denom_scale": self.denom_scale}


def adam_defaults(name: str, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                  state_bits: int) -> dict[str, Any]:
    """The default group of an Adam-family optimizer, its values checked (one ValueError naming ``name``)."""
    if lr < 0 or eps <= 0 or not all(0 <= b < 1 for b in betas) or weight_decay < 0 or state_bits not in (8, 32):
        raise ValueError(f"invalid {name} hyperparameters: lr={lr}, betas={betas}, eps={eps}, "
                         f"weight_decay={weight_decay}, state_bits={state_bits}")
    return {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay, "state_bits": state_bits}


class ParamwiseOptimizer(torch.optim.Optimizer):
    """Base class: subclasses implement :meth:`step_param`."""

    bf16_update: Bf16Update | None = None  # set by the trainer under trainer.precision=pure_bf16
    fused_adam: FusedAdam | None = None  # set by the trainer under trainer.kernels (Triton)
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
                    self.update_param(p, group)
        return loss

    def update_param(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        """One parameter's update: :meth:`step_param`, through ``bf16_update`` for a bf16 weight; an
        element-wise step runs chunk by chunk (:meth:`elementwise_step`)."""
        rounding = self._rounding(p)
        if rounding is None or self.elementwise(p, group):  # an element-wise step rounds piece by piece itself
            self.step_param(p, group)
        else:
            rounding.step(p, self.state[p], self.slot_of(p), lambda: self.step_param(p, group))

    def _rounding(self, p: torch.Tensor) -> Bf16Update | None:
        rounding = self.bf16_update
        return rounding if rounding is not None and rounding.applies_to(p) else None

    # -- element-wise steps, chunk by chunk ----------------------------------------------------------
    def elementwise(self, p: torch.Tensor, group: dict[str, Any]) -> bool:
        """Whether ``p``'s step in ``group`` is element-wise (Adam on a whole tensor), so it can run on
        pieces of the flattened tensor (:meth:`begin_elementwise` then gives the per-piece update)."""
        return False

    def begin_elementwise(self, p: torch.Tensor, group: dict[str, Any]) -> ElementwiseUpdate:
        """Once per parameter and update: initialise ``self.state[p]``, advance its counters, and return
        ``update(w, g, m, v)``, the step applied in place to pieces of the fp32 weight ``w`` and moments
        ``m``, ``v`` from the fp32 gradient ``g``."""
        raise NotImplementedError

    @torch.no_grad()
    def elementwise_step(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        """An element-wise step in pieces of :data:`CHUNK` entries of the flattened tensor (the
        ``step_param`` of element-wise optimizers); a bf16 weight is rounded back piece by piece.

        The result is that of one whole-tensor step, bit for bit (every operation is element-wise and
        8-bit blocks never straddle two pieces); what changes is the memory: the step's temporaries
        (dequantised moments, Adam's denominator, under pure bf16 the fp32 copies of weight and
        gradient) are one piece's, not the tensor's -- for a 7B model's embedding 128 MiB instead of
        3.4 GiB. A tensor that is not contiguous is stepped whole.
        """
        update = self.begin_elementwise(p, group)
        rounding = self._rounding(p)
        state = self.state[p]
        W, G = local(p.data), local(p.grad)
        writer = rounding.writer(state, p.data, self.slot_of(p)) if rounding is not None else None
        stored = [local(state[k]) for k in ("exp_avg", "exp_avg_sq") if k in state]
        flat = all(t.is_contiguous() for t in (W, G, *stored))
        n = W.numel()
        if self.fused_adam is not None and flat and isinstance(update, AdamStep):
            for i in range(0, n, CHUNK):
                self._fused_piece(update, state, W, G, writer, slice(i, min(i + CHUNK, n)))
            if writer is not None:
                writer.close()
            return
        pieces = [slice(i, min(i + CHUNK, n)) for i in range(0, n, CHUNK)] if flat and n > CHUNK else [None]
        for sl in pieces:
            w = W if sl is None else W.view(-1)[sl]
            g = G if sl is None else G.view(-1)[sl]
            g = g if g.dtype == torch.float32 else g.float()
            m, v = moments.load_slice(state, sl)
            x = w if writer is None else writer.load(w, sl)
            update(x, g, m, v)
            moments.save_slice(state, sl, m, v)
            if writer is not None:
                writer.store(w, x, sl)
        if writer is not None:
            writer.close()

    def _fused_piece(self, update: AdamStep, state: dict[str, Any], W: torch.Tensor, G: torch.Tensor,
                     writer: Any, sl: slice) -> None:
        """The flat entries ``sl`` stepped by :attr:`fused_adam`: the stored moments (fp32, or 8-bit codes
        and the absmax of their blocks) and, for a bf16 weight, the rounding's bits or compensation."""
        assert self.fused_adam is not None
        kw: dict[str, Any] = {}
        if "exp_avg_q8" in state:
            b = moments.blocks_of(sl)
            for key, name in (("exp_avg", "m"), ("exp_avg_sq", "v")):
                kw[f"{name}_codes"] = local(state[key + "_q8"]).view(-1)[sl]
                kw[f"{name}_absmax"] = local(state[key + "_absmax"])[b]
            kw["qmap_m"], kw["qmap_v"] = quant8.qmap(True, W.device), quant8.qmap(False, W.device)
        else:
            kw["m"], kw["v"] = local(state["exp_avg"]).view(-1)[sl], local(state["exp_avg_sq"]).view(-1)[sl]
        if writer is not None:
            kw.update(writer.kernel_args(sl))
        self.fused_adam(W.view(-1)[sl], G.view(-1)[sl], update.kernel_constants(), **kw)

    def slot_of(self, p: torch.Tensor) -> int:
        """``p``'s position among all parameters of the optimizer (fixed for a run)."""
        self.group_of(p)  # refreshes the index when the groups changed
        return self._group_index[2][id(p)]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's, except that state tensors keep their dtype.

        torch.optim.Optimizer casts every state tensor to its parameter's dtype; the 8-bit codes
        (uint8) and subspace indices (int64) of our optimizers must not become floats, and the fp32
        moments of a bf16 weight (``trainer.precision=pure_bf16``) must stay fp32.
        """
        held, floats = {}, {}
        for pid, s in state_dict["state"].items():
            held[pid] = {k: v for k, v in s.items() if isinstance(v, torch.Tensor) and k != "step"}
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
            params = [q for g in self.param_groups for q in g["params"]]
            cached = (key, {id(q): g for g in self.param_groups for q in g["params"]},
                      {id(q): i for i, q in enumerate(params)})
            self._group_index = cached
        return cached[1][id(p)]
