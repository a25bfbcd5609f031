"""SLTrain (Han et al., NeurIPS 2024): W = s·B·A + S, a low-rank plus a fixed-support sparse part.

Every target weight (m, n) is the sum of a LoRA-style product s·B·A (s = lora_alpha / r; A
Kaiming-uniform, B = 0, as andyjm3/SLTrain ``splora/splora_linear.py``) and a sparse S whose support
is drawn once, uniformly at random, with ⌊δ·m·n⌋ entries (δ = ``delta``), and never changes. The
support is a buffer of sorted flat row-major indices (saved in checkpoints); only the values on it
are trained, initialised U(±1/√n). The dense init of the model is not kept. No merges, no restarts:
plain AdamW on A, B, the values, and the dense embeddings, head and norms.

Memory, per target, of what :class:`SparseLowRankFunction` keeps and creates:

- persistent: A (r·n), B (m·r), the values (nnz = δ·m·n) and their int64 indices (nnz), their
  gradients and Adam moments (for A, B and the values only): no dense weight, gradient or state;
- transient: the dense weight s·B·A + S is rebuilt in the forward and again in the backward (as the
  reference does) and freed right after its matmul: one (m, n) buffer at a time, never saved for
  backward (only x, A, B and the values are);
- the gradient of the values is G[support] with G = gᵀx (the dense weight gradient), computed
  block by block over rows: each block of ``rows = block_elements // n`` rows is one GEMM
  g[:, rows]ᵀ·x followed by a gather of the support entries that fall in it (a contiguous slice of
  the sorted indices), so at most ``block_elements`` entries (default 2²² = 16 MiB in fp32) of G
  exist at a time instead of m·n; the FLOPs are those of the dense weight gradient (2·tokens·m·n);
- the factor gradients never form G either: ∂B = s·gᵀ(x Aᵀ), ∂A = s·(g B)ᵀ x.

The op itself lives in lrpretrain/kernels/sparse_lowrank.py: this PyTorch one (``trainer.kernels=torch``,
and the CPU default), and a Triton one (``trainer.kernels=triton``, and ``auto`` on CUDA) that never
makes S dense: the low-rank part through its factors, the sparse part as sparse products over the
support (forward and ∂x), and the values' gradient sampled at the support; with a cached layout of
the support (row and column pointers and a column-order permutation: 4 more bytes per value).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lrpretrain.errors import check
from lrpretrain.kernels.sparse_lowrank import (
    SparseLowRankFunction,
    SupportLayout,
    sparse_lowrank_triton,
    support_layout,
)
from lrpretrain.methods import register_method
from lrpretrain.methods.base import Method, Reparameterized
from lrpretrain.methods.targets import TargetsConfig
from lrpretrain.methods.toolkit import (
    check_rank_for_model,
    kaiming_uniform_,
    reparameterize,
    reparameterized_cost,
    seeded_generator,
    target_shapes,
)
from lrpretrain.model.memory import rope_bytes

if TYPE_CHECKING:
    from lrpretrain.config import ModelConfig


@dataclass
class SLTrainConfig(TargetsConfig):
    rank: int = 128  # r
    lora_alpha: float = 32.0  # α: the low-rank part is (α / r)·B·A
    delta: float = 0.03  # δ: density of S's fixed random support (the reference's sp_ratio)
    block_elements: int = 1 << 22  # at most this many dense-gradient entries at a time (values' gradient)

    def validate(self) -> None:
        super().validate()
        check(self.rank > 0, "method.rank", self.rank, "must be > 0")
        check(self.lora_alpha > 0, "method.lora_alpha", self.lora_alpha, "must be > 0")
        check(0 < self.delta <= 1, "method.delta", self.delta, "must be in (0, 1]: the density of the sparse support")
        check(self.block_elements > 0, "method.block_elements", self.block_elements, "must be > 0")

    def validate_for_model(self, model_cfg: ModelConfig) -> None:
        check_rank_for_model(self.rank, model_cfg, list(self.targets))


# -- the module -------------------------------------------------------------------------------------------


class SparseLowRankLinear(Reparameterized):
    """W = s·B·A + S; S = ``sparse_values`` at the fixed flat positions ``sparse_index`` (a buffer)."""

    def __init__(self, in_features: int, out_features: int, rank: int, scale: float, delta: float,
                 generator: torch.Generator, block_elements: int = 1 << 22, device=None, dtype=None,
                 kernels: str = "torch"):
        super().__init__()
        self.kernels = kernels  # torch: the dense rebuild; triton: S applied sparsely (lrpretrain/kernels)
        self._layout: SupportLayout | None = None  # the support's layout for the Triton op, made on first use
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.scale, self.delta = scale, delta
        self.block_rows = max(1, block_elements // in_features)
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=device, dtype=dtype))
        kaiming_uniform_(self.lora_A, generator)
        nnz = int(delta * out_features * in_features)
        index = torch.randperm(out_features * in_features, generator=generator)[:nnz].sort().values
        self.register_buffer("sparse_index", index.to(device))
        bound = 1.0 / math.sqrt(in_features)
        values = torch.empty(nnz, dtype=dtype).uniform_(-bound, bound, generator=generator)
        self.sparse_values = nn.Parameter(values.to(device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels == "triton":
            self._layout = support_layout(self.sparse_index, self.out_features, self.in_features, self._layout)
            return sparse_lowrank_triton(x, self.lora_A, self.lora_B, self.sparse_values, self.sparse_index,
                                         self.scale, self._layout)
        return SparseLowRankFunction.apply(x, self.lora_A, self.lora_B, self.sparse_values, self.sparse_index,
                                           self.scale, self.block_rows)

    def dense_weight(self) -> torch.Tensor:
        """s·B·A + S in fp32, differentiable (export and merges call it with or without autograd; the
        forward's :func:`dense_weight` writes with ``out=``, which autograd refuses)."""
        w = torch.mm(self.lora_B.float(), self.lora_A.float()) * self.scale
        return w.view(-1).index_add(0, self.sparse_index, self.sparse_values.float()).view_as(w)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"scale={self.scale:g}, delta={self.delta:g}, nnz={self.sparse_values.numel()}")


@register_method("sltrain")
class SLTrain(Method):
    """Targets replaced by s·B·A + S (fixed random support), trained with plain AdamW."""

    Config = SLTrainConfig
    cfg: SLTrainConfig
    salt = 0x534C5472

    def prepare_model(self, model: nn.Module) -> nn.Module:
        c = self.cfg
        # One generator for every support: draws do not depend on anything else using the global RNG.
        generator = seeded_generator(self.salt)

        def build(_qual: str, linear: nn.Linear) -> SparseLowRankLinear:
            w = linear.weight
            return SparseLowRankLinear(linear.in_features, linear.out_features, c.rank, c.lora_alpha / c.rank,
                                       c.delta, generator, c.block_elements, device=w.device, dtype=w.dtype,
                                       kernels=self.kernels)

        reparameterize(model, list(c.targets), build)
        return model

    def cost(self, model_cfg: ModelConfig, seq_len: int) -> dict[str, Any]:
        r, delta = self.cfg.rank, self.cfg.delta

        def per_target(m: int, n: int) -> tuple[float, float, float]:
            # As executed: forward 2mn (dense rebuilt weight); backward 2mn (∂x) + 2mn (the row-blocked
            # GEMM behind the values' gradient) + 4r(m+n) (factor gradients). The rebuild itself
            # (2mnr per call, not per token) is left out.
            trained = float(r * (m + n) + int(delta * m * n))
            return trained, trained, 6.0 * m * n + 4.0 * r * (m + n)

        out = reparameterized_cost(model_cfg, seq_len, list(self.cfg.targets), per_target)
        # S's support: one int64 index per value, a buffer (+ the RoPE tables); for the Triton op also its
        # layout (int32 row and column pointers and a permutation: 4 bytes per value)
        shapes = target_shapes(model_cfg, list(self.cfg.targets)).values()
        nnz = sum(int(delta * m * n) for m, n in shapes)
        out["buffer_bytes"] = 8.0 * nnz * model_cfg.n_layers + rope_bytes(model_cfg)
        if self.kernels == "triton":
            out["buffer_bytes"] += 4.0 * model_cfg.n_layers * sum(int(delta * m * n) + m + n + 2 for m, n in shapes)
        return out
