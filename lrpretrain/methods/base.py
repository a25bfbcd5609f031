"""The method plugin contract.

A method decides how target weights are parameterized and/or how their gradients are turned into
updates, and what happens every N steps. The trainer only calls these hooks; it never asks which
method is running. Every hook has a default that means "plain full-rank training", so a plugin
overrides only what it changes. See DESIGN.md ("Method plugin contract").

A module that replaces a target ``nn.Linear`` subclasses :class:`Reparameterized` and states its
function as one dense weight: the default export (:meth:`Method.dense_weights`) and merging rely on it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from omegaconf import MISSING
from torch import nn

from lrpretrain.errors import UserError
from lrpretrain.model.llama import flops_per_token, param_count
from lrpretrain.model.memory import activation_itemsize, largest_trainable, llama_layer_bytes
from lrpretrain.optim import AdamW, ParamwiseOptimizer
from lrpretrain.optim.memory import adamw_state_bytes, elementwise_temp_bytes

if TYPE_CHECKING:
    from lrpretrain.config import ModelConfig, OptimConfig


@dataclass
class MethodConfig:
    """Base of every method's config dataclass (``conf/method/<name>.yaml`` fills it)."""

    name: str = MISSING

    def validate(self) -> None:
        """Check the method's own values; raise ConfigError with one line."""

    def validate_for_model(self, model_cfg: ModelConfig) -> None:
        """Checks that need the model's shapes (a rank against min(m, n)); run before any heavy work."""

    def resolve_for_precision(self, precision: str) -> None:
        """Resolve keys whose default follows ``trainer.precision`` (``auto`` values), once, when the
        run's config is loaded, so the run's config.yaml holds the value used."""


@dataclass
class StepContext:
    """What ``after_step`` sees after optimizer update number ``step`` (1-based) is applied; what
    ``before_step`` sees before the update whose 0-based index is ``step`` (the updates done so far)
    runs its first forward (``loss`` is then nan)."""

    step: int
    model: nn.Module
    optimizer: torch.optim.Optimizer
    lr: float
    loss: float
    log: Callable[[dict[str, Any]], None] = field(default=lambda _m: None)  # add metrics for this step
    micro_batches: int = 1  # forward + backward passes of this update (gradient accumulation) on this rank


# -- modules that replace a target Linear (what export and merging rely on) ----------------------------


class Reparameterized(nn.Module):
    """Base of a module that replaces a target ``nn.Linear(in_features, out_features, bias=False)``."""

    in_features: int
    out_features: int

    def dense_weight(self) -> torch.Tensor:
        """The module's function as one (out_features, in_features) matrix, in fp32."""
        raise NotImplementedError(f"{type(self).__name__} cannot be written as a dense weight")


def reparameterized_modules(model: nn.Module) -> list[tuple[str, Reparameterized]]:
    return [(q, m) for q, m in model.named_modules() if isinstance(m, Reparameterized)]


@torch.no_grad()
def dense_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state as a plain LLaMA's: every reparameterized module becomes ``<name>.weight``.

    Raises NotImplementedError (with the module's name) where a module has no dense form (CoLA).
    """
    modules = reparameterized_modules(model)
    out = {}
    for key, value in model.state_dict().items():
        if not any(key.startswith(q + ".") for q, _ in modules):
            out[key] = value.detach()
    for q, m in modules:
        out[f"{q}.weight"] = m.dense_weight().detach()
    return out


def dense_param_groups(params: Iterable[torch.Tensor], weight_decay: float) -> list[dict[str, Any]]:
    """Full training's groups of the trainable ``params``: matrices with weight decay, norms and vectors
    without (a plugin with groups of its own puts the remaining parameters in these)."""
    decay, no_decay = [], []
    for p in params:
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


class Method:
    """Full-rank training: the defaults of every hook."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    # distributed strategies this method cannot run under, each with the reason (refused at config time
    # with it; see lrpretrain/distributed/)
    unsupported_strategies: ClassVar[dict[str, str]] = {}

    @classmethod
    def strategy_refusal(cls, strategy: str, cfg: Any) -> str | None:
        """Why this method cannot train correctly under ``distributed.strategy=strategy`` with this config
        (one line, shown at config time), or None. Default: ``unsupported_strategies``."""
        return cls.unsupported_strategies.get(strategy)

    @classmethod
    def per_layer_refusal(cls, cfg: Any) -> str | None:
        """Why this method cannot step one parameter at a time inside the backward
        (``trainer.per_layer_update=true``; one line, shown at config time), or None."""
        return None

    def __init__(self, cfg: MethodConfig, model_cfg: ModelConfig):
        self.cfg = cfg
        self.model_cfg = model_cfg
        # how the method's fused ops run (lrpretrain/kernels): torch (the PyTorch references) or triton; set
        # from trainer.kernels, for the run's device, before prepare_model (by the trainer and by estimate)
        self.kernels = "torch"

    # -- once, before wrapping -------------------------------------------------------------
    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Module surgery (replace target Linears, rewire blocks). Runs before any wrapping."""
        return model

    def param_groups(self, model: nn.Module, optim_cfg: OptimConfig) -> list[dict[str, Any]]:
        """Parameter groups for the optimizer: matrices get weight decay, norms and vectors do not."""
        return dense_param_groups(model.parameters(), optim_cfg.weight_decay)

    def build_optimizer(self, groups: list[dict[str, Any]], optim_cfg: OptimConfig) -> ParamwiseOptimizer:
        """A :class:`~lrpretrain.optim.ParamwiseOptimizer` (so per-layer updates can step it)."""
        return AdamW(groups, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps,
                     weight_decay=optim_cfg.weight_decay, state_bits=optim_cfg.state_bits)

    def recompute_policy(self) -> Callable[[nn.Module], None] | None:
        """The method's own activation recomputation, for ``trainer.recompute=method``.

        A function the trainer applies once to the prepared model (after ``prepare_model``, before
        any wrapping) to install the method's checkpointing, e.g. CoLA-M's segments whose
        boundaries are the r-dimensional activations. None: the method has no policy of its own
        (``trainer.recompute=method`` is then a config error).
        """
        return None

    # -- every optimizer update --------------------------------------------------------------
    def lr_factor(self, step: int) -> float:
        """Multiplies the base schedule at update ``step`` (0-based), e.g. ReLoRA's jagged restarts."""
        return 1.0

    def before_step(self, ctx: StepContext) -> None:
        """Before the first forward of an update (``ctx.step``: its 0-based index; ``ctx.micro_batches``:
        the forward/backward passes it will run). A method that needs something from this update's
        backward beyond the parameters' gradients arms its modules here: LoQT takes the full gradient
        of its quantized weights (which are not parameters) at its update steps, in its modules'
        backward, once the last micro-batch's gradient is complete. The trainer knows nothing of it."""

    def after_step(self, ctx: StepContext) -> None:
        """Periodic work after an update: merges, switches, resampling, optimizer resets."""

    # -- checkpoints and export -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """State not held by the model or the optimizer (sampling RNGs, counters). Plain tensors/ints."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def dense_weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The function as dense LLaMA weights (names of the unmodified model), for export.

        Every :class:`Reparameterized` module becomes ``<name>.weight``
        through its ``dense_weight()``; a module without a dense form (CoLA's non-linear bottleneck,
        CR-Net's cross-layer term) makes this one clear error.
        """
        try:
            return dense_state_dict(model)
        except NotImplementedError as e:
            raise UserError(f"method={self.name} cannot be exported as dense LLaMA weights: {e}; "
                            "use the checkpoint's own state_dict") from e

    # -- accounting ---------------------------------------------------------------------------
    def trainable_parameters(self, model: nn.Module) -> int:
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    def cost(self, model_cfg: ModelConfig, seq_len: int) -> dict[str, float]:
        """Analytic parameters and training FLOPs per token (6N + attention), for MFU and estimates.

        Required keys: ``params``, ``trainable_params``, ``flops_per_token``. Optional keys read by
        ``lrpretrain estimate``: ``buffer_bytes`` (every non-parameter tensor of the model; default:
        the RoPE tables), ``method_state_bytes`` (tensors the plugin holds outside the model and the
        optimizer), ``largest_trainable`` (entries of the largest trainable tensor; default: the
        embedding's), ``quantized_params`` (weights stored quantized in buffers, not as parameters:
        not in ``params``, shown beside it; their bytes are in ``buffer_bytes``), ``kahan_params``
        (trained entries that get a bf16 compensation buffer under ``trainer.bf16_update=kahan``;
        default: ``trainable_params``), ``autocast_params`` (entries of the weights that bf16 autocast
        casts and keeps a bf16 copy of; default: every parameter but the embedding's),
        ``head_grad_params`` (entries of the LM head's gradient; default V·d, 0 for a frozen head).
        """
        n = param_count(model_cfg)
        return {"params": float(n), "trainable_params": float(n), "flops_per_token": flops_per_token(model_cfg, seq_len)}

    def optimizer_state_bytes(self, model_cfg: ModelConfig, optim_cfg: OptimConfig) -> float:
        """Analytic bytes of the optimizer's state (for ``lrpretrain estimate``).

        Default: AdamW (fp32 or ``optim.state_bits=8`` moments) on ``cost()``'s trainable parameters;
        a method whose optimizer keeps other state overrides it (the GaLore family's projected moments).
        """
        trainable = self.cost(model_cfg, 1)["trainable_params"]
        return adamw_state_bytes(model_cfg, trainable, optim_cfg.state_bits)

    def step_temp_bytes(self, model_cfg: ModelConfig, optim_cfg: OptimConfig, precision: str) -> float:
        """Analytic bytes of the temporaries of the costliest single-parameter optimizer step (for
        ``lrpretrain estimate``): by default AdamW's element-wise step of the largest trainable tensor,
        in pieces (:func:`lrpretrain.optim.memory.elementwise_temp_bytes`)."""
        largest = self.cost(model_cfg, 1).get("largest_trainable", largest_trainable(model_cfg))
        bits = min(optim_cfg.state_bits, getattr(self.cfg, "state_bits", 32))
        return elementwise_temp_bytes(float(largest), bits, precision)

    def backward_temp_bytes(self, model_cfg: ModelConfig, optim_cfg: OptimConfig, precision: str, tokens: int,
                            accumulation: int, recompute: str = "none", recompute_every: int = 1) -> float:
        """Analytic bytes that the method's own work adds beside the activations at the start of the
        backward of its costliest update (for ``lrpretrain estimate``): what its modules compute or save
        beyond plain autograd (LoQT: the full gradient of a quantized weight with its SVD at an update
        step; a dequantized weight for the input gradient). ``tokens``: one micro-batch's;
        ``accumulation``: micro-batches per update; ``recompute``: ``trainer.recompute``, blocks 0, k,
        2k, ... checkpointed (k = ``recompute_every``). Default: nothing."""
        return 0.0

    def module_temp_bytes(self, model_cfg: ModelConfig, precision: str) -> float:
        """Bytes of the temporaries one of the method's modules holds while its forward or backward runs
        (a weight rebuilt from quantized codes), beside nearly every activation (for ``lrpretrain
        estimate``). Default: none beyond a plain matmul's."""
        return 0.0

    def activation_bytes(self, model_cfg: ModelConfig, recompute: str, recompute_every: int, precision: str) -> float:
        """Bytes per token that the decoder layers keep for the backward after a forward (all layers;
        the embedding, final norm, LM head and loss are counted by the estimator).

        ``precision``: ``fp32``, ``bf16`` (autocast) or ``pure_bf16``. Default: the plain LLaMA block's
        (:func:`lrpretrain.model.memory.llama_layer_bytes`), blocks 0, k, 2k, ... checkpointed under
        ``full|selective``. A method that changes what a block saves overrides it;
        ``recompute="method"`` is its own policy's figure.
        """
        if recompute == "method":
            raise NotImplementedError(f"method '{self.name}' has no activation model for its recompute policy")
        extra = activation_itemsize(precision) * self.layer_extra_values(model_cfg)  # bf16: an approximation
        total = 0.0
        for i in range(model_cfg.n_layers):
            checkpointed = recompute != "none" and i % recompute_every == 0
            total += llama_layer_bytes(model_cfg, recompute if checkpointed else "none", precision)
            total += 0.0 if checkpointed else extra
        return total

    def second_pass_bytes(self, model_cfg: ModelConfig, seq_len: int, recompute: str, recompute_every: int,
                          precision: str, grad_bytes: float, fused_loss: bool = False) -> tuple[float, float] | None:
        """For a method whose optimizer runs a second forward and backward inside its step (one that
        ``reevaluates``, DLRT's S-step), for ``lrpretrain estimate``: (bytes per token that this forward
        saves for its backward, the embedding, head and loss included; bytes held through it beside the
        weights and the optimizer states: gradients of the first pass kept for later, the step's own
        tensors). ``precision``: ``fp32``, ``bf16`` or ``pure_bf16``; ``grad_bytes``: bytes per gradient
        entry; ``fused_loss``: the loss is a fused head loss (``trainer.kernels``: no logits; it keeps its
        gradients instead, lrpretrain/kernels/head_loss.py). None (the default): no second pass."""
        return None

    def layer_extra_values(self, model_cfg: ModelConfig) -> float:
        """Values per token that the method's modules save in each decoder block beyond a plain block's
        (its r-dimensional activations, dropout copies, ...), for :meth:`activation_bytes`."""
        return 0.0
