"""LoRA trained from scratch: W = W0 + s·B·A with W0 the frozen random initialisation.

The baseline row "LoRA" of GaLore's Table 2: every target projection keeps its standard random
init as a frozen W0 and learns only the adapter (A Kaiming-uniform, B zero, s = lora_alpha / r);
embeddings, head and norms are trained in full. Defaults (r 128, α 32, dropout 0.1) are those of
the ReLoRA code base (Guitaricet/relora ``torchrun_main.py``, ``--use_peft`` without restarts),
the reference implementation of this baseline.

This file also holds :class:`LoRAWithRestarts`, the part ReLoRA and PeriodicLoRA share: every N
updates the adapter is merged into W0 (function unchanged) and training continues with a fresh one;
an optional linear re-warmup of the LR after each restart is composed with the base schedule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from lrpretrain.errors import check
from lrpretrain.methods import register_method
from lrpretrain.methods.base import Method, StepContext
from lrpretrain.methods.targets import TargetsConfig, expand_targets
from lrpretrain.methods.toolkit import (
    LoRALinear,
    check_rank_for_model,
    reparameterize,
    reparameterized_cost,
    restart_ramp,
    seeded_generator,
)

if TYPE_CHECKING:
    from lrpretrain.config import ModelConfig


@dataclass
class LoRAConfig(TargetsConfig):
    rank: int = 128  # r
    lora_alpha: float = 32.0  # α: the adapter is scaled by s = α / r
    lora_dropout: float = 0.1  # dropout on the adapter's input (ReLoRA's code uses 0.1)

    def validate(self) -> None:
        super().validate()
        check(self.rank > 0, "method.rank", self.rank, "must be > 0")
        check(self.lora_alpha > 0, "method.lora_alpha", self.lora_alpha, "must be > 0")
        check(0 <= self.lora_dropout < 1, "method.lora_dropout", self.lora_dropout, "must be in [0, 1)")

    def validate_for_model(self, model_cfg: ModelConfig) -> None:
        check_rank_for_model(self.rank, model_cfg, list(self.targets))

    @property
    def scale(self) -> float:
        return self.lora_alpha / self.rank


def lora_target_cost(rank: int):
    """Frozen W0 (m, n) + trained A (r, n), B (m, r): forward 2mn + 2r(m+n) FLOPs per token;
    backward 2mn (input grad through W0; W0 gets no weight grad) + 4r(m+n) (factors' input and weight grads)."""

    def cost(m: int, n: int) -> tuple[float, float, float]:
        adapter = rank * (m + n)
        return float(m * n + adapter), float(adapter), 4.0 * m * n + 6.0 * adapter

    return cost


def lora_activation_values(model_cfg: ModelConfig, rank: int, targets: list[str], dropout: float) -> float:
    """Values per token and block that adapters on ``targets`` save beyond a plain block's."""
    n = len(expand_targets(targets))
    extra = n * rank
    if dropout > 0:
        extra += (10 * model_cfg.dim + model_cfg.ffn_dim) * n / 7
    return float(extra)


def lora_modules(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


@register_method("lora")
class LoRA(Method):
    """Frozen random W0 + s·B·A on every target, trained from scratch."""

    Config = LoRAConfig
    cfg: LoRAConfig

    def prepare_model(self, model: nn.Module) -> nn.Module:
        c = self.cfg
        reparameterize(model, list(c.targets), lambda _q, linear: LoRALinear(linear, c.rank, c.scale,
                                                                             dropout=c.lora_dropout))
        return model

    def layer_extra_values(self, model_cfg: ModelConfig) -> float:
        """x·Aᵀ (r per target); with dropout its noise and dropped input: 10d + f per block with every
        target (measured on torch 2.13, tests/test_estimate.py), pro rata for fewer targets."""
        return lora_activation_values(model_cfg, self.cfg.rank, list(self.cfg.targets), self.cfg.lora_dropout)

    def cost(self, model_cfg: ModelConfig, seq_len: int) -> dict[str, float]:
        return reparameterized_cost(model_cfg, seq_len, list(self.cfg.targets), lora_target_cost(self.cfg.rank))


class LoRAWithRestarts(LoRA):
    """LoRA whose adapters are unloaded into W0 every ``period`` updates, then restarted.

    Subclasses say what a restart does to the adapters and their optimizer state (:meth:`restart`).
    The restart count and the RNG that re-initialises A are the method's state; everything else
    (W0, A, B, the moments) lives in the model and the optimizer, so a run resumes exactly, also
    between restarts.
    """

    period_key: ClassVar[str] = "method.merge_every"
    salt: ClassVar[int] = 0x4C6F5241  # decorrelates this method's RNG from the run's global stream

    def __init__(self, cfg, model_cfg):
        super().__init__(cfg, model_cfg)
        self.restarts = 0
        self.generator = torch.Generator()

    @property
    def period(self) -> int:
        raise NotImplementedError

    @property
    def restart_warmup_steps(self) -> int:
        return 0

    def prepare_model(self, model: nn.Module) -> nn.Module:
        model = super().prepare_model(model)
        self.generator = seeded_generator(self.salt)
        return model

    def lr_factor(self, step: int) -> float:
        """The jagged schedule: after every restart (update index k·N, 0-based) the LR drops to 0 and
        ramps linearly back over ``restart_warmup_steps`` updates; 1 elsewhere. It multiplies the
        base schedule (warmup + cosine), so the ramp climbs back to the cosine envelope."""
        return restart_ramp(step, self.period, self.restart_warmup_steps)

    def after_step(self, ctx: StepContext) -> None:
        if ctx.step % self.period == 0:
            self.restarts += 1
            stats = self.restart(ctx.model, ctx.optimizer)
            ctx.log({"restarts": self.restarts, **stats})

    def restart(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Unload the adapters into W0 and restart them; returns metrics to log."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {"restarts": self.restarts, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.restarts = int(state["restarts"])
        self.generator.set_state(state["generator"])


def adapter_parameters(model: nn.Module) -> list[torch.Tensor]:
    """The A and B factors of every LoRA module (the only parameters a restart touches)."""
    return [p for m in lora_modules(model) for p in (m.lora_A, m.lora_B)]
