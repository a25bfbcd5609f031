"""ReLoRA (Lialin et al., ICLR 2024): high-rank training through a sequence of low-rank updates.

Each target is ``W0 + s·B·A`` (LoRA, W0 frozen). Every ``merge_every`` updates (N):

1. merge: W0 <- W0 + s·B·A, then A is re-drawn Kaiming-uniform and B set to zero, so the network's
   function is unchanged;
2. reset the optimizer state of the LoRA factors only (embeddings, head and norms keep theirs):
   ``magnitude`` pruning zeroes, per moment tensor, the fraction p of entries smallest in |value|;
   ``random`` zeroes each entry with probability p; ``full`` zeroes all; step counters are kept;
3. the jagged schedule: the LR drops to 0 and warms up linearly over ``restart_warmup_steps`` back
   to the base cosine schedule (through :meth:`lr_factor`, multiplied with the base schedule).

Differences from the reference (Guitaricet/relora), on purpose:

- the reference zero-initialises A *and* B in some code paths, so the adapters get no gradient until
  the first merge (ReLoRA issue #18); here B = 0 and A is Kaiming-uniform from the start, so the
  adapters learn from update 1;
- the reference merges after update N+1 (the zero-LR update that opens a cycle); here the merge and
  reset follow update N and the zero-LR update is the first of the new cycle: the same shape, with
  the fresh adapter and pruned moments in place before it. Its restart ramp climbs linearly to one
  fixed value of the cosine taken near the restart (``_get_cosine_schedule_with_multiple_warmups_lambda``),
  ours is the ramp times the cosine itself, which moves by a negligible amount within the ramp;
- one period N serves merges, optimizer resets and restart warmups (the reference has separate
  ``--relora`` and ``--cycle_length``; every published run sets them equal).

Optional full-rank warm start (``method.warm_start=PATH``): the dense model's weights are loaded from
a checkpoint (``.../checkpoints/step_N`` or a run directory, whose latest checkpoint is used) before
the targets are replaced, as the paper's warm start from a partially trained full-rank network.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lrpretrain.errors import ConfigError, allowed, check
from lrpretrain.methods import register_method
from lrpretrain.methods.lora import LoRAConfig, LoRAWithRestarts, adapter_parameters, lora_modules
from lrpretrain.methods.toolkit import reset_optimizer_state
from lrpretrain.model import build_model

if TYPE_CHECKING:
    from lrpretrain.config import ModelConfig

RESETS = ("magnitude", "random", "full", "none")


@dataclass
class ReLoRAConfig(LoRAConfig):
    merge_every: int = 1000  # N: merge-and-reinit period in optimizer updates
    optimizer_reset: str = "magnitude"  # magnitude | random | full | none (LoRA factors only)
    reset_ratio: float = 0.9  # p: fraction of each moment tensor zeroed by magnitude/random pruning
    restart_warmup_steps: int = 100  # linear LR re-warmup after each merge (the jagged schedule)
    warm_start: str | None = None  # full-rank checkpoint (step_N dir or run dir) loaded before surgery

    def validate(self) -> None:
        super().validate()
        check(self.merge_every > 0, "method.merge_every", self.merge_every, "must be > 0")
        check(self.optimizer_reset in RESETS, "method.optimizer_reset", self.optimizer_reset,
              f"allowed: {allowed(RESETS)}")
        check(0 <= self.reset_ratio <= 1, "method.reset_ratio", self.reset_ratio, "must be in [0, 1]")
        check(0 <= self.restart_warmup_steps <= self.merge_every, "method.restart_warmup_steps",
              self.restart_warmup_steps, f"must be in [0, method.merge_every={self.merge_every}]")
        if self.warm_start is not None:
            warm_start_file(self.warm_start)

    def validate_for_model(self, model_cfg: ModelConfig) -> None:
        super().validate_for_model(model_cfg)
        if self.warm_start is not None:
            check_warm_start_fits(self.warm_start, model_cfg)


def warm_start_file(path: str, key: str = "method.warm_start") -> Path:
    """``model.safetensors`` of a checkpoint directory, or of a run directory's latest checkpoint (``key``:
    the config key that names it, for the error)."""
    p = Path(path)
    if (p / "model.safetensors").is_file():
        return p / "model.safetensors"
    latest = p / "checkpoints" / "latest"
    if latest.is_file() and (p / "checkpoints" / latest.read_text().strip() / "model.safetensors").is_file():
        return p / "checkpoints" / latest.read_text().strip() / "model.safetensors"
    raise ConfigError(f"{key}={path} is invalid: expected a checkpoint directory holding "
                      "model.safetensors (.../checkpoints/step_N) or a run directory with checkpoints/latest")


def check_warm_start_fits(path: str, model_cfg: ModelConfig, key: str = "method.warm_start") -> None:
    """The checkpoint must hold exactly the dense model's tensors, with their shapes (headers only)."""
    from safetensors import safe_open

    expected = {k: tuple(v.shape) for k, v in build_model(model_cfg, materialize=False).state_dict().items()}
    file = warm_start_file(path, key)
    with safe_open(str(file), framework="pt") as f:
        found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    problem = next((f"it lacks {k}" for k in expected if k not in found), None)
    problem = problem or next((f"it holds {k}, which a dense {model_cfg.name} does not have" for k in found
                               if k not in expected), None)
    problem = problem or next((f"{k} has shape {found[k]}, the model needs {expected[k]}" for k in expected
                               if found[k] != expected[k]), None)
    if problem:
        raise ConfigError(f"{key}={path} does not fit model={model_cfg.name}: {problem} "
                          f"({file}); a warm start needs a full-rank checkpoint of the same model")


def load_warm_start(model: nn.Module, path: str) -> None:
    """Load a full-rank checkpoint's weights into the dense ``model`` (before any surgery; its fit is
    checked at config time). On the meta device (FSDP2's shapes-only build) nothing is loaded: the
    values come from the build that rank 0 broadcasts."""
    from safetensors.torch import load_file

    device = next(model.parameters()).device
    if device.type == "meta":
        return
    model.load_state_dict(load_file(str(warm_start_file(path)), device=str(device)), strict=True)


@register_method("relora")
class ReLoRA(LoRAWithRestarts):
    Config = ReLoRAConfig
    cfg: ReLoRAConfig

    @property
    def period(self) -> int:
        return self.cfg.merge_every

    @property
    def restart_warmup_steps(self) -> int:
        return self.cfg.restart_warmup_steps

    def prepare_model(self, model: nn.Module) -> nn.Module:
        if self.cfg.warm_start is not None:
            load_warm_start(model, self.cfg.warm_start)
        return super().prepare_model(model)

    @torch.no_grad()
    def restart(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        for m in lora_modules(model):
            m.merge_(reinit=True, generator=self.generator)
        if self.cfg.optimizer_reset == "none":
            return {}
        zeroed, seen = reset_optimizer_state(optimizer, adapter_parameters(model), self.cfg.optimizer_reset,
                                             self.cfg.reset_ratio, self.generator)
        return {"optimizer_state_zeroed": zeroed / max(seen, 1)}
