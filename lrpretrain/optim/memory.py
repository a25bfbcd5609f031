"""Bytes of the optimizers' states and step temporaries, from sizes alone (``lrpretrain estimate`` and
the method plugins' ``optimizer_state_bytes`` both use them)."""

from __future__ import annotations

import math

from lrpretrain.config import ModelConfig
from lrpretrain.optim import quant8


def moment_pair_bytes(numel: float, bits: int) -> float:
    """Bytes of Adam's two moments of one tensor: fp32, or blockwise 8-bit codes + fp32 absmax per 256."""
    if quant8.use_8bit(int(numel), bits):
        return 2.0 * (numel + 4 * math.ceil(numel / quant8.BLOCK))
    return 8.0 * numel


def adamw_state_bytes(model_cfg: ModelConfig, trainable_params: float, bits: int) -> float:
    """AdamW's state for a LLaMA with ``trainable_params`` trainable entries: two moments per tensor
    and a 0-d fp32 step. Embedding, LM head and norm weights are counted tensor by tensor (the norms
    keep fp32 moments below bitsandbytes' 4096-entry threshold); the rest, the decoder's matrices, as
    large tensors."""
    d, V, L = model_cfg.dim, model_cfg.vocab_size, model_cfg.n_layers
    embeddings = [V * d] * (1 if model_cfg.tie_embeddings else 2)
    norms = [d] * (2 * L + 1)
    rest = trainable_params - sum(embeddings) - sum(norms)
    n_rest = 7 * L  # tensors: about one per projection (step counters only)
    total = sum(moment_pair_bytes(n, bits) for n in embeddings + norms)
    total += moment_pair_bytes(rest, bits) if rest > 0 else 0.0
    return total + 4.0 * (len(embeddings) + len(norms) + n_rest)


def optimizer_temp_bytes(largest: float, bits: int) -> float:
    """Temporaries of one parameter's AdamW step: sqrt(v) and its scaled copy; with 8-bit states also
    the dequantised m and v and their requantised codes."""
    return 4.0 * largest * (2 + (2 if bits == 8 else 0)) + (2.0 * largest if bits == 8 else 0.0)
