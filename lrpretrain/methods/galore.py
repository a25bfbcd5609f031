"""GaLore (Zhao et al., ICML 2024): full-rank weights, Adam states on a rank-r SVD projection of each
target gradient, refreshed every T steps. Optimizer: :class:`lrpretrain.optim.GaLoreAdamW`.

``method=galore`` with ``method.rank`` (r), ``method.scale`` (α), ``method.update_proj_gap`` (T),
``method.proj_type``, ``method.moments_on_refresh`` (keep, as the reference | reset | rotate),
``method.state_bits`` (8: GaLoreAdamW8bit). Per-size settings of the paper: conf/experiment/galore_c4_*.
"""

from __future__ import annotations

from dataclasses import dataclass

from lrpretrain.methods import register_method
from lrpretrain.methods.subspace import SubspaceConfig, SubspaceMethod
from lrpretrain.optim import GaLoreAdamW


@dataclass
class GaLoreConfig(SubspaceConfig):
    """GaLore's C4 defaults (60M script): r = 128, α = 0.25, T = 200, std projection."""


@register_method("galore")
class GaLore(SubspaceMethod):
    Config = GaLoreConfig

    def make_optimizer(self, groups, **kw) -> GaLoreAdamW:
        return GaLoreAdamW(groups, **kw)
