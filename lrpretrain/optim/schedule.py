"""Learning-rate schedules, counted in optimizer updates (never micro-batches)."""

from __future__ import annotations

import math

from lrpretrain.config import OptimConfig


def lr_factor(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Multiplier of the base LR for update ``step`` (0-based).

    Linear warmup from 0 over ``warmup_steps`` updates, then cosine (or linear) decay to
    ``min_lr_ratio`` at ``max_steps``. The cosine form is GaLore's
    ``get_cosine_schedule_with_min_lr_lambda`` (peft_pretraining/training_utils.py), so update 0 of a
    warmed-up run has LR 0, exactly as in the reference runs.
    """
    w = cfg.warmup_steps
    if step < w:
        return step / max(1, w)
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - w) / max(1, max_steps - w))
    if cfg.schedule == "linear":
        decay = 1.0 - progress
    else:
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * decay
