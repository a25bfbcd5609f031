"""SVD-free GaLore (Modoranu et al., 2025, "SVD-free low-rank adaptive gradient optimization"): the
subspace is r columns of a fixed orthonormal DCT-II basis, the ones best aligned with the gradient,
re-chosen every T steps with one matmul (norms of G·D or D^T·G); only their indices are stored.

Same keys and optimizer as ``galore`` (:class:`lrpretrain.optim.GaLoreAdamW` with a
:class:`~lrpretrain.optim.projector.DCTBasis`); ``moments_on_refresh=rotate`` is exact here up to a
clamp (a change of DCT columns is a sub-selection of coordinates).
"""

from __future__ import annotations

from dataclasses import dataclass

from lrpretrain.methods import register_method
from lrpretrain.methods.subspace import SubspaceConfig, SubspaceMethod
from lrpretrain.optim import GaLoreAdamW
from lrpretrain.optim.projector import DCTBasis


@dataclass
class GaLoreDCTConfig(SubspaceConfig):
    """GaLore's defaults (r = 128, α = 0.25, T = 200, std side)."""


@register_method("galore_dct")
class GaLoreDCT(SubspaceMethod):
    Config = GaLoreDCTConfig

    def make_optimizer(self, groups, **kw) -> GaLoreAdamW:
        return GaLoreAdamW(groups, basis=DCTBasis(), **kw)

    def refresh_temp_bytes(self, shape: tuple[int, int]) -> float:
        return 4.0 * shape[0] * shape[1]  # the scores' product Dᵀ·G (or G·D)

    def basis_bytes(self, shape: tuple[int, int]) -> int:
        rank = min(self.cfg.rank, min(shape))
        return 8 * rank * (2 if self.cfg.proj_type == "full" else 1)  # int64 indices only
