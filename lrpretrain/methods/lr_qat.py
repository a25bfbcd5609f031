"""LR-QAT (Bondarenko, Del Chiaro, Nagel; arXiv 2406.06385): low-rank quantization-aware training.

Every target projection is the fake-quantised weight

    Ŵ = s · clamp(round_STE(Φ₀ + (α/r)·B·A), q_min, q_max),   Φ₀ = W₀ / s₀ (frozen),

on the signed symmetric b-bit grid [q_min, q_max] = [-2^(b-1), 2^(b-1) - 1] with one scale per output
channel. W₀ is the target's weight at the start (its random initialisation, or a full-rank checkpoint's
weight with ``method.init_from``); s₀ its initial per-channel scales; A (r x n) and B (m x r) are the
trained low-rank factors, *inside* the rounding, so that after training B·A is fused into the integer
grid at no inference cost: W_int = clamp(round(Φ₀ + (α/r)·B·A)) (int8 codes) and Ŵ = s · W_int
(:meth:`LRQATLinear.fused_codes`; :meth:`~LRQATLinear.dense_weight` and so ``lrpretrain export`` give
the dequantised result). The scales s are trained too, with their own learning rate
(``method.scale_lr``, a parameter group of its own that the schedule scales like every other).

Φ₀ lives in a container (``method.container``): ``int8`` (default, the paper's fixed-point down-cast
φ): Φ₀ is clamped to the grid and stored as round(Φ₀ · 2^(8-b)) in an int8 tensor, b integer bits and
8 - b fraction bits; ``bf16`` or ``fp32`` keep W₀/s₀ unclamped in that dtype (the reference's other
φ variants). The codes are a plain persistent buffer: checkpoints hold them as int8 tensors.

The weight Ŵ is never kept for the backward (the paper's checkpointing): :class:`LRQATWeight`, an
autograd function, builds Ŵ inside the forward, multiplies, frees it, and saves only the layer's input;
the backward rebuilds W_int from Φ₀, A, B and forms every gradient from it (straight-through rounding:
the gradient passes where round(Z) lies inside [q_min, q_max], the clamp's interior, and is zero
outside). Its temporaries are one fp32 m x n latent Z, a bool mask and one m x n matrix of the compute
dtype (:meth:`LRQAT.module_temp_bytes`); what a block saves is a plain block's.

Precisions (``trainer.precision``):

- ``fp32``: A, B, s, the rest of the model and Ŵ in fp32;
- ``bf16`` (autocast): A, B, s keep fp32 masters; Ŵ is rounded once from fp32 to bf16 and the matmul
  runs in bf16 on the bf16 copy of the input (what autocast's own linear does); autocast caches no copy
  of a target's weight (there is none to cache);
- ``pure_bf16``: A, B, s and the rest of the model stored in bf16 (the paper's ``--use-bf16
  --use-bf16-ab``), updated with ``trainer.bf16_update``'s rounding; Ŵ in bf16. This is the setting of
  the 7B memory figure (README, benchmarks/results/lr_qat_7b.md).
In every precision Z = Φ₀ + (α/r)·B·A and its rounding are computed in fp32 (from the stored factors),
so the integer codes do not depend on bf16 arithmetic.

Defaults are the reference's W4 per-channel command (Qualcomm-AI-research/lr-qat README, "Reproducing
results"): b = 4, r = 32, ``--lora-method lr_qat_fixed_point8`` (int8 container), ``--scales-lr 1e-5``,
``--lr-ab 1e-3`` (our ``optim.lr`` in the presets), β2 0.95, weight decay 0 for A, B and s,
``--weight-quant-method LP_p4`` (s₀ per channel by a 100-point grid search minimising the L4 error of
the quantised weight), and ``--lora-alpha``'s default 1 (the command does not set it: α/r = 1/32).
A is Kaiming-uniform and B zero (the reference zero-initialises its (m x r) factor and draws the other
Kaiming-uniform), so training starts from the round-to-nearest quantised W₀.

Choices where the paper is silent, and differences from the reference, on purpose:

- From scratch (the paper only runs QAT of pretrained models): W₀ is the model's random initialisation,
  quantised as above; ``method.init_from=PATH`` (a full-rank checkpoint or run directory, loaded as
  ReLoRA's warm start) gives the paper's setting.
- The rest of the model (embeddings, norms, LM head) is trained with AdamW at ``optim.lr`` as in every
  other method here (pretraining from a random init needs it); ``method.train_rest=false`` freezes it,
  the reference's ``--param-group lora``.
- The reference computes Z in the model's dtype (bf16 under ``--use-bf16``); here always in fp32 (see
  above). The learned scales are clamped at 1e-8 in the forward, as the reference's quantiser does.
- ``method.bits=8`` is allowed (the reference asserts b <= 7): the int8 container then holds no fraction
  bits, Φ₀ = round(W₀/s₀) (the reference's ``lr_qat_int`` start).
- The paper's double-packed integer container and activation quantisation are not implemented; the
  weight grid is per output channel (no groups/blocks).
- Rounding is round-half-to-even (``torch.round``, as the reference).
- FLOPs per token count the matmuls (2mn forward, 4mn backward per target, as a dense layer); the
  B·A products of the rebuilds (3 x 2mnr per micro-batch, not per token) are left out.
- ``lrpretrain generate`` rebuilds Ŵ at every forward (no cached dense copy: an evaluation during
  training would otherwise hold a dense copy of every weight); export the run for fast inference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from lrpretrain.errors import check
from lrpretrain.methods import register_method
from lrpretrain.methods.base import Method, Reparameterized
from lrpretrain.methods.relora import check_warm_start_fits, load_warm_start, warm_start_file
from lrpretrain.methods.targets import TargetsConfig
from lrpretrain.methods.toolkit import check_rank_for_model, kaiming_uniform_, reparameterize, target_shapes
from lrpretrain.model.llama import flops_per_token, param_count
from lrpretrain.model.memory import activation_itemsize, residual_itemsize, rope_bytes
from lrpretrain.optim.memory import moment_pair_bytes

if TYPE_CHECKING:
    from lrpretrain.config import ModelConfig, OptimConfig

CONTAINERS = {"int8": torch.int8, "bf16": torch.bfloat16, "fp32": torch.float32}
SCALE_INITS = ("lp", "minmax")
SCALE_EPS = 1e-8  # the smallest scale the forward uses (the reference's quantiser clamps at its eps)
CHUNK = 1 << 22  # entries per piece of the scale search (bounds its temporaries)
ROW_CHUNK = 1 << 20  # entries per piece of the scales' gradient in the backward


# -- the integer grid and its container (the quantisation helpers of this method) ------------------------


def grid(bits: int) -> tuple[int, int]:
    """[q_min, q_max] of the signed symmetric b-bit grid."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def container_unit(bits: int, container: str) -> float:
    """The value of one code of the container: 2^-(8-b) for the int8 fixed point, 1 for float containers."""
    return 2.0 ** -(8 - bits) if container == "int8" else 1.0


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """s · clamp(round(w / s), q_min, q_max) with one scale per row (fp32)."""
    qmin, qmax = grid(bits)
    s = scale.float().clamp(min=SCALE_EPS)[:, None]
    return torch.round(w.float() / s).clamp_(qmin, qmax).mul_(s)


@torch.no_grad()
def initial_scales(w: torch.Tensor, bits: int, how: str = "lp", p: float = 4.0, candidates: int = 100) -> torch.Tensor:
    """s₀ per output channel (row) of ``w`` (fp32).

    ``minmax``: absmax / q_max. ``lp``: the reference's grid search (``LP_p4``): for each row the clipping
    threshold t_k = absmax · k / candidates (k = 1..candidates) whose quantised row has the smallest
    sum of |w - Q(w)|^p, s₀ = t / q_max (the first such k on ties). Rows are searched in pieces of
    :data:`CHUNK` entries, so the temporaries stay small whatever the matrix.
    """
    qmax = grid(bits)[1]
    w = w.float()
    absmax = w.abs().amax(dim=1)
    if how == "minmax":
        return (absmax / qmax).clamp_(min=SCALE_EPS)
    rows = max(1, CHUNK // max(w.shape[1], 1))
    out = torch.empty_like(absmax)
    for i in range(0, w.shape[0], rows):
        block, top = w[i:i + rows], absmax[i:i + rows]
        best = torch.full_like(top, float("inf"))
        chosen = torch.empty_like(top)
        for k in range(1, candidates + 1):
            s = (top * (k / candidates) / qmax).clamp_(min=SCALE_EPS)
            err = fake_quantize(block, s, bits).sub_(block).abs_().pow_(p).sum(dim=1)
            better = err < best
            best = torch.where(better, err, best)
            chosen = torch.where(better, s, chosen)
        out[i:i + rows] = chosen
    return out


def to_container(phi: torch.Tensor, bits: int, container: str) -> torch.Tensor:
    """Φ₀ = W₀/s₀ (fp32) in its container: int8 codes round(clamp(Φ₀) · 2^(8-b)), or a bf16/fp32 copy."""
    if container == "int8":
        qmin, qmax = grid(bits)
        return torch.round(phi.clamp(qmin, qmax) * 2.0 ** (8 - bits)).to(torch.int8)
    return phi.to(CONTAINERS[container])


def latent(phi: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, unit: float) -> torch.Tensor:
    """Z = Φ₀ + (α/r)·B·A as a new fp32 (m, n) tensor, the only full-size fp32 temporary: Φ₀'s fp32
    copy, scaled to its value, then B·A accumulated into it by one in-place GEMM (mixed-dtype in-place
    arithmetic on the CPU would add a converted full-size copy)."""
    z = phi.float()
    if unit != 1.0:
        z.mul_(unit)
    return z.addmm_(B.float(), A.float(), alpha=scaling)


def integer_weight(phi: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, unit: float,
                   bits: int) -> torch.Tensor:
    """W_int = clamp(round(Z), q_min, q_max) as fp32 (integer values)."""
    qmin, qmax = grid(bits)
    return latent(phi, A, B, scaling, unit).round_().clamp_(qmin, qmax)


def row_dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_j a_ij b_ij per row in fp32, in pieces of :data:`ROW_CHUNK` entries (no full-size product or copy)."""
    rows = max(1, ROW_CHUNK // max(a.shape[1], 1))
    return torch.cat([(a[i:i + rows].float() * b[i:i + rows].float()).sum(dim=1) for i in range(0, a.shape[0], rows)])


class LRQATWeight(torch.autograd.Function):
    """y = x Ŵᵀ with Ŵ = s · clamp(round_STE(Φ₀ + c·B·A)) rebuilt in the forward and again in the backward:
    only x is saved (Φ₀, A, B, s are the module's own tensors).

    Gradients, with G = gyᵀ x (m x n) and the mask M = [q_min <= round(Z) <= q_max]:
    dx = (gy · diag(s)) W_int; ds_i = Σ_j G_ij W_int_ij (where s_i >= eps); dZ = (s ⊙ G) ⊙ M;
    dB = c · dZ Aᵀ; dA = c · Bᵀ dZ. Full-size temporaries: the fp32 Z (then W_int, then dZ), the bool
    mask, and one matrix of the compute dtype (W_int for dx, then G); in the forward Z and Ŵ.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, phi: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: torch.Tensor,
                spec: tuple[float, float, int]) -> torch.Tensor:
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        with torch.autocast(device, enabled=False):
            xc = x.to(dtype)  # under autocast the bf16 copy of the input, as autocast's own linear makes and saves
            scaling, unit, bits = spec
            w = integer_weight(phi, A, B, scaling, unit, bits).mul_(s.clamp(min=SCALE_EPS)[:, None])
            y = F.linear(xc, w.to(dtype))  # bf16: one rounding of the exact fp32 product
            del w
        ctx.save_for_backward(xc, phi, A, B, s)
        ctx.spec, ctx.x_dtype = spec, x.dtype
        return y

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        xc, phi, A, B, s = ctx.saved_tensors
        scaling, unit, bits = ctx.spec
        qmin, qmax = grid(bits)
        dtype = xc.dtype
        with torch.autocast(gy.device.type, enabled=False):
            gy = gy.to(dtype)
            z = latent(phi, A, B, scaling, unit).round_()
            outside = (z < qmin).logical_or_(z > qmax)  # the STE passes the gradient inside the clamp only
            z.clamp_(qmin, qmax)  # W_int
            s_eff = s.clamp(min=SCALE_EPS)
            gx = None
            if ctx.needs_input_grad[0]:  # (gy · diag(s)) W_int; W_int is exact in bf16 (integers <= 128)
                gs_y = gy * s_eff.to(dtype)
                gx = torch.matmul(gs_y, z if dtype == torch.float32 else z.to(dtype)).to(ctx.x_dtype)
                del gs_y
            g = torch.mm(gy.reshape(-1, gy.shape[-1]).t(), xc.reshape(-1, xc.shape[-1]))  # G = gyᵀ x
            gs = row_dots(g, z).mul_(s >= SCALE_EPS)  # Σ_j G_ij W_int_ij
            dz = z.copy_(g).mul_(s_eff[:, None]).masked_fill_(outside, 0.0)  # (s ⊙ G) ⊙ M, fp32, in z's storage
            del g, outside
            gB = torch.mm(dz, A.float().t()).mul_(scaling)
            gA = torch.mm(B.float().t(), dz).mul_(scaling)
        return gx, None, gA.to(A.dtype), gB.to(B.dtype), gs.to(s.dtype), None


class LRQATLinear(Reparameterized):
    """A target projection trained by LR-QAT: ``phi`` (Φ₀ in its container, a persistent buffer), ``lora_A``
    (r, n), ``lora_B`` (m, r), ``scale`` (m,)."""

    def __init__(self, base: nn.Linear, rank: int, lora_alpha: float, bits: int, container: str,
                 scale_init: str = "lp", lp_norm: float = 4.0, scale_grid: int = 100):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.bits, self.container = rank, bits, container
        self.scaling = lora_alpha / rank  # α/r
        self.unit = container_unit(bits, container)
        w = base.weight.detach()
        with torch.no_grad():
            s0 = initial_scales(w, bits, scale_init, lp_norm, scale_grid)
            self.register_buffer("phi", to_container(w.float() / s0[:, None], bits, container))
        self.scale = nn.Parameter(s0.to(w.dtype))
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=w.device, dtype=w.dtype))
        kaiming_uniform_(self.lora_A)

    @property
    def spec(self) -> tuple[float, float, int]:
        return self.scaling, self.unit, self.bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return LRQATWeight.apply(x, self.phi, self.lora_A, self.lora_B, self.scale, self.spec)

    @torch.no_grad()
    def fused_codes(self) -> torch.Tensor:
        """B·A fused into the integer grid: W_int = clamp(round(Φ₀ + (α/r)·B·A)) as int8 codes (Ŵ = s · W_int)."""
        return integer_weight(self.phi, self.lora_A, self.lora_B, self.scaling, self.unit, self.bits).to(torch.int8)

    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        """The dequantised fused weight s · W_int in fp32: the training-time Ŵ (exactly so in fp32)."""
        return self.fused_codes().float().mul_(self.scale.float().clamp(min=SCALE_EPS)[:, None])

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bits={self.bits}, container={self.container}, scaling={self.scaling:g}")


def lr_qat_modules(model: nn.Module) -> list[LRQATLinear]:
    return [m for m in model.modules() if isinstance(m, LRQATLinear)]


# -- config and plugin ----------------------------------------------------------------------------------------


@dataclass
class LRQATConfig(TargetsConfig):
    rank: int = 32  # r
    lora_alpha: float = 1.0  # α: B·A is scaled by α/r inside the rounding
    bits: int = 4  # b: the signed symmetric grid [-2^(b-1), 2^(b-1) - 1]
    container: str = "int8"  # Φ₀'s storage: int8 (fixed point, b integer + 8 - b fraction bits) | bf16 | fp32
    scale_lr: float = 1e-5  # learning rate of the per-channel scales s (their own parameter group)
    scale_init: str = "lp"  # s₀ per output channel: lp (grid search on the L_p error, p = lp_norm) | minmax
    lp_norm: float = 4.0
    scale_grid: int = 100  # candidate clipping thresholds of scale_init=lp
    train_rest: bool = True  # embeddings, norms, LM head trained (false: the reference's --param-group lora)
    init_from: str | None = None  # a full-rank checkpoint (step_N dir or run dir) whose weights are W₀

    def validate(self) -> None:
        super().validate()
        check(self.rank > 0, "method.rank", self.rank, "must be > 0")
        check(2 <= self.bits <= 8, "method.bits", self.bits,
              "must be in [2, 8] (the integer grid lives in an int8 container)")
        check(self.container in CONTAINERS, "method.container", self.container, f"allowed: {', '.join(CONTAINERS)}")
        check(self.lora_alpha > 0, "method.lora_alpha", self.lora_alpha, "must be > 0")
        check(self.scale_lr >= 0, "method.scale_lr", self.scale_lr, "must be >= 0 (0 keeps the scales fixed)")
        check(self.scale_init in SCALE_INITS, "method.scale_init", self.scale_init, f"allowed: {', '.join(SCALE_INITS)}")
        check(self.lp_norm > 0, "method.lp_norm", self.lp_norm, "must be > 0")
        check(self.scale_grid >= 1, "method.scale_grid", self.scale_grid, "must be >= 1")
        if self.init_from is not None:
            warm_start_file(self.init_from, "method.init_from")

    def validate_for_model(self, model_cfg: ModelConfig) -> None:
        check_rank_for_model(self.rank, model_cfg, list(self.targets))
        if self.init_from is not None:
            check_warm_start_fits(self.init_from, model_cfg, "method.init_from")


@register_method("lr_qat")
class LRQAT(Method):
    """Quantization-aware low-rank training: frozen quantised Φ₀, trained A, B (inside the rounding) and s."""

    Config = LRQATConfig
    cfg: LRQATConfig

    def prepare_model(self, model: nn.Module) -> nn.Module:
        c = self.cfg
        if c.init_from is not None:
            load_warm_start(model, c.init_from)
        reparameterize(model, list(c.targets), lambda _q, lin: LRQATLinear(
            lin, c.rank, c.lora_alpha, c.bits, c.container, c.scale_init, c.lp_norm, c.scale_grid))
        if not c.train_rest:
            ours = {id(p) for m in lr_qat_modules(model) for p in m.parameters()}
            for p in model.parameters():
                if id(p) not in ours:
                    p.requires_grad_(False)
        return model

    def param_groups(self, model: nn.Module, optim_cfg: OptimConfig) -> list[dict[str, Any]]:
        """The rest of the model as in full training; A and B without weight decay (the reference's LoRA
        group); the scales in their own group at ``method.scale_lr``, without weight decay."""
        modules = lr_qat_modules(model)
        factors = [p for m in modules for p in (m.lora_A, m.lora_B)]
        scales = [m.scale for m in modules]
        ours = {id(p) for p in factors + scales}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ours]
        groups = [{"params": [p for p in rest if p.ndim >= 2], "weight_decay": optim_cfg.weight_decay},
                  {"params": [p for p in rest if p.ndim < 2], "weight_decay": 0.0},
                  {"params": factors, "weight_decay": 0.0},
                  {"params": scales, "weight_decay": 0.0, "lr": self.cfg.scale_lr}]
        return [g for g in groups if g["params"]]

    # -- accounting -----------------------------------------------------------------------------------------
    def _targets(self, model_cfg: ModelConfig) -> list[tuple[int, int]]:
        return list(target_shapes(model_cfg, list(self.cfg.targets)).values())

    def cost(self, model_cfg: ModelConfig, seq_len: int) -> dict[str, float]:
        """``params``: what is stored as parameters (A, B, s and the rest); ``quantized_params``: the
        frozen Φ₀ entries held as container codes (their bytes are in ``buffer_bytes``)."""
        r, L, c = self.cfg.rank, model_cfg.n_layers, self.cfg
        shapes = self._targets(model_cfg)
        quantized = float(L * sum(m * n for m, n in shapes))
        adapters = float(L * sum(r * (m + n) + m for m, n in shapes))  # A, B and s
        dense = float(param_count(model_cfg))
        V, d = model_cfg.vocab_size, model_cfg.dim
        flops = flops_per_token(model_cfg, seq_len) - (0.0 if c.train_rest else 2.0 * V * d)  # no head weight grad
        largest = max(max(max(r * n, m * r) for m, n in shapes), V * d if c.train_rest else 0)
        itemsize = torch.empty((), dtype=CONTAINERS[c.container]).element_size()
        return {"params": dense - quantized + adapters, "trainable_params": (dense - quantized if c.train_rest else 0.0) + adapters,
                "flops_per_token": flops, "quantized_params": quantized,
                "buffer_bytes": rope_bytes(model_cfg) + itemsize * quantized,
                "autocast_params": float(V * d + (2 * L + 1) * d), "largest_trainable": float(largest),
                "head_grad_params": float(V * d if c.train_rest else 0)}

    def optimizer_state_bytes(self, model_cfg: ModelConfig, optim_cfg: OptimConfig) -> float:
        """AdamW tensor by tensor: A, B and s of every target; embeddings, head and norms if trained."""
        r, L, d, V = self.cfg.rank, model_cfg.n_layers, model_cfg.dim, model_cfg.vocab_size
        tensors = [t for m, n in self._targets(model_cfg) for t in (r * n, m * r, m)] * L
        if self.cfg.train_rest:
            tensors += [V * d] * (1 if model_cfg.tie_embeddings else 2) + [d] * (2 * L + 1)
        bits = optim_cfg.state_bits
        return sum(moment_pair_bytes(t, bits) + 4.0 for t in tensors)

    def activation_bytes(self, model_cfg: ModelConfig, recompute: str, recompute_every: int, precision: str) -> float:
        """A plain block's (the autograd function saves the input the plain linear saves), less, with
        ``train_rest=false``, what frozen norms, embedding and head leave unsaved (measured on torch 2.13,
        tests/test_lr_qat.py): each RMSNorm's normalised value (kept for its weight's gradient), in the
        first block (whose input needs no gradient) also its norm's fp32 input copy and 1/rms, the LM
        head's input, and two fp32 values per token; checkpointed blocks save their input either way."""
        total = super().activation_bytes(model_cfg, recompute, recompute_every, precision)
        if self.cfg.train_rest:
            return total
        d, res, act = model_cfg.dim, residual_itemsize(precision), activation_itemsize(precision)
        unsaved = (res + act) * d + 8.0
        for i in range(model_cfg.n_layers):
            if recompute == "none" or i % recompute_every:
                unsaved += 2 * res * d + (4.0 * d + 4.0 if i == 0 else 0.0)
        return total - unsaved

    def module_temp_bytes(self, model_cfg: ModelConfig, precision: str) -> float:
        """The rebuild of the largest target's Ŵ in the backward (:class:`LRQATWeight`): the fp32 latent Z
        (then W_int, then dZ), the bool mask, and one m x n matrix of the compute dtype (W_int for dx, then
        G = gyᵀx); the forward holds less (Z and Ŵ; in fp32 Ŵ is Z scaled in place)."""
        mn = max(m * n for m, n in self._targets(model_cfg))
        pieces = min(mn, ROW_CHUNK) * (4.0 + (4.0 if precision != "fp32" else 0.0))  # row_dots: a product (+ G's fp32 copy)
        return float(mn * (4 + 1 + activation_itemsize(precision))) + pieces
