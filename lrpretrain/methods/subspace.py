"""What the optimizer-side methods (GaLore, Fira, APOLLO, APOLLO-Mini, FRUGAL, GaLore-DCT) share.

They keep the model as it is (full-rank weights, no surgery) and change only the optimizer: the
target projections (``method.targets``, default attn + mlp) form one projected parameter group whose
gradients are compressed; embeddings, the LM head and norms are plain Adam in their own groups with
the same learning rate and no scale, as in every reference (METHODS.md §1b).

This module holds the shared config fields and their validation, the parameter groups, the
optimizer's construction and the analytic cost; each method's plugin file adds its own keys and
picks its optimizer (lrpretrain/optim/).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from lrpretrain.config import ModelConfig, OptimConfig
from lrpretrain.errors import allowed, check
from lrpretrain.methods.base import Method, StepContext
from lrpretrain.methods.targets import TargetsConfig, expand_targets, select_targets
from lrpretrain.methods.toolkit import check_rank
from lrpretrain.optim import quant8
from lrpretrain.optim.memory import projected_step_temp_bytes, svd_temp_bytes
from lrpretrain.optim.projector import PROJ_TYPES, projected_shape, projection_side
from lrpretrain.optim.subspace import MOMENTS_ON_REFRESH, SubspaceAdam

BASIS_DTYPES = ("auto", "fp32", "bf16")


def target_shapes(model_cfg: ModelConfig, targets: list[str]) -> dict[str, tuple[int, int]]:
    """(m, n) = (out, in) of each selected projection of one decoder block."""
    d, f = model_cfg.dim, model_cfg.ffn_dim
    shapes = {"q_proj": (d, d), "k_proj": (d, d), "v_proj": (d, d), "o_proj": (d, d),
              "gate_proj": (f, d), "up_proj": (f, d), "down_proj": (d, f)}
    return {name: shapes[name] for name in expand_targets(list(targets))}


def check_state_bits(key: str, bits: int) -> None:
    check(bits in (32, 8), key, bits, "allowed: 32, 8")
    check(bits != 8 or quant8.available(), key, bits, "8-bit states need bitsandbytes>=0.49 (pip install bitsandbytes)")


@dataclass
class BasisConfig(TargetsConfig):
    """Where a method stores projection bases (SVD factors): ``basis_dtype``."""

    # dtype in which stored projection bases (SVD factors) are kept; the SVD itself and the projection
    # arithmetic run in fp32 either way. auto: the weights' dtype, as GaLore's reference casts its
    # projector to the model's dtype: bf16 under trainer.precision=pure_bf16 (half the bytes; its
    # 7B memory figure), fp32 otherwise. Resolved when the run's config is loaded.
    basis_dtype: str = "auto"  # auto | fp32 | bf16

    def validate(self) -> None:
        super().validate()
        check(self.basis_dtype in BASIS_DTYPES, "method.basis_dtype", self.basis_dtype, f"allowed: {allowed(BASIS_DTYPES)}")

    def resolve_for_precision(self, precision: str) -> None:
        if self.basis_dtype == "auto":
            self.basis_dtype = "bf16" if precision == "pure_bf16" else "fp32"


@dataclass
class SubspaceConfig(BasisConfig):
    """Keys shared by the methods that project gradients onto a rank-r subspace."""

    rank: int = 128  # r
    scale: float = 0.25  # α: multiplies the projected-back update
    update_proj_gap: int = 200  # T: steps between subspace refreshes
    proj_type: str = "std"  # std | reverse_std | left | right | full (which side of G is projected)
    clamp_rank: bool = False  # rank > min(m, n) of a weight: clamp it there instead of an error
    moments_on_refresh: str = "keep"  # keep (the references) | reset | rotate (into the new basis)
    state_bits: int = 32  # 32 | 8 (blockwise 8-bit moments, as GaLoreAdamW8bit)

    def validate(self) -> None:
        super().validate()
        check(self.rank > 0, "method.rank", self.rank, "must be > 0")
        check(self.scale > 0, "method.scale", self.scale, "must be > 0")
        check(self.update_proj_gap > 0, "method.update_proj_gap", self.update_proj_gap, "must be > 0")
        check(self.proj_type in PROJ_TYPES, "method.proj_type", self.proj_type, f"allowed: {allowed(PROJ_TYPES)}")
        check(self.moments_on_refresh in MOMENTS_ON_REFRESH, "method.moments_on_refresh", self.moments_on_refresh,
              f"allowed: {allowed(MOMENTS_ON_REFRESH)}")
        check_state_bits("method.state_bits", self.state_bits)

    def validate_for_model(self, model_cfg: ModelConfig) -> None:
        for name, shape in target_shapes(model_cfg, self.targets).items():
            check_rank(self.rank, shape, name, clamp=self.clamp_rank)


class SubspaceMethod(Method):
    """Full-rank weights, a projected optimizer for the targets, Adam for the rest."""

    Config = SubspaceConfig

    # -- what each plugin chooses ------------------------------------------------------------------
    def group_options(self) -> dict[str, Any]:
        """Keys of the projected parameter group (read by the optimizer at every step)."""
        c = self.cfg
        return {"rank": c.rank, "scale": c.scale, "update_proj_gap": c.update_proj_gap, "proj_type": c.proj_type,
                "clamp_rank": c.clamp_rank, "moments_on_refresh": c.moments_on_refresh,
                "basis_dtype": self.basis_dtype()}

    def basis_dtype(self) -> str:
        """``fp32`` or ``bf16`` (an unresolved ``auto``, outside a loaded run config, is fp32)."""
        return "bf16" if self.cfg.basis_dtype == "bf16" else "fp32"

    def basis_itemsize(self) -> int:
        return 2 if self.basis_dtype() == "bf16" else 4

    def make_optimizer(self, groups: list[dict[str, Any]], **kw: Any) -> SubspaceAdam:
        raise NotImplementedError

    # -- hooks ---------------------------------------------------------------------------------------
    def projected_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """The parameters whose gradients are projected: the target projections' weights (Q-GaLore: the
        gradient handles of its INT8 weights)."""
        return [m.weight for _, m in select_targets(model, list(self.cfg.targets))]

    def param_groups(self, model: nn.Module, optim_cfg: OptimConfig) -> list[dict[str, Any]]:
        projected = self.projected_parameters(model)
        ids = {id(p) for p in projected}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
        groups = [{"params": [p for p in rest if p.ndim >= 2], "weight_decay": optim_cfg.weight_decay},
                  {"params": [p for p in rest if p.ndim < 2], "weight_decay": 0.0},
                  {"params": projected, "weight_decay": optim_cfg.weight_decay, "projected": True,
                   **self.group_options()}]
        return [g for g in groups if g["params"]]

    def build_optimizer(self, groups: list[dict[str, Any]], optim_cfg: OptimConfig) -> SubspaceAdam:
        return self.make_optimizer(groups, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps,
                                   weight_decay=optim_cfg.weight_decay, state_bits=self.state_bits(optim_cfg))

    def state_bits(self, optim_cfg: OptimConfig) -> int:
        """8 if ``method.state_bits`` or ``optim.state_bits`` asks for it (both name the same moments)."""
        return min(self.cfg.state_bits, optim_cfg.state_bits)

    def after_step(self, ctx: StepContext) -> None:
        # Refreshes whose SVD fell back (zero, non-finite or unconvergeable gradient) become a metric;
        # counted only on the update after a refresh (update numbers kT + 1).
        gap = self.cfg.update_proj_gap
        if gap > 1 and ctx.step % gap != 1:
            return
        count = ctx.optimizer.svd_fallbacks()
        if count != getattr(self, "_fallbacks_logged", 0):
            ctx.log({"svd_fallbacks": count})
            self._fallbacks_logged = count

    # -- accounting ------------------------------------------------------------------------------------
    def moment_shape(self, shape: tuple[int, int]) -> tuple[int, int] | None:
        """Shape of the moments of a projected weight (None: it holds none)."""
        rank = min(self.cfg.rank, min(shape))
        return projected_shape(shape, projection_side(self.cfg.proj_type, shape), rank)

    def basis_bytes(self, shape: tuple[int, int]) -> int:
        """Bytes of the stored basis of one projected weight (SVD: the factor(s), fp32 or bf16)."""
        m, n = shape
        rank = min(self.cfg.rank, min(shape))
        side = projection_side(self.cfg.proj_type, shape)
        return self.basis_itemsize() * rank * ({"left": m, "right": n, "full": m + n}[side])

    # fp32 m x n matrices one projected update makes beyond the gradient (GaLore: Δ; Fira, FRUGAL: + residual)
    full_size_temps = 1

    def refresh_temp_bytes(self, shape: tuple[int, int]) -> float:
        """Temporaries of choosing a new basis for an m x n gradient (GaLore: its SVD)."""
        return svd_temp_bytes(shape)

    def step_temp_bytes(self, model_cfg: ModelConfig, optim_cfg: OptimConfig, precision: str) -> float:
        """The larger of the plain-Adam step of the embedding and the projected step of the largest
        target (at a refresh with its SVD), :mod:`lrpretrain.optim.memory`."""
        worst = super().step_temp_bytes(model_cfg, optim_cfg, precision)
        bits = self.state_bits(optim_cfg)
        for shape in target_shapes(model_cfg, self.cfg.targets).values():
            ms = self.moment_shape(shape)
            projected = ms if ms is not None else shape
            basis = self.basis_bytes(shape) / 2 if self.basis_dtype() == "bf16" else 0.0  # entries of a bf16 basis
            step = projected_step_temp_bytes(shape, projected, basis, bits, precision, self.full_size_temps)
            refresh = self.refresh_temp_bytes(shape) + (8.0 * shape[0] * shape[1] if precision == "pure_bf16" else 0.0)
            worst = max(worst, step, refresh)
        return worst

    def extra_bytes(self, shape: tuple[int, int]) -> int:
        """Other per-weight state (a limiter's norm)."""
        return 0

    def cost(self, model_cfg: ModelConfig, seq_len: int) -> dict[str, float]:
        """Base cost plus the analytic optimizer-state bytes (moments, stored bases, scalars).

        The per-step projection and the SVD every T steps are optimizer work, not per-token training
        FLOPs: ``flops_per_token`` is the full model's, as for AdamW.
        """
        out = super().cost(model_cfg, seq_len)
        out["optimizer_state_bytes"] = float(self.state_bytes(model_cfg, self.cfg.state_bits))
        return out

    def optimizer_state_bytes(self, model_cfg: ModelConfig, optim_cfg: OptimConfig) -> float:
        return float(self.state_bytes(model_cfg, self.state_bits(optim_cfg)))

    def state_bytes(self, model_cfg: ModelConfig, bits: int) -> int:
        """Analytic optimizer-state bytes with ``bits``-bit moments."""
        L, d, V = model_cfg.n_layers, model_cfg.dim, model_cfg.vocab_size
        chosen, every = target_shapes(model_cfg, self.cfg.targets), target_shapes(model_cfg, ["attn", "mlp"])
        total = 0
        for shape in chosen.values():
            ms = self.moment_shape(shape)
            moments_bytes = 2 * moment_bytes(ms[0] * ms[1], bits) if ms else 0
            total += L * (moments_bytes + self.basis_bytes(shape) + self.extra_bytes(shape))
        # plain Adam: embedding (+ LM head), norms, and projections that are not targets
        dense = [V * d] * (1 if model_cfg.tie_embeddings else 2) + [d] * (2 * L + 1)
        dense += [m * n for name, (m, n) in every.items() if name not in chosen] * L
        total += sum(2 * moment_bytes(numel, bits) for numel in dense)
        return total


def moment_bytes(numel: int, bits: int) -> int:
    """Bytes of one moment tensor: fp32, or uint8 codes + an fp32 absmax per block of 256."""
    if quant8.use_8bit(numel, bits):
        return numel + 4 * -(-numel // quant8.BLOCK)
    return 4 * numel
