"""The per-parameter step shared by the projected-gradient optimizers (GaLore, Fira, APOLLO, FRUGAL).

Parameter groups marked ``projected`` hold 2-D weights whose gradient G is projected to a rank-r
subspace (:mod:`lrpretrain.optim.projector`) where Adam keeps its moments; every other group
(embeddings, LM head, norms) is plain Adam with the same learning rate. One update of a projected
weight, at its own step count t (starting at 0, as in GaLore's reference):

1. if t mod T == 0 (T = ``update_proj_gap``): refresh the basis from the current G, then keep, reset
   or rotate the moments (``moments_on_refresh``; GaLore keeps them, FRUGAL resets them);
2. R = project(G); Adam moments on R (fp32 or 8-bit, :mod:`lrpretrain.optim.moments`);
   N = Adam's normalised direction and f the bias-correction factor of the LR;
3. the subclass turns (G, R, N) into the full-space update Δ (GaLore: α·P N; Fira adds a scaled
   residual; APOLLO rescales G itself; FRUGAL adds signSGD on the residual); W <- W(1 - lr·λ) - Δ.

Everything a step needs is in ``self.state[p]`` (plain tensors and ints) and the group, so
``step_param`` serves the global step and the per-layer (in-backward) step alike, and a checkpoint
resumes exactly, also between two refreshes.

Under FSDP2 (sharded DTensor parameters) each matrix's *full* gradient is all-gathered and projected
(the projection, moments and update are then the single-process ones, replicated on every rank as
plain tensors) and each rank applies its own rows of Δ; the non-projected parameters step their shard.

Deliberate difference from the references: decoupled weight decay is applied before the update
(W(1 - lr·λ) - Δ, as torch.optim.AdamW and FRUGAL do); GaLore's code applies it after (W - Δ, then
times (1 - lr·λ)), a second-order difference, and every published GaLore run uses λ = 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from lrpretrain.comm import shard_rows
from lrpretrain.optim import moments
from lrpretrain.optim.base import AdamStep, ParamwiseOptimizer
from lrpretrain.optim.projector import PROJ_TYPES, Basis, next_seed, project, projected_shape, projection_side

MOMENTS_ON_REFRESH = ("keep", "reset", "rotate")


class SubspaceAdam(ParamwiseOptimizer):
    """Base class: Adam in a periodically refreshed subspace of each projected weight's gradient."""

    form = "hf"  # where Adam's eps sits (moments.normalized): the GaLore/Fira/APOLLO references' form
    group_keys: tuple[str, ...] = ("rank", "update_proj_gap", "scale", "proj_type")
    group_defaults: dict[str, Any] = {"moments_on_refresh": "keep", "clamp_rank": False, "basis_dtype": "fp32"}

    def __init__(self, params, basis: Basis, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, state_bits: int = 32, seed: int = 0):
        if lr < 0 or eps <= 0 or not all(0 <= b < 1 for b in betas) or weight_decay < 0 or state_bits not in (8, 32):
            raise ValueError(f"invalid hyperparameters: lr={lr}, betas={betas}, eps={eps}, "
                             f"weight_decay={weight_decay}, state_bits={state_bits}")
        self.basis = basis
        self.seed = seed
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
                                  "state_bits": state_bits})

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group.get("projected"):
            for key, value in self.group_defaults.items():
                group.setdefault(key, value)
            self.check_group(group)
        self._index = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}

    # -- configuration -----------------------------------------------------------------------
    def check_group(self, group: dict[str, Any]) -> None:
        missing = [k for k in self.group_keys if k not in group]
        if missing:
            raise ValueError(f"projected parameter group lacks {missing}")
        if group.get("proj_type", "std") not in PROJ_TYPES:
            raise ValueError(f"unknown proj_type '{group['proj_type']}'; allowed: {', '.join(PROJ_TYPES)}")
        if group["update_proj_gap"] <= 0:
            raise ValueError(f"update_proj_gap={group['update_proj_gap']} must be > 0")
        if group["moments_on_refresh"] not in MOMENTS_ON_REFRESH:
            raise ValueError(f"moments_on_refresh='{group['moments_on_refresh']}'; allowed: {MOMENTS_ON_REFRESH}")
        if group["moments_on_refresh"] == "rotate" and not self.basis.orthonormal:
            raise ValueError("moments_on_refresh=rotate needs an orthonormal basis")
        for p in group["params"]:
            if p.ndim != 2:
                raise ValueError(f"a projected parameter must be 2-D, got shape {tuple(p.shape)}")
            self.rank_of(p, group)

    def rank_of(self, p: torch.Tensor, group: dict[str, Any]) -> int:
        rank, limit = group["rank"], min(p.shape)
        if rank <= 0 or (rank > limit and not group["clamp_rank"]):
            raise ValueError(f"rank={rank} is invalid for a {tuple(p.shape)} weight: must be in [1, {limit}]")
        return min(rank, limit)

    def seed_of(self, p: torch.Tensor) -> int:
        """The first projection seed of ``p``: a function of the optimizer's seed and p's position."""
        return next_seed(self.seed * 1_000_003 + self._index[id(p)])

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.basis.clear()

    # -- the step ----------------------------------------------------------------------------
    def step_param(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        if not group.get("projected"):
            self.dense_step(p, group)
            return
        G, state = p.grad, self.state[p]
        rows = None
        if isinstance(G, DTensor):  # FSDP2: project the whole gradient, apply this rank's rows of the update
            G, rows = G.full_tensor(), shard_rows(p)
        if not state:
            state["step"] = 0
        rank = self.rank_of(p, group)
        side = projection_side(group["proj_type"], tuple(G.shape))
        if self.refresh_due(state, group):
            self.refresh(p, group, state, G, side, rank)
        P, Q = self.basis.get(state, G, side, rank)
        P, Q = _as(P, G.dtype), _as(Q, G.dtype)  # a bf16-stored basis (basis_dtype=bf16) is used in fp32
        R = project(G, P, Q)
        beta1, beta2 = group["betas"]
        m, v, t = moments.update(state, R, beta1, beta2)
        N, factor = moments.normalized(m, v, t, beta1, beta2, group["eps"], self.form)
        state["step"] += 1
        lr, wd = group["lr"], group["weight_decay"]
        W = p if rows is None else p.to_local()
        if wd != 0:
            W.mul_(1 - lr * wd)
        delta = self.update(p, group, state, G, R, N, P, Q, side, lr * factor)
        W.sub_((delta if rows is None else delta[rows]).to(W.dtype))

    def refresh_due(self, state: dict[str, Any], group: dict[str, Any]) -> bool:
        """Whether this step chooses a new basis: at steps 0, T, 2T, ... of the weight (Q-GaLore's lazy
        refresh lengthens each weight's own gap)."""
        return state["step"] % group["update_proj_gap"] == 0

    def refresh(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any], G: torch.Tensor,
                side: str, rank: int) -> None:
        """New basis from G; then the moments follow ``moments_on_refresh``."""
        first = not moments.has_moments(state)
        policy = group["moments_on_refresh"]
        old = None if first or policy != "rotate" else self.basis.get(state, G, side, rank)
        self.basis.refresh(state, G, side, rank, self.seed_of(p))
        keep = torch.bfloat16 if group["basis_dtype"] == "bf16" else torch.float32
        for key in ("proj_left", "proj_right"):  # stored factors (SVD bases) in basis_dtype
            if key in state and state[key].dtype != keep:
                state[key] = state[key].to(keep)
        if first:
            moments.init_moments(state, G.new_empty(projected_shape(tuple(G.shape), side, rank)), group["state_bits"])
        elif policy == "reset":
            moments.reset(state)
        elif policy == "rotate":
            (P_old, Q_old), (P_new, Q_new) = old, self.basis.get(state, G, side, rank)
            left = None if P_new is None else P_new.float().T @ P_old.float()
            right = None if Q_new is None else Q_new.float() @ Q_old.float().T
            moments.change_basis(state, left, right, *group["betas"])

    def update(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any], G: torch.Tensor,
               R: torch.Tensor, N: torch.Tensor, P: torch.Tensor | None, Q: torch.Tensor | None, side: str,
               step_size: float) -> torch.Tensor:
        """The full-space update Δ (W <- W - Δ) from the gradient G, its projection R and Adam's N."""
        raise NotImplementedError

    def dense_step(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        """Plain Adam (same form and LR) for the parameters that are not projected."""
        self.elementwise_step(p, group)

    def elementwise(self, p: torch.Tensor, group: dict[str, Any]) -> bool:
        return not group.get("projected")

    def begin_elementwise(self, p: torch.Tensor, group: dict[str, Any]) -> DenseAdamStep:
        state = self.state[p]
        if not state:
            state["step"] = 0
            moments.init_moments(state, p, group["state_bits"])
        state["step"] += 1
        state["adam_step"] += 1
        t, (beta1, beta2), eps = state["adam_step"], group["betas"], group["eps"]
        bc1, bc2 = 1 - beta1**t, 1 - beta2**t
        # moments.normalized's two forms: N = m / (sqrt(v) / s + eps), update lr·f·N
        scale, factor = (1.0, math.sqrt(bc2) / bc1) if self.form == "hf" else (math.sqrt(bc2), 1.0 / bc1)
        return DenseAdamStep("direction", beta1, beta2, eps, group["lr"], group["weight_decay"],
                             step_size=-group["lr"] * factor, denom_scale=scale, t=t, normalized_form=self.form)

    # -- introspection ---------------------------------------------------------------------------
    def state_bytes(self) -> int:
        """Bytes of all tensors held in the optimizer state (what a checkpoint stores)."""
        return sum(moments.state_bytes(s) for s in self.state.values())

    def svd_fallbacks(self) -> int:
        return sum(s.get("svd_fallbacks", 0) for s in self.state.values())


@dataclass(frozen=True)
class DenseAdamStep(AdamStep):
    """The plain Adam of the parameters that are not projected (same form and LR as the projected ones)."""

    t: int = 1  # Adam's step since the moments were last zeroed
    normalized_form: str = "hf"  # moments.normalized's form

    def __call__(self, w: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor) -> None:
        m.lerp_(g, 1 - self.beta1)
        v.mul_(self.beta2).addcmul_(g, g, value=1 - self.beta2)
        N, factor = moments.normalized(m, v, self.t, self.beta1, self.beta2, self.eps, self.normalized_form)
        if self.weight_decay != 0:
            w.mul_(1 - self.lr * self.weight_decay)
        w.add_(N.to(w.dtype), alpha=-self.lr * factor)


def _as(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return t if t is None or t.dtype == dtype else t.to(dtype)


def channel_scaling(N: torch.Tensor, R: torch.Tensor, side: str) -> torch.Tensor:
    """phi = ||N_c|| / (||R_c|| + 1e-8) per channel c of the dimension that is *not* projected.

    Left projection (R is r x n): one factor per column, shape (1, n). Right (R is m x r): one per
    row, shape (m, 1). Broadcasts against the m x n gradient (Fira's norm-based scaling, APOLLO's
    channel-wise scaling).
    """
    dim = 0 if side == "left" else 1
    phi = torch.linalg.vector_norm(N, dim=dim, keepdim=True) / (torch.linalg.vector_norm(R, dim=dim, keepdim=True) + 1e-8)
    return phi


def tensor_scaling(N: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """phi = ||N|| / (||R|| + 1e-8) for the whole tensor (APOLLO-Mini)."""
    return torch.linalg.vector_norm(N) / (torch.linalg.vector_norm(R) + 1e-8)


def limit_norm_growth(x: torch.Tensor, state: dict[str, Any], gamma: float, key: str = "limiter_norm") -> torch.Tensor:
    """Fira's norm-growth limiter: if ||x_t|| / ||x_{t-1}|| > gamma, scale x_t down to gamma·||x_{t-1}||.

    ``state[key]`` keeps the (limited) norm of the previous step; the first call only records it.
    Tensor ops only (no host sync), as in Fira's code: x / (max(ratio, gamma) / gamma). In place.
    """
    norm = torch.linalg.vector_norm(x)
    if key not in state:
        state[key] = norm
        return x
    limiter = torch.clamp(norm / (state[key] + 1e-8), min=gamma) / gamma
    state[key] = norm / limiter
    return x.div_(limiter)
