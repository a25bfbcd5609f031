"""The LM head and the next-token cross-entropy as one op: the loss without the tokens x vocab logits.

The plain path (``lrpretrain.model.lm_loss`` on the model's logits, ``trainer.kernels=torch``) holds
the logits of the whole micro-batch, their fp32 copy, the log-softmax and the logits' gradient: at
llama_60m with 16 x 256 tokens and a 32000-token vocabulary, 131M values each. A *head loss* takes
the final hidden states h (after the last RMSNorm), the head's weight W (vocab x dim) and the labels,
and returns the summed loss over the counted targets, computing the logits a chunk of tokens at a
time. As in liger-kernel's fused linear cross-entropy, the gradients are computed in the forward,
chunk by chunk, while each chunk's logits exist: ∂h (tokens x dim) and ∂W (vocab x dim, accumulated
in fp32) are kept for the backward, which only scales them by the incoming gradient (out of place, so
a graph run twice, ``retain_graph``, stays right). Nothing else is kept: not h, not the logits.

Two implementations of the same op (:data:`IMPLS`), and the reference they equal:

- ``chunked``: PyTorch (:func:`chunked_head_loss`), on any device; ``trainer.kernels=auto`` on the CPU.
  Chunks of :func:`chunk_rows` tokens, so that one chunk's logits hold about as many values as h.
  Per chunk: the logits in the matmul's dtype (bf16 under autocast or pure bf16), upcast to fp32,
  log-sum-exp, loss, and the softmax turned in place into the logits' gradient.
- ``liger``: liger-kernel's Triton cross-entropy inside its chunked forward
  (``liger_kernel.ops.fused_linear_cross_entropy``, the optional extra ``pip install
  'lrpretrain[kernels]'``), on CUDA (or in Triton's interpreter); ``trainer.kernels=auto`` on CUDA and
  ``trainer.kernels=triton``. Its loss and gradients come from liger's forward; the autograd function
  around it is ours (liger's own backward scales its saved gradients in place, which a second backward
  of a retained graph would scale again).
- the reference (``full``): the model's logits and ``lm_loss``, :func:`reference_head_loss` here.

Padding: labels are aligned with the input ids; the targets are the labels shifted left by one with
-100 appended (the last position of each row predicts nothing), so h is used as it is, without a
shifted copy; -100 targets count neither in the loss nor in the gradients. Precision: the matmuls run
in the dtype autocast gives them (or the tensors' own), the log-softmax in fp32 per chunk, the loss is
summed in fp32, ∂W is accumulated in fp32 and returned in W's dtype, ∂h in h's dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from lrpretrain.kernels.triton_support import cdiv, next_power_of_2
from lrpretrain.paths import unshadow_pypi_kernels

IMPLS = ("full", "chunked", "liger")
IGNORE = -100
# (hidden (B, T, d), head weight (V, d), labels (B, T)) -> summed loss over the counted targets (fp32, 0-d)
HeadLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# (h (N, d), W (V, d), targets (N,), need ∂h, need ∂W) -> (loss, ∂h or None, ∂W or None), unscaled
_Impl = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool, bool],
                 tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]


def shift_targets(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) labels aligned with the inputs -> (B, T) next-token targets (-100 at the last position)."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE)


def chunk_rows(n_rows: int, vocab: int, dim: int) -> int:
    """Tokens per chunk: one chunk's logits (rows x vocab) hold about as many values as h (n_rows x dim)
    (liger-kernel's rule: n_rows / ceil(vocab / dim), rounded up to a power of two)."""
    return next_power_of_2(cdiv(max(n_rows, 1), cdiv(vocab, dim)))


def reference_head_loss(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The reference: every logit, as ``lrpretrain.model.lm_loss`` computes the loss from them."""
    logits = F.linear(h, weight)
    shift = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    return F.cross_entropy(shift, labels[:, 1:].reshape(-1), ignore_index=IGNORE, reduction="sum")


def _chunked(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, need_h: bool, need_w: bool):
    n, d = h.shape
    vocab = weight.shape[0]
    rows = chunk_rows(n, vocab, d)
    loss = torch.zeros((), dtype=torch.float32, device=h.device)
    grad_h = torch.empty_like(h) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
    for s in range(0, n, rows):
        hc, tc = h[s:s + rows], targets[s:s + rows]
        logits = F.linear(hc, weight)  # (rows, V) in the matmul's dtype (autocast's, or the tensors')
        dtype = logits.dtype
        z = logits.float()  # the same tensor in fp32 (a copy of bf16 logits, which are then freed)
        del logits
        valid = tc != IGNORE
        tgt = torch.where(valid, tc, 0)
        picked = z.gather(1, tgt[:, None]).squeeze(1)
        zmax = z.amax(1, keepdim=True)
        total = z.sub_(zmax).exp_().sum(1)  # z: exp(logit - max), in place
        lse = zmax.squeeze(1) + total.log()
        loss += torch.where(valid, lse - picked, 0.0).sum()
        if not (need_h or need_w):
            continue
        z.div_(total[:, None])  # softmax
        z.scatter_add_(1, tgt[:, None], -valid[:, None].to(z.dtype))  # - one-hot of the target
        z.mul_(valid[:, None])  # rows without a target: no gradient
        gz = z.to(dtype)  # the logits' gradient in the logits' dtype, as autocast's backward has it
        if need_h:
            grad_h[s:s + rows] = gz @ weight
        if need_w:
            if gz.dtype == hc.dtype == torch.float32 and not torch.is_autocast_enabled(h.device.type):
                grad_w.addmm_(gz.t(), hc)
            else:  # bf16 logits: the fp32 gradient (z, before its rounding to gz) times the chunk's h in fp32,
                # added into the fp32 accumulator in place: a bf16 product added to it would hold a vocab x dim
                # product and (on the CPU) its fp32 cast at once
                with torch.autocast(h.device.type, enabled=False):
                    grad_w.addmm_(z.t(), hc.float())
    return loss, grad_h, None if grad_w is None else grad_w.to(weight.dtype)


def _liger(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, need_h: bool, need_w: bool):
    # imported on first use: an optional dependency (the [kernels] extra, checked by liger_refusal()) that
    # imports transformers (seconds), which imports the PyPI package `kernels`
    unshadow_pypi_kernels()
    from liger_kernel.ops.fused_linear_cross_entropy import fused_linear_cross_entropy_forward

    h_in = h if need_h or need_w else h.detach()  # liger computes gradients when its input requires them
    w_in = weight if need_w else weight.detach()
    out = fused_linear_cross_entropy_forward(_input=h_in, weight=w_in, target=targets, ignore_index=IGNORE,
                                             reduction="sum", accum_dtype=torch.float32)
    # (loss, z_loss, [token accuracy, predicted tokens,] grad_input, grad_weight, grad_bias): by position
    # from both ends, as liger's releases have added entries in the middle
    loss, grad_h, grad_w = out[0], out[-3], out[-2]
    return loss.float(), grad_h if need_h else None, grad_w if need_w else None


class _FusedHeadLoss(torch.autograd.Function):
    """Loss and both gradients from the forward; the backward scales them by the incoming gradient."""

    @staticmethod
    def forward(ctx, h, weight, targets, impl: _Impl):
        loss, grad_h, grad_w = impl(h, weight, targets, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        ctx.save_for_backward(grad_h, grad_w)  # neither inputs nor outputs: no double backward
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        g = float(grad_loss)  # a Python number: bf16 gradients are scaled in fp32 and rounded once
        return (None if grad_h is None else grad_h * g, None if grad_w is None else grad_w * g, None, None)


@torch.compiler.disable  # a graph break: Dynamo would trace the chunk loop (or liger's kernels) into the graph
def _head_loss(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, impl: _Impl) -> torch.Tensor:
    targets = shift_targets(labels.to(h.device)).reshape(-1)
    h2 = h.reshape(-1, h.shape[-1])
    if torch.is_grad_enabled() and (h2.requires_grad or weight.requires_grad):
        return _FusedHeadLoss.apply(h2, weight, targets, impl)
    return impl(h2, weight, targets, False, False)[0]


def chunked_head_loss(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The summed next-token loss of ``h @ weight.T`` against ``labels``, in token chunks (PyTorch)."""
    return _head_loss(h, weight, labels, _chunked)


def liger_head_loss(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """As :func:`chunked_head_loss`, through liger-kernel's Triton cross-entropy."""
    return _head_loss(h, weight, labels, _liger)


def liger_refusal() -> str | None:
    """Why liger-kernel's fused linear cross-entropy cannot be used here, or None."""
    unshadow_pypi_kernels()
    try:
        from liger_kernel.ops.fused_linear_cross_entropy import fused_linear_cross_entropy_forward  # noqa: F401
    except Exception as e:  # noqa: BLE001 - missing, or broken against this torch/triton
        return f"liger-kernel cannot be imported ({type(e).__name__}: {e}); pip install 'lrpretrain[kernels]'"
    return None


def head_loss(impl: str) -> HeadLoss | None:
    """The head loss of implementation ``impl`` (:data:`IMPLS`); None for ``full`` (the model's logits)."""
    return {"full": None, "chunked": chunked_head_loss, "liger": liger_head_loss}[impl]


def fused_loss_bytes(impl: str, tokens: int, dim: int, vocab: int, precision: str,
                     head_grad: bool = True) -> tuple[float, float, float]:
    """Bytes of a fused head loss over ``tokens`` rows (for ``lrpretrain estimate``):
    (kept for the backward, the forward's peak beyond them, the backward's beyond them and the head's
    new gradient). ``precision``: fp32 | bf16 (autocast) | pure_bf16.

    Kept: ∂h (tokens x dim, h's dtype: fp32 unless pure bf16) and ∂W (vocab x dim, W's dtype). In the
    forward, one chunk at a time (:func:`chunk_rows` rows): ``chunked`` holds the chunk's logits in the
    matmul's dtype, their fp32 copy (the same tensor in fp32) and the gradient cast back to the matmul's
    dtype, and with bf16 logits the chunk's h in fp32 (∂W's update is an fp32 matmul into the accumulator); ``liger`` holds the logits in the
    matmul's dtype only (its kernel writes the gradient over them) and the per-row losses. Under pure
    bf16, ∂W is accumulated in fp32 and cast at the end (4 more bytes per entry of W); under bf16
    autocast the bf16 copy of W that autocast caches lives while the loss runs (nothing saves it).
    Backward: the scaled copy of ∂h. ``head_grad`` false (a frozen LM head: LR-QAT's
    ``train_rest=false``): no ∂W is computed, kept or accumulated.
    """
    if impl not in ("chunked", "liger"):
        raise ValueError(f"fused_loss_bytes: '{impl}' is not a fused head loss")
    hb = 2 if precision == "pure_bf16" else 4  # h, ∂h
    wb = 2 if precision == "pure_bf16" else 4  # W, ∂W
    lb = 4 if precision == "fp32" else 2  # the logits' (matmul's) dtype
    rows = min(chunk_rows(tokens, vocab, dim), tokens)
    w_grad = float(vocab * dim) if head_grad else 0.0  # ∂W's entries
    accumulator = 4.0 * w_grad if wb == 2 else 0.0  # fp32 accumulation of a bf16 ∂W
    if impl == "chunked":
        fp32_logits = 4.0 * rows * vocab
        chunk = fp32_logits if lb == 4 else fp32_logits + lb * rows * vocab + (4.0 * rows * dim if head_grad else 0.0)
    else:
        chunk = float(lb * rows * vocab + 5 * tokens)
    saved = float(hb * tokens * dim + wb * w_grad)
    cached = 2.0 * vocab * dim if precision == "bf16" else 0.0  # autocast's bf16 copy of W, while the loss runs
    return saved, accumulator + cached + chunk + lb * rows * dim, float(hb * tokens * dim)
