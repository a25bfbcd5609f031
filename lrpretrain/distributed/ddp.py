"""``distributed.strategy=ddp``: DistributedDataParallel, a full replica of model and optimizer per process.

Every rank builds the model from the same seed (identical weights; DDP also broadcasts rank 0's at
wrapping), runs its slice of the update's micro-batches, and DDP all-reduces the gradients in
buckets during the last micro-batch's backward (``no_sync`` on the others). DDP averages over
ranks while the loss is normalised by the update's global target count, so the loss is multiplied by
the world size before backward: the reduced gradient is then the single-process one.

Per-layer updates (``trainer.per_layer_update``): DDP's reduction happens after the
post-accumulate-grad hooks, too late for a step inside the backward. The model is then not wrapped;
each hook all-reduces its own parameter's gradient (one collective per parameter, in the same order
on every rank: the autograd order of identical graphs) and steps it at once.

Checkpoints: rank 0 writes the usual safetensors + train_state.pt (every rank's data position and
RNGs included). Method hooks (merges, switches) run on every rank on identical replicas with
identical RNGs, so the replicas stay equal.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lrpretrain.distributed.strategy import Strategy, register_strategy
from lrpretrain.errors import ConfigError
from lrpretrain.methods import get_method

if TYPE_CHECKING:
    from lrpretrain.config import Config


@register_strategy("ddp")
class DDP(Strategy):
    multi_process = True

    @classmethod
    def validate(cls, cfg: Config, world_size: int) -> None:
        super().validate(cfg, world_size)
        why = get_method(cfg.method.name).strategy_refusal("ddp", cfg)
        if why:
            raise ConfigError(f"method={cfg.method.name} is not supported with distributed.strategy=ddp: {why}; "
                              "use distributed.strategy=single")

    def __init__(self, cfg):
        super().__init__(cfg)
        self.ddp: DistributedDataParallel | None = None

    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer, per_layer_in_backward: bool) -> nn.Module:
        if per_layer_in_backward:
            with torch.no_grad():  # the replicas start equal (same seed); make sure of it, as DDP would
                for t in [*model.parameters(), *model.buffers()]:
                    dist.broadcast(t, src=0)
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        self.ddp = DistributedDataParallel(model, device_ids=ids, bucket_cap_mb=self.dcfg.ddp_bucket_mb,
                                           broadcast_buffers=False)
        return self.ddp

    def accumulating(self, last: bool) -> AbstractContextManager:
        return self.ddp.no_sync() if self.ddp is not None and not last else nullcontext()

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.world_size  # DDP averages; the ranks' gradients must sum

    @torch.no_grad()
    def per_layer_grad(self, p: torch.Tensor) -> None:
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)  # gloo has no AVG
        p.grad.div_(self.world_size)
