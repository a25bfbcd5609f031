"""LORO's optimizer (Mo, Huang, Pan, ICLR 2025; mzf666/LORO-main ``loro_torch/loro_optim.py``): Adam
for every parameter, with the parameter groups marked ``loro`` holding the factor pairs of W = B·A,
which update in two ways.

- Lazy update (every update but one in K): each factor takes an Adam step with its learning rate scaled
  by ``lazy_scale`` (the reference's ``lr_scaler``, r/d): B <- B - lr·(r/d)·f·N_B, likewise A.
- Exact update (the update with index u, 0-based, where (u + 1) mod K == 0): both factors' moments take
  the update's gradient, then W = B·A moves by -lr·ξ on the manifold of rank-r matrices and is
  retracted there (:func:`riemannian_step`), ξ the tangent vector built from the two directions f·N,
  as the reference (its Algorithm 1 writes the raw gradients ∇B, ∇A; its code passes the
  Adam-normalised ones). No weight decay in the exact update (the reference's).

Adam's arithmetic is the reference's (transformers' AdamW form, as the GaLore family here): N = m / (√v
+ eps) with f = √(1 - β₂ᵗ) / (1 - β₁ᵗ) (:func:`lrpretrain.optim.moments.normalized`, ``hf``), for the
factors and for the other parameters (embeddings, head, norms) alike. Decoupled weight decay
p <- p(1 - lr·λ) comes before the update (the reference applies it after, at the bias-corrected step
size for the factors; every published run uses λ = 0).

The group holds ``[B₀, A₀, B₁, A₁, ...]`` (B: m x r, A: r x n), ``exact_every`` (K), ``lazy_scale``
and ``update``: the number of updates done, which the method plugin sets after every update from the
trainer's count (:meth:`LOROAdamW.set_update`), so the exact update falls on the trainer's schedule
also after a skipped (non-finite) update. Everything is per parameter (``step_param``): under
per-layer updates the second factor of a pair to arrive performs the pair's exact step (the first
only updates its moments and marks itself), so the global and the per-layer step agree. Lazy and
dense steps are element-wise (:meth:`~lrpretrain.optim.ParamwiseOptimizer.elementwise_step`: in pieces,
under ``trainer.precision=pure_bf16`` on fp32 working copies rounded back by the run's rule); an exact
step runs on fp32 copies of both factors (with their ``kahan`` errors added back) and rounds each new
factor once by the rule, keyed by its own slot and update count. The
optimizer-state refresh after an exact update and the LR restart belong to the plugin
(lrpretrain/methods/loro.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from lrpretrain.optim import moments
from lrpretrain.optim.base import AdamStep, ParamwiseOptimizer, adam_defaults
from lrpretrain.optim.bf16 import Writer


def qr_positive(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduced QR with a non-negative diagonal of R (the unique QR of a full-rank ``x``): Q (m x k),
    R (k x c) for x (m x c), k = min(m, c). Householder QR: Q is orthonormal even where x is
    rank-deficient."""
    q, r = torch.linalg.qr(x)
    sign = torch.sign(torch.diagonal(r))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return q * sign, r * sign[:, None]


def riemannian_step(B: torch.Tensor, A: torch.Tensor, dB: torch.Tensor, dA: torch.Tensor,
                    lr: float) -> tuple[torch.Tensor, torch.Tensor]:
    """LORO's exact update of W = B·A (B: m x r, A: r x n, rank r), in fp32.

    With B = Q_B R_B and Aᵀ = Q_A R_A (QR), Z_B = dB R_A⁻¹ and Z_A = dAᵀ R_B⁻¹ (for the gradients of a
    loss whose gradient in W is G, dB = G Aᵀ and dA = Bᵀ G, so Z_B = G Q_A and Z_A = Gᵀ Q_B: G's action on
    the column and row spaces, without forming G). The tangent vector is
    ξ = Q_B Z_Aᵀ + (I - Q_B Q_Bᵀ) Z_B Q_Aᵀ (= P_T(G), the projection of G onto the tangent space at W,
    for true gradients). W - lr·ξ = [Q_B, Q̄_B] C [Q_A, Q̄_A]ᵀ with the 2r x 2r core
    C = [[R_B R_Aᵀ - lr Z_Aᵀ Q_A, -lr R̄_Aᵀ], [-lr R̄_B, 0]], where Q̄ R̄ are the QR factors of the
    directions' parts outside the current spaces. Retraction: the rank-r truncated SVD of C,
    U* Σ V*ᵀ, split evenly between the factors: B' = [Q_B, Q̄_B] U* Σ^½, A' = Σ^½ V*ᵀ [Q_A, Q̄_A]ᵀ.

    Q̄, R̄ come from one Householder QR of [Q_B, Z_B] (its last columns are orthonormal to Q_B even
    when the outside part is rank-deficient) rather than from a QR of the projection (I - Q_B Q_Bᵀ) Z_B
    alone, as the reference does: the same factors where that QR is full rank. Where 2r exceeds m (or
    n) the outside part has at most m - r columns and the core shrinks accordingly.
    """
    B, A, dB, dA = B.float(), A.float(), dB.float(), dA.float()
    r = B.shape[1]
    q_b, r_b = qr_positive(B)  # (m, r), (r, r)
    q_a, r_a = qr_positive(A.T)  # (n, r), (r, r)
    z_b = torch.linalg.solve_triangular(r_a, dB, upper=True, left=False)  # dB R_A⁻¹ (m, r)
    z_a = torch.linalg.solve_triangular(r_b, dA.T, upper=True, left=False)  # dAᵀ R_B⁻¹ (n, r)
    basis_b, t_b = qr_positive(torch.cat([q_b, z_b], 1))  # [Q_B, Q̄_B], R̄_B = t_b[r:, r:]
    basis_a, t_a = qr_positive(torch.cat([q_a, z_a], 1))
    core = torch.zeros(basis_b.shape[1], basis_a.shape[1], dtype=B.dtype, device=B.device)
    core[:r, :r] = r_b @ r_a.T - lr * (z_a.T @ q_a)
    core[:r, r:] = -lr * t_a[r:, r:].T
    core[r:, :r] = -lr * t_b[r:, r:]
    u, s, vh = torch.linalg.svd(core, full_matrices=False)
    root = s[:r].sqrt()
    return basis_b @ (u[:, :r] * root), (root[:, None] * vh[:r]) @ basis_a.T


@dataclass(frozen=True)
class LOROAdamStep(AdamStep):
    """LOROAdamW's element-wise step (the reference's Adam, transformers' form): p <- p(1 - lr·λ), then
    p <- p - lr·s·f·m/(√v + eps), s the lazy scale of the factors (1 for the other parameters), f =
    √(1 - β₂ᵗ)/(1 - β₁ᵗ): the ``direction`` form of the fused kernel (``trainer.kernels``) with α = -lr·s·f."""

    def __call__(self, w: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor) -> None:
        if self.weight_decay != 0:
            w.mul_(1 - self.lr * self.weight_decay)
        m.lerp_(g, 1 - self.beta1)
        v.mul_(self.beta2).addcmul_(g, g, value=1 - self.beta2)
        w.add_(m / (v.sqrt() + self.eps), alpha=self.step_size)


class LOROAdamW(ParamwiseOptimizer):
    """Adam (the reference's arithmetic) for every group; groups with ``loro=True`` hold factor pairs (see
    the module docstring) and step lazily or exactly."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, state_bits: int = 32):
        super().__init__(params, adam_defaults("LOROAdamW", lr, betas, eps, weight_decay, state_bits))
        self._pair: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for group in self.param_groups:
            if not group.get("loro"):
                continue
            group.setdefault("update", 0)
            ps = group["params"]
            if len(ps) % 2 or any(b.ndim != 2 or a.ndim != 2 or b.shape[1] != a.shape[0] for b, a in zip(ps[::2], ps[1::2])):
                raise ValueError("a loro group holds factor pairs [B, A, ...] with B (m, r) and A (r, n)")
            for b, a in zip(ps[::2], ps[1::2]):
                self._pair[id(b)] = self._pair[id(a)] = (b, a)

    def set_update(self, done: int) -> None:
        """``done`` updates are complete: the next one is an exact update if (done + 1) mod K == 0."""
        for group in self.param_groups:
            if group.get("loro"):
                group["update"] = done

    @staticmethod
    def _exact(group: dict[str, Any]) -> bool:
        """Whether this update is an exact (Riemannian) one for ``group``'s parameters."""
        return bool(group.get("loro")) and (group.get("update", 0) + 1) % group["exact_every"] == 0

    def elementwise(self, p: torch.Tensor, group: dict[str, Any]) -> bool:
        return not self._exact(group)  # Adam steps (lazy or dense) run in pieces, rounded piece by piece

    def begin_elementwise(self, p: torch.Tensor, group: dict[str, Any]) -> LOROAdamStep:
        """A plain Adam step (the factors' lazy one at lr·(r/d)) in the reference's arithmetic."""
        state = self.state[p]
        if not moments.has_moments(state):
            moments.init_moments(state, p, group["state_bits"])
        state["adam_step"] += 1
        t, (beta1, beta2) = state["adam_step"], group["betas"]
        f = math.sqrt(1 - beta2**t) / (1 - beta1**t)
        scale = group["lazy_scale"] if group.get("loro") else 1.0
        return LOROAdamStep("direction", beta1, beta2, group["eps"], group["lr"], group["weight_decay"],
                            step_size=-group["lr"] * scale * f, denom_scale=1.0)

    def step_param(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        if not self._exact(group):
            self.elementwise_step(p, group)
            return
        self._adam(p, group)  # this update's gradient into the moments
        update = group["update"]
        self.state[p]["exact_at"] = update
        b, a = self._pair[id(p)]
        other = a if p is b else b
        if self.state[other].get("exact_at") != update:
            return  # the first factor of the pair: the second one moves both
        writers = {id(t): self._writer(t) for t in (b, a)}
        B, A = (t if writers[id(t)] is None else writers[id(t)].load(t.data, None) for t in (b, a))
        new_b, new_a = riemannian_step(B, A, self._direction(b, group), self._direction(a, group), group["lr"])
        for t, new in ((b, new_b), (a, new_a)):
            w = writers[id(t)]
            if w is None:
                t.copy_(new.to(t.dtype))
            else:  # pure bf16: the new factor rounded by the run's rule (once per update and factor)
                w.store(t.data, new, None)
                w.close()

    def update_param(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        """As every optimizer's, except an exact update, which rounds both factors of a pair itself (bf16
        weights) when the second one arrives: the first only takes its gradient into its moments, so each
        factor is rounded once per update with its own key, whichever factor arrives first (per-layer
        updates equal the global step)."""
        if self._exact(group):
            self.step_param(p, group)
        else:
            super().update_param(p, group)

    def _writer(self, p: torch.Tensor) -> Writer | None:
        rounding = self._rounding(p)
        return None if rounding is None else rounding.writer(self.state[p], p.data, self.slot_of(p))

    def _adam(self, p: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        """Update ``p``'s moments with its gradient; returns the direction f·N."""
        state = self.state[p]
        if not moments.has_moments(state):
            moments.init_moments(state, p, group["state_bits"])
        beta1, beta2 = group["betas"]
        moments.update(state, p.grad, beta1, beta2)
        return self._direction(p, group)

    def _direction(self, p: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        """Adam's direction f·N of ``p`` from its moments (the update is lr·f·N)."""
        state = self.state[p]
        beta1, beta2 = group["betas"]
        m, v = moments.load(state)
        n, f = moments.normalized(m, v, state["adam_step"], beta1, beta2, group["eps"], "hf")
        return n.mul_(f)
