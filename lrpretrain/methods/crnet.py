"""CR-Net (Kong et al., ICLR 2026; arXiv 2509.18993): the cross-layer low-rank residual network.

The paper observes that the outputs of the same projection in adjacent layers differ by a low-rank
term. So layer 1 is dense, and in every later layer l each target projection type P (q, k, v, o,
gate, up, down) reuses the previous layer's output of its type, scaled by a learned scalar, plus a
low-rank term of its own input:

    Y_l^P = s(β_l^P)·Y_{l-1}^P + X_l^P A_l^P B_l^P,    s(β) = sign(β)·(|β| + ε)

(A: r x n and B: m x r here, nn.Linear's layout: X A B = (X Aᵀ) Bᵀ.) High-rank information flows
through the carried outputs; each later layer costs r·(n + m) + 1 parameters per type instead of n·m.
:class:`CRNetLLaMA` is the decoder loop that carries a dict of the previous layer's outputs (the
*carry*) from block to block; state_dict names stay those of the plain model
(``layers.<i>.attn.q_proj.{A,B,beta}`` for i >= 1, ``layers.0.attn.q_proj.weight``).

Our choices where the paper is silent, or where its text could not be read here (only its abstract
and introduction were retrievable; the reported C4 perplexities 32.76/23.74/17.08/14.05 at
60M/130M/350M/1B come from a listing of its tables). All are config keys:
- Layer 1 is dense for every target type (the paper's first layer); a type left out of
  ``method.targets`` is dense in every layer and carries nothing.
- ``beta_init`` = 1: each later layer starts as the previous layer's output plus a low-rank
  correction, the paper's premise.
- ``eps`` = 1e-3 and sign(0) := +1: |s(β)| >= ε always and ds/dβ = 1, so the cross-layer path can
  neither vanish nor freeze (torch.sign(0) = 0 would give s(0) = 0 with zero gradient).
- A, B ~ N(0, σ²) with σ = (init_std²/r)^(1/4): each entry of the product A·B has std init_std (0.02),
  the scale of the dense layer; both nonzero so that every layer's own input counts from step 0 (a
  LoRA-style B = 0 would start every layer as a copy of layer 1's outputs). With β = 1 the carried
  outputs' variance grows by one dense layer's worth per layer at init; RMSNorm keeps the residual
  stream's input to each block normalised.
- rank ≈ d/4 per size (128/256/256/512/1024), as CoLA and GaLore: about half the dense parameters.
- Optimizer: plain AdamW with CoLA's recipe (lr 0.006/0.003/0.003/0.002/0.001, weight decay 0.01,
  clipping 0.5, warmup 2K/2K/6K/10K/15K): the closest published recipe for a from-scratch
  architecture of about half the parameters. β is a 1-element parameter: no weight decay (decay would pull
  the cross-layer path towards ε).

Recomputation (``recompute_policy()``, for ``trainer.recompute=method``); the paper's own scheme was
not readable, this is ours. The carry (Σ_P m_P values per token: 5d + 2·ffn_dim with every target)
is several times the residual stream, and plain block checkpointing must keep every block's inputs,
residual and carry. But the recursion makes a carry cheap to rebuild from the one before it:
Y_l = s(β_l)·Y_{l-1} + Z_l·B_l needs only the r-dimensional Z_l = X_l·A_l and one r x m matmul per
type. So layers 2..L go in groups of k (``method.recompute_group``, default round(√(L − 1))); in
forward a group keeps its input carry (the anchor), each layer's input residual, and the Z_l of its
layers but the last; layer 1 keeps its input residual. In backward a group rebuilds its k carries
from the anchor (no grad), then recomputes and back-propagates its layers one at a time, last first.
Kept per token: d + Σ_groups (k·d + C + (k − 1)·Σ_P r) (:func:`crnet_saved_bytes`), plus, during one
group's backward, its k rebuilt carries and one layer's internals. Exact: every rebuilt or
recomputed tensor repeats the forward's operations on the same inputs.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lrpretrain.config import ModelConfig
from lrpretrain.errors import ConfigError, UserError, check
from lrpretrain.methods import register_method
from lrpretrain.methods.base import Method, Reparameterized
from lrpretrain.methods.subspace import target_shapes
from lrpretrain.methods.targets import ATTN, TargetsConfig, expand_targets, select_targets, set_module
from lrpretrain.methods.toolkit import check_rank, decoder_cost
from lrpretrain.model.llama import LLaMA
from lrpretrain.model.memory import activation_itemsize, llama_layer_bytes, residual_itemsize


@dataclass
class CRNetConfig(TargetsConfig):
    """Rank d/4 at 60M (r = 128) on every attention and MLP projection of layers 2..L."""

    rank: int = 128  # r
    beta_init: float = 1.0  # β at init: s(β)·Y_{l-1} starts as the previous layer's output
    eps: float = 1e-3  # ε: |s(β)| = |β| + ε >= ε
    recompute_group: int = 0  # k: layers per carry anchor when recomputing; 0: round(sqrt(n_layers - 1))

    def validate(self) -> None:
        super().validate()
        check(self.rank > 0, "method.rank", self.rank, "must be > 0")
        check(self.eps > 0, "method.eps", self.eps, "must be > 0 (it keeps |s(β)| >= ε)")
        check(math.isfinite(self.beta_init), "method.beta_init", self.beta_init, "must be finite")
        check(self.recompute_group >= 0, "method.recompute_group", self.recompute_group,
              "must be >= 0 (0: round(sqrt(n_layers - 1)))")

    def validate_for_model(self, model_cfg: ModelConfig) -> None:
        check(model_cfg.n_layers >= 2, "model.n_layers", model_cfg.n_layers,
              "CR-Net needs at least 2 layers (layer 1 is dense, later layers build on it)")
        for name, shape in target_shapes(model_cfg, self.targets).items():
            check_rank(self.rank, shape, name)


class CrossLayerLinear(Reparameterized):
    """Y = s(β)·Y_prev + (X Aᵀ) Bᵀ: a projection of layer l >= 2, given layer l-1's output of its type.

    Called as ``module(x, prev)``, not as an nn.Linear: its output depends on the previous layer.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, beta_init: float, eps: float,
                 init_std: float, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank, self.eps = in_features, out_features, rank, eps
        self.A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.empty(out_features, rank, device=device, dtype=dtype))
        # β is a 1-element vector, not a 0-d scalar: FSDP2 and DeepSpeed shard and broadcast only tensors with a dim
        self.beta = nn.Parameter(torch.full((1,), beta_init, device=device, dtype=dtype))  # β
        std = (init_std**2 / rank) ** 0.25  # an entry of A·B then has std init_std
        with torch.no_grad():
            nn.init.normal_(self.A, std=std)
            nn.init.normal_(self.B, std=std)

    def scale(self) -> torch.Tensor:
        """s(β) = sign(β)·(|β| + ε), with sign(0) = +1."""
        return self.beta + torch.where(self.beta >= 0, self.eps, -self.eps).to(self.beta.dtype)  # a bf16 β stays bf16

    def lowrank(self, x: torch.Tensor) -> torch.Tensor:
        """Z = X Aᵀ: the r-dimensional activation (all the recomputation keeps of this projection)."""
        return F.linear(x, self.A)

    def combine(self, z: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        return self.scale() * prev + F.linear(z, self.B)

    def forward(self, x: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        return self.combine(self.lowrank(x), prev)

    def dense_weight(self) -> torch.Tensor:
        raise NotImplementedError("a CR-Net projection adds s(β) x the previous layer's output of its type, "
                                  "which is not a function of its own input, so it has no dense weight")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"eps={self.eps:g}")


class CRNetBlock(nn.Module):
    """A pre-norm decoder block (the children of :class:`~lrpretrain.model.llama.Block`) whose
    cross-layer projections read ``prev``, the previous block's outputs; it returns its own."""

    def __init__(self, block: nn.Module, carried: tuple[str, ...]):
        super().__init__()
        self.attn_norm, self.attn, self.mlp_norm, self.mlp = block.attn_norm, block.attn, block.mlp_norm, block.mlp
        self.carried = carried  # the target types, in model order: their outputs go to the next block

    def proj(self, name: str) -> nn.Module:
        return getattr(self.attn if name in ATTN else self.mlp, name)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, prev: dict[str, torch.Tensor] | None,
                lowrank: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(x, prev) -> (x', this block's outputs of the carried types); ``lowrank`` collects the Z's."""
        carry: dict[str, torch.Tensor] = {}

        def project(name: str, inp: torch.Tensor) -> torch.Tensor:
            p = self.proj(name)
            if isinstance(p, CrossLayerLinear):
                z = p.lowrank(inp)
                if lowrank is not None:
                    lowrank[name] = z
                y = p.combine(z, prev[name])
            else:
                y = p(inp)
            if name in self.carried:
                carry[name] = y
            return y

        h = self.attn_norm(x)
        q, k, v = project("q_proj", h), project("k_proj", h), project("v_proj", h)
        x = x + project("o_proj", self.attn.attend(q, k, v, cos, sin))
        h = self.mlp_norm(x)
        g, u = project("gate_proj", h), project("up_proj", h)
        x = x + project("down_proj", F.silu(g) * u)
        return x, {name: carry[name] for name in self.carried}

    def rebuild_carry(self, lowrank: dict[str, torch.Tensor], prev: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This block's outputs from its saved Z's and the previous outputs: one r x m matmul per type."""
        return {name: self.proj(name).combine(lowrank[name], prev[name]) for name in self.carried}


class CRNetLLaMA(LLaMA):
    """LLaMA whose decoder loop carries each block's projection outputs to the next block.

    ``prepare_model`` turns a built :class:`LLaMA` into one in place (its class changes, as FSDP2's
    ``fully_shard`` does): same modules, buffers and state_dict.
    """

    recompute_group = 0  # layers per carry anchor in CR-Net's recomputation; 0: off

    def forward_layers(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.recompute_group and torch.is_grad_enabled():
            return recompute_layers(list(self.layers), x, cos, sin, self.recompute_group)
        carry = None
        for layer in self.layers:
            x, carry = layer(x, cos, sin, carry)
        return x


# -- recomputation -------------------------------------------------------------------------------------


def layer_groups(n_layers: int, k: int) -> list[list[int]]:
    """Layer 1 alone (no carry enters it), then layers 2..L in groups of k."""
    return [[0]] + [list(range(s, min(s + k, n_layers))) for s in range(1, n_layers, k)]


def recompute_layers(layers: list[CRNetBlock], x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     k: int) -> torch.Tensor:
    carry: dict[str, torch.Tensor] = {}
    for idx in layer_groups(len(layers), k):
        blocks = [layers[i] for i in idx]
        params = [p for b in blocks for p in b.parameters()]
        x, *out = _AnchoredGroup.apply(blocks, tuple(carry), cos, sin, x, *carry.values(), *params)
        carry = dict(zip(blocks[-1].carried, out))
    return x


def _autocast_like_now(device_type: str):
    """A context that restores the current autocast state (for the recomputation in backward)."""
    enabled, dtype = torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)

    def ctx() -> AbstractContextManager[Any]:
        return torch.autocast(device_type, dtype=dtype, enabled=enabled)

    return ctx


class _AnchoredGroup(torch.autograd.Function):
    """Consecutive CR-Net blocks run without autograd; backward rebuilds and recomputes them.

    Inputs: the blocks, the names of the carry entering them, RoPE tables, the residual x, the
    carry tensors (the anchor) and every parameter of the blocks (passed so that their gradients
    are returned here and accumulate as usual, post-accumulate-grad hooks included).
    """

    @staticmethod
    def forward(ctx, blocks, names, cos, sin, x, *tensors):
        anchor = tensors[:len(names)]
        ctx.blocks, ctx.names, ctx.cos, ctx.sin = blocks, names, cos, sin
        ctx.autocast = _autocast_like_now(x.device.type)
        inputs, lowranks = [], []
        prev = dict(zip(names, anchor)) or None
        with torch.no_grad():
            for block in blocks:
                inputs.append(x)
                z: dict[str, torch.Tensor] = {}
                x, prev = block(x, cos, sin, prev, lowrank=z)
                lowranks.append(z)
        keep = lowranks[:-1]  # the last block's Z's rebuild no carry
        ctx.z_names = [tuple(z) for z in keep]
        ctx.save_for_backward(*inputs, *anchor, *(t for z in keep for t in z.values()))
        return (x, *prev.values())

    @staticmethod
    def backward(ctx, dx, *d_out):
        blocks, n = ctx.blocks, len(ctx.blocks)
        saved = ctx.saved_tensors
        inputs, anchor, flat = saved[:n], saved[n:n + len(ctx.names)], iter(saved[n + len(ctx.names):])
        lowranks = [{name: next(flat) for name in names} for names in ctx.z_names]
        # 1. the carry entering each block, rebuilt from the anchor
        carries: list[dict[str, torch.Tensor] | None] = [dict(zip(ctx.names, anchor)) or None]
        with torch.no_grad(), ctx.autocast():
            for block, z in zip(blocks[:-1], lowranks):
                carries.append(block.rebuild_carry(z, carries[-1]))
        # 2. each block recomputed with autograd and back-propagated, last first
        d_carry = dict(zip(blocks[-1].carried, d_out))
        param_grads: list[tuple] = [()] * n
        for j in reversed(range(n)):
            block = blocks[j]
            x_in = inputs[j].detach().requires_grad_()
            prev = {name: t.detach().requires_grad_() for name, t in (carries[j] or {}).items()}
            carries[j] = None
            params = list(block.parameters())
            with torch.enable_grad(), ctx.autocast():
                x_out, carry = block(x_in, ctx.cos, ctx.sin, prev or None)
            grads = torch.autograd.grad((x_out, *carry.values()), (x_in, *prev.values(), *params),
                                        (dx, *(d_carry[name] for name in carry)), allow_unused=True)
            dx, d_carry = grads[0], dict(zip(prev, grads[1:1 + len(prev)]))
            param_grads[j] = grads[1 + len(prev):]
        return (None, None, None, None, dx, *(d_carry[name] for name in ctx.names),
                *(g for grads in param_grads for g in grads))


def crnet_saved_bytes(model_cfg: ModelConfig, rank: int, targets: list[str], group: int,
                      act_bytes: int = 4, residual_bytes: int = 4) -> int:
    """Bytes per token that CR-Net's recomputation keeps for the whole decoder (see the module doc)."""
    d, shapes = model_cfg.dim, target_shapes(model_cfg, targets)
    carry = act_bytes * sum(m for m, _n in shapes.values())
    z = act_bytes * rank * len(shapes)
    total = residual_bytes * d  # layer 1's input
    for idx in layer_groups(model_cfg.n_layers, group)[1:]:
        total += len(idx) * residual_bytes * d + carry + (len(idx) - 1) * z
    return total


@register_method("crnet")
class CRNet(Method):
    """CR-Net: dense layer 1, cross-layer low-rank residual projections after it."""

    Config = CRNetConfig

    @classmethod
    def strategy_refusal(cls, strategy: str, cfg) -> str | None:
        sharded = strategy == "fsdp2" or (strategy == "deepspeed" and cfg.distributed.zero_stage == 3)
        if sharded and cfg.trainer.recompute == "method":
            return ("its recomputation (trainer.recompute=method) rebuilds a group of layers in one autograd function "
                    "that spans several sharded blocks, whose parameters are gathered only block by block "
                    "(trainer.recompute=none works)")
        return None

    def prepare_model(self, model: nn.Module) -> nn.Module:
        if not isinstance(model, LLaMA):
            raise ConfigError(f"method=crnet rewires a LLaMA decoder; got a {type(model).__name__}")
        c = self.cfg
        for qual, linear in select_targets(model, list(c.targets)):
            if qual.startswith("layers.0."):
                continue  # layer 1 stays dense
            if not isinstance(linear, nn.Linear):
                raise ConfigError(f"{qual} is a {type(linear).__name__}, not an nn.Linear: it was already replaced")
            w = linear.weight
            set_module(model, qual, CrossLayerLinear(linear.in_features, linear.out_features, c.rank, c.beta_init,
                                                     c.eps, self.model_cfg.init_std, device=w.device, dtype=w.dtype))
        carried = expand_targets(list(c.targets))
        for i, block in enumerate(model.layers):
            model.layers[i] = CRNetBlock(block, carried)
        model.__class__ = CRNetLLaMA
        return model

    def group_size(self, n_layers: int) -> int:
        return self.cfg.recompute_group or max(1, round(math.sqrt(n_layers - 1)))

    def recompute_policy(self):
        def install(model: nn.Module) -> None:
            if not isinstance(model, CRNetLLaMA):
                raise UserError("CR-Net's recomputation needs a model prepared by method=crnet")
            model.recompute_group = self.group_size(len(model.layers))

        return install

    def activation_bytes(self, model_cfg: ModelConfig, recompute: str, recompute_every: int, precision: str) -> float:
        """Layer 1 is a plain block; each later block saves, beyond a plain one, 7r values of X·A and
        4d of the carried outputs that s(β)·Y_{l-1} keeps (every target; pro rata for fewer). With
        its recomputation: :func:`crnet_saved_bytes`."""
        if recompute in ("full", "selective"):
            raise ConfigError(f"trainer.recompute={recompute} is invalid for method=crnet (its blocks carry the "
                              "previous block's outputs); allowed: none, method")
        targets = list(self.cfg.targets)
        if recompute == "method":
            k = self.group_size(model_cfg.n_layers)
            return float(crnet_saved_bytes(model_cfg, self.cfg.rank, targets, k, activation_itemsize(precision),
                                           residual_itemsize(precision)))
        n = len(expand_targets(targets))
        extra = activation_itemsize(precision) * (n * self.cfg.rank + 4 * model_cfg.dim * n / 7)
        return model_cfg.n_layers * llama_layer_bytes(model_cfg, "none", precision) + (model_cfg.n_layers - 1) * extra

    def cost(self, model_cfg: ModelConfig, seq_len: int) -> dict[str, float]:
        """Exact parameters; FLOPs of every matmul: layer 1 dense, r·(n + m) per target after it."""
        r, chosen = self.cfg.rank, set(expand_targets(list(self.cfg.targets)))
        shapes = target_shapes(model_cfg, ["attn", "mlp"])
        dense = sum(m * n for m, n in shapes.values())
        later = sum(r * (m + n) if name in chosen else m * n for name, (m, n) in shapes.items())
        L = model_cfg.n_layers
        return decoder_cost(model_cfg, seq_len, [dense] + [later] * (L - 1), [0] + [len(chosen)] * (L - 1))
