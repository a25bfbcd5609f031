"""The low-rank toolkit that every reparameterization method reuses.

- :class:`~lrpretrain.methods.base.Reparameterized` (part of the plugin contract, in ``base``): the base
  of every module that replaces a target ``nn.Linear``. It states its function as one dense weight
  (``dense_weight()``), which is all that merging, export (``base.dense_state_dict``) and
  function-preservation tests need.
- :func:`reparameterize`: replace the selected target projections (``method.targets``, see
  :mod:`lrpretrain.methods.targets`) with modules built from the original Linear.
- Factor initialisations (:func:`kaiming_uniform_`, the ``nn.Linear`` default that LoRA uses for A).
- :class:`LoRALinear` (frozen W0 + s·B·A, with :meth:`~LoRALinear.merge_`) shared by LoRA, ReLoRA,
  PeriodicLoRA and SwitchLoRA; :class:`LowRankLinear` (W = B·A).
- :func:`check_rank`: one clear error for a rank outside [1, min(m, n)]; :func:`check_rank_for_model`
  checks it at config time against every target's shape (:func:`target_shapes`).
- :func:`reparameterized_cost`: analytic params / trainable params / training FLOPs per token of a
  model whose targets are replaced, from a per-target cost (each method's ``cost()``).
- :func:`seeded_generator`: a method's own RNG, derived from the run's seed (saved in checkpoints).
- :func:`compute_dtype`: the matmul dtype under autocast, for custom autograd functions.
- :func:`restart_ramp`: the LR factor of a jagged schedule (ReLoRA's restarts, LORO's cosine restarts).
- :func:`parameter_counts` and :func:`reset_optimizer_state` (full, magnitude or random pruning of
  the optimizer's moments, as ReLoRA's restarts need); :func:`restart_optimizer_state` (forget a
  parameter's whole state, step counter included, as SST's swapped vectors need).
- :func:`decoder_cost`: exact parameters and FLOPs per token of a reparameterized decoder.
- :func:`saved_activation_bytes`: the bytes autograd holds for backward after a forward, the measure
  of every activation-recomputation policy (CoLA-M, CR-Net).

Shapes follow ``nn.Linear``: a weight is (out_features, in_features) = (m, n); ``A`` is (r, n) and
``B`` is (m, r), so ``y = x W^T`` becomes ``y = (x A^T) B^T``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from lrpretrain.comm import shard_rows
from lrpretrain.errors import ConfigError
from lrpretrain.methods.base import Reparameterized
from lrpretrain.methods.targets import expand_targets, select_targets, set_module
from lrpretrain.model.llama import flops_per_token, param_count
from lrpretrain.optim.bf16 import forget_compensation

if TYPE_CHECKING:
    from lrpretrain.config import ModelConfig

# -- ranks ------------------------------------------------------------------------------------------


def check_rank(rank: int, shape: tuple[int, int], where: str, key: str = "method.rank", clamp: bool = False) -> int:
    """``rank`` if it lies in [1, min(shape)]; clamped to min(shape) when ``clamp``; else a ConfigError."""
    limit = min(shape)
    if rank <= 0:
        raise ConfigError(f"{key}={rank} is invalid: must be > 0")
    if rank > limit:
        if clamp:
            return limit
        raise ConfigError(f"{key}={rank} is invalid: must be <= min(m, n) = {limit} for {where} "
                          f"({shape[0]}x{shape[1]})")
    return rank


def target_shapes(model_cfg: ModelConfig, targets: list[str]) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) = (m, n) of each selected projection name (the same in every layer)."""
    d, f = model_cfg.dim, model_cfg.ffn_dim
    shapes = {"q_proj": (d, d), "k_proj": (d, d), "v_proj": (d, d), "o_proj": (d, d),
              "gate_proj": (f, d), "up_proj": (f, d), "down_proj": (d, f)}
    return {name: shapes[name] for name in expand_targets(list(targets))}


def check_rank_for_model(rank: int, model_cfg: ModelConfig, targets: list[str], key: str = "method.rank") -> None:
    """At config time (no model built): ``rank`` must fit every target of ``model_cfg``."""
    for name, shape in target_shapes(model_cfg, targets).items():
        check_rank(rank, shape, f"{name} of model={model_cfg.name}", key)


# -- initialisation -----------------------------------------------------------------------------------


@torch.no_grad()
def kaiming_uniform_(t: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``nn.Linear``'s default: Kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    with fan_in = t.shape[1]. LoRA and ReLoRA initialise A this way."""
    bound = 1.0 / math.sqrt(t.shape[1])
    if isinstance(t, DTensor):  # FSDP2: draw the whole matrix as one process would, keep this rank's rows
        full = torch.empty(t.shape, dtype=t.dtype).uniform_(-bound, bound, generator=generator)
        t.to_local().copy_(full[shard_rows(t)])
        return t
    if generator is not None and generator.device != t.device:  # a CPU generator for a GPU tensor
        return t.copy_(torch.empty(t.shape, dtype=t.dtype).uniform_(-bound, bound, generator=generator))
    return t.uniform_(-bound, bound, generator=generator)


def seeded_generator(salt: int) -> torch.Generator:
    """A CPU generator for a method's own sampling (re-initialisations, supports, pruning masks).

    Seeded from the run's seed (``torch.initial_seed()`` after the trainer's ``seed_everything``) plus
    a per-method ``salt``, so it does not depend on what else drew from the global RNG. A method keeps
    it and saves ``get_state()`` in ``state_dict()`` so that resume continues the same stream.
    """
    return torch.Generator().manual_seed((torch.initial_seed() + salt) % (1 << 63))


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast would run a matmul on ``x`` in (bf16 under bf16 autocast), else x's: for custom
    autograd functions that spell autocast's semantics out."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def restart_ramp(step: int, period: int, warmup: int) -> float:
    """The LR factor at update ``step`` (0-based) of a schedule restarted every ``period`` updates: at each
    restart (update k·period, k >= 1) it drops to 0 and ramps linearly back to 1 over ``warmup`` updates;
    1 elsewhere (the first cycle has only the base schedule's warmup). It multiplies the base schedule."""
    into_cycle = step % period
    return into_cycle / warmup if step >= period and into_cycle < warmup else 1.0


# -- modules ------------------------------------------------------------------------------------------


class LowRankLinear(Reparameterized):
    """W = s·B·A with both factors trained (the plain low-rank baseline); s defaults to 1.

    ``dropout`` acts on the input of A (as LoRA's dropout); the factors are left uninitialised:
    the method that builds the module chooses their initialisation.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, device=None, dtype=None,
                 scale: float = 1.0, dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.scale, self.dropout = scale, dropout
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(out_features, rank, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(F.linear(F.dropout(x, self.dropout, self.training), self.lora_A), self.lora_B)
        return y if self.scale == 1.0 else self.scale * y

    def dense_weight(self) -> torch.Tensor:
        return self.scale * (self.lora_B.float() @ self.lora_A.float())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"scale={self.scale:g}, dropout={self.dropout:g}")


class LoRALinear(Reparameterized):
    """y = x W0^T + s · (x A^T) B^T with W0 frozen (``weight``), A (r, n) and B (m, r) trained.

    A is Kaiming-uniform and B zero, so the adapter starts as a no-op yet B receives a gradient
    from the first step (ReLoRA's reference zero-initialises both factors, which leaves them
    untrained until the first merge: ReLoRA issue #18).
    """

    def __init__(self, base: nn.Linear, rank: int, scale: float, train_base: bool = False, dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.scale, self.dropout = rank, scale, dropout  # dropout: on the adapter's input only
        self.weight = nn.Parameter(base.weight.detach().clone(), requires_grad=train_base)  # W0
        w = self.weight
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, rank, device=w.device, dtype=w.dtype))
        self.reset_factors()

    @torch.no_grad()
    def reset_factors(self, generator: torch.Generator | None = None) -> None:
        kaiming_uniform_(self.lora_A, generator)
        self.lora_B.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xa = F.linear(F.dropout(x, self.dropout, self.training), self.lora_A)
        return F.linear(x, self.weight) + self.scale * F.linear(xa, self.lora_B)

    def delta(self) -> torch.Tensor:
        """s·B·A in fp32."""
        return self.scale * (self.lora_B.float() @ self.lora_A.float())

    def dense_weight(self) -> torch.Tensor:
        return self.weight.float() + self.delta()

    @torch.no_grad()
    def merge_(self, reinit: bool = True, generator: torch.Generator | None = None) -> None:
        """W0 <- W0 + s·B·A, then (by default) a fresh adapter: the function is unchanged."""
        self.weight.copy_(self.dense_weight().to(self.weight.dtype))
        if reinit:
            self.reset_factors(generator)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"scale={self.scale:g}, dropout={self.dropout:g}, train_base={self.weight.requires_grad}")


# -- surgery and export ---------------------------------------------------------------------------------


def reparameterize(model: nn.Module, targets: list[str],
                   build: Callable[[str, nn.Linear], nn.Module]) -> list[tuple[str, nn.Module]]:
    """Replace every selected target projection with ``build(qualified_name, linear)``.

    ``build`` sees the original, initialised ``nn.Linear`` (so a method can start from the standard
    init, e.g. SST's SVD of it) and returns the replacement. Returns the new modules in model order.
    """
    replaced = []
    for qual, linear in select_targets(model, targets):
        if not isinstance(linear, nn.Linear):
            raise ConfigError(f"{qual} is a {type(linear).__name__}, not an nn.Linear: it was already replaced")
        new = build(qual, linear)
        set_module(model, qual, new)
        replaced.append((qual, new))
    return replaced


# -- accounting -------------------------------------------------------------------------------------------


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Total, trainable and frozen parameter counts (shared tensors counted once)."""
    seen: set[int] = set()
    total = trainable = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return {"total": total, "trainable": trainable, "frozen": total - trainable}


# Per-target cost of a reparameterization: (parameters, trainable parameters, training FLOPs per token)
# of one (m, n) target module.
TargetCost = Callable[[int, int], tuple[float, float, float]]


def dense_target_cost(m: int, n: int) -> tuple[float, float, float]:
    """An ``nn.Linear(n, m)`` trained in full: 2mn FLOPs forward, 4mn backward (input and weight grads)."""
    return float(m * n), float(m * n), 6.0 * m * n


def reparameterized_cost(model_cfg: ModelConfig, seq_len: int, targets: list[str],
                         per_target: TargetCost) -> dict[str, float]:
    """``cost()`` of a model whose selected targets are replaced: the full-rank analytic cost with
    every target's dense share swapped for ``per_target(m, n)`` (embeddings, head, norms unchanged)."""
    params = trainable = float(param_count(model_cfg))
    flops = flops_per_token(model_cfg, seq_len)
    for m, n in target_shapes(model_cfg, targets).values():
        p, t, f = per_target(m, n)
        dp, dt, df = dense_target_cost(m, n)
        params += model_cfg.n_layers * (p - dp)
        trainable += model_cfg.n_layers * (t - dt)
        flops += model_cfg.n_layers * (f - df)
    return {"params": params, "trainable_params": trainable, "flops_per_token": flops}


def decoder_cost(model_cfg: ModelConfig, seq_len: int, layer_matmul: Sequence[int],
                 layer_other: Sequence[int] = ()) -> dict[str, float]:
    """Exact parameters and training FLOPs per token of a LLaMA whose decoder layer i holds
    ``layer_matmul[i]`` matmul-weight entries (and ``layer_other[i]`` other entries, e.g. CR-Net's β),
    everything trained; embeddings, LM head and norms as in the plain model.

    FLOPs follow :meth:`~lrpretrain.methods.base.Method.cost`: a weight entry costs 2 FLOPs per token
    forward and 4 backward (6N over the matmul weights, LM head included), plus the causal attention
    scores. Elementwise work (norms, SiLU, SwiGLU, CR-Net's β·Y) is not counted, as for every method;
    unlike the base (6 x all non-embedding parameters) the norm weights are not counted as matmuls.
    """
    d, V, L = model_cfg.dim, model_cfg.vocab_size, model_cfg.n_layers
    if len(layer_matmul) != L:
        raise ValueError(f"layer_matmul has {len(layer_matmul)} entries for {L} layers")
    embeddings = V * d * (1 if model_cfg.tie_embeddings else 2)
    params = embeddings + d * (2 * L + 1) + sum(layer_matmul) + sum(layer_other)
    attention = 12 * L * d * seq_len / 2  # QKᵀ and AV, halved by the causal mask (as llama.flops_per_token)
    return {"params": float(params), "trainable_params": float(params),
            "flops_per_token": 6.0 * (sum(layer_matmul) + V * d) + attention}


def saved_activation_bytes(model: nn.Module, forward: Callable[[], Any]) -> tuple[Any, int]:
    """Run ``forward()`` and return (its result, bytes of the activations autograd saved for backward).

    Every tensor an op saves passes through ``saved_tensors_hooks``; a storage counts once however
    many ops (or views) save it, which is what memory holds. Parameters and buffers of ``model``
    (weights saved by matmuls, RoPE tables) are not activations and are left out. Inside a
    ``torch.utils.checkpoint`` region only the region's inputs are saved, so this measures a
    recomputation policy exactly. Keep the result alive to keep the graph (and the bytes) alive.
    """
    static = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    held: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in static:
            held[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    return out, sum(held.values())


# -- optimizer state ------------------------------------------------------------------------------------


MOMENT_KEYS = ("exp_avg", "exp_avg_sq")


@torch.no_grad()
def reset_optimizer_state(optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor], mode: str,
                          ratio: float = 1.0, generator: torch.Generator | None = None,
                          keys: tuple[str, ...] = MOMENT_KEYS, reset_step: bool = False) -> tuple[int, int]:
    """Zero part of the optimizer's moments of ``params``; returns (entries zeroed, entries seen).

    ``full``: every entry. ``magnitude``: per tensor, the entries whose |value| lies below the
    ``ratio`` quantile (ReLoRA's partial reset; each moment pruned by its own magnitudes).
    ``random``: per tensor, each entry with probability ``ratio`` (drawn from ``generator``).
    Step counters are kept (the bias correction goes on), as in ReLoRA's reference, unless
    ``reset_step``: then ``state["step"]`` restarts at 0 too, as in a freshly built optimizer.
    """
    if mode not in ("full", "magnitude", "random"):
        raise ConfigError(f"optimizer reset mode '{mode}' is invalid; allowed: full, magnitude, random")
    if not 0.0 <= ratio <= 1.0:
        raise ConfigError(f"optimizer reset ratio={ratio} is invalid: must be in [0, 1]")
    zeroed = seen = 0
    for p in params:
        state = optimizer.state.get(p, {})
        forget_compensation(state)  # restarted parameters are re-initialised or merged: the old rounding error goes
        for key in keys:
            t = state.get(key)
            if not isinstance(t, torch.Tensor) or t.numel() == 0:
                continue
            # FSDP2: the mask of the whole moment (magnitude quantiles are global), applied to this shard
            shard, t = (t, t.full_tensor()) if isinstance(t, DTensor) else (None, t)
            if mode == "full" or ratio >= 1.0:
                mask = torch.ones_like(t, dtype=torch.bool)
            elif mode == "magnitude":
                k = int(ratio * t.numel())  # the k smallest |values| are zeroed
                mask = torch.zeros(t.numel(), dtype=torch.bool, device=t.device)
                if k > 0:
                    mask[t.abs().flatten().argsort(stable=True)[:k]] = True
                mask = mask.view_as(t)
            else:
                mask = torch.rand(t.shape, generator=generator, device="cpu").to(t.device) < ratio
            if shard is None:
                t.masked_fill_(mask, 0)
            else:
                shard.to_local().masked_fill_(mask[shard_rows(shard)], 0)
            zeroed += int(mask.sum())
            seen += t.numel()
        step = state.get("step")
        if reset_step and isinstance(step, torch.Tensor):
            step.zero_()
    return zeroed, seen


ROUNDING_STATE = ("bf16_updates", "bf16_comp")  # trainer.precision=pure_bf16's entries (lrpretrain/optim/bf16.py)


def restart_optimizer_state(optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor],
                            keep_rounding: bool = False) -> int:
    """Forget the optimizer's whole state of ``params`` (moments and step counter): the next update
    starts them as new parameters, bias correction included. Returns how many had state.

    ``keep_rounding``: keep the pure-bf16 rounding entries (the stochastic rounding's update count, so no
    rounding bits are drawn twice, and the Kahan buffer, which belongs to the weight, not to the
    moments); only for an optimizer that initialises a state by its moments' absence (LOROAdamW), not
    by an empty state (AdamW)."""
    n = 0
    for p in params:
        state = optimizer.state.pop(p, None)
        if state is None:
            continue
        n += 1
        kept = {k: state[k] for k in ROUNDING_STATE if keep_rounding and k in state}
        if kept:
            optimizer.state[p] = kept
    return n
