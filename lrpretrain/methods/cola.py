"""CoLA and CoLA-M (Liu et al., EMNLP 2025; arXiv 2502.10940; code alvin-zyl/CoLA).

CoLA makes every target projection a low-rank auto-encoder

    h(x) = B·σ(A·x),   σ = SiLU,   A: r x n,  B: m x r     (as nn.Linear: h = σ(x Aᵀ) Bᵀ)

so activations are low-rank by construction and the targets' parameters and matmul FLOPs fall from
m·n to r·(m + n), about half at r ≈ d/4. Attention keeps RoPE and softmax on the q, k, v that CoLA
layers produce; the MLP keeps its SwiGLU on top, down(SiLU(gate(x)) ⊙ up(x)) with each of gate, up,
down a CoLA layer (``method.only_lr_act=true`` drops that SiLU, as the reference's flag of the same
name does). Embeddings, the LM head and norms stay full rank; plain AdamW trains everything.

CoLA-M is the same model, same parameters, same function, trained with a recomputation whose
segment boundaries are the r-dimensional activations σ(A·x) (:class:`CoLABlock`): autograd keeps
only those and the residual stream. ``method=cola_m`` always installs it; ``method=cola`` offers it
as its ``recompute_policy()`` (``trainer.recompute=method``).

From the reference (public copies of cola/cola_layer.py and of the run scripts):
- init: every entry of A and B ~ N(0, 1)·r^(-1/4)·(n + m)^(-1/4), so an entry of the product B·A
  has variance 1/(n + m), Xavier-like; no bias (our LLaMA has none);
- rank 128/256/256/512/1024 at 60M/130M/350M/1B/7B (≈ d/4); AdamW lr 0.006/0.003/0.003/0.002/0.001,
  weight decay 0.01, clipping 0.5, warmup 2K/2K/6K/10K/15K: conf/experiment/cola_c4_<size>.yaml.

h is not linear in x, so CoLA has no dense weights: ``dense_weights`` refuses with one line.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lrpretrain.config import ModelConfig
from lrpretrain.errors import UserError, check
from lrpretrain.kernels.lowrank_act import cola_encode, cola_linear
from lrpretrain.methods import register_method
from lrpretrain.methods.base import Method, Reparameterized
from lrpretrain.methods.subspace import target_shapes
from lrpretrain.methods.targets import TargetsConfig, expand_targets
from lrpretrain.methods.toolkit import check_rank, decoder_cost, reparameterize
from lrpretrain.model.llama import Block
from lrpretrain.model.memory import activation_itemsize, residual_itemsize


@dataclass
class CoLAConfig(TargetsConfig):
    """CoLA's 60M setting: r = 128 on every attention and MLP projection."""

    rank: int = 128  # r: width of the bottleneck σ(A·x)
    only_lr_act: bool = False  # true: MLP = down(gate(x) ⊙ up(x)), the CoLA σ its only nonlinearity

    def validate(self) -> None:
        super().validate()
        check(self.rank > 0, "method.rank", self.rank, "must be > 0")

    def validate_for_model(self, model_cfg: ModelConfig) -> None:
        for name, shape in target_shapes(model_cfg, self.targets).items():
            check_rank(self.rank, shape, name)


class CoLALinear(Reparameterized):
    """h(x) = B·σ(A·x) in place of ``nn.Linear(in_features, out_features, bias=False)``."""

    def __init__(self, in_features: int, out_features: int, rank: int, device=None, dtype=None, kernels: str = "torch"):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.kernels = kernels  # triton: SiLU fused into the matmuls, σ recomputed from A·x (lrpretrain/kernels)
        self.A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.empty(out_features, rank, device=device, dtype=dtype))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = (self.rank * (self.in_features + self.out_features)) ** -0.25  # r^(-1/4)·(n + m)^(-1/4)
        nn.init.normal_(self.A, std=std)
        nn.init.normal_(self.B, std=std)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """σ(A·x): the r-dimensional activation, CoLA-M's segment boundary."""
        if self.kernels == "triton":
            return cola_encode(x, self.A)
        return F.silu(F.linear(x, self.A))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return F.linear(z, self.B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels == "triton":  # keeps A·x for the backward, not σ(A·x)
            return cola_linear(x, self.A, self.B)
        return self.decode(self.encode(x))

    def dense_weight(self) -> torch.Tensor:
        raise NotImplementedError("h(x) = B·σ(A·x) is not linear in x (σ = SiLU), so it has no dense weight")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, act=silu"


def encode(proj: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A projection's segment boundary: σ(A·x) for a CoLA layer, the input itself for a dense one."""
    return proj.encode(x) if isinstance(proj, CoLALinear) else x


def decode(proj: nn.Module, z: torch.Tensor) -> torch.Tensor:
    return proj.decode(z) if isinstance(proj, CoLALinear) else proj(z)


class CoLABlock(nn.Module):
    """A decoder block (the same children and state_dict names as :class:`Block`) with CoLA-M's
    segmented forward.

    ``recompute`` off: the plain pre-norm block. On (CoLA-M), when gradients are recorded: four
    non-reentrant checkpointed segments, each cut at r-dimensional activations z = σ(A·x):

        1. RMSNorm, A-halves of q, k, v                       x            -> z_q, z_k, z_v
        2. B-halves of q, k, v, attention, A-half of o        z_q, z_k, z_v -> z_o
        3. B-half of o, residual, RMSNorm, A-halves of gate, up   x, z_o   -> x', z_g, z_u
        4. B-halves of gate, up, SwiGLU, A-half of down       z_g, z_u     -> z_d
        then x' + B_d·z_d outside any segment (a matmul keeps only its input z_d)

    Autograd keeps the segments' inputs only: the block's input residual x and the seven z's,
    (d + 7r) values per token (:func:`cola_m_saved_bytes`); RMSNorm statistics, q/k/v, attention
    and SwiGLU intermediates are recomputed. (METHODS.md reads the reference's segment 1 as also
    holding the previous block's down B-half, which keeps the mid-block residual x' as well; decoding
    B_d·z_d outside the segments keeps that d per token out.) A projection left dense (not in
    ``method.targets``) has no bottleneck: its boundary is its input, which is then what is kept.
    """

    # LLaMA's forward loop runs it under trainer.recompute=full|selective like any Block
    checkpoint_fn = Block.checkpoint_fn

    def __init__(self, block: Block, swiglu: bool = True):
        super().__init__()
        self.attn_norm, self.attn, self.mlp_norm, self.mlp = block.attn_norm, block.attn, block.mlp_norm, block.mlp
        self.swiglu = swiglu  # False: the reference's only_lr_act (no SiLU on the gate)
        self.recompute = False

    def act(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return (F.silu(gate) if self.swiglu else gate) * up

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.recompute and torch.is_grad_enabled():
            return self.forward_segmented(x, cos, sin)
        a, m = self.attn, self.mlp
        h = self.attn_norm(x)
        x = x + a.o_proj(a.attend(a.q_proj(h), a.k_proj(h), a.v_proj(h), cos, sin))
        h = self.mlp_norm(x)
        return x + m.down_proj(self.act(m.gate_proj(h), m.up_proj(h)))

    # -- CoLA-M ---------------------------------------------------------------------------------------
    def _qkv(self, x):
        h, a = self.attn_norm(x), self.attn
        return encode(a.q_proj, h), encode(a.k_proj, h), encode(a.v_proj, h)

    def _attention(self, zq, zk, zv, cos, sin):
        a = self.attn
        return encode(a.o_proj, a.attend(decode(a.q_proj, zq), decode(a.k_proj, zk), decode(a.v_proj, zv), cos, sin))

    def _mlp_in(self, x, zo):
        x = x + decode(self.attn.o_proj, zo)
        h = self.mlp_norm(x)
        return x, encode(self.mlp.gate_proj, h), encode(self.mlp.up_proj, h)

    def _mlp(self, zg, zu):
        m = self.mlp
        return encode(m.down_proj, self.act(decode(m.gate_proj, zg), decode(m.up_proj, zu)))

    def forward_segmented(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # no randomness inside a block (no dropout): no RNG state to stash and restore
        seg = lambda fn, *args: checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)  # noqa: E731
        zq, zk, zv = seg(self._qkv, x)
        zo = seg(self._attention, zq, zk, zv, cos, sin)
        x, zg, zu = seg(self._mlp_in, x, zo)
        zd = seg(self._mlp, zg, zu)
        return x + decode(self.mlp.down_proj, zd)


def install_cola_m(model: nn.Module) -> None:
    """CoLA-M's recomputation: every CoLA block runs its segmented forward (applying it twice is harmless)."""
    blocks = [m for m in model.modules() if isinstance(m, CoLABlock)]
    if not blocks:
        raise UserError("CoLA-M's recomputation needs a model prepared by method=cola or method=cola_m "
                        "(this model has no CoLA block)")
    for block in blocks:
        block.recompute = True


def cola_m_saved_bytes(model_cfg: ModelConfig, rank: int, targets: list[str], act_bytes: int = 4,
                       residual_bytes: int = 4) -> int:
    """Bytes per token that autograd keeps for one CoLA-M block (:class:`CoLABlock`).

    The residual stream x (``residual_bytes`` per value: fp32, also under bf16 autocast; bf16 under
    pure bf16) and each
    segment boundary: r values (``act_bytes``) per CoLA projection; for a dense projection its input,
    which q, k, v (and gate, up) share: the normed residual (``residual_bytes``), the attention
    output (d) or the SwiGLU product (ffn_dim) (``act_bytes``).
    """
    d, f, cola = model_cfg.dim, model_cfg.ffn_dim, set(expand_targets(targets))

    def boundary(names: tuple[str, ...], dense_bytes: int) -> int:
        z = sum(act_bytes * rank for n in names if n in cola)
        return z + (dense_bytes if any(n not in cola for n in names) else 0)

    return (residual_bytes * d
            + boundary(("q_proj", "k_proj", "v_proj"), residual_bytes * d)
            + boundary(("o_proj",), act_bytes * d)
            + boundary(("gate_proj", "up_proj"), residual_bytes * d)
            + boundary(("down_proj",), act_bytes * f))


@register_method("cola")
class CoLA(Method):
    """CoLA: target projections become B·σ(A·x); CoLA-M's recomputation on request."""

    Config = CoLAConfig
    recompute_always = False  # CoLA-M: install the recomputation in prepare_model

    def prepare_model(self, model: nn.Module) -> nn.Module:
        c = self.cfg
        reparameterize(model, list(c.targets), lambda _q, lin: CoLALinear(
            lin.in_features, lin.out_features, c.rank, device=lin.weight.device, dtype=lin.weight.dtype,
            kernels=self.kernels))
        for i, block in enumerate(model.layers):
            model.layers[i] = CoLABlock(block, swiglu=not c.only_lr_act)
        if self.recompute_always:
            install_cola_m(model)
        return model

    def recompute_policy(self):
        return install_cola_m

    def layer_extra_values(self, model_cfg: ModelConfig) -> float:
        """A·x and σ(A·x): 2r values per CoLA projection; with the fused kernel (``kernels=triton``) A·x
        only, σ being recomputed from it in the backward."""
        per_projection = 1.0 if self.kernels == "triton" else 2.0
        return per_projection * self.cfg.rank * len(expand_targets(list(self.cfg.targets)))

    def activation_bytes(self, model_cfg: ModelConfig, recompute: str, recompute_every: int, precision: str) -> float:
        """CoLA-M's segments keep (d + 7r) values per token and block (:func:`cola_m_saved_bytes`)."""
        if recompute == "method" or (self.recompute_always and recompute == "none"):
            per_block = cola_m_saved_bytes(model_cfg, self.cfg.rank, list(self.cfg.targets),
                                           activation_itemsize(precision), residual_itemsize(precision))
            return float(model_cfg.n_layers * per_block)
        return super().activation_bytes(model_cfg, recompute, recompute_every, precision)

    def cost(self, model_cfg: ModelConfig, seq_len: int) -> dict[str, float]:
        """Exact parameters; FLOPs of every matmul, the bottlenecks' r·(n + m) instead of m·n."""
        r, cola = self.cfg.rank, set(expand_targets(list(self.cfg.targets)))
        per_layer = sum(r * (m + n) if name in cola else m * n
                        for name, (m, n) in target_shapes(model_cfg, ["attn", "mlp"]).items())
        return decoder_cost(model_cfg, seq_len, [per_layer] * model_cfg.n_layers)


@register_method("cola_m")
class CoLAM(CoLA):
    """CoLA-M: CoLA (same parameters, same function) with its segment recomputation always on."""

    recompute_always = True

