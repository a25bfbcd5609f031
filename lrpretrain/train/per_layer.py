"""Per-layer (in-backward) updates: ``trainer.per_layer_update=true``.

Each parameter's optimizer step runs inside the backward, in a post-accumulate-grad hook, as soon as
its gradient is complete, through the optimizer's own ``update_param(p, group)`` (every optimizer here
is a :class:`~lrpretrain.optim.ParamwiseOptimizer`, so this is the same code as the global step);
the gradient is freed at once. At most one parameter's gradient is alive at a time instead of all of
them: for AdamW that removes the gradient term (4 bytes per parameter in fp32) from peak memory.

What stays exact, and what it costs:

- **Schedule.** The trainer sets the learning rate before the backward that steps, from the number
  of optimizer updates done (never micro-batches).
- **Gradient accumulation.** Micro-batches before the last only accumulate (the hooks do nothing);
  each parameter steps once, in the last micro-batch's backward, from its complete gradient. The
  gradients are therefore held until the last micro-batch: the memory saving is the full one only
  without accumulation.
- **Clipping** (``optim.grad_clip`` > 0) is never skipped. ``trainer.per_layer_clip`` chooses how:

  ``global`` (default): exact global-norm clipping, the same update as the global step, bit for bit.
  The norm must be known before the first parameter steps, so the last micro-batch is
  backpropagated twice: pass 1 takes each parameter's gradient norm and frees the gradient at once;
  pass 2 scales every gradient by min(1, c / (‖g‖ + 1e-6)) and steps. Pass 2 reuses pass 1's graph
  (``retain_graph``; activations then stay alive through pass 1, which peaks where an ordinary
  backward starts) when it can, and recomputes the forward when the graph cannot be run twice
  (``trainer.recompute=selective|method``; this assumes a deterministic forward, which holds for
  the LLaMA here and every built-in method: no dropout). Cost: one more backward per update (about
  +2/3 of the step's FLOPs), or one more forward and backward (+100%) when the forward is recomputed.
  With accumulation the gradients are all held by the last micro-batch anyway, so there is nothing
  to save: the update then runs after the last backward, exactly as the global step (no second pass).

  With ``optim.grad_clip=0`` there is nothing to clip, but ``global`` still takes the norm first so
  that the non-finite guard stays all-or-nothing (below).

  ``param``: one backward; each parameter's gradient is clipped to norm c on its own
  (g · min(1, c / (‖g‖ + 1e-6))). This is *not* global clipping: a parameter whose gradient is
  small is never scaled down because another's is large, so the update differs from the global
  step's whenever global clipping would act. With ``optim.grad_clip=0`` it is the plain single-pass
  per-layer update, equal to the global step (as long as every gradient is finite).

- **Non-finite guard** (a non-finite value must never reach the weights or the optimizer state).
  A non-finite loss is known before the last backward: nothing is stepped. With ``global`` the
  gradient norm of the whole update is known before any parameter steps (pass 1), so a non-finite
  gradient skips the whole update, exactly as the global step does. With ``param`` a gradient is
  only seen when its parameter's turn comes: each gradient's norm is checked before that parameter
  steps (one host sync per parameter), a non-finite one is never applied, and from then on no
  further parameter of this update steps. Parameters that stepped earlier in the backward (those
  nearer the output) keep their update: the update is recorded as skipped, counted by the guard
  (``trainer.on_nonfinite``, ``trainer.max_nonfinite``), and the number of parameters that stepped
  is logged (``partial_update``). Use ``global`` where all-or-nothing matters more than the pass.
- **Grad norm metric.** ``grad_norm`` is the global norm before clipping, from the same per-tensor
  norms in the same order as the global step, so the two agree bit for bit.
- **Checkpoints.** The optimizer and its state are the same objects as with the global step; the
  hooks look up each parameter's group at every step, so a resumed run (whose groups were replaced
  by ``load_state_dict``) continues exactly.
- Methods' ``after_step`` hooks run after the whole update, as always; they cannot read gradients
  (already freed).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lrpretrain.comm import local
from lrpretrain.errors import ConfigError
from lrpretrain.optim import ParamwiseOptimizer
from lrpretrain.optim.clip import clip_coefficient, total_norm


@dataclass
class Outcome:
    grad_norm: float  # global norm of the update's gradient before clipping (nan if not computed)
    applied: bool  # every parameter stepped
    stepped: int  # parameters that stepped (on a skipped update: those stepped before the fault was seen)


class PerLayerUpdate:
    """Post-accumulate-grad hooks that step ``optimizer`` one parameter at a time inside the backward."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, clip: str, max_norm: float,
                 accum_steps: int, reusable_graph: bool, strategy: Any = None):
        if not isinstance(optimizer, ParamwiseOptimizer):
            raise ConfigError(f"trainer.per_layer_update=True is invalid: the method's optimizer "
                              f"{type(optimizer).__name__} is not a lrpretrain.optim.ParamwiseOptimizer (no "
                              "per-parameter step_param); use trainer.per_layer_update=false")
        self.optimizer = optimizer
        # distributed.strategy: makes each gradient global before it steps (DDP reduces it in the hook;
        # FSDP2's hooks fire after the reduce-scatter) and takes norms across shards
        self.strategy = strategy
        self.clip, self.max_norm = clip, max_norm
        self.reusable_graph = reusable_graph
        # With global clipping and accumulation every gradient is held until the last micro-batch anyway:
        # the trainer then runs its ordinary step (exact), and no hook is needed.
        self.in_backward = not (clip == "global" and accum_steps > 1)
        self.model = model
        self.params: list[torch.Tensor] = []
        self._handles: list = []
        self._phase: str | None = None  # None: accumulate | param: "step" | global: "norm", then "global_step"
        self._norms: list[torch.Tensor | None] = []
        self._coef: torch.Tensor | None = None
        self._blocked = False
        self._stepped = 0
        if self.in_backward:
            self._hook_parameters()

    def _hook_parameters(self) -> None:
        """Hook every trainable parameter the optimizer holds, in the model's order (the order the
        global step's norm uses: the same total, bit for bit)."""
        owned = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        params = [p for p in self.model.parameters() if id(p) in owned and p.requires_grad]
        if [id(p) for p in params] == [id(p) for p in self.params]:
            return
        self.close()  # a method swapped, added or froze parameters (e.g. in after_step): hook the new set
        self.params = params
        self._slot = {id(p): i for i, p in enumerate(params)}
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for p in params]

    def describe(self) -> str:
        if not self.in_backward:
            return ("per-layer updates: with gradient accumulation and trainer.per_layer_clip=global every gradient "
                    "is held until the last micro-batch, so the update runs after it as the ordinary step")
        if self.clip == "global":
            second = "reusing the graph" if self.reusable_graph else "recomputing the forward"
            return (f"per-layer updates inside the backward; the global gradient norm first, for exact clipping and an "
                    f"all-or-nothing non-finite guard (one more backward per update, {second})")
        clip = f"each gradient clipped to norm {self.max_norm} on its own" if self.max_norm > 0 else "no clipping"
        return f"per-layer updates inside the backward, one pass; {clip}; non-finite gradients checked per parameter"

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # -- one update -------------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor, loss_is_finite: bool, forward_again: Callable[[], torch.Tensor]) -> Outcome:
        """The last micro-batch's backward, stepping every parameter inside it.

        ``loss`` is that micro-batch's (normalised) loss; ``forward_again`` recomputes it from the same
        batch, for the second pass of exact global clipping when the graph cannot be run twice.
        """
        if not loss_is_finite:  # nothing steps; the graph is dropped without a backward
            return Outcome(math.nan, False, 0)
        self._hook_parameters()
        self._norms, self._blocked, self._stepped, self._coef = [None] * len(self.params), False, 0, None
        if self.clip == "param":
            norm = self._run(loss, "step")
            return Outcome(float(norm), not self._blocked, self._stepped)
        norm = self._run(loss, "norm", retain_graph=self.reusable_graph)
        if not math.isfinite(float(norm)):
            return Outcome(float(norm), False, 0)
        # without clipping nothing is scaled, as in the global step
        self._coef = clip_coefficient(self.max_norm, norm) if self.max_norm > 0 else None
        self._run(loss if self.reusable_graph else forward_again(), "global_step")
        return Outcome(float(norm), True, self._stepped)

    def _run(self, loss: torch.Tensor, phase: str, retain_graph: bool = False) -> torch.Tensor:
        self._phase = phase
        try:
            loss.backward(retain_graph=retain_graph)
        finally:
            self._phase = None
        return total_norm([n for n in self._norms if n is not None])

    def _norm(self, g: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(g) if self.strategy is None else self.strategy.tensor_norm(g)

    @torch.no_grad()
    def _hook(self, p: torch.Tensor) -> None:
        if self._phase is None:  # an earlier micro-batch: let the gradient accumulate
            return
        if self.strategy is not None:
            self.strategy.per_layer_grad(p)
        g, i = p.grad, self._slot[id(p)]
        if self._phase == "norm":  # pass 1 of global: only the norm; free the gradient at once
            self._norms[i] = self._norm(g)
            p.grad = None
            return
        if self._phase == "step":  # per_layer_clip=param: this gradient alone decides
            if self._blocked:
                p.grad = None
                return
            self._norms[i] = norm = self._norm(g)
            if not math.isfinite(norm):  # never apply it, nor any later parameter of this update
                self._blocked = True
                p.grad = None
                return
            if self.max_norm > 0:
                local(g).mul_(clip_coefficient(self.max_norm, norm))
        elif self._coef is not None:  # pass 2 of global: the norm is known
            local(g).mul_(self._coef)
        self.optimizer.update_param(p, self.optimizer.group_of(p))
        self._stepped += 1
        p.grad = None
