"""Q-GaLore's optimizer (Zhang et al., 2024; VITA-Group/Q-GaLore ``q_galore_adamw8bit.py``,
``q_galore_projector.py``): GaLore whose projected weights are stored in INT8 and whose projection
bases are stored in INT4, with a layer-adaptive lazy refresh of the bases.

- **INT8 weights without a high-precision copy.** A projected parameter of this optimizer may be a
  *gradient handle* (see :class:`QuantizedWeight`): a broadcast placeholder whose ``.grad`` is the
  weight's gradient while the weight itself lives in the module's INT8 buffers. Its update dequantizes
  the weight to fp32, runs GaLore's step on it (:class:`~lrpretrain.optim.GaLoreAdamW`), and
  re-quantizes the result with stochastic rounding (new scales and minima per group), whose bits come
  from :func:`lrpretrain.optim.bf16.rounding_bits` under a key of (seed, the parameter's slot, its
  update count ``sr_updates``): independent of the order parameters step in (per-layer updates equal
  the global step) and resumed exactly from the checkpointed counter.
- **INT4 bases.** At a refresh the top-r singular vectors (fp32 SVD) are stored as 4-bit group-wise
  min-max codes (``proj_left_q`` / ``proj_right_q`` with their scales and minima), dequantized for use.
- **Lazy refresh.** At each refresh the cosine similarity between the previous and the new first
  singular vector (of the unquantized SVD, as the reference) joins a queue of the last ``queue_size``;
  once the queue is full and its mean reaches ``cos_threshold``, this weight's gap is multiplied by
  ``gamma_proj`` (the reference doubles it; ``gamma_proj=0`` stops refreshing that weight for good).
  A weight refreshes at its steps t with t mod gap == 0 (t counts its updates from 0), as the
  reference. Gap, queue and previous vector are in the weight's optimizer state (``proj_gap``,
  ``proj_sims``, ``proj_first``): the refresh decisions are part of the checkpoint.

Why not torchao's prototype INT8 quantized training (``int8_weight_only_quantized_training``): its
weights are a tensor subclass (checkpoints then need torchao to load, and are not plain tensors), it
quantizes per row rather than Q-GaLore's groups of 256, its stochastic rounding draws from the global
RNG inside the optimizer's ``add_`` (the bits would depend on the order parameters step in, so per-layer
updates could not equal the global step, and on every other draw of that RNG), and it works through
torchao's own optimizers, not around a GaLore projection.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F

from lrpretrain.optim import quantized
from lrpretrain.optim.bf16 import rounding_bits, rounding_key
from lrpretrain.optim.galore import GaLoreAdamW
from lrpretrain.optim.projector import SVDBasis, svd_bases

RandomBits = Any  # (start, count) -> int32 tensor of 16-bit integers


class QuantizedWeight(Protocol):
    """What a gradient handle stands for: a weight stored quantized (a method's module)."""

    def dequantize(self) -> torch.Tensor:
        """The weight in fp32, (m, n)."""

    def store_(self, weight: torch.Tensor, random_bits: RandomBits | None) -> None:
        """Quantize the fp32 ``weight`` into the storage (stochastically with ``random_bits``)."""


class QuantizedSVDBasis(SVDBasis):
    """GaLore's SVD basis stored as ``bits``-bit group-wise min-max codes (``bits=0``: unquantized, as
    GaLore's); the first singular vector of each refresh is kept unquantized (``proj_first``) for the
    lazy refresh."""

    def __init__(self, bits: int = 4, group: int = 256):
        if bits not in (0, 4, 8):
            raise ValueError(f"proj_bits={bits}; allowed: 0 (unquantized), 4, 8")
        self.bits, self.group = bits, group

    def refresh(self, state: dict[str, Any], G: torch.Tensor, side: str, rank: int, seed: int) -> None:
        stored = any(k in state for k in ("proj_left", "proj_right", "proj_left_q", "proj_right_q"))
        P, Q, fell_back = svd_bases(G, side, rank, self.get(state, G, side, rank) if stored else (None, None), seed)
        if fell_back:
            state["svd_fallbacks"] = state.get("svd_fallbacks", 0) + 1
        state["proj_first"] = (P[:, 0] if P is not None else Q[0]).float().clone()
        for key, basis in (("proj_left", P), ("proj_right", Q)):
            if basis is None:
                continue
            if not self.bits:
                state[key] = basis.to(G.dtype).contiguous()
                continue
            q = quantized.minmax_quantize(basis, self.bits, self.group)
            state[key + "_q"], state[key + "_scales"], state[key + "_mins"] = q["codes"], q["scales"], q["mins"]

    def get(self, state: dict[str, Any], G: torch.Tensor, side: str, rank: int):
        if not self.bits:
            return super().get(state, G, side, rank)
        m, n = G.shape
        out = []
        for key, shape in (("proj_left", (m, rank)), ("proj_right", (rank, n))):
            if key + "_q" not in state:
                out.append(None)
                continue
            q = {"codes": state[key + "_q"], "scales": state[key + "_scales"], "mins": state[key + "_mins"]}
            out.append(quantized.minmax_dequantize(q, self.bits, self.group, shape, G.dtype))
        return out[0], out[1]


class QGaLoreAdamW(GaLoreAdamW):
    """GaLore (8-bit or fp32 moments) with INT4 bases, the lazy refresh and INT8 weights behind gradient
    handles (``quantized``: handle -> :class:`QuantizedWeight`)."""

    group_defaults = {**GaLoreAdamW.group_defaults, "cos_threshold": 0.4, "gamma_proj": 2.0, "queue_size": 5}

    def __init__(self, params, quantized: dict[torch.Tensor, QuantizedWeight] | None = None,
                 stochastic_round: bool = True, proj_bits: int = 4, proj_group_size: int = 256, **kw):
        super().__init__(params, basis=QuantizedSVDBasis(proj_bits, proj_group_size), **kw)
        self.quantized = {id(p): w for p, w in (quantized or {}).items()}
        self.stochastic_round = stochastic_round

    # -- INT8 weights ------------------------------------------------------------------------------
    def update_param(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        weight = self.quantized.get(id(p))
        if weight is None:
            super().update_param(p, group)
            return
        handle, grad = p.data, p.grad
        p.data = weight.dequantize()
        p.grad = grad if grad.dtype == torch.float32 else grad.float()
        try:
            self.step_param(p, group)
            result = p.data
        finally:
            p.data, p.grad = handle, grad
        state = self.state[p]
        bits = None
        if self.stochastic_round:
            count = int(state.get("sr_updates", 0))
            key = rounding_key(self.seed, self.slot_of(p), count)
            bits = lambda start, n: rounding_bits(key, start, n, result.device)  # noqa: E731
            state["sr_updates"] = count + 1
        weight.store_(result, bits)

    # -- the lazy refresh ----------------------------------------------------------------------------
    def refresh_due(self, state: dict[str, Any], group: dict[str, Any]) -> bool:
        gap = state.get("proj_gap", group["update_proj_gap"])
        if gap == 0:  # gamma_proj = 0 froze this weight's basis
            return "proj_first" not in state
        return state["step"] % gap == 0

    def refresh(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any], G: torch.Tensor,
                side: str, rank: int) -> None:
        before = state.get("proj_first")
        super().refresh(p, group, state, G, side, rank)
        after = state.get("proj_first")
        if before is None or after is None:
            return
        sim = F.cosine_similarity(before, after, dim=0).reshape(1).float()
        sims = torch.cat([state.get("proj_sims", sim.new_zeros(0)), sim])[-group["queue_size"]:]
        state["proj_sims"] = sims
        if sims.numel() == group["queue_size"] and float(sims.mean()) >= group["cos_threshold"]:
            gap = state.get("proj_gap", group["update_proj_gap"])
            state["proj_gap"] = int(gap * group["gamma_proj"])
            state["lazy_growths"] = state.get("lazy_growths", 0) + 1
