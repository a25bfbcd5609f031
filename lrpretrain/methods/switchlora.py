"""SwitchLoRA (Zhou, Wang, Xu; arXiv 2406.06564): LoRA whose vectors are switched with candidates.

Every target projection is ``W0 + s·B·A`` with W0 frozen and A (r, n), B (m, r) trained, as LoRA.
Each layer also keeps two pools of min(m, n) candidate vectors, one for the rows a_i of A and one
for the columns b_i of B (offloaded to the CPU by default, as in the reference). After every update,
a few vectors are switched for candidates, so over the run the adapter visits far more directions
than r, and the trained product reaches full rank. Facts below were checked against the reference,
asfsdsf/SwitchLoRA (switchlora/switch_lora.py, lora_utils.py, optimizer.py, llama/main.py).

- Switching a_i for candidate c keeps the function: ``W0 += s·b_i (a_i - c)^T``, then a_i <- c and
  the old a_i goes back to the pool (symmetric for b_i: ``W0 += s·(b_i - c) a_i^T``).
- The gradient of a_i depends on b_i (and the data) only, so a_i's Adam state stays valid when a_i
  is switched; the gradient of its counterpart b_i changes. So the *counterpart*'s moments and its
  own step counter are zeroed, and the counterpart is frozen (zero gradient) for ``adam_warm_step``
  updates while its moments warm up (reference: ``zero_lora_states`` on the vectors it marks fixed,
  ``correct_switched_lora``). Per-vector step counters live in :class:`~lrpretrain.optim.VectorwiseAdamW`.
- How many: r / interval per layer and update, stochastically rounded (one draw per layer, the same
  count for A and B), with ``interval = interval0 / rate(t)``, ``rate(t) = 0.3^((t+1)/(ratio·T))``:
  the frequency falls to 0.3x at ratio·T and keeps decaying.
- Which: the rows after a cursor, in order; A's cursor starts at 0 and B's at r/2 so a row's a_i and
  b_i are switched half a cycle apart. The candidate is the pool's next vector after the one the
  previous row took (``candidate_order=sequential``, the reference default) or a uniformly random
  free one (``random``, the reference's ``--discontinuous_switch``). A frozen vector is never
  switched: the run of rows switched stops before the first frozen one (the reference caps the
  count with the same aim); ``interval >= 2·adam_warm_step`` keeps that cap from binding.
- Init (reference ``get_init_lora_bound``, its default, non-"origin_lora" mode): candidates of A are
  U(-sqrt(3)·σ_A, sqrt(3)·σ_A) with σ_A = ((sqrt(m)·r)/n^(3/2))^(1/4)·sqrt(g), of B σ_B = (r/sqrt(m·n))^(1/4)·sqrt(g),
  g = gain(leaky_relu, sqrt(5)) = 1/sqrt(3); A and B start as the pool's last r vectors (B is not zero);
  and W0 = W_init - s·B·A, so the model starts exactly at the standard init. s = lora_alpha / r with
  lora_alpha = 1 (the reference's llama/main.py).

Differences from the reference, all deliberate: the reference also switches before the very first
update (we start after it: one random switch of untrained vectors fewer); it caps the count with one
cyclic-distance formula for A and B together, we stop each run at its first frozen vector.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lrpretrain.errors import CheckpointError, allowed, check
from lrpretrain.methods import register_method
from lrpretrain.methods.base import Method, StepContext
from lrpretrain.methods.subspace import target_shapes
from lrpretrain.methods.targets import TargetsConfig
from lrpretrain.methods.toolkit import LoRALinear, check_rank, reparameterize
from lrpretrain.optim import VectorwiseAdamW
from lrpretrain.optim.bf16 import forget_compensation

ORDERS = ("sequential", "random")


@dataclass
class SwitchLoRAConfig(TargetsConfig):
    rank: int = 128  # r
    lora_alpha: float = 1.0  # s = lora_alpha / r
    interval: int = 40  # interval0: at the start each vector is switched about once per `interval` updates
    descent_ratio: float = 0.1  # ratio: the switch frequency is 0.3x its start at ratio * total_steps
    adam_warm_step: int = 5  # updates a switched vector's counterpart stays frozen
    total_steps: int = 0  # T; conf/method/switchlora.yaml sets ${trainer.max_steps}
    candidate_order: str = "sequential"  # sequential | random
    offload_candidates: bool = True  # keep the candidate pools in CPU memory

    def validate(self) -> None:
        super().validate()
        check(self.rank > 0, "method.rank", self.rank, "must be > 0")
        check(self.lora_alpha > 0, "method.lora_alpha", self.lora_alpha, "must be > 0")
        check(self.interval > 0, "method.interval", self.interval, "must be > 0")
        check(self.adam_warm_step >= 0, "method.adam_warm_step", self.adam_warm_step, "must be >= 0")
        check(self.interval >= 2 * self.adam_warm_step, "method.interval", self.interval,
              f"must be >= 2 x method.adam_warm_step = {2 * self.adam_warm_step} (a vector and its counterpart "
              "must never be frozen together)")
        check(self.descent_ratio > 0, "method.descent_ratio", self.descent_ratio, "must be > 0")
        check(self.total_steps > 0, "method.total_steps", self.total_steps,
              "must be > 0 (conf/method/switchlora.yaml sets it to ${trainer.max_steps})")
        check(self.candidate_order in ORDERS, "method.candidate_order", self.candidate_order,
              f"allowed: {allowed(ORDERS)}")

    def validate_for_model(self, model_cfg) -> None:
        for name, shape in target_shapes(model_cfg, list(self.targets)).items():
            check_rank(self.rank, shape, name)


# -- the switching schedule -----------------------------------------------------------------------------


def switch_rate(step: int, descent_steps: float) -> float:
    """rate(t) = 0.3^((t+1)/descent_steps), floored at 1e-8 as in the reference."""
    return max(0.3 ** ((step + 1) / descent_steps), 1e-8)


def switch_interval(step: int, interval0: float, descent_steps: float) -> float:
    """interval(t) = interval0 / rate(t): updates between two switches of the same vector."""
    return interval0 / switch_rate(step, descent_steps)


def stochastic_round(x: float, generator: torch.Generator) -> int:
    """floor(x) + 1 with probability frac(x): unbiased, E = x. Always draws once (a fixed RNG stream)."""
    u = float(torch.rand((), generator=generator))
    return math.floor(x) + int(u < x - math.floor(x))


def candidate_bounds(m: int, n: int, rank: int) -> tuple[float, float]:
    """Uniform bounds of the A- and B-candidates (reference lora_utils.get_init_lora_bound)."""
    gain = nn.init.calculate_gain("leaky_relu", math.sqrt(5))
    std_a = ((m**0.5 * rank) / n**1.5) ** 0.25 * gain**0.5
    std_b = (rank / (m * n) ** 0.5) ** 0.25 * gain**0.5
    return math.sqrt(3.0) * std_a, math.sqrt(3.0) * std_b


# -- the layer ----------------------------------------------------------------------------------------------


class SwitchLoRALinear(LoRALinear):
    """``W0 + s·B·A`` (see :class:`LoRALinear`) with candidate pools and function-preserving switches.

    Pools and switch bookkeeping are plain tensors, not buffers: the pools are as large as W (min(m, n)
    vectors of length n and m) and live on the CPU; the method saves them (:meth:`switch_state`).
    """

    def __init__(self, base: nn.Linear, rank: int, scale: float, generator: torch.Generator,
                 offload: bool = True):
        super().__init__(base, rank, scale)
        m, n, r, w = self.out_features, self.in_features, rank, self.weight
        pool_device = torch.device("cpu") if offload else w.device
        c = min(m, n)
        bound_a, bound_b = candidate_bounds(m, n, r)
        self.candidates_A = torch.empty(c, n, dtype=w.dtype).uniform_(-bound_a, bound_a, generator=generator).to(pool_device)
        self.candidates_B = torch.empty(c, m, dtype=w.dtype).uniform_(-bound_b, bound_b, generator=generator).to(pool_device)
        # pool slot each row of A / column of B was taken from; the r rows hold a window of r consecutive slots
        self.slots_A = torch.arange(c - r, c)
        self.slots_B = c - r + (torch.arange(r) - r // 2) % r
        self.cursor_A, self.cursor_B = 0, r // 2  # next row of A / column of B to switch
        with torch.no_grad():
            self.lora_A.copy_(self.candidates_A[self.slots_A])
            self.lora_B.copy_(self.candidates_B[self.slots_B].T)
            self.weight.sub_(self.delta().to(w.dtype))  # W0 = W - s·B·A: the model starts at the standard init

    @property
    def spare_candidates(self) -> int:
        return self.candidates_A.shape[0] - self.rank

    def cursor(self, which: str) -> int:
        return self.cursor_A if which == "A" else self.cursor_B

    def free_run(self, which: str, frozen: torch.Tensor) -> int:
        """How many vectors from the cursor on (cyclically) are not frozen."""
        order = (self.cursor(which) + torch.arange(self.rank)) % self.rank
        hits = frozen.cpu()[order].nonzero()
        return int(hits[0]) if len(hits) else self.rank

    @torch.no_grad()
    def switch_(self, which: str, count: int, order: str = "sequential",
                generator: torch.Generator | None = None) -> torch.Tensor:
        """Switch ``count`` rows of A (``which="A"``) or columns of B (``"B"``) from the cursor on for
        candidates, keeping the layer's function. Returns the switched indices (CPU, long)."""
        r, c = self.rank, self.candidates_A.shape[0]
        if which == "A":  # vectors a_i (r, n); counterparts b_i as rows (r, m); W0 (m, n)
            vectors, counterparts, w0 = self.lora_A, self.lora_B.T, self.weight
            pool, slots, cursor = self.candidates_A, self.slots_A, self.cursor_A
        else:  # vectors b_i (r, m); counterparts a_i (r, n); W0^T (n, m)
            vectors, counterparts, w0 = self.lora_B.T, self.lora_A, self.weight.T
            pool, slots, cursor = self.candidates_B, self.slots_B, self.cursor_B
        count = min(count, r)
        if order == "sequential":
            count = min(count, self.spare_candidates)  # the new slots must lie outside the r in use
        if count <= 0:
            return torch.zeros(0, dtype=torch.long)
        index = (cursor + torch.arange(count)) % r
        if order == "sequential":  # the pool's next vectors after the previous row's
            new = (slots[(cursor - 1) % r] + 1 + torch.arange(count)) % c
        else:  # uniformly among the slots no other row holds
            free = torch.ones(c, dtype=torch.bool)
            free[slots] = False
            free[slots[index]] = True
            free = free.nonzero().flatten()
            new = free[torch.randperm(len(free), generator=generator)[:count]]
        rows = index.to(vectors.device)
        old = vectors[rows]  # advanced indexing: a copy
        pool[slots[index]] = old.to(pool.device, pool.dtype)  # the old vectors go back first (a random pick may take one)
        cand = pool[new].to(vectors.device, vectors.dtype)
        w0.add_(counterparts[rows].T.to(w0.dtype) @ (old - cand).to(w0.dtype), alpha=self.scale)
        vectors[rows] = cand
        slots[index] = new
        if which == "A":
            self.cursor_A = (cursor + count) % r
        else:
            self.cursor_B = (cursor + count) % r
        return index

    def switch_state(self) -> dict[str, torch.Tensor]:
        return {"candidates_A": self.candidates_A, "candidates_B": self.candidates_B, "slots_A": self.slots_A,
                "slots_B": self.slots_B, "cursors": torch.tensor([self.cursor_A, self.cursor_B])}

    @torch.no_grad()
    def load_switch_state(self, state: dict[str, torch.Tensor]) -> None:
        for key in ("candidates_A", "candidates_B", "slots_A", "slots_B"):
            getattr(self, key).copy_(state[key])
        self.cursor_A, self.cursor_B = (int(x) for x in state["cursors"])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, candidates={self.candidates_A.shape[0]} ({self.candidates_A.device})"


# -- the method -------------------------------------------------------------------------------------------


@register_method("switchlora")
class SwitchLoRA(Method):
    """LoRA from scratch with switched vectors; frozen W0, trained A, B and every non-target parameter."""
    unsupported_strategies = {
        "fsdp2": "its VectorwiseAdamW keeps per-row/column step counters and freezes and restarts single vectors "
                 "of the moments, which is not implemented on sharded (DTensor) state"}

    Config = SwitchLoRAConfig
    cfg: SwitchLoRAConfig

    def __init__(self, cfg: SwitchLoRAConfig, model_cfg):
        super().__init__(cfg, model_cfg)
        self.generator = torch.Generator()  # candidate pools, stochastic rounding, random candidate picks
        self.layers: list[tuple[str, SwitchLoRALinear]] = []

    @property
    def descent_steps(self) -> float:
        return self.cfg.descent_ratio * self.cfg.total_steps

    def prepare_model(self, model: nn.Module) -> nn.Module:
        self.generator.manual_seed(int(torch.randint(2**62, (1,))))  # from the run's seed
        c = self.cfg
        self.layers = reparameterize(model, list(c.targets), lambda _q, lin: SwitchLoRALinear(
            lin, c.rank, c.lora_alpha / c.rank, self.generator, c.offload_candidates))
        return model

    def param_groups(self, model: nn.Module, optim_cfg) -> list[dict[str, Any]]:
        """As full training, with the A factors and the B factors in groups of their own that keep one
        Adam step counter per row of A / column of B."""
        rows = [m.lora_A for _, m in self.layers]
        cols = [m.lora_B for _, m in self.layers]
        factors = {id(p) for p in rows + cols}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in factors]
        wd = optim_cfg.weight_decay
        groups = [{"params": [p for p in rest if p.ndim >= 2], "weight_decay": wd},
                  {"params": rows, "weight_decay": wd, "vectors": "rows"},
                  {"params": cols, "weight_decay": wd, "vectors": "columns"}]
        no_decay = [p for p in rest if p.ndim < 2]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        return groups

    def build_optimizer(self, groups, optim_cfg) -> VectorwiseAdamW:
        return VectorwiseAdamW(groups, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps,
                               weight_decay=optim_cfg.weight_decay, state_bits=optim_cfg.state_bits)

    @torch.no_grad()
    def after_step(self, ctx: StepContext) -> None:
        opt = ctx.optimizer
        if not isinstance(opt, VectorwiseAdamW):
            raise TypeError(f"switchlora needs the VectorwiseAdamW it builds, not {type(opt).__name__}")
        # ctx.step updates are done: this switch precedes update index ctx.step, as the reference's
        # switch_lora(..., global_step=t) precedes its optimizer step t
        interval = switch_interval(ctx.step, self.cfg.interval, self.descent_steps)
        expected = self.cfg.rank / interval
        switched = 0
        for _, layer in self.layers:
            count = stochastic_round(expected, self.generator)
            for which, own, other in (("A", layer.lora_A, layer.lora_B), ("B", layer.lora_B, layer.lora_A)):
                n = min(count, layer.free_run(which, opt.frozen_vectors(own)))
                index = layer.switch_(which, n, self.cfg.candidate_order, self.generator)
                if len(index):
                    forget_compensation(opt.state[own], index, 0 if which == "A" else 1)  # new vectors
                    opt.restart_vectors(other, index)
                    opt.freeze_vectors(other, index, self.cfg.adam_warm_step)
                    switched += len(index)
        ctx.log({"switched_vectors": switched, "switch_interval": interval})

    # -- checkpoints ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(),
                "layers": {q: m.switch_state() for q, m in self.layers}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        names = {q for q, _ in self.layers}
        if set(state["layers"]) != names:
            raise CheckpointError("the checkpoint's SwitchLoRA candidate pools do not fit this model "
                                  f"({len(state['layers'])} layers saved, {len(names)} here)")
        for q, m in self.layers:
            m.load_switch_state(state["layers"][q])
        self.generator.set_state(state["generator"])

    # -- accounting -----------------------------------------------------------------------------------------
    def layer_extra_values(self, model_cfg) -> float:
        """x·Aᵀ: r values per target (no dropout)."""
        return float(self.cfg.rank * len(target_shapes(model_cfg, list(self.cfg.targets))))

    def cost(self, model_cfg, seq_len: int) -> dict[str, float]:
        """W0 stays (no weight gradient): per target 4mn + 6r(m+n) training FLOPs per token instead of 6mn."""
        base = super().cost(model_cfg, seq_len)
        shapes = list(target_shapes(model_cfg, list(self.cfg.targets)).values()) * model_cfg.n_layers
        r = self.cfg.rank
        factors = sum(r * (m + n) for m, n in shapes)
        dense = sum(m * n for m, n in shapes)
        return {"params": base["params"] + factors,
                "trainable_params": base["trainable_params"] - dense + factors,
                "flops_per_token": base["flops_per_token"] - 2 * dense + 6 * factors,
                "candidate_params": float(sum(min(m, n) * (m + n) for m, n in shapes)),
                # the pools (fp32) in device memory, unless offloaded to the host (the default)
                "method_state_bytes": 0.0 if self.cfg.offload_candidates else 4.0 * sum(min(m, n) * (m + n)
                                                                                         for m, n in shapes)}
