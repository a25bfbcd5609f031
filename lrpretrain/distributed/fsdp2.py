"""``distributed.strategy=fsdp2``: parameters, gradients and optimizer state sharded with ``fully_shard``.

**Building.** Every rank builds the model on the meta device (nothing allocated) and runs the
method's module surgery there (a method whose surgery needs real weights, SST's SVD of the initial
weight, is built in full on every rank instead, as a single process does, then sharded); then each decoder block and the root become FSDP units
(``fully_shard`` with a :class:`MixedPrecisionPolicy` from ``distributed.param_dtype`` /
``reduce_dtype``), and the sharded parameters are allocated on the device. Their values come from
rank 0, which builds the same model once more on the CPU exactly as a single process does (same
seed, same surgery) and broadcasts it shard by shard (``set_model_state_dict(...,
broadcast_from_rank0=True)``): the initial weights equal the single-process run's, for every method.
Cost: rank 0 holds one full copy of the model in CPU memory while it starts. Under
``trainer.precision=pure_bf16`` the parameters are bf16 (built in fp32, then cast, as a single process
does): no mixed-precision policy casts them, and the optimizer rounds each shard's update into bf16.

**Gradients.** FSDP2 reduce-scatters each block's gradients in the backward (averaging; the loss is
multiplied by the world size so that the ranks' gradients sum, as the loss normalisation requires).
The global norm sums the shards' squared norms across ranks; clipping scales each shard.

**Optimizers.** Element-wise optimizers (AdamW, Adam on non-projected weights) step each rank's shard:
their moments are sharded DTensors like the parameters. Projected-gradient optimizers (GaLore, Fira,
APOLLO, FRUGAL; :mod:`lrpretrain.optim.subspace`) project the *full* gradient of each matrix: it is
all-gathered (``DTensor.full_tensor()``, the volume of one parameter all-gather per matrix and step,
and one full m x n gradient alive at a time), the projection, the subspace moments and the full-space
update are computed identically on every rank (plain tensors, replicated), and each rank applies its
own rows of the update. The update equals the single-process one.

**Per-layer updates.** ``register_post_accumulate_grad_hook`` fires on the sharded parameters after
the reduce-scatter, with the reduced gradient shard: the step there is the global step's.

**Checkpoints.** torch.distributed.checkpoint (DCP): every rank writes its shards of model and
optimizer into ``step_<N>/dcp/`` inside the temporary checkpoint directory; rank 0 adds the train
state (every rank's data position and RNGs) and moves the directory into place atomically. DCP
reshards on load, so a run resumes on another world size (exactly with ``distributed.data=global``).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from lrpretrain import comm
from lrpretrain.checkpoint import SHARDED, Checkpointer
from lrpretrain.comm import local
from lrpretrain.distributed.strategy import Resumed, Strategy, method_fallback, register_strategy
from lrpretrain.errors import CheckpointError, ConfigError
from lrpretrain.methods import get_method
from lrpretrain.optim.clip import clip_coefficient, total_norm

if TYPE_CHECKING:
    from lrpretrain.config import Config

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _surgery_runs_on_meta(build: Callable[..., nn.Module]) -> bool:
    """Whether the method's module surgery works on the meta device (a throwaway attempt: costs nothing)."""
    try:
        build(torch.device("meta"), reference=True)
    except (NotImplementedError, RuntimeError):
        return False
    return True


@register_strategy("fsdp2")
class FSDP2(Strategy):
    multi_process = True

    @classmethod
    def validate(cls, cfg: Config, world_size: int) -> None:
        super().validate(cfg, world_size)
        why = get_method(cfg.method.name).strategy_refusal("fsdp2", cfg)
        if why:
            raise ConfigError(f"method={cfg.method.name} is not supported with distributed.strategy=fsdp2: {why}; "
                              f"use {method_fallback(cfg)}")
        if cfg.optim.state_bits == 8 or getattr(cfg.method, "state_bits", 32) == 8:
            key = "optim.state_bits" if cfg.optim.state_bits == 8 else "method.state_bits"
            raise ConfigError(f"{key}=8 is not supported with distributed.strategy=fsdp2: blockwise 8-bit "
                              "moments quantise the whole flattened tensor, a rank holds only a shard; use "
                              f"{key}=32 or distributed=ddp")
        if cfg.trainer.compile:
            raise ConfigError("trainer.compile=true is not supported with distributed.strategy=fsdp2 here "
                              "(untested); use trainer.compile=false")
        if cfg.model.tie_embeddings:
            raise ConfigError("model.tie_embeddings=true is not supported with distributed.strategy=fsdp2 here: "
                              "materialising the sharded model gives the LM head a parameter of its own (the tie "
                              "would silently break); use distributed=ddp or model.tie_embeddings=false")
        if cfg.trainer.precision == "pure_bf16" and cfg.distributed.param_dtype == "fp16":
            raise ConfigError("distributed.param_dtype=fp16 contradicts trainer.precision=pure_bf16 (the parameters are "
                              "bf16 and are gathered as they are); use distributed.param_dtype=bf16 or leave it at fp32")

    def setup(self, device: torch.device) -> torch.device:
        device = super().setup(device)
        self.mesh = init_device_mesh(device.type, (self.world_size,))
        return device

    # -- model -----------------------------------------------------------------------------------
    def build_model(self, build: Callable[..., nn.Module]) -> nn.Module:
        # pure_bf16: the parameters are bf16 already and are gathered as they are (no cast, no fp32 copy);
        # reduce_dtype still applies (fp32 by default: the gradient is reduce-scattered in fp32, stored in bf16)
        param_dtype = None if self.cfg.trainer.precision == "pure_bf16" else DTYPES[self.dcfg.param_dtype]
        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=DTYPES[self.dcfg.reduce_dtype])
        kw = {"mesh": self.mesh, "mp_policy": mp, "reshard_after_forward": self.dcfg.reshard_after_forward}
        if not _surgery_runs_on_meta(build):
            # The method's surgery needs real weights (SST's SVD of the initial weight): every rank builds
            # the full model as a single process does (same seed: identical), then it is sharded.
            model = build(torch.device("cpu"))
            self._shard(model, kw)
            model.to(self.device)
            return model
        reference = build(torch.device("cpu"), reference=True) if self.rank == 0 else None
        rng = torch.get_rng_state()  # as after a single-process build (rank 0's; others: the seed's)
        model = build(torch.device("meta"))
        self._shard(model, kw)
        model.to_empty(device=self.device)
        full = reference.state_dict() if reference is not None else {}
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        # buffers are not sharded: rank 0's (non-persistent ones, e.g. RoPE tables, are not in the state dict)
        ref_buffers = dict(reference.named_buffers()) if reference is not None else {}
        with torch.no_grad():
            for name, buf in model.named_buffers():
                if self.rank == 0:
                    buf.copy_(ref_buffers[name])
                dist.broadcast(buf, src=0)
        del reference, full
        torch.set_rng_state(comm.broadcast_object(rng))
        return model

    @staticmethod
    def _shard(model: nn.Module, kw: dict[str, Any]) -> None:
        """One FSDP unit per decoder block, then the root (embeddings, final norm, LM head)."""
        with torch.no_grad():  # fully_shard needs contiguous parameters (an SVD factor may be column-major)
            for p in model.parameters():
                if not p.is_contiguous():
                    p.data = p.data.contiguous()
        for block in getattr(model, "layers", []):
            fully_shard(block, **kw)
        fully_shard(model, **kw)

    # -- one update ------------------------------------------------------------------------------
    def accumulating(self, last: bool) -> AbstractContextManager:
        return nullcontext()  # gradients are reduce-scattered every micro-batch; shards accumulate

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.world_size  # the reduce-scatter averages; the ranks' gradients must sum

    def tensor_norm(self, g: torch.Tensor) -> torch.Tensor:
        sq = torch.linalg.vector_norm(local(g)).square()
        dist.all_reduce(sq)
        return sq.sqrt()

    def grad_norm(self, grads: list[torch.Tensor]) -> torch.Tensor:
        if not grads:
            return torch.zeros(())
        sq = torch.stack([torch.linalg.vector_norm(local(g)).square() for g in grads])
        dist.all_reduce(sq)  # one collective for every tensor's squared norm
        return total_norm(list(sq.sqrt()))

    @torch.no_grad()
    def clip_(self, params: list[torch.Tensor], max_norm: float, norm: torch.Tensor) -> None:
        coef = clip_coefficient(max_norm, norm)
        for p in params:
            local(p.grad).mul_(coef)

    # -- checkpoints -----------------------------------------------------------------------------
    def model_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def save_checkpoint(self, ckpt: Checkpointer, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                        state: dict[str, Any], rank_state: dict[str, Any], config_yaml: str) -> Path:
        ranks = comm.all_gather_object(rank_state)
        tmp = Path(comm.on_main(lambda: str(ckpt.begin(step))))
        dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)},
                 checkpoint_id=str(tmp / SHARDED))
        dist.barrier()  # every shard is written before rank 0 seals the directory
        full = {**state, **ranks[0], "ranks": ranks, "world_size": len(ranks)}
        path = comm.on_main(lambda: ckpt.commit(step, tmp, full, config_yaml))
        dist.barrier()
        return path

    def load_checkpoint(self, ckpt: Checkpointer, how: str, model: nn.Module, optimizer: torch.optim.Optimizer,
                        warn: Callable[[str], None]) -> Resumed | None:
        path = self.find_checkpoint(ckpt, how, warn)
        if path is None:
            return None
        loaded = Checkpointer.read(path)  # find_checkpoint verified it
        if loaded.model is not None:
            raise CheckpointError(f"checkpoint {loaded.path} was written by distributed.strategy=single or ddp "
                                  "(full weights); resume it with that strategy")
        sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
        try:
            dcp.load(sd, checkpoint_id=str(loaded.path / SHARDED))
        except Exception as e:
            raise CheckpointError(f"checkpoint {loaded.path} does not fit this run: {str(e).splitlines()[0]}") from e
        set_model_state_dict(model, sd["model"])
        set_optimizer_state_dict(model, optimizer, sd["optim"])
        return Resumed(loaded.path, loaded.state, self.rank_state_of(loaded.state, loaded.path))
