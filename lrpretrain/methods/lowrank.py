"""Low-rank baseline: every target weight *is* a rank-r product, W = s·B·A, trained from scratch.

The "Low-Rank" row of GaLore's Table 2. Its reference implementation is the ReLoRA code base's
``lora_only`` path (Guitaricet/relora ``peft_pretraining/relora.py``): the dense weight is dropped,
A (r, n) and B (m, r) are both Kaiming-uniform with a = √5 (U(±1/√fan_in)), the output is scaled by
s = lora_alpha / r, with dropout on the input. ``init=svd`` instead starts from the best rank-r
approximation of the model's standard init (truncated SVD, split evenly between the factors), so
the first forward is as close to the dense model as rank r allows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from lrpretrain.errors import allowed, check
from lrpretrain.methods import register_method
from lrpretrain.methods.base import Method
from lrpretrain.methods.lora import lora_activation_values
from lrpretrain.methods.targets import TargetsConfig
from lrpretrain.methods.toolkit import (
    LowRankLinear,
    check_rank_for_model,
    kaiming_uniform_,
    reparameterize,
    reparameterized_cost,
)

if TYPE_CHECKING:
    from lrpretrain.config import ModelConfig

INITS = ("kaiming", "svd")


@dataclass
class LowRankConfig(TargetsConfig):
    rank: int = 128  # r
    lora_alpha: float = 32.0  # α: W = (α / r)·B·A
    lora_dropout: float = 0.1  # dropout on the input of A (the reference's lora_dropout)
    init: str = "kaiming"  # kaiming (the reference) | svd (truncated SVD of the standard init)

    def validate(self) -> None:
        super().validate()
        check(self.rank > 0, "method.rank", self.rank, "must be > 0")
        check(self.lora_alpha > 0, "method.lora_alpha", self.lora_alpha, "must be > 0")
        check(0 <= self.lora_dropout < 1, "method.lora_dropout", self.lora_dropout, "must be in [0, 1)")
        check(self.init in INITS, "method.init", self.init, f"allowed: {allowed(INITS)}")

    def validate_for_model(self, model_cfg: ModelConfig) -> None:
        check_rank_for_model(self.rank, model_cfg, list(self.targets))


@torch.no_grad()
def svd_factors_(module: LowRankLinear, weight: torch.Tensor) -> None:
    """s·B·A = the best rank-r approximation of ``weight``: B = U_r √Σ_r / √s, A = √Σ_r V_rᵀ / √s."""
    u, sigma, vh = torch.linalg.svd(weight.float(), full_matrices=False)
    r = module.rank
    root = (sigma[:r] / module.scale).sqrt()
    module.lora_B.copy_(u[:, :r] * root)
    module.lora_A.copy_(root[:, None] * vh[:r])


@register_method("lowrank")
class LowRank(Method):
    """Targets replaced by W = s·B·A; nothing of the dense weight is kept."""

    Config = LowRankConfig
    cfg: LowRankConfig

    def prepare_model(self, model: nn.Module) -> nn.Module:
        c = self.cfg

        def build(_qual: str, linear: nn.Linear) -> LowRankLinear:
            w = linear.weight
            m = LowRankLinear(linear.in_features, linear.out_features, c.rank, device=w.device, dtype=w.dtype,
                              scale=c.lora_alpha / c.rank, dropout=c.lora_dropout)
            if c.init == "svd":
                svd_factors_(m, w)
            else:
                kaiming_uniform_(m.lora_A)
                kaiming_uniform_(m.lora_B)
            return m

        reparameterize(model, list(c.targets), build)
        return model

    def layer_extra_values(self, model_cfg: ModelConfig) -> float:
        """As LoRA's adapters: x·Aᵀ per target, plus the dropout's copies (lora.lora_activation_values)."""
        return lora_activation_values(model_cfg, self.cfg.rank, list(self.cfg.targets), self.cfg.lora_dropout)

    def cost(self, model_cfg: ModelConfig, seq_len: int) -> dict[str, float]:
        return reparameterized_cost(model_cfg, seq_len, list(self.cfg.targets), factor_cost(self.cfg.rank))


def factor_cost(rank: int):
    """W = B·A with both factors trained: r(m + n) parameters; forward 2r(m+n) FLOPs per token, backward
    4r(m+n) (input and weight grads of both factors)."""

    def cost(m: int, n: int) -> tuple[float, float, float]:
        return float(rank * (m + n)), float(rank * (m + n)), 6.0 * rank * (m + n)

    return cost

