"""FRUGAL (Zmushko et al., ICML 2025): the gradient of each target weight is split into a state-full
part trained with Adam and a state-free part trained with signSGD, so every update is full rank at
GaLore-like memory. Optimizer: :class:`lrpretrain.optim.FrugalAdamW`.

``method.subspace``: ``block`` (default; the FRUGAL C4 scripts' ``--optimizer frugal``: a fraction ρ of
the target matrices get Adam, chosen anew every T steps in ``block_order``, the others signSGD and no
state), ``svd`` or ``random`` (a rank round(ρ·d) subspace of every matrix, SVD of the gradient or a
random orthonormal basis). ``density`` is ρ; ``scale`` the reference's ``proj_params_lr_scale``;
``inactive_update_rule`` / ``inactive_lr_scale`` the state-free rule and its LR multiplier; moments are
reset at every refresh (``moments_on_refresh=reset``, the reference's ``reset_statistics``).
"""

from __future__ import annotations

from dataclasses import dataclass

from lrpretrain.config import ModelConfig
from lrpretrain.errors import allowed, check
from lrpretrain.methods import register_method
from lrpretrain.methods.subspace import BasisConfig, SubspaceMethod, check_state_bits, moment_bytes
from lrpretrain.optim import FrugalAdamW
from lrpretrain.optim.frugal import BLOCK_ORDERS, INACTIVE_RULES, SUBSPACES
from lrpretrain.optim.projector import PROJ_TYPES, projected_shape, projection_side
from lrpretrain.optim.subspace import MOMENTS_ON_REFRESH


@dataclass
class FrugalConfig(BasisConfig):
    density: float = 0.25  # ρ: fraction of each matrix (svd/random) or of the matrices (block) that is state-full
    scale: float = 1.0  # LR multiplier of the target weights (proj_params_lr_scale)
    update_proj_gap: int = 200  # T
    subspace: str = "block"  # block | svd | random
    proj_type: str = "std"  # svd/random: which side of G is projected
    block_order: str = "descending"  # block: random | ascending | descending
    inactive_update_rule: str = "sign_sgd"  # sign_sgd | sgd | none
    inactive_lr_scale: float = 1.0
    moments_on_refresh: str = "reset"  # reset (the reference) | keep | rotate (svd/random only)
    seed: int = 0  # random subspaces and random block order
    state_bits: int = 32  # 32 | 8

    def validate(self) -> None:
        super().validate()
        check(0 < self.density <= 1, "method.density", self.density, "must be in (0, 1]")
        check(self.scale > 0, "method.scale", self.scale, "must be > 0")
        check(self.update_proj_gap > 0, "method.update_proj_gap", self.update_proj_gap, "must be > 0")
        check(self.subspace in SUBSPACES, "method.subspace", self.subspace, f"allowed: {allowed(SUBSPACES)}")
        check(self.proj_type in PROJ_TYPES, "method.proj_type", self.proj_type, f"allowed: {allowed(PROJ_TYPES)}")
        check(self.block_order in BLOCK_ORDERS, "method.block_order", self.block_order, f"allowed: {allowed(BLOCK_ORDERS)}")
        check(self.inactive_update_rule in INACTIVE_RULES, "method.inactive_update_rule", self.inactive_update_rule,
              f"allowed: {allowed(INACTIVE_RULES)}")
        check(self.inactive_lr_scale >= 0, "method.inactive_lr_scale", self.inactive_lr_scale, "must be >= 0")
        check(self.moments_on_refresh in MOMENTS_ON_REFRESH, "method.moments_on_refresh", self.moments_on_refresh,
              f"allowed: {allowed(MOMENTS_ON_REFRESH)}")
        check(self.subspace != "block" or self.moments_on_refresh == "reset", "method.moments_on_refresh",
              self.moments_on_refresh, "subspace=block starts every activated matrix with fresh moments: use reset")
        check_state_bits("method.state_bits", self.state_bits)

    def validate_for_model(self, model_cfg: ModelConfig) -> None:
        pass  # the rank follows from the density: round(ρ·d) >= 1 always holds


@register_method("frugal")
class Frugal(SubspaceMethod):
    Config = FrugalConfig
    full_size_temps = 2  # the state-full part's update and the state-free residual

    def refresh_temp_bytes(self, shape: tuple[int, int]) -> float:
        return super().refresh_temp_bytes(shape) if self.cfg.subspace == "svd" else 0.0

    def group_options(self):
        c = self.cfg
        return {"density": c.density, "scale": c.scale, "update_proj_gap": c.update_proj_gap, "proj_type": c.proj_type,
                "moments_on_refresh": c.moments_on_refresh, "inactive_update_rule": c.inactive_update_rule,
                "inactive_lr_scale": c.inactive_lr_scale, "block_order": c.block_order, "basis_dtype": self.basis_dtype()}

    def make_optimizer(self, groups, **kw) -> FrugalAdamW:
        return FrugalAdamW(groups, subspace=self.cfg.subspace, seed=self.cfg.seed, **kw)

    def _rank(self, shape: tuple[int, int]) -> int:
        side = projection_side(self.cfg.proj_type, shape)
        d = {"left": shape[0], "right": shape[1], "full": min(shape)}[side]
        return max(1, round(d * self.cfg.density))

    def moment_shape(self, shape):
        if self.cfg.subspace == "block":  # in expectation: a fraction ρ of the matrices holds full moments
            return None
        return projected_shape(shape, projection_side(self.cfg.proj_type, shape), self._rank(shape))

    def basis_bytes(self, shape):
        if self.cfg.subspace != "svd":
            return 0  # block: none; random: regenerated from a seed
        side = projection_side(self.cfg.proj_type, shape)
        return self.basis_itemsize() * self._rank(shape) * {"left": shape[0], "right": shape[1], "full": sum(shape)}[side]

    def extra_bytes(self, shape):
        if self.cfg.subspace != "block":
            return 0
        return round(self.cfg.density * 2 * moment_bytes(shape[0] * shape[1], self.cfg.state_bits))
