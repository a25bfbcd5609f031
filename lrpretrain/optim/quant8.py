"""Blockwise 8-bit storage of optimizer moments (``optim.state_bits=8``, ``method.state_bits=8``).

A moment tensor is stored as one uint8 code per entry plus one fp32 absmax per block of 256 entries,
with bitsandbytes' dynamic (tree) quantisation map: signed for the first moment m, unsigned for the
second moment v. That is exactly the state of bitsandbytes' 8-bit Adam (Dettmers et al., 2022), which
GaLore's ``GaLoreAdamW8bit`` uses; the step dequantises to fp32, does the Adam arithmetic there and
quantises back. Tensors with fewer than 4096 entries (norms) keep fp32 moments, as bitsandbytes'
``min_8bit_size`` does.

Why bitsandbytes, and only its quantiser: it is the well-kept reference, it runs on the CPU here (since
0.49 it has a CPU backend) and on CUDA, and its blockwise codes are plain uint8/fp32 tensors, so
checkpoints load with ``torch.load(weights_only=True)``. torchao's low-bit optimizer states were
rejected: they are tensor subclasses (``OptimState8bit``) whose checkpoints fail ``weights_only``
loading in a process that has not imported torchao, and they are not plain tensors. We call only
``quantize_blockwise``/``dequantize_blockwise`` (not bitsandbytes' fused optimizers), so one
:class:`~lrpretrain.optim.ParamwiseOptimizer` step serves fp32 and 8-bit states, full-rank AdamW and
every projected optimizer. bitsandbytes is imported on first use only (it takes ~1.5 s to import).
"""

from __future__ import annotations

import logging

import torch

BLOCK = 256  # entries per absmax block (bitsandbytes' blockwise optimizer states)
MIN_8BIT_NUMEL = 4096  # smaller tensors keep fp32 moments (bitsandbytes' min_8bit_size)

_maps: dict[tuple[bool, str], torch.Tensor] = {}


def _bnb_functional():
    # bitsandbytes logs at import that optional 4-bit CPU kernels are absent; they are not used here.
    logger = logging.getLogger("bitsandbytes")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import bitsandbytes.functional as F
    finally:
        logger.setLevel(level)
    return F


def available() -> bool:
    try:
        _bnb_functional()
    except Exception:
        return False
    return True


def qmap(signed: bool, device: torch.device) -> torch.Tensor:
    """bitsandbytes' dynamic quantisation map (256 fp32 values in [-1, 1] or [0, 1])."""
    key = (signed, str(device))
    if key not in _maps:
        _maps[key] = _bnb_functional().create_dynamic_map(signed=signed).to(device)
    return _maps[key]


def quantize(x: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``x`` -> (uint8 codes of x's shape, fp32 absmax per block of 256 entries)."""
    F = _bnb_functional()
    codes, qs = F.quantize_blockwise(x.float().contiguous(), code=qmap(signed, x.device), blocksize=BLOCK)
    return codes.view(x.shape), qs.absmax


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, signed: bool) -> torch.Tensor:
    """(codes, absmax) -> fp32 tensor of the codes' shape."""
    F = _bnb_functional()
    out = F.dequantize_blockwise(codes.contiguous(), absmax=absmax, code=qmap(signed, codes.device), blocksize=BLOCK)
    return out.view(codes.shape).float()


def use_8bit(numel: int, bits: int) -> bool:
    return bits == 8 and numel >= MIN_8BIT_NUMEL
