"""GaLore (Zhao et al., ICML 2024): Adam on the low-rank projection of each target weight's gradient.

For a projected weight, with R = project(G) and Adam's N = m / (sqrt(v) + eps) on R, the update is
Δ = lr · sqrt(1-b2^t)/(1-b1^t) · α · project_back(N): the step size, eps placement and step counting of
jiaweizzhao/GaLore (galore_torch/adamw.py, galore_projector.py): the basis is the top-r singular
vectors of the gradient at steps 0, T, 2T, ... of each weight, its moments are kept across refreshes
(``moments_on_refresh=keep``). The projector is computed in fp32 and stored in the gradient's dtype
(GaLore casts it back to bf16 under pure-bf16 training; our fp32 master weights keep it fp32).

``GaLoreAdamW(basis=DCTBasis())`` is the SVD-free variant (``method=galore_dct``).
"""

from __future__ import annotations

from typing import Any

import torch

from lrpretrain.optim.projector import Basis, SVDBasis, project_back
from lrpretrain.optim.subspace import SubspaceAdam


class GaLoreAdamW(SubspaceAdam):
    def __init__(self, params, basis: Basis | None = None, **kw):
        super().__init__(params, basis or SVDBasis(), **kw)

    def update(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any], G: torch.Tensor,
               R: torch.Tensor, N: torch.Tensor, P, Q, side: str, step_size: float) -> torch.Tensor:
        return project_back(N, P, Q).mul_(group["scale"] * step_size)  # α · P N (or N Q, P N Q)
