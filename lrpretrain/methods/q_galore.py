"""Q-GaLore (Zhang et al., arXiv 2407.08296; VITA-Group/Q-GaLore, PyPI q-galore-torch): GaLore with INT8
weights updated by stochastic rounding, INT4 projection bases and a layer-adaptive lazy refresh.

Every target projection keeps its weight only as INT8 codes with an fp32 scale and minimum per group
of 256 entries (:func:`lrpretrain.optim.quantized.minmax_quantize`): there is no high-precision copy.
Its forward dequantizes the weight into the activations' dtype (again in the backward: nothing but the
input is saved, as by a plain linear); the weight's gradient reaches the optimizer through a
*gradient handle*, a parameter broadcast from a single value (``<target>.grad_handle.weight``: two
bytes under pure bf16) whose ``.grad`` is the m x n gradient. So gradient accumulation, global-norm
clipping, the non-finite guard and per-layer updates treat it as any weight's gradient, and the
trainer knows nothing of it. The optimizer (:class:`lrpretrain.optim.q_galore.QGaLoreAdamW`) steps a
handle by GaLore's step on the dequantized weight and re-quantizes the result with stochastic
rounding; its bases are stored in INT4 and refreshed lazily (see its module docstring). Everything
else (embeddings, LM head, norms) trains in the trainer's precision with plain Adam, as in GaLore.

Read in VITA-Group/Q-GaLore (q_galore_torch/, run_pretrain.py, scripts/); of the paper only its
abstract and a summary could be retrieved here. Differences, on purpose:

- Min-max groups keep the group's minimum (fp32) as the offset instead of the reference's integer zero
  point clamped into [0, 255] (see :mod:`lrpretrain.optim.quantized`: the reference's grid shift biases
  stochastic rounding next to a group's extremes, and its clamp breaks groups that do not straddle 0);
  scales are fp32 (the reference's turn bf16 after the first update under bf16 training).
- Stochastic rounding draws its bits from a position-based generator (seed, the weight's slot, its
  update count), not from the global RNG (``torch.rand_like``): per-layer updates equal the global
  step and a resumed run continues bit for bit; the probability of rounding up is the fraction to
  within 2^-16.
- The 4-bit codes of the bases are packed two per byte (the reference keeps one 4-bit code per uint8).
- Global-norm clipping covers the INT8 weights' gradients too (the reference clips only the float
  parameters: its INT8 gradients live outside ``.grad``).
- Per-layer updates step once per update (the reference's per-layer mode steps at every micro-batch
  and doubles its gaps and schedule to compensate, METHODS.md §1f); weight decay, where set, is
  applied before the update (as GaLore here).
- Distributed training is refused (the reference's INT8 path is single-GPU too): DDP and FSDP2 would
  broadcast or shard the handles but not the INT8 buffers.

Choices where the paper and the reference are silent:

- Any ``trainer.precision`` works: under ``pure_bf16`` (the paper's setting, the 7B presets') the
  handles' gradients and the activations are bf16; under fp32 everything not INT8 is fp32.
- The lazy refresh compares the signed cosine similarity of the first singular vectors, as the
  reference (singular vectors are defined up to sign; LAPACK's are deterministic for a given input);
  ``gamma_proj=0`` freezes a weight's basis once the rule fires (the issue's "stops refreshing").
- Initial weights are quantized to nearest (the reference's ``_quantize``); every later write rounds
  stochastically (``stochastic_round=false``: to nearest).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from lrpretrain.errors import check
from lrpretrain.methods import register_method
from lrpretrain.methods.base import Reparameterized
from lrpretrain.methods.subspace import SubspaceConfig, SubspaceMethod, target_shapes
from lrpretrain.methods.targets import select_targets
from lrpretrain.methods.toolkit import reparameterize, seeded_generator
from lrpretrain.model.memory import activation_itemsize, rope_bytes
from lrpretrain.optim import quantized
from lrpretrain.optim.memory import elementwise_temp_bytes, projected_step_temp_bytes, svd_temp_bytes
from lrpretrain.optim.projector import projection_side
from lrpretrain.optim.q_galore import QGaLoreAdamW

if TYPE_CHECKING:
    from lrpretrain.config import ModelConfig, OptimConfig


@dataclass
class QGaLoreConfig(SubspaceConfig):
    """Q-GaLore's C4 defaults (scripts/pretrain_c4/llama_60m.sh): r 128, α 0.25, T 200, 8-bit Adam."""

    state_bits: int = 8  # the reference's Adam is bitsandbytes' 8-bit (q_galore_adamw8bit)
    weight_bits: int = 8  # INT8 weights (the reference implements 8 only)
    weight_group_size: int = 256  # entries per scale and minimum
    stochastic_round: bool = True  # INT8 writes round stochastically (false: to nearest)
    proj_quant: bool = True  # store the bases quantized
    proj_bits: int = 4  # INT4 bases
    proj_group_size: int = 256
    cos_threshold: float = 0.4  # the lazy refresh fires when the mean similarity of the last queue_size refreshes >= this
    gamma_proj: float = 2.0  # ... and multiplies that weight's gap by this (0: stops refreshing it)
    queue_size: int = 5

    def validate(self) -> None:
        super().validate()
        check(self.weight_bits == 8, "method.weight_bits", self.weight_bits, "allowed: 8 (INT8 weights)")
        check(self.proj_bits in (4, 8), "method.proj_bits", self.proj_bits, "allowed: 4, 8")
        for key in ("weight_group_size", "proj_group_size"):
            value = getattr(self, key)
            check(value > 0 and value % 2 == 0, f"method.{key}", value, "must be an even number > 0")
        check(-1.0 <= self.cos_threshold <= 1.0, "method.cos_threshold", self.cos_threshold, "must be in [-1, 1]")
        check(self.gamma_proj == 0 or self.gamma_proj >= 1, "method.gamma_proj", self.gamma_proj,
              "must be >= 1 (the factor a stable weight's gap grows by) or 0 (stop refreshing it)")
        check(self.queue_size >= 1, "method.queue_size", self.queue_size, "must be >= 1")


class GradientHandle(nn.Module):
    """A parameter broadcast from one value, shaped as the weight it stands for: the weight's gradient
    accumulates in its ``.grad``. Not in the state dict (it holds nothing)."""

    def __init__(self, shape: tuple[int, int], dtype: torch.dtype, device: torch.device | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros((), dtype=dtype, device=device).expand(shape))

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        pass

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        pass


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class _Int8Linear(torch.autograd.Function):
    """y = x·deq(W)ᵀ; the backward dequantizes W again for the input gradient and returns the weight's
    gradient (output gradientᵀ · input) as the handle's."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, handle: torch.Tensor, module: Int8Linear) -> torch.Tensor:
        x = x.to(_compute_dtype(x))
        ctx.module = module
        ctx.save_for_backward(x)
        return F.linear(x, module.weight_as(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        grad_x = grad @ ctx.module.weight_as(grad.dtype) if ctx.needs_input_grad[0] else None
        grad_w = grad.reshape(-1, grad.shape[-1]).T @ x.reshape(-1, x.shape[-1]) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w, None


class Int8Linear(Reparameterized):
    """A target projection whose weight is INT8 group-wise codes (buffers ``weight_codes``,
    ``weight_scales``, ``weight_mins``); its gradient goes to ``grad_handle.weight``."""

    def __init__(self, base: nn.Linear, bits: int = 8, group: int = 256):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.bits, self.group = bits, group
        w = base.weight.detach()
        for key, t in quantized.minmax_quantize(w, bits, group).items():
            self.register_buffer(f"weight_{key}", t)
        self.grad_handle = GradientHandle((self.out_features, self.in_features), w.dtype, w.device)

    def _q(self) -> quantized.Quantized:
        return {"codes": self.weight_codes, "scales": self.weight_scales, "mins": self.weight_mins}

    def weight_as(self, dtype: torch.dtype) -> torch.Tensor:
        return quantized.minmax_dequantize(self._q(), self.bits, self.group, (self.out_features, self.in_features), dtype)

    # the optimizer's view (lrpretrain.optim.q_galore.QuantizedWeight)
    def dequantize(self) -> torch.Tensor:
        return self.weight_as(torch.float32)

    @torch.no_grad()
    def store_(self, weight: torch.Tensor, random_bits) -> None:
        for key, t in quantized.minmax_quantize(weight, self.bits, self.group, random_bits).items():
            getattr(self, f"weight_{key}").copy_(t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Int8Linear.apply(x, self.grad_handle.weight, self)

    def dense_weight(self) -> torch.Tensor:
        return self.dequantize()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int{self.bits}, group={self.group}"


@register_method("q_galore")
class QGaLore(SubspaceMethod):
    Config = QGaLoreConfig
    cfg: QGaLoreConfig
    unsupported_strategies = {
        "ddp": "its INT8 weights are buffers its optimizer rewrites behind broadcast gradient handles, which DDP "
               "cannot broadcast or bucket (the reference's INT8 path is single-GPU too)",
        "fsdp2": "it would shard Q-GaLore's gradient handles but not its INT8 weights (buffers)",
        "deepspeed": "it would partition Q-GaLore's gradient handles but not its INT8 weights (buffers)",
    }
    salt = 0x51476C72  # decorrelates the rounding stream from the run's other seeded streams

    def __init__(self, cfg, model_cfg):
        super().__init__(cfg, model_cfg)
        self._modules: dict[torch.Tensor, Int8Linear] = {}
        self.seed = 0

    def prepare_model(self, model: nn.Module) -> nn.Module:
        c = self.cfg
        reparameterize(model, list(c.targets), lambda _q, lin: Int8Linear(lin, c.weight_bits, c.weight_group_size))
        self.seed = int(seeded_generator(self.salt).initial_seed())
        return model

    def projected_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        modules = [m for _, m in select_targets(model, list(self.cfg.targets)) if isinstance(m, Int8Linear)]
        self._modules = {m.grad_handle.weight: m for m in modules}  # for the optimizer (build_optimizer)
        return list(self._modules)

    def group_options(self) -> dict[str, Any]:
        c = self.cfg
        return {**super().group_options(), "cos_threshold": c.cos_threshold, "gamma_proj": c.gamma_proj,
                "queue_size": c.queue_size}

    def make_optimizer(self, groups, **kw) -> QGaLoreAdamW:
        c = self.cfg
        return QGaLoreAdamW(groups, quantized=self._modules, stochastic_round=c.stochastic_round,
                            proj_bits=c.proj_bits if c.proj_quant else 0, proj_group_size=c.proj_group_size,
                            seed=self.seed, **kw)

    def after_step(self, ctx) -> None:
        super().after_step(ctx)
        grown = sum(s.get("lazy_growths", 0) for s in ctx.optimizer.state.values())
        if grown != getattr(self, "_grown_logged", 0):
            ctx.log({"lazy_refresh_growths": grown})
            self._grown_logged = grown

    # -- accounting --------------------------------------------------------------------------------------
    def cost(self, model_cfg: ModelConfig, seq_len: int) -> dict[str, float]:
        """``params``: what is stored as parameters (embeddings, LM head, norms, projections that are not
        targets, one entry per gradient handle); ``trainable_params``: what has a gradient (the targets'
        m x n included); the INT8 weights are ``quantized_params``, their bytes in ``buffer_bytes``."""
        out = super().cost(model_cfg, seq_len)
        L = model_cfg.n_layers
        shapes = list(target_shapes(model_cfg, list(self.cfg.targets)).values())
        q = L * sum(m * n for m, n in shapes)
        handles = L * len(shapes)
        out["params"] = out["params"] - q + handles
        out["kahan_params"] = out["params"] - handles  # the INT8 weights round stochastically, no buffer
        out["quantized_params"] = float(q)
        out["buffer_bytes"] = rope_bytes(model_cfg) + L * sum(
            quantized.minmax_bytes(m * n, self.cfg.weight_bits, self.cfg.weight_group_size) for m, n in shapes)
        out["largest_trainable"] = float(max(model_cfg.vocab_size * model_cfg.dim, *(m * n for m, n in shapes)))
        return out

    def basis_bytes(self, shape: tuple[int, int]) -> int:
        """The INT4 (or INT8) codes of the basis with their scales and minima, or the unquantized basis."""
        if not self.cfg.proj_quant:
            return super().basis_bytes(shape)
        m, n = shape
        rank = min(self.cfg.rank, min(shape))
        return quantized.minmax_bytes(rank * (m if self.side(shape) == "left" else n), self.cfg.proj_bits,
                                      self.cfg.proj_group_size)

    def side(self, shape: tuple[int, int]) -> str:
        return projection_side(self.cfg.proj_type, shape)

    def extra_bytes(self, shape: tuple[int, int]) -> int:
        """The first singular vector of the last refresh (fp32) and the queue of similarities."""
        m, n = shape
        return 4 * (m if self.side(shape) in ("left", "full") else n) + 4 * self.cfg.queue_size

    def step_temp_bytes(self, model_cfg: ModelConfig, optim_cfg: OptimConfig, precision: str) -> float:
        """The larger of the plain-Adam step of the embedding and a target's step: its fp32 weight and
        (unless fp32 already) gradient, GaLore's projected step on them, the dequantized basis, the
        INT8 re-quantization of one piece; at a refresh the SVD."""
        worst = elementwise_temp_bytes(float(model_cfg.vocab_size * model_cfg.dim), self.state_bits(optim_cfg), precision)
        bits = self.state_bits(optim_cfg)
        for shape in target_shapes(model_cfg, self.cfg.targets).values():
            m, n = shape
            ms = self.moment_shape(shape) or shape
            basis_entries = self.basis_bytes(shape) / 4 if not self.cfg.proj_quant else \
                min(self.cfg.rank, min(shape)) * (m if self.side(shape) == "left" else n)
            copies = 4.0 * m * n * (1 if precision == "fp32" else 2)
            step = copies + projected_step_temp_bytes(shape, ms, basis_entries, bits, "fp32", 1)
            requant = 13.0 * min(m * n, quantized.PIECE)
            refresh = copies + svd_temp_bytes(shape)
            worst = max(worst, step + requant, refresh)
        return worst

    def backward_temp_bytes(self, model_cfg: ModelConfig, optim_cfg: OptimConfig, precision: str, tokens: int,
                            accumulation: int, recompute: str = "none", recompute_every: int = 1) -> float:
        """A target's input gradient dequantizes its weight (fp32, then the activations' dtype)."""
        m, n = max(target_shapes(model_cfg, self.cfg.targets).values(), key=lambda s: s[0] * s[1])
        item = activation_itemsize(precision)
        return (4.0 + (item if item != 4 else 0)) * m * n
