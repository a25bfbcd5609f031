"""LOST, LOw-rank and Sparse pre-Training (Li, Yin, Shen, Xu, Xu, Huang, Wang, Liu, Wang; arXiv 2508.02668).

Every target weight W0 (m x n, ``nn.Linear``'s out x in) of the standard initialisation is split by
its SVD, W0 = U·diag(σ)·Vᵀ, into two complementary parts that are both trained:

- the dominant spectrum, the top-r components, becomes the low-rank factors
  B = U_r·diag(√σ_r) (m x r) and A = diag(√σ_r)·V_rᵀ (r x n): B·A is the best rank-r approximation;
- the remaining spectrum, the residual R = W0 − B·A = Σ_{i>r} σ_i u_i v_iᵀ, builds the channel-wise
  sparse part: of the n input channels (the columns of W0, i.e. the features of x), the
  k = max(1, ⌊ρ·n⌋) whose residual columns have the largest L2 norm ‖R_{:,j}‖ are kept (ρ =
  ``sparsity``, the kept fraction: 1 keeps every channel), and S = R[:, channels] (m x k) holds their
  residual columns. The channels are chosen once, at initialisation, and stay fixed; S is trained.

The layer computes y = (x·Aᵀ)·Bᵀ + x[..., channels]·Sᵀ, i.e. W = B·A + S·Eᵀ with E the n x k
selection of the kept channels, and never forms a dense m x n matrix (training FLOPs per token
6r(m+n) + 6mk, against 6mn). The channel indices are a buffer (saved with the model).

What the split reconstructs (tests/test_lost_gradnorm.py checks it against an independent SVD): W
equals W0 exactly on the kept channels and equals the rank-r part B·A on the others, so
‖W0 − W‖_F² = Σ_{j not kept} ‖R_{:,j}‖², the smallest error any choice of k channels can leave; with
ρ = 1 (or r = min(m, n), where R = 0) the initial weight is reconstructed exactly and training starts
at the standard init ("zero distortion" on the kept channels).

Source and the choices made where it was silent to us: the paper's full text (arXiv HTML/PDF) and its
repository (JiaxiLi1/LOST-Low-rank-and-Sparse-Training-for-Large-Language-Models) could not be
retrieved here; only the abstract (SVD of the weights; dominant components -> low-rank; the remaining
singular values -> channel-wise sparse components complementing it) and the first author's related,
public fine-tuning adapter (JiaxiLi1/Lora-init, ``hybrid_lowrank_sparse_adapter.py``) were. From the
latter: the channels are *input* columns, ranked by the column norms of the residual spectrum's
reconstruction, the kept count is ⌊ρ·n⌋ (at least 1), the factors share √σ evenly. Our own choices:

- the sparse values start from the residual columns (the "remaining singular values"), not from W0's
  columns, so that low-rank + sparse reconstructs W0 on the kept channels instead of counting the
  dominant spectrum twice there;
- no mixing weight: W = B·A + S. The author's fine-tuning adapter mixes γ·low-rank + (1 − γ)·sparse
  on top of a frozen W0; whether LOST keeps such a γ could not be checked, so none is applied (under
  Adam a constant factor on one part acts as a per-part learning-rate scale);
- the channel set is fixed for the whole run (no re-selection), the whole residual (not a window of
  the next components) ranks the channels, and every part is trained with plain AdamW at one LR;
- defaults (``conf/method/lost.yaml``): ρ = 0.05 and the per-size ranks of the low-rank family
  (128/256/256/512/1024 for 60M/130M/350M/1B/7B) with the protocol's schedule; the paper's per-size
  values were not retrievable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from lrpretrain.errors import check
from lrpretrain.methods import register_method
from lrpretrain.methods.base import Method
from lrpretrain.methods.targets import TargetsConfig
from lrpretrain.methods.toolkit import (
    LowRankLinear,
    check_rank_for_model,
    reparameterize,
    reparameterized_cost,
    target_shapes,
)
from lrpretrain.model.memory import rope_bytes

if TYPE_CHECKING:
    from lrpretrain.config import ModelConfig


@dataclass
class LOSTConfig(TargetsConfig):
    rank: int = 128  # r: the dominant singular components kept as trainable factors
    sparsity: float = 0.05  # ρ: fraction of input channels in the sparse part, k = max(1, ⌊ρ·n⌋); 1 = all

    def validate(self) -> None:
        super().validate()
        check(self.rank > 0, "method.rank", self.rank, "must be > 0")
        check(0 < self.sparsity <= 1, "method.sparsity", self.sparsity,
              "must be in (0, 1]: the fraction of input channels the sparse part keeps")

    def validate_for_model(self, model_cfg: ModelConfig) -> None:
        check_rank_for_model(self.rank, model_cfg, list(self.targets))


def kept_channels(in_features: int, sparsity: float) -> int:
    """k = max(1, ⌊ρ·n⌋): how many input channels the sparse part keeps."""
    return max(1, int(sparsity * in_features))


@torch.no_grad()
def lost_split(weight: torch.Tensor, rank: int, k: int) -> tuple[torch.Tensor, ...]:
    """(B, A, channels, S) of ``weight`` (m x n), all fp32: B·A its best rank-r approximation, channels
    the k input channels (sorted) with the largest residual column norms, S the residual's columns there."""
    w = weight.float()
    u, sigma, vh = torch.linalg.svd(w, full_matrices=False)
    root = sigma[:rank].sqrt()
    B = u[:, :rank] * root
    A = root[:, None] * vh[:rank]
    residual = w - B @ A  # Σ_{i>r} σ_i u_i v_iᵀ (the tail of the same SVD, up to rounding)
    channels = torch.linalg.vector_norm(residual, dim=0).topk(k).indices.sort().values
    return B, A, channels, residual[:, channels]


class LOSTLinear(LowRankLinear):
    """W = B·A + S·Eᵀ: trained rank-r factors plus trained columns S on k fixed input channels."""

    def __init__(self, base: nn.Linear, rank: int, sparsity: float):
        w = base.weight
        super().__init__(base.in_features, base.out_features, rank, device=w.device, dtype=w.dtype)
        self.sparsity = sparsity
        k = kept_channels(base.in_features, sparsity)
        B, A, channels, S = lost_split(w, rank, k)
        with torch.no_grad():
            self.lora_B.copy_(B)
            self.lora_A.copy_(A)
        self.register_buffer("sparse_channels", channels.to(w.device))  # (k,) int64, fixed
        self.sparse_weight = nn.Parameter(S.to(w.dtype))  # (m, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = super().forward(x)
        return low + F.linear(x.index_select(-1, self.sparse_channels), self.sparse_weight)

    def dense_weight(self) -> torch.Tensor:
        return super().dense_weight().index_add_(1, self.sparse_channels, self.sparse_weight.float())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"sparsity={self.sparsity:g}, channels={self.sparse_channels.numel()}")


@register_method("lost")
class LOST(Method):
    """Targets split by the SVD of their init into trained rank-r factors + trained sparse input channels."""

    Config = LOSTConfig
    cfg: LOSTConfig

    def prepare_model(self, model: nn.Module) -> nn.Module:
        c = self.cfg
        reparameterize(model, list(c.targets), lambda _q, linear: LOSTLinear(linear, c.rank, c.sparsity))
        return model

    def layer_extra_values(self, model_cfg: ModelConfig) -> float:
        """Saved per token beyond a plain block: x·Aᵀ (r) and the gathered channels x[..., channels] (k)."""
        shapes = target_shapes(model_cfg, list(self.cfg.targets)).values()
        return float(sum(self.cfg.rank + kept_channels(n, self.cfg.sparsity) for _m, n in shapes))

    def cost(self, model_cfg: ModelConfig, seq_len: int) -> dict[str, float]:
        r, rho = self.cfg.rank, self.cfg.sparsity

        def per_target(m: int, n: int) -> tuple[float, float, float]:
            # factors r(m+n) and S m·k, all trained; 2 FLOPs per entry and token forward, 4 backward
            # (input and weight gradients); the gather/scatter of the k channels is not counted
            entries = float(r * (m + n) + m * kept_channels(n, rho))
            return entries, entries, 6.0 * entries

        out = reparameterized_cost(model_cfg, seq_len, list(self.cfg.targets), per_target)
        channels = sum(kept_channels(n, rho) for _m, n in target_shapes(model_cfg, list(self.cfg.targets)).values())
        out["buffer_bytes"] = 8.0 * channels * model_cfg.n_layers + rope_bytes(model_cfg)  # int64 channel indices
        return out
