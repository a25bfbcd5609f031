"""APOLLO and APOLLO-Mini (Zhu et al., MLSys 2025): Adam moments on a random rank-r projection of each
target gradient, used only to estimate a channel-wise (APOLLO) or tensor-wise (APOLLO-Mini, r = 1)
scaling of the raw gradient; Fira's norm-growth limiter on top. Optimizer: :class:`lrpretrain.optim.Apollo`.

Keys beyond GaLore's: ``scale_type`` (channel | tensor), ``scale_front`` (apply sqrt(α) before the
limiter), ``norm_growth_limiter``, ``limiter_gamma``, ``seed`` (of the random projections, stored as
integers in the optimizer state; the matrices are regenerated, never saved). Moments are kept when the
projection is resampled (the reference); ``reset`` is offered, ``rotate`` is not (the basis is not
orthonormal).
"""

from __future__ import annotations

from dataclasses import dataclass

from lrpretrain.errors import allowed, check
from lrpretrain.methods import register_method
from lrpretrain.methods.subspace import SubspaceConfig, SubspaceMethod
from lrpretrain.optim import Apollo as ApolloOptimizer
from lrpretrain.optim.apollo import SCALE_TYPES


@dataclass
class ApolloConfig(SubspaceConfig):
    """APOLLO's C4 scripts: r = 256 (128 at 60M, 192 at 130M), α = 1, T = 200, channel-wise."""

    rank: int = 256
    scale: float = 1.0
    scale_type: str = "channel"  # channel (APOLLO) | tensor (APOLLO-Mini)
    scale_front: bool = False  # multiply by sqrt(α) before the norm-growth limiter instead of after
    norm_growth_limiter: bool = True
    limiter_gamma: float = 1.01  # γ
    seed: int = 0  # seeds of the random projections

    def validate(self) -> None:
        super().validate()
        check(self.scale_type in SCALE_TYPES, "method.scale_type", self.scale_type, f"allowed: {allowed(SCALE_TYPES)}")
        check(self.limiter_gamma >= 1, "method.limiter_gamma", self.limiter_gamma, "must be >= 1")
        check(self.proj_type != "full", "method.proj_type", self.proj_type,
              "APOLLO scales per un-projected channel: use std, reverse_std, left or right")
        check(self.moments_on_refresh != "rotate", "method.moments_on_refresh", self.moments_on_refresh,
              "a random Gaussian projection is not orthonormal: allowed: keep, reset")


@dataclass
class ApolloMiniConfig(ApolloConfig):
    """APOLLO-Mini's scripts: rank 1, tensor-wise scaling, α = 128 (192 at 130M), sqrt(α) in front."""

    rank: int = 1
    scale: float = 128.0
    scale_type: str = "tensor"
    scale_front: bool = True


@register_method("apollo")
class Apollo(SubspaceMethod):
    Config = ApolloConfig

    def group_options(self):
        c = self.cfg
        return {**super().group_options(), "scale_type": c.scale_type, "scale_front": c.scale_front,
                "norm_growth_limiter": c.norm_growth_limiter, "limiter_gamma": c.limiter_gamma}

    def make_optimizer(self, groups, **kw) -> ApolloOptimizer:
        return ApolloOptimizer(groups, seed=self.cfg.seed, **kw)

    def refresh_temp_bytes(self, shape: tuple[int, int]) -> float:
        return 0.0  # a new seed; the Gaussian itself is generated at the step (r x the projected side)

    def basis_bytes(self, shape: tuple[int, int]) -> int:
        return 0  # a seed (an integer): the projection is regenerated from it

    def extra_bytes(self, shape: tuple[int, int]) -> int:
        return 4 if self.cfg.norm_growth_limiter else 0


@register_method("apollo_mini")
class ApolloMini(Apollo):
    Config = ApolloMiniConfig
