"""Bytes of a LLaMA per token and per buffer, from its config alone (``lrpretrain estimate`` and the
method plugins' memory hooks both use them).

Activation formulas count what autograd saves for the backward as torch 2.13 saves it (each storage
once, parameters and buffers excluded): see tests/test_estimate.py, which measures them with
saved_tensors_hooks. d = model.dim, f = model.ffn_dim, H = model.n_heads.
"""

from __future__ import annotations

from lrpretrain.config import ModelConfig

PRECISIONS = ("fp32", "bf16", "pure_bf16")  # trainer.precision as resolved for a device (never auto)


def activation_itemsize(precision: str) -> int:
    """Bytes per value of matmul inputs and outputs: fp32, or bf16 (autocast and pure bf16)."""
    return 4 if precision == "fp32" else 2


def residual_itemsize(precision: str) -> int:
    """Bytes per value of the residual stream: fp32 unless the whole model is bf16 (pure_bf16)."""
    return 2 if precision == "pure_bf16" else 4


def llama_layer_bytes(model_cfg: ModelConfig, recompute: str, precision: str) -> float:
    """Bytes per token that one plain LLaMA decoder block keeps for the backward.

    ``none``, fp32: 10d + 4f + H + 2 values: the two RMSNorms' inputs, normalised values and outputs
    and 1/rms (3d + 1 each), q and k before RoPE and their rotated halves (4d), the RoPE'd q, k and v
    (3d), the attention output and its head-merged copy (2d) and log-sum-exp (H), SwiGLU's gate, up,
    SiLU(gate) and product (4f). Under bf16 autocast the matmul inputs are bf16 copies (one per
    projection that reads them) and the residual stream stays fp32: 34d + 8f + 4H + 8 bytes.
    Under pure bf16 every tensor is bf16 but the RMSNorms' fp32 statistics (their fp32 input copy and
    1/rms) and the attention's fp32 log-sum-exp: 24d + 8f + 4H + 8 bytes (RoPE is computed in fp32
    from the bf16 q and k and saves nothing but its tables).
    ``full``: the block's input (the residual stream).
    ``selective``: its input plus the kept matmul and attention outputs (q, k, v, o, down: 5d;
    gate, up: 2f; attention output d, log-sum-exp H), in the matmuls' dtype.
    """
    d, f, H = model_cfg.dim, model_cfg.ffn_dim, model_cfg.n_heads
    if precision not in PRECISIONS:
        raise ValueError(f"precision '{precision}': expected one of {PRECISIONS}")
    if recompute == "full":
        return residual_itemsize(precision) * d
    if recompute == "selective":
        return residual_itemsize(precision) * d + activation_itemsize(precision) * (6 * d + 2 * f) + 4.0 * H
    if precision == "pure_bf16":
        return 24.0 * d + 8.0 * f + 4.0 * H + 8.0
    if precision == "bf16":
        return 34.0 * d + 8.0 * f + 4.0 * H + 8.0
    return 4.0 * (10 * d + 4 * f + H + 2)


def outside_layers_bytes(model_cfg: ModelConfig, seq_len: int, precision: str, fused_loss: bool = False) -> float:
    """Bytes per token saved outside the decoder blocks: token ids (int64), the final RMSNorm
    (3d + 1 fp32; under bf16 autocast the LM head's bf16 input instead of the fp32 one: 10d + 4; under
    pure bf16 the fp32 statistics and the bf16 normalised value and output: 8d + 4) and the loss: the
    fp32 log-softmax of the shifted logits and the int64 targets (T - 1 positions per row).

    ``fused_loss`` (a head loss, lrpretrain/kernels/head_loss.py): the head's input is not kept (the
    norm keeps 2d + 1 fp32, 8d + 4 under autocast, 6d + 4 under pure bf16) and neither are logits; what
    the fused loss keeps (its gradients) is counted by the estimator."""
    d, V = model_cfg.dim, model_cfg.vocab_size
    norm = {"fp32": 4.0 * (3 * d + 1), "bf16": 10.0 * d + 4.0, "pure_bf16": 8.0 * d + 4.0}[precision]
    if fused_loss:
        return 8.0 + norm - activation_itemsize(precision) * d
    return 8.0 + norm + (4.0 * V + 8.0) * (seq_len - 1) / seq_len


def loss_transient_bytes(model_cfg: ModelConfig, seq_len: int, precision: str) -> tuple[float, float]:
    """Bytes per token alive beside the saved activations (end of forward, start of backward).

    End of forward, inside the loss: the logits and the contiguous copy of the shifted logits (and,
    with bf16 logits, its fp32 copy) beside the log-softmax. Start of backward: one logits-sized fp32
    gradient (the log-softmax's saved output is released as the next gradient is made).
    """
    V = model_cfg.vocab_size
    logit = activation_itemsize(precision)
    return V * (logit + logit + (4.0 if logit == 2 else 0.0)), 4.0 * V


def autocast_weight_bytes(matmul_params: float) -> float:
    """bf16 autocast caches a bf16 copy of every weight it casts until the forward's autocast region
    ends (and the matmuls save them for the backward): 2 bytes per matmul weight entry."""
    return 2.0 * matmul_params


def rope_bytes(model_cfg: ModelConfig) -> float:
    """The RoPE cos and sin tables (fp32, max_seq_len x head_dim each)."""
    return 2.0 * 4 * model_cfg.max_seq_len * (model_cfg.dim // model_cfg.n_heads)


def largest_trainable(model_cfg: ModelConfig) -> int:
    """Entries of the largest trainable tensor of a LLaMA: the embedding (or a dense MLP matrix)."""
    return max(model_cfg.vocab_size * model_cfg.dim, model_cfg.ffn_dim * model_cfg.dim)
