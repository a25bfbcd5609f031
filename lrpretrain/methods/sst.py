"""SST, Sparse Spectral Training (Zhao, Zhang, Li, Liu, Cannistraci; arXiv 2405.15481).

Every target projection is held in its full spectral form ``W = U·diag(σ)·V^T`` (U: m×k, V: n×k,
k = min(m, n)), taken from the SVD of the standard initialisation, so training starts exactly at the
full-rank init ("zero distortion"). Training runs in rounds of ``round_steps`` updates. At the start
of a round each layer samples r of its k singular-vector pairs without replacement, with probability
proportional to |σ_i| (torch.multinomial's successive sampling). During the round every σ_i and the
sampled pairs (u_i, v_i) are trained; the other vectors are frozen and have neither gradients nor
optimizer state. At a round's end the layer is re-orthogonalised by an SVD of U·diag(σ)·V^T
(every ``resvd_every`` rounds) and the next round's vectors restart their optimizer state.

The "enhanced" gradient (paper §4.2): ∂L/∂u_i = σ_i·(∂L/∂W)·v_i and ∂L/∂v_i = σ_i·(∂L/∂W)^T·u_i
carry the factor σ_i, so directions with small singular values barely move; SST drops it and uses
(∂L/∂W)·v_i and (∂L/∂W)^T·u_i, i.e. the plain gradient divided by σ_i (without dividing: no blow-up
where σ_i ≈ 0). ``enhanced_gradient=false`` gives the plain gradient.

Memory: the layer never forms W nor a dense gradient. Its forward is x -> V^T x (k) -> ⊙σ -> U(·)
through one autograd function that saves only x and V^T x and computes the gradients of σ and of the
r sampled pairs directly (:class:`_SparseSpectralLinear`). U and V are frozen parameters (they count
as parameters and are saved with the model; they move with it); the sampled columns are trained
copies, ``U_sampled`` (m×r) and ``V_sampled`` (n×r), gathered at a round's start and written back at
its end; each forward/backward splices them into a transient copy of U and V (the same transient an
autocast cast of a weight makes). Training FLOPs per token per layer: 4k(m+n) + 2r(m+n) (vs 6mn
dense): with k = min(m, n) that is 2x a square dense layer, ~1.4x an MLP projection.

Where the paper is not explicit (its full text and code were not retrievable here), the choices are:
- one round = ``round_steps`` updates (default 200); the re-SVD happens at a round's end, every
  ``resvd_every`` rounds (default 1: every round);
- sampling weights are |σ_i| (σ may change sign during training; after an SVD all σ_i >= 0);
- at a round's end the optimizer state of the sampled vectors restarts from scratch (moments and
  step counter); after a re-SVD σ's state restarts too, since its coordinates now refer to a new
  basis (re-sorted, possibly mixed components);
- weight decay acts on σ only: decoupled decay of W = U diag(σ) V^T is exactly decay of σ, while
  decaying singular vectors would only shrink unit vectors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lrpretrain.errors import check
from lrpretrain.methods import register_method
from lrpretrain.methods.base import Method, Reparameterized, StepContext
from lrpretrain.methods.subspace import target_shapes
from lrpretrain.methods.targets import TargetsConfig
from lrpretrain.methods.toolkit import (
    check_rank,
    compute_dtype,
    reparameterize,
    restart_optimizer_state,
)


@dataclass
class SSTConfig(TargetsConfig):
    rank: int = 64  # r: singular-vector pairs trained per round and layer
    round_steps: int = 200  # updates per round (sampled vectors fixed within a round)
    resvd_every: int = 1  # re-SVD at the end of every N-th round
    enhanced_gradient: bool = True  # drop the σ_i factor from the singular vectors' gradients

    def validate(self) -> None:
        super().validate()
        check(self.rank > 0, "method.rank", self.rank, "must be > 0")
        check(self.round_steps > 0, "method.round_steps", self.round_steps, "must be > 0 (updates per round)")
        check(self.resvd_every > 0, "method.resvd_every", self.resvd_every, "must be > 0 (rounds between re-SVDs)")

    def validate_for_model(self, model_cfg) -> None:
        for name, shape in target_shapes(model_cfg, list(self.targets)).items():
            check_rank(self.rank, shape, name)


def sample_spectrum(sigma: torch.Tensor, rank: int, generator: torch.Generator) -> torch.Tensor:
    """``rank`` distinct indices (sorted, CPU), drawn one after another with probability ∝ |σ_i| among
    those not drawn yet."""
    weights = sigma.detach().abs().float().cpu().clamp_min(1e-30)  # zero weights would starve the draw
    return torch.multinomial(weights, rank, replacement=False, generator=generator).sort().values


def _effective(basis: torch.Tensor, sampled: torch.Tensor, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The basis with its sampled columns replaced by their trained copies: a transient copy the size of
    the basis (under autocast the cast to ``dtype`` makes one anyway, as for any Linear's weight)."""
    return basis.to(dtype).index_copy(1, index, sampled.to(dtype))


class _SparseSpectralLinear(torch.autograd.Function):
    """y = U_eff diag(σ) V_eff^T x, where U_eff, V_eff are U, V with the columns ``index`` replaced by
    the trained ``U_s``, ``V_s``. Gradients: x, σ, U_s, V_s (enhanced or plain); none for U, V.
    Saved for backward: x and V_eff^T x (k per token); U_eff, V_eff are rebuilt, not kept."""

    @staticmethod
    def forward(ctx, x, sigma, U_s, V_s, U, V, index, enhanced):
        dt = compute_dtype(x)  # autocast semantics, spelled out: matmuls in the autocast dtype
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1]).to(dt)  # (tokens, n)
            t = x2 @ _effective(V, V_s, index, dt)  # V_eff^T x: (tokens, k)
            y = (t * sigma.to(dt)) @ _effective(U, U_s, index, dt).T
        ctx.save_for_backward(x2, t, sigma, U_s, V_s, U, V, index)
        ctx.enhanced, ctx.x_dtype = enhanced, x.dtype
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, t, sigma, U_s, V_s, U, V, index = ctx.saved_tensors
        dt = t.dtype
        with torch.autocast(dy.device.type, enabled=False):
            dy2, s = dy.reshape(-1, dy.shape[-1]).to(dt), sigma.to(dt)  # (tokens, m)
            ds = dy2 @ _effective(U, U_s, index, dt)  # U_eff^T dy: (tokens, k)
            dsigma = (ds.float() * t.float()).sum(0)  # ∂L/∂σ_i = Σ (u_i^T dy)(v_i^T x)
            dx = (ds * s) @ _effective(V, V_s, index, dt).T
            t_i, ds_i = t.index_select(1, index), ds.index_select(1, index)
            if not ctx.enhanced:  # plain gradients carry σ_i
                t_i, ds_i = t_i * s[index], ds_i * s[index]
            dU_s = dy2.T @ t_i  # (m, r)
            dV_s = x2.T @ ds_i  # (n, r)
        return (dx.view(*dy.shape[:-1], dx.shape[-1]).to(ctx.x_dtype), dsigma.to(sigma.dtype),
                dU_s.to(U_s.dtype), dV_s.to(V_s.dtype), None, None, None, None)


class SpectralLinear(Reparameterized):
    """``W = U·diag(σ)·V^T`` from the SVD of a Linear's weight; r sampled singular-vector pairs trained."""

    def __init__(self, base: nn.Linear, rank: int, enhanced_gradient: bool = True):
        super().__init__()
        self.in_features, self.out_features, self.rank = base.in_features, base.out_features, rank
        self.enhanced_gradient = enhanced_gradient
        w = base.weight
        U, S, Vh = torch.linalg.svd(w.detach().float(), full_matrices=False)
        self.U = nn.Parameter(U.to(w.dtype), requires_grad=False)  # (m, k), frozen but for the sampled columns
        self.V = nn.Parameter(Vh.T.contiguous().to(w.dtype), requires_grad=False)  # (n, k)
        self.sigma = nn.Parameter(S.to(w.dtype))  # (k,), all trained
        self.U_sampled = nn.Parameter(self.U[:, :rank].clone())  # trained copies of the sampled columns
        self.V_sampled = nn.Parameter(self.V[:, :rank].clone())
        self.register_buffer("sampled", torch.arange(rank, device=w.device))  # their indices into k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SparseSpectralLinear.apply(x, self.sigma, self.U_sampled, self.V_sampled, self.U, self.V,
                                           self.sampled, self.enhanced_gradient)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """U and V with the sampled columns' current values (fp32)."""
        return (self.U.float().index_copy(1, self.sampled, self.U_sampled.float()),
                self.V.float().index_copy(1, self.sampled, self.V_sampled.float()))

    def dense_weight(self) -> torch.Tensor:
        U, V = self.factors()
        return (U * self.sigma.float()) @ V.T

    # -- round boundaries ---------------------------------------------------------------------------
    @torch.no_grad()
    def resample_(self, index: torch.Tensor) -> None:
        """Write the sampled columns back, then gather the columns ``index`` as the new trained copies."""
        self.U.index_copy_(1, self.sampled, self.U_sampled)
        self.V.index_copy_(1, self.sampled, self.V_sampled)
        self.sampled.copy_(index.to(self.sampled.device))
        self.U_sampled.copy_(self.U[:, self.sampled])
        self.V_sampled.copy_(self.V[:, self.sampled])

    @torch.no_grad()
    def resvd_(self) -> None:
        """Re-orthogonalise: U, σ, V <- SVD(U·diag(σ)·V^T). The function is unchanged."""
        U, S, Vh = torch.linalg.svd(self.dense_weight(), full_matrices=False)
        self.U.copy_(U)
        self.V.copy_(Vh.T)
        self.sigma.copy_(S)
        self.U_sampled.copy_(self.U[:, self.sampled])
        self.V_sampled.copy_(self.V[:, self.sampled])

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"spectrum={self.sigma.numel()}, enhanced_gradient={self.enhanced_gradient}")


@register_method("sst")
class SST(Method):
    """Sparse Spectral Training: all singular values and r sampled singular-vector pairs per round."""
    unsupported_strategies = {
        "fsdp2": "its after-step resampling splices sampled singular vectors into the frozen bases by column "
                 "index (index_copy over whole matrices), which is not implemented on sharded parameters"}

    Config = SSTConfig
    cfg: SSTConfig

    def __init__(self, cfg: SSTConfig, model_cfg):
        super().__init__(cfg, model_cfg)
        self.generator = torch.Generator()  # the sampling of singular vectors
        self.layers: list[tuple[str, SpectralLinear]] = []

    def prepare_model(self, model: nn.Module) -> nn.Module:
        self.generator.manual_seed(int(torch.randint(2**62, (1,))))  # from the run's seed
        c = self.cfg
        self.layers = reparameterize(model, list(c.targets),
                                     lambda _q, lin: SpectralLinear(lin, c.rank, c.enhanced_gradient))
        for _, layer in self.layers:
            layer.resample_(sample_spectrum(layer.sigma, c.rank, self.generator))
        return model

    def param_groups(self, model: nn.Module, optim_cfg) -> list[dict[str, Any]]:
        """Weight decay on σ (decaying W = U diag(σ) V^T is decaying σ), none on the singular vectors;
        the other parameters as in full training."""
        sigmas = [m.sigma for _, m in self.layers]
        vectors = [p for _, m in self.layers for p in (m.U_sampled, m.V_sampled)]
        ours = {id(p) for p in sigmas + vectors}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ours]
        wd = optim_cfg.weight_decay
        return [{"params": [p for p in rest if p.ndim >= 2] + sigmas, "weight_decay": wd},
                {"params": [p for p in rest if p.ndim < 2] + vectors, "weight_decay": 0.0}]

    @torch.no_grad()
    def after_step(self, ctx: StepContext) -> None:
        if ctx.step % self.cfg.round_steps:
            return
        rounds = ctx.step // self.cfg.round_steps
        resvd = rounds % self.cfg.resvd_every == 0
        for _, layer in self.layers:
            if resvd:
                layer.resvd_()
                restart_optimizer_state(ctx.optimizer, [layer.sigma])
            layer.resample_(sample_spectrum(layer.sigma, self.cfg.rank, self.generator))
            restart_optimizer_state(ctx.optimizer, [layer.U_sampled, layer.V_sampled])
        ctx.log({"sst_round": rounds, "sst_resvd": int(resvd)})

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}  # U, V, σ, the sampled indices: in the model

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])

    def layer_extra_values(self, model_cfg) -> float:
        """x·V·diag(σ) in the full spectral basis: min(m, n) values per target."""
        return float(sum(min(m, n) for m, n in target_shapes(model_cfg, list(self.cfg.targets)).values()))

    def cost(self, model_cfg, seq_len: int) -> dict[str, float]:
        """Parameters include the frozen U, V; per target 4k(m+n) + 2r(m+n) training FLOPs per token."""
        base = super().cost(model_cfg, seq_len)
        shapes = list(target_shapes(model_cfg, list(self.cfg.targets)).values()) * model_cfg.n_layers
        r = self.cfg.rank
        dense = sum(m * n for m, n in shapes)
        spectrum = sum(min(m, n) for m, n in shapes)
        bases = sum(min(m, n) * (m + n) for m, n in shapes)
        sampled = sum(r * (m + n) for m, n in shapes)
        return {"params": base["params"] - dense + bases + spectrum + sampled,
                "trainable_params": base["trainable_params"] - dense + spectrum + sampled,
                "flops_per_token": base["flops_per_token"] - 6 * dense + 4 * bases + 2 * sampled}
