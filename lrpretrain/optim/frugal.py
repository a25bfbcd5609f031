"""FRUGAL (Zmushko et al., ICML 2025): a state-full subspace trained with Adam, the rest of the
gradient with a state-free rule (signSGD), so every step is full rank at GaLore-like memory.

``subspace`` chooses the state-full part of each projected weight, refreshed every T steps:

- ``svd``: the top-r singular vectors of G (GaLore's basis), r = round(ρ · the projected dimension);
- ``random``: a random orthonormal basis of the same size (from a seed kept in the state);
- ``block``: whole matrices: round(ρ · #weights) of the projected weights get full Adam, the others
  only the state-free rule and hold no moments (BAdam-like; the FRUGAL scripts' default). Which
  weights are active is a pure function of the cycle index t // T (``block_order``: ``random`` from the
  optimizer seed, ``ascending``, ``descending``), so each weight decides alone, in any order, and a
  resumed run makes the same choices.

With R = project(G) and Adam in torch.optim.AdamW's form on R (FRUGAL's code uses that form,
eps added after the bias correction), the update of a projected weight is

    Δ = lr·s · (project_back(Adam(R))) + lr·s·s_free · sign(G - project_back(R))

(s = ``scale``, the reference's ``proj_params_lr_scale``; s_free = ``inactive_lr_scale``;
``inactive_update_rule`` ``sign_sgd`` | ``sgd`` | ``none``). Moments are reset at every refresh by
default (the reference's ``reset_statistics=True``), bias correction included. Facts from the
FRUGAL code (frugal/proj_optimizer_templates.py, galore_projector.py, adamw.py); code is ours.
"""

from __future__ import annotations

from typing import Any

import torch

from lrpretrain.optim import moments
from lrpretrain.optim.projector import RandomBasis, SVDBasis, next_seed, project_back, projection_side
from lrpretrain.optim.subspace import SubspaceAdam

SUBSPACES = ("svd", "random", "block")
INACTIVE_RULES = ("sign_sgd", "sgd", "none")
BLOCK_ORDERS = ("random", "ascending", "descending")


class FrugalAdamW(SubspaceAdam):
    form = "torch"
    group_keys = ("density", "update_proj_gap", "scale", "proj_type")
    group_defaults = {"moments_on_refresh": "reset", "clamp_rank": False, "subspace": "svd",
                      "inactive_update_rule": "sign_sgd", "inactive_lr_scale": 1.0, "block_order": "descending",
                      "basis_dtype": "fp32"}

    def __init__(self, params, subspace: str = "svd", **kw):
        if subspace not in SUBSPACES:
            raise ValueError(f"unknown subspace '{subspace}'; allowed: {SUBSPACES}")
        self.subspace = subspace
        basis = RandomBasis("orthonormal") if subspace == "random" else SVDBasis()
        self._active_sets: dict[tuple[int, int], set[int]] = {}
        self._positions: dict[int, int] = {}
        super().__init__(params, basis, **kw)

    def check_group(self, group: dict[str, Any]) -> None:
        group["subspace"] = self.subspace
        super().check_group(group)
        if not 0 < group["density"] <= 1:
            raise ValueError(f"density={group['density']} must be in (0, 1]")
        if group["inactive_update_rule"] not in INACTIVE_RULES:
            raise ValueError(f"inactive_update_rule='{group['inactive_update_rule']}'; allowed: {INACTIVE_RULES}")
        if group["block_order"] not in BLOCK_ORDERS:
            raise ValueError(f"block_order='{group['block_order']}'; allowed: {BLOCK_ORDERS}")
        if self.subspace == "block" and group["moments_on_refresh"] != "reset":
            raise ValueError("subspace=block re-initialises the moments of every activated weight: "
                             "moments_on_refresh must be reset")

    def rank_of(self, p: torch.Tensor, group: dict[str, Any]) -> int:
        """r = round(ρ · d), d the projected dimension (FRUGAL's galore_projector), at least 1."""
        m, n = p.shape
        side = projection_side(group["proj_type"], (m, n))
        d = {"left": m, "right": n, "full": min(m, n)}[side]
        return max(1, round(d * group["density"]))

    # -- subspace = svd | random -------------------------------------------------------------------
    def update(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any], G: torch.Tensor,
               R: torch.Tensor, N: torch.Tensor, P, Q, side: str, step_size: float) -> torch.Tensor:
        delta = project_back(N, P, Q).mul_(group["scale"] * step_size)
        return delta.add_(self._state_free(G - project_back(R, P, Q), group))

    def _state_free(self, residual: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        rule, lr = group["inactive_update_rule"], group["lr"] * group["scale"] * group["inactive_lr_scale"]
        if rule == "sign_sgd":
            return residual.sign_().mul_(lr)
        if rule == "sgd":
            return residual.mul_(lr)
        return residual.zero_()

    # -- subspace = block --------------------------------------------------------------------------
    def step_param(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        if not group.get("projected") or self.subspace != "block":
            super().step_param(p, group)
            return
        G, state = p.grad, self.state[p]
        if not state:
            state["step"] = 0
        T = group["update_proj_gap"]
        active = self._position(p, group) in self._active_set(group, state["step"] // T)
        if state["step"] % T == 0 or active != moments.has_moments(state):
            if active:  # (re)activated: fresh moments, as the reference clears the state at every switch
                moments.init_moments(state, p, group["state_bits"])
            else:  # inactive weights hold no moments: that is the memory saving
                moments.drop_moments(state)
        state["step"] += 1
        lr, wd = group["lr"], group["weight_decay"]
        if wd != 0:
            p.mul_(1 - lr * wd)
        if active:
            beta1, beta2 = group["betas"]
            m, v, t = moments.update(state, G, beta1, beta2)
            N, factor = moments.normalized(m, v, t, beta1, beta2, group["eps"], self.form)
            p.add_(N.to(p.dtype), alpha=-lr * group["scale"] * factor)
        else:
            p.sub_(self._state_free(G.clone(), group).to(p.dtype))

    def _position(self, p: torch.Tensor, group: dict[str, Any]) -> int:
        if id(p) not in self._positions:  # (re)built lazily: groups can be added or reloaded
            self._positions = {id(q): i for g in self.param_groups for i, q in enumerate(g["params"])}
        return self._positions[id(p)]

    def _active_set(self, group: dict[str, Any], cycle: int) -> set[int]:
        key = (id(group), cycle)  # a cache of a pure function of the cycle
        if key not in self._active_sets:
            n = len(group["params"])
            k = max(1, round(n * group["density"]))
            order = group["block_order"]
            if order == "random":
                g = torch.Generator().manual_seed(next_seed(self.seed * 1_000_003 + cycle))
                chosen = torch.randperm(n, generator=g)[:k].tolist()
            elif order == "ascending":
                chosen = [(cycle * k + j) % n for j in range(k)]
            else:  # descending: the last weights first
                chosen = [(n - 1 - cycle * k - j) % n for j in range(k)]
            if len(self._active_sets) > 64:
                self._active_sets.clear()
            self._active_sets[key] = set(chosen)
        return self._active_sets[key]
