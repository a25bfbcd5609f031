"""Bytes of the optimizers' states and step temporaries, from sizes alone (``lrpretrain estimate`` and
the method plugins' ``optimizer_state_bytes`` both use them)."""

from __future__ import annotations

import math

from lrpretrain.config import ModelConfig
from lrpretrain.optim import quant8
from lrpretrain.optim.base import CHUNK


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


def elementwise_temp_bytes(numel: float, bits: int, precision: str) -> float:
    """Temporaries of an element-wise (Adam) step of a tensor of ``numel`` entries, which runs in pieces
    of at most :data:`~lrpretrain.optim.base.CHUNK` entries: AdamW's (:func:`optimizer_temp_bytes`)
    for one piece, and under pure bf16 the piece's fp32 working copies of weight and gradient."""
    piece = min(numel, CHUNK)
    return optimizer_temp_bytes(piece, bits) + (8.0 * piece if precision == "pure_bf16" else 0.0)


def projected_step_temp_bytes(shape: tuple[int, int], projected: tuple[int, int], basis: float, bits: int,
                              precision: str, full_size: int = 1) -> float:
    """Temporaries of one projected-gradient step (GaLore's family) of an m x n weight whose projected
    gradient R has shape ``projected``: under pure bf16 the fp32 working copies of the weight and its
    gradient (2mn x 4 bytes); R, Adam's direction and its denominator (3 |R|), the dequantised moments
    and their new codes with 8-bit states; an fp32 copy of a bf16-stored basis (``basis`` entries); and
    ``full_size`` fp32 m x n matrices of the update itself (GaLore: Δ = α·P·N; Fira, FRUGAL: also the
    residual)."""
    m, n = shape
    r = projected[0] * projected[1]
    moments = (8.0 * r + 2.0 * r) if quant8.use_8bit(r, bits) else 0.0
    return ((8.0 * m * n if precision == "pure_bf16" else 0.0) + 4.0 * full_size * m * n + 12.0 * r + moments
            + 4.0 * basis)


def svd_temp_bytes(shape: tuple[int, int]) -> float:
    """Temporaries of the fp32 SVD (``torch.linalg.svd(full_matrices=False)``) of an m x n gradient:
    LAPACK's copy of the input, U (m x k), S and Vh (k x n), and gesdd's workspace (about 3k^2 + 4k
    values), k = min(m, n)."""
    m, n = shape
    k = min(m, n)
    return 4.0 * (m * n + m * k + k + k * n + 3 * k * k + 4 * k)
