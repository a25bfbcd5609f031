"""Quantised tensors as plain tensors: the storage formats of the quantised-weight methods.

Two families, each a pair of functions (quantise -> a dict of plain tensors, dequantise -> a float
tensor) plus the exact bytes they store, so that checkpoints hold only uint8/fp32 tensors (they load
with ``torch.load(weights_only=True)``; no bitsandbytes ``QuantState`` or other object is stored) and
``lrpretrain estimate`` counts them exactly:

- **blockwise absmax** (:class:`Blockwise`, LoQT's frozen weights and projections): blocks of
  ``blocksize`` consecutive entries (row-major) share one fp32 absmax; each entry is the nearest level
  of a code book scaled by it. ``nf4``: the 16 NormalFloat levels of QLoRA (Dettmers et al., 2023),
  two 4-bit codes per byte; ``int8``: 255 evenly spaced levels k/127, one byte per entry.
  Quantisation and dequantisation are bitsandbytes' (its ``quantize_4bit``/``dequantize_4bit`` and
  ``quantize_blockwise``/``dequantize_blockwise`` ops, which run on the CPU since 0.49 and on CUDA).
  ``double_quant``: the absmax themselves stored as 8-bit codes of (absmax - their mean) in blocks of
  256 with an fp32 scale each (QLoRA's double quantisation; bitsandbytes' ``compress_statistics``,
  with bitsandbytes' dynamic 8-bit code book). Largest error of a round trip: half the widest gap
  between neighbouring levels times the block's absmax (NF4: 0.1519 x absmax, int8: absmax / 254),
  plus the absmax's own 8-bit error under double quantisation.
- **group-wise min-max** (:func:`minmax_quantize`, Q-GaLore's INT8 weights and INT4 projections,
  after VITA-Group/Q-GaLore's ``_quantize``): groups of ``group`` consecutive entries (row-major) share
  an fp32 scale s = (max - min) / (2^bits - 1) and an fp32 offset, the group's minimum; code =
  round((x - min) / s) in [0, 2^bits - 1], value = min + code·s; 4-bit codes are packed two per byte.
  Rounding is to nearest, or stochastic given random bits (:func:`lrpretrain.optim.bf16.rounding_bits`):
  up with probability equal to the fraction, so the stored value equals x in expectation. One
  deliberate difference from the reference: it stores an integer zero point z = round(-min / s),
  clamped into [0, 2^bits - 1], and codes round(x / s) + z clamped into the same range. Rounding z
  shifts the grid by up to half a step, so entries within a step of the group's minimum or maximum are
  clamped (stochastic rounding is then biased there), and clamping z forces 0 into the representable
  range, which wrecks a group that does not straddle zero (all entries in [0.30, 0.31]: the
  representable range becomes [0, 0.01]). The group's minimum as the offset represents every value of
  the range, for the same grid spacing and 4 bytes per group.

bitsandbytes' CPU backend (0.50.2, checked here): ``quantize_4bit`` is its generic torch implementation
(``bucketize`` against the midpoints of the code book: exactly the nearest level, ~13 bytes of
temporaries per entry, about 0.1 µs per entry on one core), ``dequantize_4bit`` a C kernel (NF4 to
fp32/bf16/fp16; its ``out=`` variant is not implemented on the CPU, so we never pass one);
``quantize_blockwise``/``dequantize_blockwise`` C kernels whose 8-bit code search may take the
neighbouring level within ~0.2% of a step of a midpoint. On CUDA the same ops are bitsandbytes' kernels.
The CPU 4-bit matmul kernel (``gemv_4bit``) is fetched from the Hugging Face hub and is not used here.

Both quantise in pieces of :data:`PIECE` entries (a multiple of every block and group size), so a
quantisation's temporaries are those of one piece whatever the tensor's size (bitsandbytes' CPU
quantiser makes about 13 bytes of temporaries per entry). Why bitsandbytes for NF4: it is the
reference implementation (LoQT's code calls it) and its codes are plain uint8 tensors; why our own
min-max: the reference's is a few lines of torch, and we need its stochastic rounding to draw its bits
from the position-based generator of :mod:`lrpretrain.optim.bf16` (order-independent, resumable).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lrpretrain.optim import quant8

KINDS = ("nf4", "int8")
BLOCKSIZES = (64, 128, 256, 512, 1024)
PIECE = 1 << 22  # entries quantised at a time
NESTED_BLOCK = 256  # absmax entries per block under double quantisation (bitsandbytes' choice)

Quantized = dict[str, torch.Tensor]


def _bnb_ops():
    quant8._bnb_functional()  # imports bitsandbytes (quietly), which registers torch.ops.bitsandbytes
    return torch.ops.bitsandbytes


def available() -> bool:
    return quant8.available()


# -- blockwise absmax (bitsandbytes) -------------------------------------------------------------------


@dataclass(frozen=True)
class Blockwise:
    """A blockwise absmax format: ``kind`` nf4 | int8, ``blocksize`` entries per absmax."""

    kind: str = "nf4"
    blocksize: int = 64
    double_quant: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown quantisation format '{self.kind}'; allowed: {', '.join(KINDS)}")
        if self.blocksize not in BLOCKSIZES:
            raise ValueError(f"blocksize={self.blocksize}; allowed: {', '.join(map(str, BLOCKSIZES))}")

    @property
    def bits(self) -> int:
        return 4 if self.kind == "nf4" else 8

    def code_bytes(self, numel: int) -> int:
        return (numel + 1) // 2 if self.kind == "nf4" else numel

    def stored_bytes(self, numel: int) -> int:
        """Exact bytes of :func:`quantize_blockwise`'s tensors for ``numel`` entries."""
        blocks = -(-numel // self.blocksize)
        if not self.double_quant:
            return self.code_bytes(numel) + 4 * blocks
        return self.code_bytes(numel) + blocks + 4 * -(-blocks // NESTED_BLOCK) + 4

    def levels(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The code book (levels in [-1, 1], ascending)."""
        if self.kind == "nf4":
            return quant8._bnb_functional().get_4bit_type("nf4", device=device)
        return _linear_map(torch.device(device))


_linear: dict[str, torch.Tensor] = {}


def _linear_map(device: torch.device) -> torch.Tensor:
    key = str(device)
    if key not in _linear:
        _linear[key] = quant8._bnb_functional().create_linear_map(signed=True).to(device)
    return _linear[key]


def quantize_blockwise(x: torch.Tensor, fmt: Blockwise) -> Quantized:
    """``x`` (any shape, any float dtype) -> ``{"codes": uint8, "absmax": fp32}`` (or, with double
    quantisation, ``absmax_q8`` uint8 + ``absmax_scale`` fp32 + ``absmax_offset`` fp32 (1,))."""
    flat = x.detach().reshape(-1)
    n = flat.numel()
    codes = torch.empty(fmt.code_bytes(n), dtype=torch.uint8, device=x.device)
    absmax = torch.empty(-(-n // fmt.blocksize), dtype=torch.float32, device=x.device)
    ops = _bnb_ops() if fmt.kind == "nf4" else None
    for start in range(0, n, PIECE):
        piece = flat[start:start + PIECE]
        if piece.dtype != torch.float32:
            piece = piece.float()
        b0 = start // fmt.blocksize
        if ops is not None:
            packed, amax = ops.quantize_4bit.default(piece, fmt.blocksize, "nf4", torch.uint8)
            codes[start // 2:start // 2 + packed.numel()] = packed.view(-1)
        else:
            c, state = quant8._bnb_functional().quantize_blockwise(piece.contiguous(), code=_linear_map(x.device),
                                                                  blocksize=fmt.blocksize)
            codes[start:start + c.numel()] = c.view(-1)
            amax = state.absmax
        absmax[b0:b0 + amax.numel()] = amax
    if not fmt.double_quant:
        return {"codes": codes, "absmax": absmax}
    offset = absmax.mean().reshape(1)
    q8, scale = quant8.quantize(absmax - offset, signed=True)
    return {"codes": codes, "absmax_q8": q8, "absmax_scale": scale, "absmax_offset": offset}


def blockwise_absmax(q: Quantized) -> torch.Tensor:
    """The fp32 absmax of every block (decoded from 8 bits under double quantisation)."""
    if "absmax" in q:
        return q["absmax"]
    return quant8.dequantize(q["absmax_q8"], q["absmax_scale"], signed=True) + q["absmax_offset"]


def dequantize_blockwise(q: Quantized, fmt: Blockwise, shape: tuple[int, ...] | torch.Size,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The tensor that ``q`` stores, in ``dtype`` (bf16 and fp32 are produced directly)."""
    n = math.prod(shape)
    absmax = blockwise_absmax(q)
    if fmt.kind == "nf4":
        out_dtype = dtype if dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32
        out = _bnb_ops().dequantize_4bit.default(q["codes"], absmax, fmt.blocksize, "nf4", [n], out_dtype)
    else:
        out = quant8._bnb_functional().dequantize_blockwise(q["codes"], absmax=absmax, code=_linear_map(absmax.device),
                                                            blocksize=fmt.blocksize)
    return out.reshape(shape).to(dtype)


# -- group-wise min-max (Q-GaLore) -------------------------------------------------------------------------


def minmax_code_bytes(numel: int, bits: int) -> int:
    return (numel + 1) // 2 if bits == 4 else numel


def minmax_bytes(numel: int, bits: int, group: int) -> int:
    """Exact bytes of :func:`minmax_quantize`'s tensors: codes, an fp32 scale and an fp32 minimum per
    group."""
    return minmax_code_bytes(numel, bits) + 8 * -(-numel // group)


def _grouped(v: torch.Tensor, group: int) -> torch.Tensor:
    """The flat ``v`` as (groups, group), a last, shorter group padded with its own last entry (which
    changes neither its min nor its max)."""
    pad = -v.numel() % group
    if pad:
        v = torch.cat([v, v[-1:].expand(pad)])
    return v.view(-1, group)


def minmax_quantize(x: torch.Tensor, bits: int, group: int, random_bits=None) -> Quantized:
    """``x`` -> ``{"codes": uint8 (packed two per byte for 4 bits), "scales": fp32, "mins": fp32}``.

    ``random_bits(start, count)``: None rounds to nearest; else a function giving uniform 16-bit
    integers (int32) for the flat entries ``start .. start + count - 1``, with which each entry is
    rounded up with probability equal to its fraction (to within 2^-16).
    """
    if bits not in (4, 8):
        raise ValueError(f"bits={bits}; allowed: 4, 8")
    flat = x.detach().reshape(-1)
    n = flat.numel()
    top = (1 << bits) - 1
    groups = -(-n // group)
    codes = torch.empty(minmax_code_bytes(n, bits), dtype=torch.uint8, device=x.device)
    scales = torch.empty(groups, dtype=torch.float32, device=x.device)
    mins = torch.empty(groups, dtype=torch.float32, device=x.device)
    piece_len = max(PIECE // group, 1) * group
    for start in range(0, n, piece_len):
        m = min(piece_len, n - start)
        t = _grouped(flat[start:start + m].to(torch.float32, copy=True), group)  # (g, group)
        lo, hi = t.aminmax(dim=1, keepdim=True)
        s = (hi - lo).clamp_(min=1e-5).div_(top)
        t.sub_(lo).div_(s)
        if random_bits is None:
            t.round_()
        else:
            floor = t.floor()
            u = _grouped(random_bits(start, m).to(t.device).float(), group).add_(0.5).div_(65536.0)
            t = floor.add_(u.lt_(t.sub_(floor)))
        c = t.clamp_(0, top).to(torch.uint8).view(-1)[:m]  # clamp: (max - min) / s may round above top
        if bits == 8:
            codes[start:start + m] = c
        else:
            if m % 2:
                c = torch.cat([c, c.new_zeros(1)])
            codes[start // 2:start // 2 + c.numel() // 2] = (c[0::2] << 4) | c[1::2]
        g0 = start // group
        scales[g0:g0 + s.numel()] = s.view(-1)
        mins[g0:g0 + lo.numel()] = lo.view(-1)
    return {"codes": codes, "scales": scales, "mins": mins}


def minmax_dequantize(q: Quantized, bits: int, group: int, shape: tuple[int, ...] | torch.Size,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """min + code x scale of every entry, in ``dtype``."""
    n = math.prod(shape)
    c = q["codes"]
    if bits == 4:
        c = torch.stack([c >> 4, c & 0xF], dim=1).view(-1)[:n]
    out = _grouped(c.float(), group)
    out.mul_(q["scales"].unsqueeze(1)).add_(q["mins"].unsqueeze(1))
    return out.view(-1)[:n].reshape(shape).to(dtype)
