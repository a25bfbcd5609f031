"""LORO, the Low-rank Riemannian Optimizer (Mo, Huang, Pan; ICLR 2025; code mzf666/LORO-main).

Every target is W = B·A from scratch (B: m x r, A: r x n, both trained, nothing of the dense weight
kept), r the same for attention and MLP. Optimizer: :class:`lrpretrain.optim.LOROAdamW`. Most updates
are "lazy": each factor takes an AdamW step with its LR scaled by r/d. Every K-th update is the exact
Riemannian step: QR of both factors, the tangent-space projection of the gradient assembled from the
factors' directions alone, retraction by the SVD of a 2r x 2r core and rebalancing of the factors by
√Σ (:func:`lrpretrain.optim.loro.riemannian_step`). Right after it every optimizer state is
refreshed (zero moments, step counters restart) and the LR restarts: it drops to 0 and ramps back
over ``restart_warmup_steps`` updates (:meth:`LORO.lr_factor`). Embeddings, LM head and norms are
plain AdamW at the same LR. Defaults and presets: the reference's scripts/loro_c4/llama_*.sh (ranks
128/256/256/512 for 60M/130M/350M/1B, K = 500 (200 at 1B), lr 0.01 (0.005 at 1B), Adam eps 1e-6, no
clipping, no weight decay); the paper trained up to 1B, so there is no 7B preset.

Choices where the paper is silent, taken from the reference code unless said otherwise:
- Initialisation: Xavier-normal for both factors (``--loro_init xavier``), drawn from the run's seed.
- The lazy LR scale r/d uses d = model.dim for every target, the MLP's too (the reference's
  ``--loro_lr_scaler -1`` divides by ``hidden_size``); ``method.lazy_lr_scale`` sets another value.
- The exact step falls on updates K, 2K, ... (1-based; the reference's ``(update_step + 1) % loro_freq
  == 0``). Its direction is each factor's Adam-normalised gradient, with this update's gradient in the
  moments, and its step the unscaled LR of the update: the reference's code (the paper's Algorithm 1
  writes the raw gradients). No weight decay in the exact step; the lazy step decays at the unscaled LR.
- The refresh after an exact step (``method.refresh``): ``all`` states, the embeddings', head's and
  norms' included (the reference's ``--loro_refresh all``), ``lowrank`` (factors only) or ``none``.
  Under ``trainer.precision=pure_bf16`` the refresh forgets the moments only: the stochastic rounding's
  update counts go on (no rounding bits drawn twice) and the Kahan buffers stay with their weights.
- The LR: the base schedule (``optim.*``: warmup, cosine to ``min_lr_ratio``) times a restart ramp:
  at update kK (0-based, k >= 1) the factor is 0, then rises linearly to 1 over
  ``restart_warmup_steps`` (5, the reference's ``--cosine_restart_warmup`` default). Differences
  from the reference's ``cosine_restart`` schedule: its cosine is displaced by ``--lr_adjust_steps
  -warmup`` and its warmup starts at ``min_lr_ratio``; its ramp starts at 1e-6 rather than 0 and
  climbs to the cosine value at the restart rather than to the cosine itself; it has no ramp at the
  update where its warmup ends.
- Adam's arithmetic is the reference's (eps added to √v, the bias correction folded into the step size),
  for the factors and the dense parameters; decoupled weight decay comes before the update (the
  reference's after it). The presets keep its eps (1e-6).
- The exact step's complement bases come from one Householder QR of [Q, Z] (see ``riemannian_step``).
- The exact step is skipped with its update when the trainer skips a non-finite update; the refresh and
  the LR restart follow the trainer's update count all the same.

Distributed: DDP runs (identical replicas take identical exact steps); per-layer updates run (the second
factor of a pair to arrive moves both); FSDP2 is refused (the exact step needs whole factors for its
QRs); DeepSpeed is refused by its own rule for methods with their own optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lrpretrain.errors import allowed, check
from lrpretrain.methods import register_method
from lrpretrain.methods.base import Method, StepContext, dense_param_groups
from lrpretrain.methods.lora import lora_activation_values
from lrpretrain.methods.lowrank import factor_cost
from lrpretrain.methods.targets import TargetsConfig
from lrpretrain.methods.toolkit import (
    LowRankLinear,
    check_rank_for_model,
    reparameterize,
    reparameterized_cost,
    restart_optimizer_state,
    restart_ramp,
    target_shapes,
)
from lrpretrain.optim.loro import LOROAdamW
from lrpretrain.optim.memory import moment_pair_bytes, svd_temp_bytes

if TYPE_CHECKING:
    from lrpretrain.config import ModelConfig, OptimConfig

REFRESH = ("all", "lowrank", "none")


@dataclass
class LOROConfig(TargetsConfig):
    """The reference's LLaMA-60M script: r = 128, K = 500."""

    rank: int = 128  # r
    exact_every: int = 500  # K: the exact Riemannian step at updates K, 2K, ... (--loro_freq)
    restart_warmup_steps: int = 5  # LR ramp after each exact step (--cosine_restart_warmup)
    refresh: str = "all"  # optimizer states zeroed after each exact step: all | lowrank | none
    lazy_lr_scale: float | None = None  # LR factor of the lazy steps; null: r / model.dim

    def validate(self) -> None:
        super().validate()
        check(self.rank > 0, "method.rank", self.rank, "must be > 0")
        check(self.exact_every > 0, "method.exact_every", self.exact_every, "must be > 0 (updates between exact steps)")
        check(0 <= self.restart_warmup_steps <= self.exact_every, "method.restart_warmup_steps",
              self.restart_warmup_steps, f"must be in [0, method.exact_every={self.exact_every}]")
        check(self.refresh in REFRESH, "method.refresh", self.refresh, f"allowed: {allowed(REFRESH)}")
        check(self.lazy_lr_scale is None or self.lazy_lr_scale > 0, "method.lazy_lr_scale", self.lazy_lr_scale,
              "must be > 0, or null for r / model.dim")

    def validate_for_model(self, model_cfg: ModelConfig) -> None:
        check_rank_for_model(self.rank, model_cfg, list(self.targets))


@register_method("loro")
class LORO(Method):
    """W = B·A on every target; LOROAdamW: lazy factor steps, an exact Riemannian step every K."""

    Config = LOROConfig
    cfg: LOROConfig
    unsupported_strategies = {
        "fsdp2": "its exact Riemannian step takes QR decompositions of whole factors, which FSDP2 shards by rows"}

    def __init__(self, cfg: LOROConfig, model_cfg: ModelConfig):
        super().__init__(cfg, model_cfg)
        self.layers: list[LowRankLinear] = []

    def prepare_model(self, model: nn.Module) -> nn.Module:
        r = self.cfg.rank

        def build(_qual: str, linear: nn.Linear) -> LowRankLinear:
            w = linear.weight
            m = LowRankLinear(linear.in_features, linear.out_features, r, device=w.device, dtype=w.dtype)
            with torch.no_grad():  # the reference's xavier_normal_ of weight_in (n x r) and weight_out (m x r)
                nn.init.xavier_normal_(m.lora_A)
                nn.init.xavier_normal_(m.lora_B)
            return m

        self.layers = [m for _, m in reparameterize(model, list(self.cfg.targets), build)]
        return model

    @property
    def lazy_scale(self) -> float:
        c = self.cfg
        return c.lazy_lr_scale if c.lazy_lr_scale is not None else c.rank / self.model_cfg.dim

    def factors(self) -> list[torch.Tensor]:
        return [p for m in self.layers for p in (m.lora_B, m.lora_A)]

    def param_groups(self, model: nn.Module, optim_cfg: OptimConfig) -> list[dict[str, Any]]:
        """The factor pairs [B, A, ...] in one ``loro`` group; the other parameters as full training's."""
        ours = {id(p) for p in self.factors()}
        wd = optim_cfg.weight_decay
        return [{"params": self.factors(), "weight_decay": wd, "loro": True, "lazy_scale": self.lazy_scale,
                 "exact_every": self.cfg.exact_every, "update": 0},
                *dense_param_groups((p for p in model.parameters() if id(p) not in ours), wd)]

    def build_optimizer(self, groups: list[dict[str, Any]], optim_cfg: OptimConfig) -> LOROAdamW:
        return LOROAdamW(groups, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps,
                         weight_decay=optim_cfg.weight_decay, state_bits=optim_cfg.state_bits)

    def lr_factor(self, step: int) -> float:
        """0 at each update that follows an exact step, then a linear ramp back to the base schedule."""
        return restart_ramp(step, self.cfg.exact_every, self.cfg.restart_warmup_steps)

    @torch.no_grad()
    def after_step(self, ctx: StepContext) -> None:
        opt = ctx.optimizer
        if isinstance(opt, LOROAdamW):
            opt.set_update(ctx.step)
        if ctx.step % self.cfg.exact_every:
            return
        if self.cfg.refresh != "none":
            params = self.factors() if self.cfg.refresh == "lowrank" else \
                [p for g in opt.param_groups for p in g["params"]]
            restart_optimizer_state(opt, params, keep_rounding=True)  # pure bf16: the rounding goes on
        ctx.log({"loro_exact_steps": ctx.step // self.cfg.exact_every})

    # -- accounting ---------------------------------------------------------------------------
    def layer_extra_values(self, model_cfg: ModelConfig) -> float:
        """x·Aᵀ: r values per target and token (no dropout)."""
        return lora_activation_values(model_cfg, self.cfg.rank, list(self.cfg.targets), 0.0)

    def optimizer_state_bytes(self, model_cfg: ModelConfig, optim_cfg: OptimConfig) -> float:
        """Two moments per trainable tensor (fp32, or 8-bit above bitsandbytes' size threshold), no step
        tensors (the step count is an integer)."""
        d, V, L, r = model_cfg.dim, model_cfg.vocab_size, model_cfg.n_layers, self.cfg.rank
        sizes = [V * d] * (1 if model_cfg.tie_embeddings else 2) + [d] * (2 * L + 1)
        sizes += [r * x for m, n in target_shapes(model_cfg, list(self.cfg.targets)).values() for x in (m, n)] * L
        return sum(moment_pair_bytes(s, optim_cfg.state_bits) for s in sizes)

    def step_temp_bytes(self, model_cfg: ModelConfig, optim_cfg: OptimConfig, precision: str) -> float:
        """The costlier of an Adam step of the largest tensor (lazy and dense steps are element-wise, in
        pieces) and the exact Riemannian step of the largest factor pair (m x r, r x n), whose fp32
        temporaries are, per side s in (m, n): both Adam directions (and, computing each, √v + eps: 2 x sr),
        Q and Z (2sr), the augmented basis [Q, Q̄] (2sr), the QR of [Q | Z] while it runs (its input and
        unsigned Q, 4sr), the new factor (sr); the 2r x 2r core's SVD; under pure bf16 the fp32 working
        copies of both factors (sr each)."""
        dense = super().step_temp_bytes(model_cfg, optim_cfg, precision)
        r = self.cfg.rank
        pure = precision == "pure_bf16"
        exact = max(4.0 * r * (m + n) * (2 + 2 + 2 + 1 + (1 if pure else 0)) + 4.0 * 2 * r * max(m, n) * 2
                    + 4.0 * r * max(m, n) + svd_temp_bytes((2 * r, 2 * r))
                    for m, n in target_shapes(model_cfg, list(self.cfg.targets)).values())
        return max(dense, exact)

    def cost(self, model_cfg: ModelConfig, seq_len: int) -> dict[str, float]:
        """As the low-rank baseline: r(m + n) parameters per target, 6r(m + n) FLOPs per token (the exact
        step's QRs and SVD, once per K updates, are not per-token work and not counted)."""
        return reparameterized_cost(model_cfg, seq_len, list(self.cfg.targets), factor_cost(self.cfg.rank))
