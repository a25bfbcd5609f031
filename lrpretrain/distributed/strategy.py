"""Distribution strategies: ``distributed.strategy=single|ddp|fsdp2|deepspeed``.

The trainer never asks which strategy runs; it calls the hooks below, in this order::

    strategy.setup()                                   # process group from torchrun's env; the device
    model = strategy.build_model(build, device)        # build(device) -> LLaMA + method surgery + recompute
    optimizer = strategy.build_optimizer(model, make)  # make() -> the method's optimizer
    forward = strategy.wrap(model, optimizer, per_layer_in_backward)   # the module the trainer calls
    ... every update:
        with strategy.accumulating(last):              # one micro-batch's forward + backward
            loss = forward(...); strategy.backward(loss, last)   (the last: after its loss is known)
        out = strategy.clip_and_step(model, optimizer, max_norm, loss_is_finite)
        strategy.zero_grad(optimizer)
    strategy.save_checkpoint(...) / strategy.load_checkpoint(...)
    strategy.cleanup()                                 # barrier, then destroy the process group

What a strategy must implement (subclass :class:`Strategy`, decorate with ``@register_strategy``):

- ``setup``/``cleanup``: start and end the process group (``cleanup`` barriers first: a rank that
  leaves early makes torchrun report a failure).
- ``build_model``: call ``build`` (on the meta device and materialise, or on ``device``) and return the
  *unwrapped* model: the module tree the method's hooks (``after_step``, ``dense_weights``) see, with
  the method's module surgery already done. It must hold the same initial weights as a single-process
  run with the same seed.
- ``build_optimizer``: the optimizer the method's hooks see (``ctx.optimizer``). An engine that owns
  the optimizer (DeepSpeed) creates it here from ``make()`` and keeps its own handle.
- ``wrap``: the module whose ``__call__`` runs the forward (a DDP wrapper, a DeepSpeed engine, or the
  model itself).
- ``accumulating(last)``: the context a micro-batch's forward and backward run in (DDP's ``no_sync`` on
  all but the last micro-batch).
- ``backward(loss, last)``: backpropagate one micro-batch's loss (already divided by the update's
  global target-token count: the reduction must *sum* over ranks; strategies whose reduction averages
  multiply by the world size). DeepSpeed: ``engine.backward``.
- ``clip_and_step``: clip by the global gradient norm (``max_norm`` > 0), skip everything if the loss
  or the norm is not finite, step (with the trainer's ``closure`` when it passes one); return a
  :class:`StepOutcome`. An engine that clips and steps itself (DeepSpeed) calls its ``engine.step()``
  here and reports its norm.
- ``save_checkpoint``/``load_checkpoint``: the whole run state. ``state`` is the trainer's dict
  (counters, schedule, method state: equal on every rank) and ``rank_state`` this rank's own (data
  position, RNGs). The strategy writes model and optimizer in its own format (safetensors + torch for
  single/DDP, torch.distributed.checkpoint for FSDP2, DeepSpeed's for DeepSpeed), atomically; load
  returns a :class:`Resumed` (this rank's ``rank_state``) after loading model and optimizer, or None.
- Optional: ``validate(cfg, world_size)`` (classmethod) refuses combinations at config time with one
  line; ``per_layer_grad``/``tensor_norm`` for per-layer updates (FSDP2 and DDP implement them);
  ``data_stream`` to change how ranks read the data.

The base class is the single-process strategy and ``single`` is it, unchanged.
"""

from __future__ import annotations

import importlib
import json
import math
import os
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.distributed as dist
from torch import nn

from lrpretrain import comm
from lrpretrain.checkpoint import Checkpointer
from lrpretrain.distributed.data import stream_for
from lrpretrain.errors import CheckpointError, ConfigError
from lrpretrain.methods import get_method
from lrpretrain.optim.clip import total_norm

if TYPE_CHECKING:
    from lrpretrain.config import Config


@dataclass
class StepOutcome:
    grad_norm: float  # global norm of the update's gradient before clipping
    applied: bool  # the optimizer stepped (False: the update was skipped, nothing changed)


@dataclass
class Resumed:
    """What :meth:`Strategy.load_checkpoint` hands back after loading model and optimizer."""

    path: Path
    state: dict[str, Any]  # the trainer's train_state (counters, schedule, method)
    rank_state: dict[str, Any]  # this rank's data position and RNGs


_REGISTRY: dict[str, type[Strategy]] = {}
# Built-in strategies, imported on first use (deepspeed pulls in DeepSpeed only when selected).
_MODULES = {"single": __name__, "ddp": "lrpretrain.distributed.ddp", "fsdp2": "lrpretrain.distributed.fsdp2",
            "deepspeed": "lrpretrain.distributed.deepspeed"}


def register_strategy(name: str):
    def deco(cls: type[Strategy]) -> type[Strategy]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return deco


def get_strategy(name: str) -> type[Strategy]:
    if name not in _REGISTRY and name in _MODULES:
        try:
            importlib.import_module(_MODULES[name])
        except ModuleNotFoundError as e:
            if e.name == _MODULES[name]:
                raise ConfigError(f"distributed.strategy={name} is not part of this installation") from e
            raise ConfigError(f"distributed.strategy={name} needs the package '{e.name}', which is not "
                              "installed") from e
    if name not in _REGISTRY:
        raise ConfigError(f"unknown distributed.strategy '{name}'; allowed: {', '.join(_MODULES)}")
    return _REGISTRY[name]


def build_strategy(cfg: Config) -> Strategy:
    return get_strategy(cfg.distributed.strategy)(cfg)


class Strategy:
    """One process, no wrapping: the base of every strategy and ``distributed.strategy=single``."""

    name: ClassVar[str] = "single"
    multi_process: ClassVar[bool] = False  # needs a process group (launched by torchrun)

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.dcfg = cfg.distributed
        self.device = torch.device("cpu")
        self._owns_group = False

    # -- config time ---------------------------------------------------------------------------
    @classmethod
    def validate(cls, cfg: Config, world_size: int) -> None:
        """Refuse what this strategy cannot run, with one line, before anything is built."""
        if not cls.multi_process:
            check_single(cls.name, world_size)
        elif cfg.trainer.per_layer_update and not cls.supports_per_layer():
            raise ConfigError(f"trainer.per_layer_update=true is not supported by distributed.strategy={cls.name}; "
                              "use ddp or fsdp2, or trainer.per_layer_update=false")

    @classmethod
    def supports_per_layer(cls) -> bool:
        return True

    # -- process group -------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return comm.rank()

    @property
    def world_size(self) -> int:
        return comm.world_size()

    def setup(self, device: torch.device) -> torch.device:
        """Start the process group (multi-process strategies) and return the device to train on."""
        self.device = device
        if self.multi_process and not comm.is_distributed():
            if "RANK" not in os.environ or "MASTER_ADDR" not in os.environ:
                raise ConfigError(f"distributed.strategy={self.name} needs a process group: launch with torchrun "
                                  f"(torchrun --nproc_per_node=N -m lrpretrain.cli.main train ...)")
            backend = self.dcfg.backend
            if backend == "auto":
                backend = "nccl" if device.type == "cuda" else "gloo"
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group(backend, timeout=timedelta(seconds=self.dcfg.timeout_s))
            self._owns_group = True
        return device

    def cleanup(self) -> None:
        """Barrier, then destroy the group: a rank that exits early makes torchrun report a failure."""
        if self._owns_group and comm.is_distributed():
            try:
                dist.barrier()
            finally:
                dist.destroy_process_group()
            self._owns_group = False

    def abort(self) -> None:
        """After an error: destroy the group without a barrier (other ranks may never reach one)."""
        if self._owns_group and comm.is_distributed():
            dist.destroy_process_group()
            self._owns_group = False

    # -- model and optimizer -----------------------------------------------------------------------
    def build_model(self, build: Callable[..., nn.Module]) -> nn.Module:
        """``build(device, reference=False)`` seeds the RNGs from ``seed``, builds LLaMA (on the meta device:
        nothing allocated), runs the method's surgery and installs recomputation. ``reference=True`` does
        it with a throwaway method instance (a full copy whose weights a sharded model is loaded from).
        Returns the unwrapped model."""
        return build(self.device)

    def build_optimizer(self, model: nn.Module, make: Callable[[], torch.optim.Optimizer]) -> torch.optim.Optimizer:
        return make()

    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer, per_layer_in_backward: bool) -> nn.Module:
        """The module the trainer runs the forward through."""
        return model

    # -- one update ------------------------------------------------------------------------------
    def accumulating(self, last: bool) -> AbstractContextManager:
        """Context for a micro-batch's forward and backward; ``last``: the update's last micro-batch."""
        return nullcontext()

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to backpropagate: ranks' gradients must sum (the loss is normalised by the global
        target count); a reduction that averages needs the loss times the world size."""
        return loss

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.scale_loss(loss).backward()

    def tensor_norm(self, g: torch.Tensor) -> torch.Tensor:
        """The L2 norm of one whole gradient (FSDP2: of all its shards), as a plain 0-d tensor."""
        return torch.linalg.vector_norm(g)

    def grad_norm(self, grads: list[torch.Tensor]) -> torch.Tensor:
        return total_norm([self.tensor_norm(g) for g in grads])

    def per_layer_grad(self, p: torch.Tensor) -> None:
        """Per-layer updates: make ``p.grad`` the global gradient before ``p`` steps (DDP reduces here)."""

    def clip_and_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, max_norm: float,
                      loss_is_finite: bool, closure: Callable[[], float] | None = None) -> StepOutcome:
        """``closure``: passed to ``optimizer.step`` (an optimizer that ``reevaluates``)."""
        params = [p for p in model.parameters() if p.grad is not None]
        norm = self.grad_norm([p.grad for p in params])
        if max_norm > 0:
            self.clip_(params, max_norm, norm)
        grad_norm = float(norm)
        applied = loss_is_finite and math.isfinite(grad_norm)
        if applied:
            optimizer.step() if closure is None else optimizer.step(closure)
        return StepOutcome(grad_norm, applied)

    def clip_(self, params: list[torch.Tensor], max_norm: float, norm: torch.Tensor) -> None:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)

    # -- data ------------------------------------------------------------------------------------
    def data_stream(self, make: Callable[[int, int, int], Any], micro_batch_size: int) -> Any:
        """The training stream of this rank. ``make(micro_batch_size, rank, world_size)`` builds a
        :class:`~lrpretrain.data.TokenStream`; see :mod:`lrpretrain.distributed.data`."""
        return stream_for(self.dcfg.data, make, micro_batch_size, self.rank, self.world_size)

    # -- checkpoints -----------------------------------------------------------------------------
    def model_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The full (unsharded) model state dict, on rank 0 at least (export, generation)."""
        return model.state_dict()

    def save_checkpoint(self, ckpt: Checkpointer, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                        state: dict[str, Any], rank_state: dict[str, Any], config_yaml: str) -> Path:
        """Write one checkpoint atomically and return its path (the same on every rank).

        Here: rank 0 writes the full model (safetensors) and one train_state.pt holding the optimizer,
        ``state`` and every rank's ``rank_state`` (gathered)."""
        ranks = comm.all_gather_object(rank_state)
        full = {**state, "optimizer": optimizer.state_dict(), **ranks[0], "ranks": ranks, "world_size": len(ranks)}
        path = comm.on_main(lambda: ckpt.save(step, self.model_state(model), full, config_yaml))
        comm.barrier()
        return path

    def load_checkpoint(self, ckpt: Checkpointer, how: str, model: nn.Module, optimizer: torch.optim.Optimizer,
                        warn: Callable[[str], None]) -> Resumed | None:
        """Load ``trainer.resume`` (auto: the newest complete checkpoint) into model and optimizer;
        None when there is nothing to resume."""
        path = self.find_checkpoint(ckpt, how, warn)
        if path is None:
            return None
        _refuse_other_engines(path, self.name)
        loaded = Checkpointer.read(path)  # find_checkpoint verified it
        try:
            model.load_state_dict(loaded.model, strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"checkpoint {loaded.path} does not fit this model: {str(e).splitlines()[0]}") from e
        s = loaded.state
        optimizer.load_state_dict(s["optimizer"])
        return Resumed(loaded.path, s, self.rank_state_of(s, loaded.path))

    def find_checkpoint(self, ckpt: Checkpointer, how: str, warn: Callable[[str], None]) -> Path | None:
        """The checkpoint ``trainer.resume`` names, verified (auto: the newest that verifies), or None.
        Every rank reads the files (one shared file system); rank 0 picks which, the others follow."""
        comm.on_main(lambda: ckpt.remove_stale(warn))
        if how == "never":
            return None
        path = comm.on_main(lambda: _latest_verified(ckpt, warn) if how == "auto" else _verified(how))
        return None if path is None else Path(path)

    def rank_state_of(self, s: dict[str, Any], path: Path) -> dict[str, Any]:
        """This rank's data position and RNGs from a checkpoint's state (see DESIGN in the README:
        with ``distributed.data=global`` the data position is global, so any world size resumes it)."""
        ranks = s.get("ranks") or [{"data": s["data"], "rng": s["rng"]}]
        if len(ranks) == self.world_size:
            return ranks[self.rank]
        if self.dcfg.data != "global":
            raise CheckpointError(f"checkpoint {path} was written by {len(ranks)} processes with distributed.data="
                                  f"sharded; resume it with {len(ranks)} processes (this run has {self.world_size}), "
                                  "or train with distributed.data=global")
        # The global stream's position is the same on every rank; RNGs: this rank's if it existed.
        return {"data": ranks[0]["data"], "rng": ranks[min(self.rank, len(ranks) - 1)]["rng"]}


def _latest_verified(ckpt: Checkpointer, warn: Callable[[str], None]) -> str | None:
    for path in ckpt.complete_steps():
        try:
            Checkpointer.verify(path)
            return str(path)
        except CheckpointError as e:
            warn(f"{e}; falling back to an earlier checkpoint")
    return None


def _verified(path: str) -> str:
    Checkpointer.verify(Path(path))
    return path


def method_fallback(cfg: Config) -> str:
    """What to use instead when ``cfg.method`` refuses a multi-process strategy: DDP unless the method
    refuses it too (LoQT, Q-GaLore), then a single process."""
    return "distributed=ddp" if not get_method(cfg.method.name).strategy_refusal("ddp", cfg) \
        else "distributed.strategy=single"


def check_single(name: str, world_size: int) -> None:
    if world_size != 1:
        raise ConfigError(f"distributed.strategy={name} runs one process, but WORLD_SIZE={world_size}; use "
                          "distributed=ddp or distributed=fsdp2 under torchrun")


register_strategy("single")(Strategy)


def _refuse_other_engines(path: str | Path, strategy: str) -> None:
    """One clear line when a checkpoint holds another engine's state (DeepSpeed's ZeRO partitions, FSDP2's
    sharded DCP files) that this strategy cannot read."""
    meta = json.loads((Path(path) / "meta.json").read_text())
    if meta.get("engine") == "deepspeed":
        raise CheckpointError(f"checkpoint {path} was written by distributed=deepspeed (ZeRO stage "
                              f"{meta.get('zero_stage')}, {meta.get('world_size')} processes); resume it with that "
                              f"strategy, not distributed.strategy={strategy}")
    if meta.get("model") == "dcp":
        raise CheckpointError(f"checkpoint {path} is a sharded FSDP2 checkpoint (dcp/); resume it with "
                              f"distributed=fsdp2, not distributed.strategy={strategy}")
