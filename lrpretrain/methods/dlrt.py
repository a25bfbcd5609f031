"""DLRT, dynamical low-rank training (Schotthöfer, Zangrando, Kusch, Ceruti, Tudisco: "Low-rank lottery
tickets", NeurIPS 2022; COMPiLELab/DLRT-Net): every target is W = U·S·Vᵀ (U: m x r, V: n x r
orthonormal, S: r x r) trained on the manifold of rank-r matrices by the basis-update & Galerkin (BUG)
integrator, with ranks adapting per layer.

One optimizer update (:class:`BUGIntegrator`, an AdamW whose ``step(closure)`` runs the integrator)
is, for every target, with G the loss's gradient in W at the update's point:

1. K-step and L-step, from the trainer's forward and backward: K = U S and L = V Sᵀ step on
   ∇K = G V and ∇L = Gᵀ U. The layer's forward x V Sᵀ Uᵀ has a backward that hands these two products
   to the parameters ``K`` and ``L`` directly (:class:`FactorisedLinear`), so one pass gives both and G
   is never formed.
2. New bases. Rank-adaptive: Û = orth([U | K₁]) and V̂ = orth([V | L₁]) (up to 2r columns: the old basis
   and the new directions), computed as orth([U | K₁ - K₀]), the same span; fixed-rank: Û = orth(K₁),
   V̂ = orth(L₁).
3. S-step (Galerkin): S̃ = (ÛᵀU) S (VᵀV̂) represents the same W in the new bases; it steps on
   ∇S̃ = Ûᵀ G V̂, which needs G on the new directions: a second forward and backward of the update's
   micro-batches at the same weights, through the augmented factors. The trainer passes the closure
   for it (torch's ``optimizer.step(closure)``; the optimizer declares ``reevaluates``); inside it every
   parameter is frozen and only the cores S̃ (leaf tensors of their own) take gradients.
4. Truncation (rank-adaptive): S̃₁ = P Σ Qᵀ (SVD); the new rank r₁ is the smallest whose discarded
   singular values have norm ≤ ϑ·‖Σ‖ (``method.tol``, relative), bounded by ``min_rank`` and
   ``max_rank``; U₁ = Û P_{:r₁}, S₁ = Σ_{:r₁}, V₁ = V̂ Q_{:r₁}. Fixed rank: U₁ = Û, S₁ = S̃₁, V₁ = V̂.

Ranks change during training, and with them the shapes of U, S, V, K, L, of their gradients and of
their optimizer states (parameters are resized in place: the optimizer keeps the same objects). A
checkpoint holds each layer's rank in its tensors' shapes; :meth:`DLRTLinear._load_from_state_dict`
resizes the layer to them before the values are copied, so resume (and ``generate``) needs nothing
else, and the optimizer's states load with the shapes they were saved with. The metrics hold a
``ranks`` record after every update (the targets' ranks in model order: layer 0's q, k, v, o, gate,
up, down, then layer 1's, ...) and ``rank_mean``. ``estimate`` counts every target at ``max_rank``.

Choices where the paper (and its reference code) is silent or where we differ, on purpose:
- Adam inside the integrator (``method.kls_optimizer=adam``; ``sgd`` gives the paper's plain steps):
  each substep's Adam keeps its own moments, for K, L and S. Basis changes re-project them
  (:func:`lrpretrain.optim.moments.change_basis`: the first moment exactly, the diagonal second moment
  through the squared overlap): S's into the augmented bases (ÛᵀU, V̂ᵀV) and after truncation (Pᵀ,
  Qᵀ); K's columns, which are coordinates along V, into V₁ (V₁ᵀV); L's into U₁. Not reset: the bases
  move at every update, and a reset at every update makes Adam a sign descent (m/√v = ±1 on the first
  step after a reset). The reference keeps one Adam over preallocated rank-bound buffers whose moments
  stay in their slots whatever basis the slot holds; ours move with the coordinates.
- The augmented basis is orth([U | K₁ - K₀]) by a Householder QR with a positive diagonal, old basis
  first: its first r columns are U itself, so S̃ embeds S and S's moments carry over unchanged (the
  reference orthonormalises [K₁ | U]: the same span, other coordinates, which matters to Adam, not to
  SGD). The step K₁ - K₀ is taken as the optimizer computed it: recovering the new directions from K₁
  would cancel K₀ = U S in floating point and lose most of their digits. The basis has the dimension of
  the span: a new direction that lies (numerically) in it already is dropped rather than completed
  arbitrarily (a zero step, e.g. at LR 0, adds none), so S̃ may be rectangular and has at most
  min(m, 2r) x min(n, 2r) entries. The integrator works in fp32 (fp64 parameters: fp64).
- Truncation: ‖σ_{r₁+1:}‖₂ ≤ ϑ‖σ‖₂ with ϑ = 0.1 (the reference optimizer's default ``theta``) and a
  floor of 2 (``min_rank``, the reference's); the reference's loop leaves the last singular value out of
  the tail norm. ``max_rank`` defaults to the initial rank: ranks can only shrink below the bound the
  other low-rank methods get.
- Initialisation: U, S, V from the truncated SVD of the standard initialisation (the best rank-r
  approximation of the dense model's weight); the reference draws random orthonormal bases and |N(0,1)|
  singular values, far from a LLaMA's 0.02-std weights.
- One learning rate (the schedule's) for the three substeps. Decoupled weight decay acts once per update,
  on the S-step (S̃ <- (1 - lr·λ) S̃, i.e. on W); the K and L steps only produce bases.
- Embeddings, LM head and norms take AdamW on the first pass's gradients, stepped after the second pass
  (so it runs at the same point); the reference's transformer applies every pass's gradients to them.
- The second pass's core gradients are clipped by their own global norm (``optim.grad_clip``); the first
  pass's gradients are clipped by the trainer as for any method. A non-finite core gradient skips the
  S-step: the update then only truncates W (the trainer has already ruled out a non-finite first pass).
- ``trainer.precision=pure_bf16``: K, L and S are bf16 parameters; the orthonormal bases U, V stay fp32
  buffers (every buffer keeps its dtype under pure bf16; a bf16-rounded basis is orthonormal only to
  ~1e-2, an error the Galerkin projection would carry into every update, for 2 bytes x r(m + n) per
  target). The integrator runs in fp32 on working copies (with the ``kahan`` rule's kept rounding error
  added back), the cores S̃ are fp32 leaves, and the new S, K = U S and L = V Sᵀ are written back by the
  run's rounding rule (``trainer.bf16_update``, :mod:`lrpretrain.optim.bf16`: stochastic bits keyed by
  each factor's slot and update count; a Kahan buffer shaped like the new factor, the old one having
  been consumed). The dense parameters step through the shared bf16 path of every optimizer.
- FLOPs per token (``cost``) count both passes (the second: the targets through the augmented factors,
  the LM head's input gradient, attention; no weight gradients of the dense parameters); the QRs and
  SVDs (once per update, not per token) are not counted.

Refused, each with its reason at config time: per-layer updates (the integrator steps every layer
together, between two passes), DDP and FSDP2 (parameters change shape at every update and the second
backward reaches only the cores; DDP's gradient buckets and FSDP2's shards are fixed when the model is
wrapped), DeepSpeed (by its own rule for methods with their own optimizer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lrpretrain.errors import allowed, check
from lrpretrain.methods import register_method
from lrpretrain.methods.base import Method, Reparameterized, StepContext, dense_param_groups
from lrpretrain.methods.lora import lora_activation_values
from lrpretrain.methods.targets import TargetsConfig
from lrpretrain.methods.toolkit import (
    check_rank_for_model,
    compute_dtype,
    reparameterize,
    reparameterized_cost,
    target_shapes,
)
from lrpretrain.model.memory import outside_layers_bytes, rope_bytes
from lrpretrain.optim import AdamW, moments
from lrpretrain.optim.bf16 import forget_compensation
from lrpretrain.optim.clip import clip_coefficient, grad_norm
from lrpretrain.optim.loro import qr_positive
from lrpretrain.optim.memory import adamw_state_bytes, moment_pair_bytes, svd_temp_bytes

if TYPE_CHECKING:
    from lrpretrain.config import ModelConfig, OptimConfig

INTEGRATORS = ("adaptive", "fixed")
KLS_OPTIMIZERS = ("adam", "sgd")


@dataclass
class DLRTConfig(TargetsConfig):
    """Rank 128 at 60M (the bound GaLore's table gives every low-rank method), ϑ = 0.1."""

    rank: int = 128  # r at initialisation
    max_rank: int | None = None  # bound of the rank-adaptive integrator; null: method.rank
    min_rank: int = 2  # floor of the rank-adaptive integrator (the reference's)
    tol: float = 0.1  # ϑ: discarded singular values have norm <= ϑ·‖S‖ (relative)
    integrator: str = "adaptive"  # adaptive (rank-adaptive BUG) | fixed (fixed-rank BUG)
    kls_optimizer: str = "adam"  # adam | sgd: the step rule inside the K-, L- and S-steps

    @property
    def bound(self) -> int:
        """The largest rank a target can have (``estimate`` counts this)."""
        if self.integrator == "fixed":
            return self.rank
        return self.rank if self.max_rank is None else self.max_rank

    def validate(self) -> None:
        super().validate()
        check(self.rank > 0, "method.rank", self.rank, "must be > 0")
        check(self.integrator in INTEGRATORS, "method.integrator", self.integrator, f"allowed: {allowed(INTEGRATORS)}")
        check(self.kls_optimizer in KLS_OPTIMIZERS, "method.kls_optimizer", self.kls_optimizer,
              f"allowed: {allowed(KLS_OPTIMIZERS)}")
        check(0 < self.tol < 1, "method.tol", self.tol, "must be in (0, 1) (relative to the norm of S)")
        check(self.max_rank is None or self.max_rank >= self.rank, "method.max_rank", self.max_rank,
              f"must be >= method.rank={self.rank}, or null for method.rank")
        check(1 <= self.min_rank <= self.rank, "method.min_rank", self.min_rank,
              f"must be in [1, method.rank={self.rank}]")

    def validate_for_model(self, model_cfg: ModelConfig) -> None:
        check_rank_for_model(self.rank, model_cfg, list(self.targets))
        if self.max_rank is not None:
            check_rank_for_model(self.max_rank, model_cfg, list(self.targets), key="method.max_rank")


# -- the layer ---------------------------------------------------------------------------------------


class FactorisedLinear(torch.autograd.Function):
    """y = x V Sᵀ Uᵀ (the layer's W = U S Vᵀ). Its backward gives, without forming G = dyᵀx:
    ∇K = G V and ∇L = Gᵀ U to ``K`` and ``L`` (the K- and L-steps' gradients) when they are passed,
    else ∇S = Uᵀ G V to ``S`` (the S-step's); U and V get none. Saved: x·V (r per token) and, for ∇L, x."""

    @staticmethod
    def forward(ctx, x, U, S, V, K, L):
        dt = compute_dtype(x)  # autocast semantics, spelled out: matmuls in the autocast dtype
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1]).to(dt)  # (tokens, n)
            xv = x2 @ V.to(dt)  # (tokens, r)
            y = (xv @ S.to(dt).T) @ U.to(dt).T
        ctx.factors = K is not None
        ctx.save_for_backward(x2 if ctx.factors else None, xv, U, S, V)  # x only for ∇L
        ctx.x_dtype, ctx.dtypes = x.dtype, (S.dtype, None if K is None else K.dtype, None if L is None else L.dtype)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, xv, U, S, V = ctx.saved_tensors
        dt = xv.dtype
        dx = dS = dK = dL = None
        with torch.autocast(dy.device.type, enabled=False):
            dy2 = dy.reshape(-1, dy.shape[-1]).to(dt)  # (tokens, m)
            dyu = dy2 @ U.to(dt)  # (tokens, r)
            if ctx.needs_input_grad[0]:
                dx = ((dyu @ S.to(dt)) @ V.to(dt).T).view(*dy.shape[:-1], V.shape[0]).to(ctx.x_dtype)
            if ctx.factors:
                dK = (dy2.T @ xv).to(ctx.dtypes[1])  # G V
                dL = (x2.T @ dyu).to(ctx.dtypes[2])  # Gᵀ U
            elif ctx.needs_input_grad[2]:
                dS = (dyu.T @ xv).to(ctx.dtypes[0])  # Uᵀ G V
        return dx, None, dS, None, dK, dL


class DLRTLinear(Reparameterized):
    """W = U·S·Vᵀ with orthonormal U (m x r) and V (n x r) as buffers; S (r x r) and K = U S (m x r),
    L = V Sᵀ (n x r) as parameters, the integrator's three trained quantities (S's optimizer state is the
    S-step's). Between updates K and L hold U S and V Sᵀ. During the S-step (:meth:`begin_galerkin`) the
    forward runs through the augmented bases and core S̃, a leaf tensor of its own that takes the
    gradient: a parameter whose shape changed after autograd recorded it in a live graph cannot take one."""

    def __init__(self, in_features: int, out_features: int, rank: int, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        kw = {"device": device, "dtype": dtype}
        self.register_buffer("U", torch.zeros(out_features, rank, **kw))
        self.register_buffer("V", torch.zeros(in_features, rank, **kw))
        self.S = nn.Parameter(torch.zeros(rank, rank, **kw))
        self.K = nn.Parameter(torch.zeros(out_features, rank, **kw))
        self.L = nn.Parameter(torch.zeros(in_features, rank, **kw))
        self.galerkin: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (Û, S̃, V̂) in the S-step

    @property
    def rank(self) -> int:
        return self.U.shape[1]

    @torch.no_grad()
    def set_factors_(self, U: torch.Tensor, S: torch.Tensor, V: torch.Tensor) -> None:
        """W = U S Vᵀ (any rank): U, V, S take these values and shapes; K = U S, L = V Sᵀ. The bases keep
        their buffers' dtype (fp32 under ``trainer.precision=pure_bf16``), the parameters theirs."""
        dtype = self.S.dtype
        self.U = U.to(self.U.dtype).contiguous()
        self.V = V.to(self.V.dtype).contiguous()
        self.S.data = S.to(dtype).contiguous()
        self.K.data = (_hp(U) @ _hp(S)).to(dtype)
        self.L.data = (_hp(V) @ _hp(S).T).to(dtype)

    @torch.no_grad()
    def resize_(self, rank: int) -> None:
        """Every tensor at shapes of rank ``rank`` (values undefined: a checkpoint's are loaded next)."""
        kw = {"device": self.S.device, "dtype": self.S.dtype}
        m, n = self.out_features, self.in_features
        self.U, self.V = self.U.new_empty(m, rank), self.V.new_empty(n, rank)
        self.S.data, self.K.data, self.L.data = (torch.empty(rank, rank, **kw), torch.empty(m, rank, **kw),
                                                 torch.empty(n, rank, **kw))

    @torch.no_grad()
    def begin_galerkin(self, U_hat: torch.Tensor, S_tilde: torch.Tensor, V_hat: torch.Tensor) -> torch.Tensor:
        """The S-step's forward: W = Û S̃ V̂ᵀ (the same function). Returns S̃, the leaf that takes ∇S̃. All
        three in the integrator's working precision (fp32 at least: under pure bf16 the forward casts them
        to bf16 for its matmuls, and S̃'s gradient arrives in fp32)."""
        core = _hp(S_tilde).requires_grad_(True)
        self.galerkin = (_hp(U_hat), core, _hp(V_hat))
        return core

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.galerkin is None:  # S takes no gradient here (the S-step's is S̃'s): no autograd edge to it
            return FactorisedLinear.apply(x, self.U, self.S.detach(), self.V, self.K, self.L)
        U_hat, core, V_hat = self.galerkin
        return FactorisedLinear.apply(x, U_hat, core, V_hat, None, None)

    def dense_weight(self) -> torch.Tensor:
        U, S, V = self.galerkin or (self.U, self.S, self.V)
        return (U.float() @ S.detach().float()) @ V.float().T

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """A checkpoint's rank is in its tensors' shapes: take it before its values are copied."""
        shapes = {k: tuple(state_dict[prefix + k].shape) for k in ("U", "S", "V", "K", "L") if prefix + k in state_dict}
        r = shapes.get("S", (self.rank,))[0]
        m, n = self.out_features, self.in_features
        expected = {"U": (m, r), "S": (r, r), "V": (n, r), "K": (m, r), "L": (n, r)}
        if r != self.rank and r > 0 and all(shapes[k] == expected[k] for k in shapes):
            self.resize_(r)  # (inconsistent shapes are left to the loader's own size-mismatch error)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


# -- the integrator's linear algebra ----------------------------------------------------------------------


def augmented_basis(U: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of span[U | step]: U itself, then the directions of ``step`` outside span(U)
    (Householder QR, non-negative diagonal). A new column whose residual is below
    eps·max(m, 2r)·‖step‖ lies in the span already and is dropped: the basis has the span's dimension
    (at most min(m, 2r)), with no arbitrary completion for the S-step to move along."""
    r = U.shape[1]
    q, t = qr_positive(torch.cat([U, step], 1))
    residual = torch.diagonal(t)[r:]
    tol = torch.finfo(step.dtype).eps * max(step.shape[0], 2 * r) * torch.linalg.matrix_norm(step)
    keep = torch.nonzero(residual > tol).flatten() + r
    return torch.cat([q[:, :r], q[:, keep]], 1)


def _hp(t: torch.Tensor) -> torch.Tensor:
    """``t`` in the integrator's working precision: fp32 at least (fp64 stays fp64)."""
    return t.detach() if t.dtype == torch.float64 else t.detach().float()


def truncation_rank(sigma: torch.Tensor, tol: float, min_rank: int, max_rank: int) -> int:
    """The smallest r with ‖σ_{r:}‖₂ <= tol·‖σ‖₂ (σ sorted, descending), clamped to [min_rank, max_rank]
    and to len(σ)."""
    s = sigma.double()
    tails = torch.cat([s.flip(0).square().cumsum(0).flip(0).sqrt(), s.new_zeros(1)])  # ‖σ_{j:}‖, j = 0..k
    r = int(torch.nonzero(tails <= tol * torch.linalg.vector_norm(s))[0])
    return max(min(r, max_rank, sigma.numel()), min(min_rank, sigma.numel()))


# -- the optimizer -----------------------------------------------------------------------------------------


class BUGIntegrator(AdamW):
    """The DLRT update (module docstring) in ``step(closure)``: K- and L-steps on the trainer's gradients,
    new bases, the S-step on the gradient the closure's second pass gives, truncation; AdamW for the
    other parameters. The group marked ``dlrt`` holds [K, L, S] of every layer."""

    reevaluates = True  # the trainer passes step() the closure of the second pass

    def __init__(self, params, layers: list[DLRTLinear], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, state_bits: int = 32, adaptive: bool = True,
                 kls_optimizer: str = "adam", tol: float = 0.1, min_rank: int = 1, max_rank: int | None = None,
                 max_norm: float = 0.0):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, state_bits=state_bits)
        self.layers = layers
        self.adaptive, self.kls_optimizer = adaptive, kls_optimizer
        self.tol, self.min_rank, self.max_rank, self.max_norm = tol, min_rank, max_rank, max_norm
        self.stats: dict[str, float] = {}  # of the last update, for the metrics

    def step_param(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        if group.get("dlrt"):
            raise RuntimeError("the BUG integrator steps every layer together (step(closure)), not one parameter")
        super().step_param(p, group)

    def _dlrt_group(self) -> dict[str, Any]:
        return next(g for g in self.param_groups if g.get("dlrt"))

    @torch.no_grad()
    def step(self, closure=None):
        if closure is None:
            raise RuntimeError("the BUG integrator's S-step needs the loss evaluated again: call step(closure)")
        group = self._dlrt_group()
        lr, wd = group["lr"], group["weight_decay"]
        # 1. K- and L-steps on the trainer's gradients, 2. the new bases and the Galerkin cores
        old = []
        for layer in self.layers:
            (K1, dK), (L1, dL) = (self._kl_step(p, group, lr) for p in (layer.K, layer.L))
            layer.K.grad = layer.L.grad = None
            U, V, S = _hp(layer.U), _hp(layer.V), self._working(layer.S)
            if self.adaptive:  # span[U | K₁] = span[U | K₁ - K₀]: the step itself, free of K₀'s rounding
                U_hat, V_hat = augmented_basis(U, _hp(dK)), augmented_basis(V, _hp(dL))
            else:
                U_hat, V_hat = qr_positive(K1)[0], qr_positive(L1)[0]
            M, N = U_hat.T @ U, V_hat.T @ V
            self._transport(layer.S, M, N, group)
            layer.begin_galerkin(U_hat, M @ S @ N.T, V_hat)
            old.append((U, V))
        # 3. the S-step's gradient: the trainer's forward and backward again, only the cores S̃ trained
        try:
            loss = self._galerkin_pass(closure)
            cores = [layer.galerkin[1] for layer in self.layers]
            norm = grad_norm([c.grad if c.grad is not None else torch.zeros_like(c) for c in cores])
            finite = bool(torch.isfinite(norm))
            if finite and self.max_norm > 0:
                coef = clip_coefficient(self.max_norm, norm)
                for c in cores:
                    if c.grad is not None:
                        c.grad.mul_(coef.to(c.grad.dtype))
            # 4. S-steps (on S's optimizer state), then every other parameter on the first pass's gradients
            for layer, c in zip(self.layers, cores):
                if finite and c.grad is not None:
                    self._substep(c.detach(), c.grad, self.state[layer.S], group, lr, wd)
                c.grad = None
            for g in self.param_groups:
                if not g.get("dlrt"):
                    for p in g["params"]:
                        if p.grad is not None:
                            self.update_param(p, g)  # AdamW, through the bf16 rounding under pure bf16
            # 5. truncation, the new factors and the moments in their bases
            for layer, (U, V) in zip(self.layers, old):
                self._finish(layer, U, V, group)
        finally:
            for layer in self.layers:
                layer.galerkin = None
        self.stats = {"galerkin_grad_norm": float(norm), **({} if finite else {"galerkin_skipped": 1})}
        return loss

    def _galerkin_pass(self, closure) -> float:
        """The closure with every parameter frozen: only the layers' cores S̃ take gradients."""
        frozen = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        try:
            with torch.enable_grad():
                loss = closure()
        finally:
            for p in frozen:
                p.requires_grad_(True)
        return float("nan") if loss is None else float(loss)

    def _finish(self, layer: DLRTLinear, U: torch.Tensor, V: torch.Tensor, group: dict[str, Any]) -> None:
        """Truncate (rank-adaptive) and set the layer's new factors; move K's, L's and S's moments."""
        U_hat, core, V_hat = layer.galerkin
        U_hat, S1, V_hat = _hp(U_hat), _hp(core.detach()), _hp(V_hat)
        if self.adaptive:
            P, sigma, Qh = torch.linalg.svd(S1, full_matrices=False)
            r = truncation_rank(sigma, self.tol, self.min_rank, self.max_rank or layer.rank)
            self._transport(layer.S, P[:, :r].T, Qh[:r], group)
            U1, S1, V1 = U_hat @ P[:, :r], torch.diag(sigma[:r]), V_hat @ Qh[:r].T
        else:
            U1, V1 = U_hat, V_hat
        self._transport(layer.K, None, V1.T @ V, group)  # K's columns are coordinates along V
        self._transport(layer.L, None, U1.T @ U, group)  # L's along U
        layer.galerkin = None
        layer.set_factors_(U1, S1, V1)
        if self.bf16_update is not None:  # pure bf16: the trained factors written by the run's rounding rule
            for p, value in ((layer.S, S1), (layer.K, U1 @ S1), (layer.L, V1 @ S1.T)):
                self._write(p, value)

    def _kl_step(self, p: torch.Tensor, group: dict[str, Any], lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The K- or L-step of ``p`` on its gradient: (the new value, the step), in the working precision
        (``p`` itself, stepped in place, for fp32 and fp64 weights)."""
        x = self._working(p)
        if p.grad is None:
            return x, torch.zeros_like(x)
        return x, self._substep(x, _hp(p.grad), self.state[p], group, lr, 0.0)

    def _working(self, p: torch.Tensor) -> torch.Tensor:
        """``p`` in the integrator's working precision: a bf16 factor as an fp32 copy, with the rounding error
        the ``kahan`` rule kept for it added back (the value the last update computed)."""
        x = _hp(p)
        comp = self.state[p].get("bf16_comp") if self._rounding(p) is not None else None
        return x if comp is None else x + comp.float()

    def _write(self, p: torch.Tensor, value: torch.Tensor) -> None:
        """Store the working-precision ``value`` (any rank) into the bf16 parameter ``p`` by the run's rounding
        rule (``trainer.bf16_update``), keyed by p's slot and update count as every other weight's. A Kahan
        buffer of the previous value was consumed by :meth:`_working`; a new one is kept for this value."""
        rounding = self._rounding(p)
        if rounding is None:
            return
        state = self.state[p]
        forget_compensation(state)
        p.data = torch.empty(value.shape, dtype=p.dtype, device=p.device)
        writer = rounding.writer(state, p.data, self.slot_of(p))
        writer.store(p.data, value.float().clone(), None)
        writer.close()

    def _substep(self, p: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any], lr: float,
                 weight_decay: float) -> torch.Tensor:
        """One K-, L- or S-substep of ``p`` in place: Adam on the moments in ``state`` (torch.optim.AdamW's
        arithmetic), or plain SGD. Returns the step taken (the change of ``p`` but its decay)."""
        if weight_decay:
            p.mul_(1 - lr * weight_decay)
        if self.kls_optimizer == "sgd":
            delta = grad.mul(-lr)
        else:
            if not moments.has_moments(state):
                moments.init_moments(state, p, group["state_bits"])
            beta1, beta2 = group["betas"]
            m, v, t = moments.update(state, grad, beta1, beta2)
            n, f = moments.normalized(m, v, t, beta1, beta2, group["eps"], "torch")
            delta = n.mul_(-lr * f)
        p.add_(delta.to(p.dtype))
        return delta

    def _transport(self, p: torch.Tensor, left: torch.Tensor | None, right: torch.Tensor | None,
                   group: dict[str, Any]) -> None:
        """Express ``p``'s moments in new coordinates: R' = left R rightᵀ (see moments.change_basis)."""
        state = self.state.get(p)
        if state and moments.has_moments(state):
            beta1, beta2 = group["betas"]
            moments.change_basis(state, left, right, beta1, beta2)


# -- the plugin ----------------------------------------------------------------------------------------------


@register_method("dlrt")
class DLRT(Method):
    """W = U S Vᵀ on every target, trained by the (rank-adaptive) BUG integrator."""

    Config = DLRTConfig
    cfg: DLRTConfig
    _why = ("its integrator changes the parameters' shapes at every update and runs a second backward that only "
            "the cores S join; {} fixed when the model is wrapped")
    unsupported_strategies = {"ddp": _why.format("DDP's gradient buckets are"),
                              "fsdp2": _why.format("FSDP2's shards are")}

    @classmethod
    def per_layer_refusal(cls, cfg: Any) -> str | None:
        return ("the BUG integrator updates every layer together, between the update's two forward and backward "
                "passes (its S-step needs the K- and L-steps of all layers first)")

    def __init__(self, cfg: DLRTConfig, model_cfg: ModelConfig):
        super().__init__(cfg, model_cfg)
        self.layers: list[DLRTLinear] = []

    def prepare_model(self, model: nn.Module) -> nn.Module:
        r = self.cfg.rank

        def build(_qual: str, linear: nn.Linear) -> DLRTLinear:
            w = linear.weight
            m = DLRTLinear(linear.in_features, linear.out_features, r, device=w.device, dtype=w.dtype)
            U, S, Vh = torch.linalg.svd(w.detach().float(), full_matrices=False)  # best rank-r approximation
            m.set_factors_(U[:, :r], torch.diag(S[:r]), Vh[:r].T)
            return m

        self.layers = [m for _, m in reparameterize(model, list(self.cfg.targets), build)]
        return model

    def param_groups(self, model: nn.Module, optim_cfg: OptimConfig) -> list[dict[str, Any]]:
        """[K, L, S] of every layer in the ``dlrt`` group; the other parameters as full training's."""
        ours = [p for m in self.layers for p in (m.K, m.L, m.S)]
        ids = {id(p) for p in ours}
        wd = optim_cfg.weight_decay
        return [{"params": ours, "weight_decay": wd, "dlrt": True},
                *dense_param_groups((p for p in model.parameters() if id(p) not in ids), wd)]

    def build_optimizer(self, groups: list[dict[str, Any]], optim_cfg: OptimConfig) -> BUGIntegrator:
        c = self.cfg
        return BUGIntegrator(groups, self.layers, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps,
                             weight_decay=optim_cfg.weight_decay, state_bits=optim_cfg.state_bits,
                             adaptive=c.integrator == "adaptive", kls_optimizer=c.kls_optimizer, tol=c.tol,
                             min_rank=c.min_rank, max_rank=c.bound, max_norm=optim_cfg.grad_clip)

    def ranks(self) -> list[int]:
        return [m.rank for m in self.layers]

    def after_step(self, ctx: StepContext) -> None:
        """Log every target's rank (model order), their mean, and the S-step's gradient norm."""
        ranks = self.ranks()
        ctx.log({"ranks": ranks, "rank_mean": sum(ranks) / max(len(ranks), 1), **getattr(ctx.optimizer, "stats", {})})

    # -- accounting ---------------------------------------------------------------------------------------
    def layer_extra_values(self, model_cfg: ModelConfig) -> float:
        """x·V: r values per target and token (the first pass, at the rank bound)."""
        return lora_activation_values(model_cfg, self.cfg.bound, list(self.cfg.targets), 0.0)

    def _augmented(self, m: int, n: int) -> tuple[int, int]:
        """Columns of Û and V̂ at the rank bound: min(m, 2r), min(n, 2r) (r, r fixed-rank)."""
        r = self.cfg.bound
        return (min(m, 2 * r), min(n, 2 * r)) if self.cfg.integrator == "adaptive" else (r, r)

    def second_pass_bytes(self, model_cfg: ModelConfig, seq_len: int, recompute: str, recompute_every: int,
                          precision: str, grad_bytes: float, fused_loss: bool = False) -> tuple[float, float]:
        """The S-step's forward runs with every parameter frozen: per layer it saves 6d + 3f + H + 2 values
        per token and x·V̂ (c_v values) per target, outside the layers only the loss's log-softmax and
        targets, or with a fused head loss its ∂h (fp32, no recomputation: measured on torch 2.13,
        tests/test_estimate.py); other precisions and recomputation policies take the first pass's figure. Held through it: the dense parameters'
        gradients (stepped after it), Û, V̂, S̃ and its gradient, S's moments at the augmented size."""
        d, f, H, T = model_cfg.dim, model_cfg.ffn_dim, model_cfg.n_heads, seq_len
        shapes = list(target_shapes(model_cfg, list(self.cfg.targets)).values())
        # a fused head loss keeps ∂h only (the head is frozen: no ∂W), a plain one the log-softmax and targets
        loss = (2.0 if precision == "pure_bf16" else 4.0) * d if fused_loss else \
            (4.0 * model_cfg.vocab_size + 8.0) * (T - 1) / T
        if recompute == "none" and precision == "fp32":
            layer = 6 * d + 3 * f + H + 2 + sum(self._augmented(m, n)[1] for m, n in shapes)
            saved = 4.0 * model_cfg.n_layers * layer + loss
        else:
            saved = self.activation_bytes(model_cfg, recompute, recompute_every, precision) + \
                outside_layers_bytes(model_cfg, T, precision, fused_loss=fused_loss) + (loss if fused_loss else 0.0)
        r = self.cfg.bound
        ours = sum(r * (m + n) + r * r for m, n in shapes) * model_cfg.n_layers
        held = grad_bytes * (self.cost(model_cfg, T)["trainable_params"] - ours)
        return saved, held + self._integrator_held(model_cfg)

    def _integrator_held(self, model_cfg: ModelConfig) -> float:
        """Bytes the integrator holds for every layer from its K-/L-steps to the truncation: Û, V̂, S̃ and its
        gradient (fp32), and S's moments grown to the augmented size."""
        r = self.cfg.bound
        moments_grow = 8.0 if self.cfg.kls_optimizer == "adam" else 0.0
        held = 0.0
        for m, n in target_shapes(model_cfg, list(self.cfg.targets)).values():
            cu, cv = self._augmented(m, n)
            held += model_cfg.n_layers * (4.0 * (m * cu + n * cv + 2 * cu * cv) + moments_grow * (cu * cv - r * r))
        return held

    def step_temp_bytes(self, model_cfg: ModelConfig, optim_cfg: OptimConfig, precision: str) -> float:
        """Beyond every gradient of the first pass (which ``estimate`` counts at the step): what the integrator
        holds for all layers once their K- and L-steps are done (:meth:`_integrator_held`) less the K, L (and
        S) gradients it has dropped by then, plus the costlier of the dense parameters' AdamW step (after the second
        pass) and one K- or L-step of s x r (s in m, n): the step and Adam's direction with its
        denominator (3sr), the QR of [U | step] while it runs (input, unsigned and signed Q: 3 x 2sr) and
        the augmented basis (s·c); under pure bf16 the fp32 working copies of the factor and its gradient
        (2sr); and the truncation's SVD of the largest core."""
        r = self.cfg.bound
        pure = precision == "pure_bf16"
        per_step = max(4.0 * s * r * (3 + (2 if pure else 0)) + 4.0 * 3 * 2 * s * r + 4.0 * s * c
                       for m, n in target_shapes(model_cfg, list(self.cfg.targets)).values()
                       for s, c in zip((m, n), self._augmented(m, n)))
        core = max(svd_temp_bytes(self._augmented(m, n))
                   for m, n in target_shapes(model_cfg, list(self.cfg.targets)).values())
        dense = super().step_temp_bytes(model_cfg, optim_cfg, precision)
        shapes = list(target_shapes(model_cfg, list(self.cfg.targets)).values())
        dropped = (2.0 if pure else 4.0) * model_cfg.n_layers * sum(r * (m + n) + r * r for m, n in shapes)
        return max(self._integrator_held(model_cfg) - dropped, 0.0) + max(dense, per_step, core)

    def cost(self, model_cfg: ModelConfig, seq_len: int) -> dict[str, float]:
        """At the rank bound r: K, L, S trained (r(m + n) + r² per target), U and V buffers. FLOPs per token:
        the first pass, 6r(m + n) + 4r² per target (x V Sᵀ Uᵀ forward; dx, ∇K, ∇L backward), plus the
        second: the augmented factors (c_u = min(m, 2r), c_v = min(n, 2r) columns; c = r fixed-rank)
        forward 2(n c_v + c_u c_v + m c_u) and backward 2(m c_u + 2 c_u c_v + n c_v) per target, the LM head
        forward and input gradient (4 V d) and the attention scores."""
        r = self.cfg.bound
        targets = list(self.cfg.targets)

        def per_target(m: int, n: int) -> tuple[float, float, float]:
            p = float(r * (m + n) + r * r)
            return p, p, 6.0 * r * (m + n) + 4.0 * r * r

        out = reparameterized_cost(model_cfg, seq_len, targets, per_target)
        second = 0.0
        bases = 0.0
        for m, n in target_shapes(model_cfg, targets).values():
            cu, cv = self._augmented(m, n)
            second += 4.0 * m * cu + 4.0 * n * cv + 6.0 * cu * cv
            bases += r * (m + n)
        d, L = model_cfg.dim, model_cfg.n_layers
        second = L * second + 4.0 * model_cfg.vocab_size * d + 12 * L * d * seq_len / 2
        out["flops_per_token"] += second
        out["buffer_bytes"] = rope_bytes(model_cfg) + 4.0 * L * bases
        return out

    def optimizer_state_bytes(self, model_cfg: ModelConfig, optim_cfg: OptimConfig) -> float:
        """AdamW for the dense parameters; two moments (no step tensor) for each K, L and S at the rank bound
        (none with ``kls_optimizer=sgd``)."""
        r = self.cfg.bound
        shapes = list(target_shapes(model_cfg, list(self.cfg.targets)).values()) * model_cfg.n_layers
        ours = sum(r * (m + n) + r * r for m, n in shapes)
        dense = adamw_state_bytes(model_cfg, self.cost(model_cfg, 1)["trainable_params"] - ours, optim_cfg.state_bits)
        dense -= 4.0 * 7 * model_cfg.n_layers  # adamw_state_bytes counts a step tensor per projection
        if self.cfg.kls_optimizer == "sgd":
            return dense
        bits = optim_cfg.state_bits
        return dense + sum(moment_pair_bytes(m * r, bits) + moment_pair_bytes(n * r, bits) + moment_pair_bytes(r * r, bits)
                           for m, n in shapes)
