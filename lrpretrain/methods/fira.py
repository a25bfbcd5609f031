"""Fira (Chen et al., 2024): GaLore plus the out-of-subspace gradient residual, rescaled per channel by
||Adam(R)|| / ||R|| and kept from jumping by a norm-growth limiter. Optimizer:
:class:`lrpretrain.optim.FiraAdamW`.

``method.residual``: ``reference`` (default) S = G - α·P·R, what xichen-fy/Fira's code computes and
what produced its published numbers; ``paper`` S = G - P·R, the paper's equation (the residual is then
orthogonal to the subspace; with α = 0.25 the code leaves 75% of the in-subspace gradient in S).
``method.limiter_gamma`` γ = 1.01 (hard-coded in the reference). Only one-sided projections.
"""

from __future__ import annotations

from dataclasses import dataclass

from lrpretrain.errors import allowed, check
from lrpretrain.methods import register_method
from lrpretrain.methods.subspace import SubspaceConfig, SubspaceMethod
from lrpretrain.optim import FiraAdamW
from lrpretrain.optim.fira import RESIDUALS


@dataclass
class FiraConfig(SubspaceConfig):
    residual: str = "reference"  # reference: S = G - α·P·R (Fira's code) | paper: S = G - P·R
    limiter_gamma: float = 1.01  # γ of the norm-growth limiter

    def validate(self) -> None:
        super().validate()
        check(self.residual in RESIDUALS, "method.residual", self.residual, f"allowed: {allowed(RESIDUALS)}")
        check(self.limiter_gamma >= 1, "method.limiter_gamma", self.limiter_gamma, "must be >= 1")
        check(self.proj_type != "full", "method.proj_type", self.proj_type,
              "Fira scales the residual per un-projected channel: use std, reverse_std, left or right")


@register_method("fira")
class Fira(SubspaceMethod):
    Config = FiraConfig
    full_size_temps = 2  # α·P·N and the scaled residual

    def group_options(self):
        return {**super().group_options(), "residual": self.cfg.residual, "limiter_gamma": self.cfg.limiter_gamma}

    def make_optimizer(self, groups, **kw) -> FiraAdamW:
        return FiraAdamW(groups, **kw)

    def extra_bytes(self, shape: tuple[int, int]) -> int:
        return 4  # the limiter's previous norm
