"""Updating bf16 weights without an fp32 master copy (``trainer.precision=pure_bf16``).

Under ``pure_bf16`` every parameter is stored in bf16 (8 bits of mantissa: an increment below half a
bf16 ulp, about 2^-9 of the weight's magnitude, is lost by plain rounding). The optimizer's arithmetic
still runs in fp32: each parameter's step runs on an fp32 working copy of the weight and of its
gradient (chunk by chunk for element-wise steps, see
:meth:`~lrpretrain.optim.ParamwiseOptimizer.elementwise_step`; whole for steps that need the matrix,
:meth:`Bf16Update.step`), and the fp32 result is written back into the bf16 storage with one of three
rules (``trainer.bf16_update``):

- ``nearest``: round to nearest even (what a bf16 model under a plain optimizer gets; GaLore's
  pure-bf16 script). Updates below half a bf16 ulp vanish.
- ``stochastic`` (default): round up with probability equal to the fraction of the ulp, so the
  stored weight is the fp32 result in expectation: small updates survive on average.
- ``kahan``: keep the rounding error in a bf16 compensation buffer per weight (``bf16_comp`` in the
  parameter's optimizer state) and add it back before the next update: the weight is effectively
  stored as bf16 + bf16 (about 16 bits of mantissa) for 2 more bytes per parameter.

The stochastic rule's random bits are a *function of the position*: the 16 bits that round entry i of
a parameter at its k-th update come from a generator seeded by (seed, the parameter's position in the
optimizer, k, i // 2^20), with k (``bf16_updates``) kept in the parameter's optimizer state and i the
entry's index in the whole (unsharded) tensor. So the rounding does not depend on the order in which parameters step (the
per-layer update steps them inside the backward, last layer first, and equals the global step bit
for bit), on how a step is cut into chunks, or on how FSDP2 shards a weight across ranks (a 2-rank
run rounds every entry as one process would); it never draws from, or disturbs, the RNGs that
dropout and the data use; and a resumed run continues exactly (the checkpointed optimizer state holds
the counters).

Why our own rounding rather than torchao's (``torchao.optim`` has bf16 stochastic rounding in its
AdamW): torchao draws from the global RNG inside its fused step, so the rounding bits would depend on
the order parameters step in (per-layer updates would no longer equal the global step), on the
sharding, and on every other draw from that RNG; and it works only inside torchao's own optimizers,
not around our per-parameter steps (GaLore, Fira, APOLLO, FRUGAL, 8-bit states, ...). The rounding
itself is the standard bit trick (as in torchao): add 16 random bits below the bf16 mantissa of the
fp32 value and truncate; tests/test_pure_bf16.py checks it against a float64 reference.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from lrpretrain.comm import local, shard_rows

RULES = ("stochastic", "nearest", "kahan")
SR_BLOCK = 1 << 20  # entries of a tensor whose rounding bits come from one seeded draw


def rounding_bits(key: int, start: int, count: int, device: torch.device | str) -> torch.Tensor:
    """16 random bits (int32 in [0, 2^16)) for the entries ``start .. start + count - 1`` of a tensor
    under ``key``: entry i's bits are drawn, with the bits of the other entries of its block
    i // SR_BLOCK, from a generator seeded by (key, block), so they are a function of (key, i) alone."""
    out = torch.empty(count, dtype=torch.int32, device=device)
    for i, bits in _block_bits(key, start, count, torch.device(device)):
        out[i:i + len(bits)] = bits
    return out


def _block_bits(key: int, start: int, count: int, device: torch.device):
    """(offset within the range, bits) for the pieces of [start, start + count) cut at block borders."""
    i = 0
    while i < count:
        block, lo = divmod(start + i, SR_BLOCK)
        take = min(SR_BLOCK - lo, count - i)
        gen = torch.Generator(device=device).manual_seed(_mix(key, block))
        yield i, torch.randint(0, 1 << 16, (lo + take,), dtype=torch.int32, device=device, generator=gen)[lo:]
        i += take


def stochastic_round_(out: torch.Tensor, x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Write fp32 ``x`` into the bf16 tensor ``out``, rounding each entry up or down to a neighbouring
    bf16 value with the probabilities that make the result equal ``x`` in expectation, given uniform
    16-bit integers ``bits`` (int32, x's shape; consumed).

    An fp32 value's bf16 neighbours share its upper 16 bits (sign, exponent, 7 mantissa bits); adding
    a uniform 16-bit integer to the lower 16 bits carries into the upper ones with probability
    (lower bits) / 2^16, i.e. the distance to the lower neighbour in ulps; truncating then keeps the
    upper half. The sign-magnitude layout makes this unbiased for negative values too; infinities stay
    infinite and NaNs stay NaN.
    """
    x = x.float().contiguous()
    r = bits.view(x.shape).add_(x.view(torch.int32)).bitwise_and_(-65536)  # -65536 == 0xFFFF0000 as int32
    r = r.view(torch.float32).masked_fill_(torch.isnan(x), float("nan"))  # a NaN payload in the low bits
    return out.copy_(r)  # exact: the lower 16 bits are zero


def stochastic_round(x: torch.Tensor, key: int = 0) -> torch.Tensor:
    """fp32 ``x`` -> a new bf16 tensor, stochastically rounded with the bits of ``key``."""
    out = torch.empty(x.shape, dtype=torch.bfloat16, device=x.device)
    return stochastic_round_(out, x, rounding_bits(key, 0, x.numel(), x.device).view(x.shape))


def forget_compensation(state: dict[str, Any], index: torch.Tensor | None = None, dim: int = 0) -> None:
    """A method rewrote a weight (or its rows/columns ``index`` along ``dim``) outside the optimizer
    (a merge, a re-initialisation, a switched vector): the ``kahan`` rounding error kept for the old
    values no longer belongs to the new ones, so it is dropped (zeroed)."""
    comp = state.get("bf16_comp")
    if comp is None:
        return
    if index is None:
        state.pop("bf16_comp")
    else:
        local(comp).index_fill_(dim, index.to(local(comp).device), 0)


def rounding_key(*values: int) -> int:
    """A key for :func:`rounding_bits` from integers (a seed, a parameter's slot, its update count):
    nearby values give unrelated streams. For stochastic rounding elsewhere (Q-GaLore's INT8 weights)."""
    return _mix(*values)


def _mix(*values: int) -> int:
    """A 63-bit key from integers (splitmix64 steps), so nearby counters give unrelated streams."""
    z = 0
    for v in values:
        z = ((z ^ (v & 0xFFFFFFFFFFFFFFFF)) + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        z ^= z >> 31
    return z >> 1


class Writer:
    """One parameter's update under one rule: fp32 working copies of its bf16 weight (:meth:`load`),
    rounded back (:meth:`store`), whole or by flat pieces ``sl``; :meth:`close` when it is done."""

    def __init__(self, rule: str, state: dict[str, Any], weight: torch.Tensor, key: int):
        self.rule, self.state, self.key = rule, state, key
        self.comp = None
        if rule == "kahan":
            if "bf16_comp" not in state:
                state["bf16_comp"] = torch.zeros_like(weight)
            self.comp = local(state["bf16_comp"])
        self.device = local(weight).device
        # index of this rank's first entry in the whole tensor (an FSDP2 shard holds whole rows)
        self.offset = 0
        if isinstance(weight, DTensor):
            self.offset = shard_rows(weight).start * (weight.numel() // max(weight.shape[0], 1))

    def _comp(self, sl: slice | None) -> torch.Tensor:
        assert self.comp is not None
        return self.comp if sl is None else self.comp.view(-1)[sl]

    def load(self, w: torch.Tensor, sl: slice | None) -> torch.Tensor:
        """The fp32 working copy of ``w`` (the bf16 weight, or its flat entries ``sl``); a sharded
        (DTensor) weight gives a DTensor copy."""
        x = w.float()
        if self.comp is not None:
            local(x).add_(self._comp(sl))
        return x

    def store(self, w: torch.Tensor, x: torch.Tensor, sl: slice | None) -> None:
        """Round the updated fp32 ``x`` into ``w`` (local tensors: the weight or its flat entries ``sl``)."""
        if self.rule != "stochastic":
            w.copy_(x)  # round to nearest even
            if self.comp is not None:  # kahan: keep what the rounding lost
                self._comp(sl).copy_(x.sub_(w.float()))
            return
        flat = w if w.is_contiguous() else w.contiguous()  # entries in row-major order of the whole tensor
        wf, xf = flat.view(-1), x.reshape(-1)
        start = self.offset + (0 if sl is None else sl.start)
        for i, bits in _block_bits(self.key, start, wf.numel(), wf.device):  # one block's bits at a time
            stochastic_round_(wf[i:i + len(bits)], xf[i:i + len(bits)], bits)
        if flat is not w:
            w.copy_(flat)

    def kernel_args(self, sl: slice) -> dict[str, Any]:
        """What a fused step (``trainer.kernels``) needs to round the flat entries ``sl`` of the weight as
        :meth:`store` would: the rule, and the piece's random bits (the same bits: :func:`rounding_bits`
        of the entries' indices in the whole tensor) or its Kahan compensation (added in and updated)."""
        out: dict[str, Any] = {"rule": self.rule}
        if self.rule == "stochastic":
            out["bits"] = rounding_bits(self.key, self.offset + sl.start, sl.stop - sl.start, self.device)
        if self.comp is not None:
            out["comp"] = self._comp(sl)
        return out

    def close(self) -> None:
        if self.rule == "stochastic":
            self.state["bf16_updates"] = int(self.state.get("bf16_updates", 0)) + 1


class Bf16Update:
    """Runs an optimizer's per-parameter step on fp32 copies of a bf16 weight and writes the result
    back with the rounding ``rule`` (see the module docstring)."""

    def __init__(self, rule: str = "stochastic", seed: int = 0):
        if rule not in RULES:
            raise ValueError(f"unknown bf16 update rule '{rule}'; allowed: {', '.join(RULES)}")
        self.rule, self.seed = rule, seed

    def applies_to(self, p: torch.Tensor) -> bool:
        return p.dtype == torch.bfloat16

    def writer(self, state: dict[str, Any], weight: torch.Tensor, slot: int) -> Writer:
        """A :class:`Writer` for this update of the parameter at position ``slot`` (its optimizer state
        ``state`` must be initialised: the rule adds its own entries)."""
        k = int(state.get("bf16_updates", 0))
        return Writer(self.rule, state, weight, _mix(self.seed, slot, k))

    @torch.no_grad()
    def step(self, p: torch.Tensor, state: dict[str, Any], slot: int, step_param: Callable[[], None]) -> None:
        """Run ``step_param()`` (the optimizer's whole step of ``p``, which may need the whole matrix: a
        projection) with ``p`` and ``p.grad`` as fp32 copies, then round the result into ``p``'s bf16
        storage. ``state`` is p's optimizer state; ``slot`` p's fixed position in the optimizer."""
        weight, grad = p.data, p.grad
        writer = self.writer(state, weight, slot) if state else None  # no state yet: the first step makes it
        p.data = writer.load(weight, None) if writer else weight.float()
        p.grad = None if grad is None else grad.float()
        try:
            step_param()
            result = p.data
        finally:
            p.data, p.grad = weight, grad
        if writer is None:
            writer = self.writer(state, weight, slot)
        writer.store(local(weight), local(result), None)
        writer.close()
