"""PeriodicLoRA (PLoRA; Meng et al., 2024, arXiv 2402.16141), here for pretraining from scratch.

Training runs in stages of ``unload_every`` updates. During a stage only the LoRA factors (and the
embeddings, head and norms) are trained; at the end of each stage the adapter is *unloaded* into
the backbone W0 and LoRA restarts:

- ``unload=full`` (PLoRA): W0 <- W0 + s·B·A, then A is re-drawn, B = 0, and the factors' optimizer
  state is re-initialised as a fresh optimizer's would be (moments and step counter zeroed). Unlike
  ReLoRA nothing is pruned partially and the Adam bias correction restarts, which by itself tempers
  the first steps of a stage.
- ``unload=momentum`` (the paper's momentum-based unloading, which it introduces to mitigate the
  training instability of full unloads): only a share λ (``momentum``) of the adapter is moved into
  the backbone, W0 <- W0 + λ·s·B·A, and the adapter keeps the rest: both factors are scaled by
  √(1−λ), so s·B·A becomes (1−λ)·s·B·A and the network's function is unchanged. Training continues
  with the same adapter; its Adam moments are rescaled to match the rescaled factors (gradients of
  A and B scale by √(1−λ), so m by √(1−λ) and v by 1−λ; the step counter runs on). Over stages the
  backbone thus follows an exponential moving average of the adapter's contributions.

What we could verify of the paper here is its abstract (stages, unload, re-initialise LoRA; a
momentum-based unloading strategy against instability); its exact unloading equation could not be
retrieved. The only public implementation found (hhnqqq/MyTransformers, ``LinearWithPLoRA``,
``plora_momentum=0.1``) merges λ·s·B·A with λ = 0.1 and scales *both* factors by (1−λ), which leaves
(1−λ)²·s·B·A in the adapter and so changes the function at every unload; we scale by √(1−λ) to keep
it exact. λ = 0.1 is that implementation's default. PLoRA is a fine-tuning method: the paper reports
no C4 pretraining numbers, and rank, α and the stage length here follow the LoRA/ReLoRA settings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lrpretrain.errors import allowed, check
from lrpretrain.methods import register_method
from lrpretrain.methods.lora import LoRAConfig, LoRAWithRestarts, adapter_parameters, lora_modules
from lrpretrain.methods.toolkit import MOMENT_KEYS, reset_optimizer_state

UNLOADS = ("full", "momentum")


@dataclass
class PeriodicLoRAConfig(LoRAConfig):
    unload_every: int = 1000  # stage length in optimizer updates
    unload: str = "full"  # full | momentum
    momentum: float = 0.1  # λ: share of s·B·A moved into W0 at each unload when unload=momentum
    restart_warmup_steps: int = 0  # optional linear LR re-warmup after each unload (0: none)

    def validate(self) -> None:
        super().validate()
        check(self.unload_every > 0, "method.unload_every", self.unload_every, "must be > 0")
        check(self.unload in UNLOADS, "method.unload", self.unload, f"allowed: {allowed(UNLOADS)}")
        check(0 < self.momentum < 1, "method.momentum", self.momentum,
              "must be in (0, 1): the share of the adapter unloaded at each stage end")
        check(0 <= self.restart_warmup_steps <= self.unload_every, "method.restart_warmup_steps",
              self.restart_warmup_steps, f"must be in [0, method.unload_every={self.unload_every}]")


@torch.no_grad()
def scale_moments(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], c: float) -> None:
    """Adam state of parameters just scaled by ``c``: first moment x c, second moment x c²."""
    first, second = MOMENT_KEYS
    for p in params:
        state = optimizer.state.get(p, {})
        if isinstance(state.get(first), torch.Tensor):
            state[first].mul_(c)
        if isinstance(state.get(second), torch.Tensor):
            state[second].mul_(c * c)


@register_method("periodic_lora")
class PeriodicLoRA(LoRAWithRestarts):
    Config = PeriodicLoRAConfig
    cfg: PeriodicLoRAConfig
    salt = 0x504C6F52

    @property
    def period(self) -> int:
        return self.cfg.unload_every

    @property
    def restart_warmup_steps(self) -> int:
        return self.cfg.restart_warmup_steps

    @torch.no_grad()
    def restart(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        params = adapter_parameters(model)
        if self.cfg.unload == "full":
            for m in lora_modules(model):
                m.merge_(reinit=True, generator=self.generator)
            reset_optimizer_state(optimizer, params, "full", reset_step=True)
            return {}
        lam = self.cfg.momentum
        keep = math.sqrt(1.0 - lam)
        for m in lora_modules(model):
            m.weight.add_((lam * m.delta()).to(m.weight.dtype))
            m.lora_A.mul_(keep)
            m.lora_B.mul_(keep)
        scale_moments(optimizer, params, keep)
        return {}
