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

A fused kernel that also skips the dense rebuild (sparse-dense matmul in the forward and for ∂x)
would cut the transient buffer and the rebuild FLOPs; it is not implemented here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from lrpretrain.errors import check
from lrpretrain.methods import register_method
from lrpretrain.methods.base import Method, Reparameterized
from lrpretrain.methods.targets import TargetsConfig
from lrpretrain.methods.toolkit import (
    check_rank_for_model,
    compute_dtype,
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


# -- the op ---------------------------------------------------------------------------------------------


def dense_weight(lora_A: torch.Tensor, lora_B: torch.Tensor, values: torch.Tensor, index: torch.Tensor,
                 scale: float, dtype: torch.dtype) -> torch.Tensor:
    """s·B·A + S as one dense (m, n) matrix in ``dtype``.

    The product is written with ``out=`` and then scaled and added to in place: ``trainer.recompute=
    selective`` keeps the outputs of plain matmuls (``aten.mm.default``) for the backward, and would
    both keep this weight-sized temporary and refuse the in-place edits of a kept tensor."""
    w = torch.empty(lora_B.shape[0], lora_A.shape[1], dtype=dtype, device=lora_B.device)
    torch.mm(lora_B.to(dtype), lora_A.to(dtype), out=w).mul_(scale)
    return w.view(-1).index_add_(0, index, values.to(dtype)).view(lora_B.shape[0], lora_A.shape[1])


def support_gradient(grad_out: torch.Tensor, x: torch.Tensor, index: torch.Tensor, block_rows: int) -> torch.Tensor:
    """(grad_outᵀ x) at the flat ``index`` (sorted, row-major), one block of rows at a time.

    grad_out: (tokens, m); x: (tokens, n). Never holds more than ``block_rows`` x n of the dense product.
    """
    m, n = grad_out.shape[1], x.shape[1]
    out = torch.empty(index.numel(), dtype=grad_out.dtype, device=grad_out.device)
    row_starts = torch.arange(0, m + block_rows, block_rows, device=index.device).clamp_(max=m)
    bounds = torch.searchsorted(index, row_starts * n).tolist()  # support slice of each row block
    for b, r0 in enumerate(range(0, m, block_rows)):
        lo, hi = bounds[b], bounds[b + 1]
        if lo == hi:
            continue
        r1 = min(r0 + block_rows, m)
        block = grad_out[:, r0:r1].t() @ x  # (r1 - r0, n)
        out[lo:hi] = block.view(-1)[index[lo:hi] - r0 * n]
    return out


class SparseLowRankFunction(torch.autograd.Function):
    """y = x (s·B·A + S)ᵀ with gradients for x, A, B and S's values, and no dense weight gradient."""

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, values, index, scale: float, block_rows: int):
        dtype = compute_dtype(x)
        ctx.save_for_backward(x, lora_A, lora_B, values, index)
        ctx.scale, ctx.block_rows, ctx.dtype = scale, block_rows, dtype
        w = dense_weight(lora_A, lora_B, values, index, scale, dtype)
        return F.linear(x.to(dtype), w)

    @staticmethod
    def backward(ctx, grad_out):
        x, lora_A, lora_B, values, index = ctx.saved_tensors
        s, dtype = ctx.scale, ctx.dtype
        n, m = lora_A.shape[1], lora_B.shape[0]
        g = grad_out.reshape(-1, m).to(dtype)
        x2 = x.reshape(-1, n).to(dtype)
        grad_x = grad_A = grad_B = grad_values = None
        if ctx.needs_input_grad[0]:
            w = dense_weight(lora_A, lora_B, values, index, s, dtype)
            grad_x = (g @ w).view(x.shape).to(x.dtype)
            del w
        if ctx.needs_input_grad[2]:
            grad_B = (g.t() @ (x2 @ lora_A.to(dtype).t())).mul_(s).to(lora_B.dtype)  # s·gᵀ(x Aᵀ)
        if ctx.needs_input_grad[1]:
            grad_A = ((g @ lora_B.to(dtype)).t() @ x2).mul_(s).to(lora_A.dtype)  # s·(g B)ᵀ x
        if ctx.needs_input_grad[3]:
            grad_values = support_gradient(g, x2, index, ctx.block_rows).to(values.dtype)
        return grad_x, grad_A, grad_B, grad_values, None, None, None


# -- the module -------------------------------------------------------------------------------------------


class SparseLowRankLinear(Reparameterized):
    """W = s·B·A + S; S = ``sparse_values`` at the fixed flat positions ``sparse_index`` (a buffer)."""

    def __init__(self, in_features: int, out_features: int, rank: int, scale: float, delta: float,
                 generator: torch.Generator, block_elements: int = 1 << 22, device=None, dtype=None):
        super().__init__()
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
        return SparseLowRankFunction.apply(x, self.lora_A, self.lora_B, self.sparse_values, self.sparse_index,
                                           self.scale, self.block_rows)

    def dense_weight(self) -> torch.Tensor:
        return dense_weight(self.lora_A, self.lora_B, self.sparse_values, self.sparse_index, self.scale, torch.float32)

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
                                       c.delta, generator, c.block_elements, device=w.device, dtype=w.dtype)

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
        # S's support: one int64 index per value, a buffer (+ the RoPE tables)
        nnz = sum(int(delta * m * n) for m, n in target_shapes(model_cfg, list(self.cfg.targets)).values())
        out["buffer_bytes"] = 8.0 * nnz * model_cfg.n_layers + rope_bytes(model_cfg)
        return out
