"""LoQT (Loeschcke et al., NeurIPS 2024; arXiv 2405.16528): low-rank adapters for quantized training.

Each target projection (m x n = out x in) is ``y = x·deq(W_q)ᵀ + s·x·(ΔW)ᵀ`` with W_q the frozen
weight stored quantized (NF4 by default) and the low-rank term ΔW = P·B (P: m x r) or B·P (P: r x n):
P is frozen, taken from the SVD of W's gradient and stored quantized too; only B is trained (with the
embeddings, LM head and norms). At the update steps u_0 = 0, u_1 = T0, u_{k+1} = u_k + T0 +
floor(ψ^k) (``update_proj_gap`` T0, ``increment_size`` ψ; ``proj_gap_progression=static``: every T0):

1. the update's backward also gives the full gradient G = ∂L/∂W of the dense weight W = deq(W_q) + s·ΔW
   (the modules' frozen quantized matmul computes it from the output gradient and its input; it is
   not a parameter, and the trainer knows nothing of it: :meth:`LoQT.before_step` arms the modules);
   P_new = the top-r singular vectors of G on the smaller side, stored quantized at once;
2. after the optimizer step: merge W <- deq(W_q) + s·ΔW, then error compensation: B = P⁺(W - deq(Q(W)))/s
   (P⁺ the pseudo-inverse of the dequantized P_new), re-quantise W - s·ΔW(B), recompute B, for
   ``compensation_iterations`` rounds, keeping the pair (W_q, B) with the smallest ‖W - deq(W_q) - s·ΔW‖;
3. B's Adam state is kept across merges (``reset_optimizer=true``: forgotten).

All of it lives in the model's buffers (codes, absmax) and B, so a checkpoint between two merges
resumes exactly; nothing is pending across an update.

Read in sebulo/LoQT (loqt/LoQT.py, loqt/utils.py, torchrun_main.py, scripts/); the paper's full text
could not be retrieved here beyond its abstract and introduction. Differences, on purpose:

- **Order of an update step.** The reference merges in a forward pre-hook of the update step, runs
  that step's forward on the merged quantized W alone (the low-rank path off), initialises P and B in
  the backward hook of the last micro-batch, and zeroes B's gradient, so that AdamW then takes a
  momentum-only step on the fresh B. Here the update step is an ordinary training step (B is
  trained), its backward also yields G (the gradient of the same dense W: the function is the same
  before and after a merge, up to the quantisation error), and the merge, the new P and B follow the
  optimizer step. Nothing a forward or backward can see changes inside an update, so activation
  recomputation, the two backward passes of exact per-layer clipping and gradient accumulation are
  exact, per-layer updates equal the global step, and no full-precision copy of the merged W has to
  be kept through the backward (the reference keeps one per target, offloaded to the CPU).
- Memory of the update step: without accumulation one target's G exists at a time (computed in its
  module's backward, decomposed and freed at once; the reference accumulates every target's G in a
  buffer, offloaded to the CPU at 7B); with accumulation each target's G is summed over the
  micro-batches in the weights' dtype (as the reference), and all of them are held until the last
  micro-batch's backward. ``lrpretrain estimate`` counts it (``backward_temp_bytes``).
- The int8 weight format (bitsandbytes' blockwise quantisation with 255 evenly spaced levels) is our
  option; the reference quantizes to NF4 only. ``projection=bf16`` keeps P in bf16 (the reference's
  unquantized projection).
- SVD failures fall back as in GaLore here (:func:`lrpretrain.optim.projector.svd_bases`: an
  eigendecomposition of the Gram matrix); a non-finite G skips that update's merge for that target
  (logged as ``loqt_skipped``). The reference calls SVD (or, for its 7B/13B scripts, eigh) unguarded.
- Distributed training is refused: DDP needs every trained parameter in every forward (B is not at
  step 0), FSDP2 would shard B but not the quantized buffers, and every rank would have to all-reduce G.

Choices where the paper and the reference are silent or differ between scripts:

- s = ``lora_alpha`` itself (the reference's ``scaling = lora_alpha``, not α/r): 0.4 at 60M, 0.5 at
  130M/350M/7B, 0.25 at 1B (scripts/pretraining/*.sh).
- P sits on the smaller dimension: m >= n (q, k, v, o, gate, up) gives P = the top-r right singular
  vectors (r x n) and B (m x r); m < n (down) gives P = the top-r left singular vectors (m x r) and B
  (r x n) (the reference's ``std`` rule, in_features <= out_features -> P on the input side).
- At step 0 there is no P yet: the forward is deq(W_q)·x alone and B receives no gradient; the first
  merge therefore starts from deq(Q(W0)) (the reference too: W0's own quantisation error is not
  compensated).
- Blocks of 64 entries per absmax (bitsandbytes' default, the reference's ``Params4bit``);
  ``double_quant`` as the reference's 7B script (off in its small-model scripts).
- Compensation uses the pseudo-inverse of the *dequantized* P (the reference's, as P is not exactly
  orthonormal once quantized), computed in fp32, and B is stored in the parameters' dtype.
- ``compensation_iterations=0``: W_q = Q(W) and B = 0 (the reference). The 7B script passes none
  (0); conf/experiment/loqt_c4_7b.yaml uses 5, as every smaller script.
- The frozen products (x·deq(W_q)ᵀ and the one with P) dequantize in the forward and again in the
  backward and save nothing (bitsandbytes' 4-bit matmul, which the reference uses, does the same), so
  a block saves less than a plain one: the inputs of q/k/v and gate/up are not kept, r values per
  target with P on the input side are (``layer_extra_values``).
- Any ``trainer.precision`` works: B, embeddings and norms are stored in the parameters' dtype and the
  dequantized weights in the activations'; the presets train in pure bf16 (the reference casts the
  model to bf16).
- ``reset_optimizer=true`` zeroes B's moments and step counter at each merge (the reference has no
  such option); the stochastic-rounding counter of pure bf16 goes on.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from lrpretrain.errors import allowed, check
from lrpretrain.methods import register_method
from lrpretrain.methods.base import Method, Reparameterized, StepContext
from lrpretrain.methods.targets import TargetsConfig
from lrpretrain.methods.toolkit import (
    check_rank_for_model,
    reparameterize,
    reparameterized_cost,
    target_shapes,
)
from lrpretrain.model.memory import activation_itemsize, rope_bytes
from lrpretrain.optim import moments, quantized
from lrpretrain.optim.bf16 import forget_compensation
from lrpretrain.optim.memory import adamw_state_bytes, svd_temp_bytes
from lrpretrain.optim.projector import svd_bases
from lrpretrain.optim.quantized import Blockwise

if TYPE_CHECKING:
    from lrpretrain.config import ModelConfig, OptimConfig

PROGRESSIONS = ("exponential", "static")
PROJECTIONS = ("nf4", "bf16")


@dataclass
class LoQTConfig(TargetsConfig):
    """LoQT's C4 defaults (sebulo/LoQT scripts/pretraining/60m.sh, except lora_alpha: see the yaml)."""

    rank: int = 128  # r
    lora_alpha: float = 0.5  # s: ΔW is scaled by s itself
    update_proj_gap: int = 100  # T0: the first gap between update steps
    proj_gap_progression: str = "exponential"  # exponential: u_{k+1} = u_k + T0 + floor(ψ^k) | static: every T0
    increment_size: float = 1.2  # ψ
    quant_type: str = "nf4"  # W_q: nf4 | int8
    quant_blocksize: int = 64  # entries per absmax
    double_quant: bool = False  # the absmax stored in 8 bits (QLoRA's double quantisation)
    projection: str = "nf4"  # P: nf4 (the reference's 4-bit projection) | bf16
    compensation_iterations: int = 5  # rounds of the alternating error compensation (0: B = 0)
    reset_optimizer: bool = False  # forget B's Adam state at each merge (the reference keeps it)

    def validate(self) -> None:
        super().validate()
        check(self.rank > 0, "method.rank", self.rank, "must be > 0")
        check(self.lora_alpha > 0 and math.isfinite(self.lora_alpha), "method.lora_alpha", self.lora_alpha,
              "must be a finite number > 0")
        check(self.update_proj_gap > 0, "method.update_proj_gap", self.update_proj_gap, "must be > 0")
        check(self.proj_gap_progression in PROGRESSIONS, "method.proj_gap_progression", self.proj_gap_progression,
              f"allowed: {allowed(PROGRESSIONS)}")
        check(1.0 <= self.increment_size <= 10.0, "method.increment_size", self.increment_size, "must be in [1, 10]")
        check(self.quant_type in quantized.KINDS, "method.quant_type", self.quant_type,
              f"allowed: {allowed(quantized.KINDS)}")
        check(self.quant_blocksize in quantized.BLOCKSIZES, "method.quant_blocksize", self.quant_blocksize,
              f"allowed: {allowed(quantized.BLOCKSIZES)}")
        check(self.projection in PROJECTIONS, "method.projection", self.projection, f"allowed: {allowed(PROJECTIONS)}")
        check(0 <= self.compensation_iterations <= 100, "method.compensation_iterations",
              self.compensation_iterations, "must be in [0, 100]")
        check(quantized.available(), "method.quant_type", self.quant_type,
              "LoQT quantizes through bitsandbytes>=0.49 (pip install bitsandbytes)")

    def validate_for_model(self, model_cfg: ModelConfig) -> None:
        check_rank_for_model(self.rank, model_cfg, list(self.targets))

    def weight_format(self) -> Blockwise:
        return Blockwise(self.quant_type, self.quant_blocksize, self.double_quant)

    def projection_format(self) -> Blockwise | None:
        """None: P is stored in bf16."""
        return Blockwise("nf4", self.quant_blocksize, self.double_quant) if self.projection == "nf4" else None


def update_schedule(gap: int, progression: str = "exponential", increment: float = 1.2) -> Iterator[int]:
    """The update steps (0-based optimizer updates): 0, T0, then u + T0 + floor(ψ^k) for k = 1, 2, ...
    (sebulo/LoQT loqt/utils.py ``get_proj_update_steps``); ``static``: 0, T0, 2·T0, ..."""
    u, k = 0, 0
    yield u
    u = gap
    while True:
        yield u
        k += 1
        u += gap + (math.floor(increment**k) if progression == "exponential" else 0)


def side_of(shape: tuple[int, int]) -> str:
    """``right``: P (r x n) on the input side, B (m x r), for m >= n; ``left``: P (m x r), B (r x n)."""
    m, n = shape
    return "right" if m >= n else "left"


# -- the quantized layer ----------------------------------------------------------------------------------


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class _FrozenLinear(torch.autograd.Function):
    """y = x·Fᵀ for a frozen, quantized F (``which``: the module's ``weight`` W_q or its projection P):
    dequantized in the forward and again in the backward, never saved (bitsandbytes' 4-bit matmul
    does the same; a saved dequantized copy of P would cost r·min(m, n) values per target for every
    forward). At an armed update step the weight's input is saved too, and the backward hands W's full
    gradient (output gradientᵀ · input) to the module."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: LoQTLinear, which: str) -> torch.Tensor:
        dtype = _compute_dtype(x)
        x = x.to(dtype)
        ctx.module, ctx.which = module, which
        # armed for the whole update (not only until G is complete): a recomputed forward (activation
        # checkpointing, the second pass of exact per-layer clipping) saves what the first one saved
        ctx.probe = which == "weight" and module.armed
        if ctx.probe:
            ctx.save_for_backward(x)
        return F.linear(x, module.frozen(which, dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        module = ctx.module
        grad_x = grad @ module.frozen(ctx.which, grad.dtype) if ctx.needs_input_grad[0] else None
        if ctx.probe and module.probing:
            (x,) = ctx.saved_tensors
            module.take_gradient(grad.reshape(-1, grad.shape[-1]).T @ x.reshape(-1, x.shape[-1]))
        return grad_x, None, None


class LoQTLinear(Reparameterized):
    """y = x·deq(W_q)ᵀ + s·x·(ΔW)ᵀ, ΔW = P·B or B·P (see the module docstring), W_q and P in buffers."""

    def __init__(self, base: nn.Linear, rank: int, scale: float, weight_format: Blockwise,
                 projection_format: Blockwise | None):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.scale = rank, scale
        self.weight_format, self.projection_format = weight_format, projection_format
        m, n = self.out_features, self.in_features
        self.side = side_of((m, n))
        w = base.weight.detach()
        self._keys: dict[str, list[str]] = {}
        self._store("weight", quantized.quantize_blockwise(w, weight_format))
        self.proj_shape = (m, rank) if self.side == "left" else (rank, n)
        self.lora_B = nn.Parameter(torch.zeros((rank, n) if self.side == "left" else (m, rank), dtype=w.dtype,
                                               device=w.device))
        zeros = torch.zeros(self.proj_shape, device=w.device)
        self._store("proj", self._encode_projection(zeros))
        self.register_buffer("initialized", torch.zeros(1, dtype=torch.uint8, device=w.device))  # P and B set
        self._active = False  # mirror of ``initialized`` (no host sync in the forward)
        self.register_load_state_dict_post_hook(lambda module, _keys: module._sync_active())
        # one update's probe (never across updates, so never checkpointed)
        self._expected = 0  # backward passes whose gradients sum to G (0: not armed)
        self._calls = 0
        self._acc: torch.Tensor | None = None
        self._pending: quantized.Quantized | None = None  # the new P, stored as it will be
        self.seed = 0  # of the random basis that svd_bases falls back to (set by the method: distinct per target)

    # -- storage -------------------------------------------------------------------------------------
    def _store(self, prefix: str, q: quantized.Quantized) -> None:
        """Write the tensors of ``q`` into buffers ``<prefix>_<key>`` (registered on first use)."""
        self._keys[prefix] = list(q)
        for key, t in q.items():
            name = f"{prefix}_{key}"
            if name in self._buffers:
                self._buffers[name].copy_(t)
            else:
                self.register_buffer(name, t)

    def _load(self, prefix: str) -> quantized.Quantized:
        return {key: self._buffers[f"{prefix}_{key}"] for key in self._keys[prefix]}

    def _encode_projection(self, P: torch.Tensor) -> quantized.Quantized:
        if self.projection_format is None:
            return {"bf16": P.to(torch.bfloat16)}
        return quantized.quantize_blockwise(P, self.projection_format)

    def _sync_active(self) -> None:
        self._active = bool(self.initialized.item())

    def base_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """deq(W_q), (m, n)."""
        return quantized.dequantize_blockwise(self._load("weight"), self.weight_format,
                                              (self.out_features, self.in_features), dtype)

    def projection(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """P: (m, r) (left) or (r, n) (right)."""
        q = self._load("proj")
        if self.projection_format is None:
            return q["bf16"].to(dtype)
        return quantized.dequantize_blockwise(q, self.projection_format, self.proj_shape, dtype)

    def frozen(self, which: str, dtype: torch.dtype) -> torch.Tensor:
        return self.base_weight(dtype) if which == "weight" else self.projection(dtype)

    def delta(self, P: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """ΔW = P·B (left) or B·P (right), in the factors' dtype."""
        return P @ B if self.side == "left" else B @ P

    # -- forward ---------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _FrozenLinear.apply(x, self, "weight")
        if not self._active:  # before the first merge: no P yet (B is zero and gets no gradient)
            return y
        if self.side == "left":  # x·(P·B)ᵀ = (x·Bᵀ)·Pᵀ
            low = _FrozenLinear.apply(F.linear(x, self.lora_B), self, "proj")
        else:  # x·(B·P)ᵀ = (x·Pᵀ)·Bᵀ
            low = F.linear(_FrozenLinear.apply(x, self, "proj"), self.lora_B)
        return y + self.scale * low

    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        W = self.base_weight(torch.float32)
        if self._active:
            W += self.scale * self.delta(self.projection(torch.float32), self.lora_B.float())
        return W

    # -- an update step ------------------------------------------------------------------------------------
    @property
    def armed(self) -> bool:
        """This update takes W's full gradient."""
        return self._expected > 0

    @property
    def probing(self) -> bool:
        """Armed and G not yet complete (a later pass over the same micro-batch, e.g. the second
        backward of exact per-layer clipping, is not a new gradient)."""
        return self._calls < self._expected

    def arm(self, micro_batches: int) -> None:
        """Take W's gradient in this update's backward passes (summed over ``micro_batches``)."""
        self._expected, self._calls, self._acc, self._pending = micro_batches, 0, None, None

    def take_gradient(self, G: torch.Tensor) -> None:
        """One backward pass's contribution to G = ∂L/∂W (m x n); at the last, decompose and free it."""
        if not self.probing:
            return
        self._calls += 1
        self._acc = G if self._acc is None else self._acc.add_(G)
        if self._calls < self._expected:
            return
        G, self._acc = self._acc, None
        if bool(torch.isfinite(G).all()):
            P, Q, _ = svd_bases(G, self.side, self.rank, (None, None), self.seed)
            self._pending = self._encode_projection(P if self.side == "left" else Q)

    @torch.no_grad()
    def merge_(self, iterations: int) -> dict[str, float] | None:
        """After the update: W <- deq(W_q) + s·ΔW, the new P, W_q and B by error compensation. Returns
        the relative errors ‖W - deq(W_q) - s·ΔW‖ / ‖W‖ with and without compensation; None when this
        update gave no usable gradient (non-finite, or no backward ran): nothing changes."""
        pending, self._pending, self._expected, self._acc = self._pending, None, 0, None
        if pending is None:
            return None
        W = self.base_weight(torch.float32)
        if self._active:
            W += self.scale * self.delta(self.projection(torch.float32), self.lora_B.float())
        self._store("proj", pending)
        P = self.projection(torch.float32)
        q, B, err, plain = compensate(W, P, self.scale, self.side, self.weight_format, iterations)
        norm = float(torch.linalg.vector_norm(W)) or 1.0
        self._store("weight", q)
        self.lora_B.copy_(B)
        self.initialized.fill_(1)
        self._active = True
        return {"error": err / norm, "plain_error": plain / norm}

    def extra_repr(self) -> str:
        p = "bf16" if self.projection_format is None else self.projection_format.kind
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"scale={self.scale:g}, W_q={self.weight_format.kind}, P={p} ({self.side})")


@torch.no_grad()
def compensate(W: torch.Tensor, P: torch.Tensor, scale: float, side: str, fmt: Blockwise,
               iterations: int) -> tuple[quantized.Quantized, torch.Tensor, float, float]:
    """LoQT's error compensation for the fp32 weight W and projection P: returns (W_q, B, error,
    plain error), error = ‖W - deq(W_q) - s·ΔW(B)‖ of the best of ``iterations`` rounds (each: quantize,
    B = P⁺(W - deq)/s, next round quantizes W - s·ΔW(B)), plain error = ‖W - deq(Q(W))‖."""
    def low_rank(R: torch.Tensor) -> torch.Tensor:  # B = P⁺ R / s
        return (Pinv @ R if side == "left" else R @ Pinv).div_(scale)

    def delta(B: torch.Tensor) -> torch.Tensor:  # s·ΔW
        return (P @ B if side == "left" else B @ P).mul_(scale)

    shape = tuple(W.shape)
    q = quantized.quantize_blockwise(W, fmt)
    R = quantized.dequantize_blockwise(q, fmt, shape).neg_().add_(W)  # W - deq(Q(W))
    plain = float(torch.linalg.vector_norm(R))
    b_shape = (P.shape[1], W.shape[1]) if side == "left" else (W.shape[0], P.shape[0])
    if iterations == 0:
        return q, torch.zeros(b_shape, dtype=W.dtype, device=W.device), plain, plain
    Pinv = torch.linalg.pinv(P)
    best: tuple[float, quantized.Quantized, torch.Tensor] | None = None
    for i in range(iterations):
        if i > 0:
            q = quantized.quantize_blockwise(R, fmt)  # R holds W - s·ΔW(B) of the last round
            R = quantized.dequantize_blockwise(q, fmt, shape).neg_().add_(W)
        B = low_rank(R)
        D = delta(B)
        err = float(torch.linalg.vector_norm(R.sub_(D)))  # W - deq - s·ΔW
        if best is None or err < best[0]:
            best = (err, q, B)
        R = torch.sub(W, D, out=D)  # the next round quantizes W - s·ΔW(B)
    assert best is not None
    return best[1], best[2], best[0], plain


def restart_adam(state: dict[str, Any]) -> None:
    """Zero Adam's moments (fp32 or 8-bit) and its step counter in place: the next update starts them
    afresh, bias correction included; the stochastic-rounding counter goes on (its stream is not reused)."""
    if moments.has_moments(state):
        moments.reset(state)
    step = state.get("step")
    if isinstance(step, torch.Tensor):
        step.zero_()
    elif step is not None:
        state["step"] = 0


# -- the plugin -----------------------------------------------------------------------------------------


def loqt_modules(model: nn.Module) -> list[LoQTLinear]:
    return [m for m in model.modules() if isinstance(m, LoQTLinear)]


@register_method("loqt")
class LoQT(Method):
    Config = LoQTConfig
    cfg: LoQTConfig
    unsupported_strategies = {
        "ddp": "DDP needs every trained parameter in every forward (LoQT's factors B take no part before the "
               "first merge), and every rank would need the same full gradient of each quantized weight at an "
               "update step",
        "fsdp2": "it would shard the factors B but not LoQT's quantized weights (buffers), and a merge needs "
                 "whole matrices",
        "deepspeed": "it would partition the factors B but not LoQT's quantized weights (buffers), and a merge "
                     "needs whole matrices",
    }

    def __init__(self, cfg, model_cfg):
        super().__init__(cfg, model_cfg)
        self._schedule: list[int] = []
        self._next = update_schedule(cfg.update_proj_gap, cfg.proj_gap_progression, cfg.increment_size)

    def is_update_step(self, u: int) -> bool:
        """Whether update ``u`` (0-based) takes W's gradient for a new P and merges after it."""
        while not self._schedule or self._schedule[-1] < u:
            self._schedule.append(next(self._next))
        return u in self._schedule

    def prepare_model(self, model: nn.Module) -> nn.Module:
        c = self.cfg
        wfmt, pfmt = c.weight_format(), c.projection_format()
        built = reparameterize(model, list(c.targets), lambda _q, lin: LoQTLinear(lin, c.rank, c.lora_alpha, wfmt, pfmt))
        for i, (_, m) in enumerate(built):
            m.seed = 0x4C6F5154 + i
        return model

    def before_step(self, ctx: StepContext) -> None:
        if self.is_update_step(ctx.step):
            for m in loqt_modules(ctx.model):
                m.arm(ctx.micro_batches)

    def after_step(self, ctx: StepContext) -> None:
        if not self.is_update_step(ctx.step - 1):
            return
        errors, plain, skipped = [], [], 0
        for m in loqt_modules(ctx.model):
            stats = m.merge_(self.cfg.compensation_iterations)
            if stats is None:
                skipped += 1
                continue
            errors.append(stats["error"])
            plain.append(stats["plain_error"])
            state = ctx.optimizer.state.get(m.lora_B, {})
            forget_compensation(state)  # B was rewritten: a kahan buffer no longer belongs to it
            if self.cfg.reset_optimizer:
                restart_adam(state)
        record: dict[str, Any] = {"loqt_merged": len(errors)}
        if errors:
            record["loqt_quant_error"] = sum(errors) / len(errors)
            record["loqt_plain_quant_error"] = sum(plain) / len(plain)
        if skipped:
            record["loqt_skipped"] = skipped
        ctx.log(record)

    # -- accounting ---------------------------------------------------------------------------------
    def target_cost(self, m: int, n: int) -> tuple[float, float, float]:
        """Parameters held as floats (B), trainable (B), training FLOPs per token: the quantized matmul
        2mn forward + 2mn backward (input gradient only), the low-rank path 2r(m + n) forward and
        2mr + 4rn (P left) or 4mr + 2rn (P right) backward. The full gradient of W at the update steps
        (2mn, once per hundreds of updates) is not counted."""
        r, left = self.cfg.rank, side_of((m, n)) == "left"
        low = 2.0 * r * (m + n) + (2.0 * m * r + 4.0 * r * n if left else 4.0 * m * r + 2.0 * r * n)
        b = float(r * (n if left else m))
        return b, b, 4.0 * m * n + low

    def quantized_bytes(self, shape: tuple[int, int]) -> float:
        """Buffers of one target: W_q, P and the ``initialized`` flag."""
        m, n = shape
        r = self.cfg.rank
        pfmt = self.cfg.projection_format()
        proj = 2.0 * r * min(m, n) if pfmt is None else float(pfmt.stored_bytes(r * min(m, n)))
        return float(self.cfg.weight_format().stored_bytes(m * n)) + proj + 1.0

    def cost(self, model_cfg: ModelConfig, seq_len: int) -> dict[str, float]:
        """``params``: what is stored as parameters (embeddings, LM head, norms, B); the frozen weights
        are in ``quantized_params`` and their bytes (with P's) in ``buffer_bytes``."""
        shapes = target_shapes(model_cfg, list(self.cfg.targets))
        out = reparameterized_cost(model_cfg, seq_len, list(self.cfg.targets), self.target_cost)
        L = model_cfg.n_layers
        out["quantized_params"] = float(L * sum(m * n for m, n in shapes.values()))
        out["buffer_bytes"] = rope_bytes(model_cfg) + L * sum(self.quantized_bytes(s) for s in shapes.values())
        out["largest_trainable"] = max(float(model_cfg.vocab_size * model_cfg.dim),
                                       *(self.target_cost(m, n)[1] for m, n in shapes.values()))
        return out

    def optimizer_state_bytes(self, model_cfg: ModelConfig, optim_cfg: OptimConfig) -> float:
        return adamw_state_bytes(model_cfg, self.cost(model_cfg, 1)["trainable_params"], optim_cfg.state_bits)

    def unsaved_inputs(self, model_cfg: ModelConfig) -> float:
        """Values per token and block that a plain block saves and LoQT's does not: the input of the
        projections whose P sits on the input side (their frozen matmul and the P·x product need not
        save it), where every projection reading that input is such a target: q, k, v (d), gate, up
        (d), down (f, if f <= d). The attention output that o reads stays saved (SDPA keeps it)."""
        d, f = model_cfg.dim, model_cfg.ffn_dim
        shapes = target_shapes(model_cfg, list(self.cfg.targets))
        groups = {("q_proj", "k_proj", "v_proj"): d, ("gate_proj", "up_proj"): d, ("down_proj",): f}
        return float(sum(size for names, size in groups.items()
                         if all(n in shapes and side_of(shapes[n]) == "right" for n in names)))

    def layer_extra_values(self, model_cfg: ModelConfig) -> float:
        """P·x (r values) of every target whose P sits on the input side, minus the inputs no longer
        saved (:meth:`unsaved_inputs`); a target with P on the output side saves its input for B's
        gradient, as a plain block does (measured on torch 2.13, tests/test_estimate.py)."""
        shapes = target_shapes(model_cfg, list(self.cfg.targets)).values()
        return self.cfg.rank * sum(side_of(s) == "right" for s in shapes) - self.unsaved_inputs(model_cfg)

    def backward_temp_bytes(self, model_cfg: ModelConfig, optim_cfg: OptimConfig, precision: str, tokens: int,
                            accumulation: int, recompute: str = "none", recompute_every: int = 1) -> float:
        """An update step's backward: the full gradient G of the largest target (in the activations'
        dtype; with accumulation every target's, held until the last micro-batch) with its fp32 SVD,
        the inputs that the frozen matmuls save again for G in the blocks not recomputed, and one
        dequantized weight of the input gradient."""
        shapes = list(target_shapes(model_cfg, list(self.cfg.targets)).values())
        item = activation_itemsize(precision)
        largest = max(shapes, key=lambda s: s[0] * s[1])
        g = item * largest[0] * largest[1]
        if accumulation > 1:
            g = item * model_cfg.n_layers * sum(m * n for m, n in shapes)
        kept = sum(1 for i in range(model_cfg.n_layers) if recompute == "none" or i % recompute_every != 0)
        saved = item * tokens * kept * self.unsaved_inputs(model_cfg)
        return g + svd_temp_bytes(largest) + saved + item * largest[0] * largest[1]
