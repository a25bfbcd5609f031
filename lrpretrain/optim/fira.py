"""Fira (Chen et al., 2024): GaLore plus the out-of-subspace residual, rescaled, under a norm-growth limiter.

With R = project(G), N = m / (sqrt(v) + eps) on R, per channel c of the un-projected dimension
phi_c = ||N_c|| / (||R_c|| + 1e-8) (norm-based scaling), the residual

    S = G - α · project_back(R)   (``residual=reference``: xichen-fy/Fira optimizer_torch/fira_adamw.py)
    S = G - project_back(R)       (``residual=paper``: the paper's equation)

becomes S̃ = phi ⊙ S, limited so that ||S̃_t|| <= γ ||S̃_{t-1}|| (γ = 1.01), and the update is
Δ = lr · sqrt(1-b2^t)/(1-b1^t) · (α · project_back(N) + S̃). The reference code subtracts the
α-scaled back-projection (its ``project_back`` multiplies by α), so with α = 0.25 three quarters of
the in-subspace gradient stay in the residual; the paper's S is orthogonal to the subspace. Both are
offered; the default is the code's, which produced the published numbers.

Only one-sided projections are defined (phi needs an un-projected dimension): ``proj_type=full`` is
refused. State besides GaLore's: one scalar per weight (the limiter's previous norm).
"""

from __future__ import annotations

from typing import Any

import torch

from lrpretrain.optim.projector import Basis, SVDBasis, project_back
from lrpretrain.optim.subspace import SubspaceAdam, channel_scaling, limit_norm_growth

RESIDUALS = ("reference", "paper")


class FiraAdamW(SubspaceAdam):
    group_defaults = {**SubspaceAdam.group_defaults, "residual": "reference", "limiter_gamma": 1.01}

    def __init__(self, params, basis: Basis | None = None, **kw):
        super().__init__(params, basis or SVDBasis(), **kw)

    def check_group(self, group: dict[str, Any]) -> None:
        super().check_group(group)
        if group["proj_type"] == "full":
            raise ValueError("Fira needs a one-sided projection: proj_type=full has no un-projected dimension")
        if group["residual"] not in RESIDUALS:
            raise ValueError(f"residual='{group['residual']}'; allowed: {RESIDUALS}")
        if group["limiter_gamma"] < 1:
            raise ValueError(f"limiter_gamma={group['limiter_gamma']} must be >= 1")

    def update(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any], G: torch.Tensor,
               R: torch.Tensor, N: torch.Tensor, P, Q, side: str, step_size: float) -> torch.Tensor:
        alpha = group["scale"]
        residual = project_back(R, P, Q).mul_(-alpha if group["residual"] == "reference" else -1.0).add_(G)
        residual = limit_norm_growth(residual.mul_(channel_scaling(N, R, side)), state, group["limiter_gamma"])
        return project_back(N, P, Q).mul_(alpha).add_(residual).mul_(step_size)
