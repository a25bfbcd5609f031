"""The LLaMA model and its builder."""

from __future__ import annotations

import torch

from lrpretrain.config import ModelConfig
from lrpretrain.model.llama import HeadLoss, LLaMA, flops_per_token, generate, lm_loss, param_count

__all__ = ["HeadLoss", "LLaMA", "build_model", "cast_parameters", "flops_per_token", "generate", "lm_loss", "param_count"]


def build_model(cfg: ModelConfig, device: torch.device | str = "cpu", materialize: bool = True) -> LLaMA:
    """Describe the model on the meta device (no memory), then materialise it on ``device`` and
    initialise it from the current torch RNG. ``materialize=False`` returns the meta model (for
    parameter counting, or for FSDP2 to shard before allocating)."""
    with torch.device("meta"):
        model = LLaMA(cfg)
    if materialize:
        model.to_empty(device=device)
        model.tie_weights()
        model.init_weights()
    return model


@torch.no_grad()
def cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Store every floating-point parameter (trained or frozen) in ``dtype``, in place
    (``trainer.precision=pure_bf16``); a parameter broadcast from one value (every stride 0) stays so.
    Buffers keep their dtype: the RoPE tables stay fp32 (RoPE is computed in fp32, as under autocast)
    and index buffers stay integers."""
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            t = p.data
            if t.numel() > 1 and not any(t.stride()):  # a broadcast value (Q-GaLore's gradient handles): stays one
                p.data = t.as_strided((), ()).to(dtype).expand(t.shape)
            else:
                p.data = t.to(dtype)
    return model
