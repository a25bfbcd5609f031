"""Adam's moments, shared by every optimizer here: storage (fp32 or blockwise 8-bit), update, reset
and change of basis.

The moments of one tensor live in its optimizer state as plain tensors: ``exp_avg`` / ``exp_avg_sq``
in fp32, or ``exp_avg_q8`` + ``exp_avg_absmax`` / ``exp_avg_sq_q8`` + ``exp_avg_sq_absmax`` in 8 bits
(:mod:`lrpretrain.optim.quant8`). The 8-bit keys differ on purpose: a uint8 code of 0 is not the value
0, so code that zeroes ``exp_avg`` (e.g. ReLoRA's partial resets) must not touch them by accident.

``adam_step`` counts the updates since the moments were last zeroed; it drives the bias correction
and restarts with the moments (``reset``), while the optimizer's own ``step`` keeps counting.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lrpretrain.comm import local
from lrpretrain.optim import quant8

State = dict[str, Any]


def init_moments(state: State, like: torch.Tensor, bits: int) -> None:
    """Zero moments shaped like ``like`` (fp32, or 8-bit codes when ``bits == 8`` and it is large)."""
    drop_moments(state)
    # zeros_like keeps a DTensor a DTensor: under FSDP2 the moments of a shard are sharded alike
    m = torch.zeros_like(like, dtype=torch.float32, memory_format=torch.contiguous_format)
    _store(state, m, torch.zeros_like(m), quant8.use_8bit(like.numel(), bits))
    state["adam_step"] = 0


def drop_moments(state: State) -> None:
    for key in ("exp_avg", "exp_avg_sq", "exp_avg_q8", "exp_avg_absmax", "exp_avg_sq_q8", "exp_avg_sq_absmax"):
        state.pop(key, None)


def has_moments(state: State) -> bool:
    return "exp_avg" in state or "exp_avg_q8" in state


def load(state: State) -> tuple[torch.Tensor, torch.Tensor]:
    """(m, v) as fp32 tensors: the stored ones (fp32) or dequantised copies (8-bit)."""
    if "exp_avg_q8" in state:
        return (quant8.dequantize(state["exp_avg_q8"], state["exp_avg_absmax"], signed=True),
                quant8.dequantize(state["exp_avg_sq_q8"], state["exp_avg_sq_absmax"], signed=False))
    return state["exp_avg"], state["exp_avg_sq"]


def _store(state: State, m: torch.Tensor, v: torch.Tensor, eight_bit: bool) -> None:
    if eight_bit:
        state["exp_avg_q8"], state["exp_avg_absmax"] = quant8.quantize(m, signed=True)
        state["exp_avg_sq_q8"], state["exp_avg_sq_absmax"] = quant8.quantize(v, signed=False)
    else:
        state["exp_avg"], state["exp_avg_sq"] = m, v


def save(state: State, m: torch.Tensor, v: torch.Tensor) -> None:
    """Write (m, v) back: in place for fp32 storage, requantised for 8-bit storage."""
    if "exp_avg_q8" in state:
        _store(state, m, v, True)
    elif m is not state["exp_avg"]:
        state["exp_avg"], state["exp_avg_sq"] = m, v


def blocks_of(sl: slice) -> slice:
    """The absmax entries of the 8-bit blocks that the flat slice ``sl`` covers (``sl.start`` is a
    multiple of the block size)."""
    return slice(sl.start // quant8.BLOCK, -(-sl.stop // quant8.BLOCK))


def load_slice(state: State, sl: slice | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(m, v) of the flat entries ``sl`` (None: the whole, unflattened tensors) as fp32 tensors: views
    of the stored moments (updated in place) or dequantised copies of their 8-bit blocks."""
    if sl is None:
        m, v = load(state)
        return local(m), local(v)
    if "exp_avg_q8" in state:
        b = blocks_of(sl)
        return (quant8.dequantize(state["exp_avg_q8"].view(-1)[sl], state["exp_avg_absmax"][b], signed=True),
                quant8.dequantize(state["exp_avg_sq_q8"].view(-1)[sl], state["exp_avg_sq_absmax"][b], signed=False))
    return local(state["exp_avg"]).view(-1)[sl], local(state["exp_avg_sq"]).view(-1)[sl]


def save_slice(state: State, sl: slice | None, m: torch.Tensor, v: torch.Tensor) -> None:
    """Write back what :func:`load_slice` gave: nothing to do for fp32 views; the 8-bit codes and absmax
    of the slice's blocks are requantised in place (a block never straddles two slices)."""
    if "exp_avg_q8" not in state:
        return
    if sl is None:
        _store(state, m, v, True)
        return
    b = blocks_of(sl)
    for key, x, signed in (("exp_avg", m, True), ("exp_avg_sq", v, False)):
        codes, absmax = quant8.quantize(x, signed)
        state[key + "_q8"].view(-1)[sl].copy_(codes.view(-1))
        state[key + "_absmax"][b].copy_(absmax)


def update(state: State, grad: torch.Tensor, beta1: float, beta2: float) -> tuple[torch.Tensor, torch.Tensor, int]:
    """m <- b1 m + (1-b1) g, v <- b2 v + (1-b2) g^2; returns fp32 (m, v) and the bias-correction step t."""
    m, v = load(state)
    g = grad.float() if grad.dtype != m.dtype else grad
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    save(state, m, v)
    state["adam_step"] += 1
    return m, v, state["adam_step"]


def normalized(m: torch.Tensor, v: torch.Tensor, t: int, beta1: float, beta2: float, eps: float,
               form: str) -> tuple[torch.Tensor, float]:
    """Adam's direction N and the factor f of the learning rate, so that the update is lr·f·N.

    ``hf`` (the form of GaLore, Fira and APOLLO, from transformers' AdamW): N = m / (sqrt(v) + eps),
    f = sqrt(1-b2^t) / (1-b1^t); the methods scale and project N itself, so this form is theirs.
    ``torch`` (torch.optim.AdamW, FRUGAL): N = m / (sqrt(v)/sqrt(1-b2^t) + eps), f = 1/(1-b1^t).
    The two differ only in where eps sits: eps_hf = eps_torch·sqrt(1-b2^t).
    """
    bc1, bc2 = 1 - beta1**t, 1 - beta2**t
    if form == "hf":
        return m / (v.sqrt() + eps), math.sqrt(bc2) / bc1
    return m / (v.sqrt() / math.sqrt(bc2)).add_(eps), 1.0 / bc1


@torch.no_grad()
def change_basis(state: State, left: torch.Tensor | None, right: torch.Tensor | None,
                 beta1: float, beta2: float) -> None:
    """Express the moments of a projected gradient R in a new basis: R' = A_l R A_r^T.

    ``left`` = A_l = P_new^T P_old (r x r) when the rows are projected, ``right`` = A_r = Q_new Q_old^T
    when the columns are; both are the overlap of orthonormal bases, so R' is the new-basis coordinates
    of the old subspace's component.

    First moment: linear in R, so m' = A_l m A_r^T exactly.
    Second moment: v holds only the diagonal E[R_k^2] per coordinate; the cross terms E[R_k R_l] are
    unknown. Split the bias-corrected estimate into mean and fluctuation, v̂ = m̂^2 + s with
    s = max(v̂ - m̂^2, 0), rotate the mean exactly and the fluctuation as if the old coordinates were
    uncorrelated (the only assumption a diagonal allows): v̂' = (A∘A) s (A∘A)^T + (A m̂)^2. This is
    non-negative, exact for the mean, exact for a permutation or sub-selection of coordinates (the
    DCT case) up to the clamp, and reduces to v' = v when A = I. The bias correction is kept:
    m' and v' are stored back scaled by (1-b1^t) and (1-b2^t).
    """
    if not has_moments(state) or state.get("adam_step", 0) == 0:
        return
    m, v = load(state)
    t = state["adam_step"]
    bc1, bc2 = 1 - beta1**t, 1 - beta2**t
    m_hat, v_hat = m / bc1, v / bc2
    spread = (v_hat - m_hat.square()).clamp_(min=0)

    def rotate(x: torch.Tensor, square: bool) -> torch.Tensor:
        if left is not None:
            a = left.float()
            x = (a * a if square else a) @ x
        if right is not None:
            a = right.float()
            x = x @ (a * a if square else a).T
        return x

    m_new = rotate(m_hat, square=False)
    v_new = rotate(spread, square=True) + m_new.square()
    save(state, (m_new * bc1).contiguous(), (v_new * bc2).contiguous())


def reset(state: State) -> None:
    """Zero the moments and restart the bias correction (FRUGAL's ``reset_statistics``)."""
    if not has_moments(state):
        return
    m, v = load(state)
    m.zero_()
    v.zero_()
    save(state, m, v)
    state["adam_step"] = 0


def state_bytes(state: State) -> int:
    """Bytes of every tensor in one parameter's optimizer state."""
    return sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor))
