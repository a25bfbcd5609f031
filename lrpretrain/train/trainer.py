"""The training loop: it wires the built parts together and calls the method's hooks.

It never asks which method is running. One optimizer update (:meth:`Trainer.train_step`) is:
fetch the step's micro-batches, set the LR (schedule x method factor), ``method.before_step``, forward +
backward each (loss
normalised by the step's target tokens, so the update does not depend on how the batch is split),
clip, guard against non-finite values, step (an optimizer that ``reevaluates`` gets a closure that runs
the update's forward and backward again), ``method.after_step``. With per-layer updates
(:mod:`lrpretrain.train.per_layer`) the last backward clips, guards and steps each parameter itself.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lrpretrain.checkpoint import Checkpointer, tensor_bytes
from lrpretrain.comm import all_reduce_sum, world_size
from lrpretrain.config import Config
from lrpretrain.data import TokenStream, ValidationSet
from lrpretrain.distributed.strategy import Strategy
from lrpretrain.errors import UserError
from lrpretrain.kernels import KernelChoice
from lrpretrain.kernels.head_loss import head_loss
from lrpretrain.methods import Method, StepContext
from lrpretrain.metrics import MetricsLogger, peak_memory_mb, reset_peak_memory
from lrpretrain.optim import lr_factor
from lrpretrain.train.evaluate import batch_loss, evaluate
from lrpretrain.train.per_layer import PerLayerUpdate
from lrpretrain.train.rng import rng_state, set_rng_state


class TrainingStopped(UserError):
    """Training cannot go on (non-finite loss); the message says why."""


@dataclass
class TrainState:
    """Counters that, with model/optimizer/data/RNG/method state, make up a checkpoint."""

    step: int = 0  # optimizer updates done
    tokens: int = 0  # non-pad tokens consumed (all ranks)
    nonfinite: int = 0  # updates skipped because the loss or gradient norm was not finite
    consecutive_nonfinite: int = 0


class Trainer:
    def __init__(self, cfg: Config, resolved: DictConfig, model: nn.Module, method: Method,
                 optimizer: torch.optim.Optimizer, data: TokenStream, val: ValidationSet | None,
                 run_dir: Path, logger: MetricsLogger, device: torch.device, accum_steps: int,
                 flops_per_token: float = 0.0, per_layer: PerLayerUpdate | None = None,
                 strategy: Strategy | None = None, forward: nn.Module | None = None,
                 kernels: KernelChoice | None = None):
        self.cfg, self.tcfg = cfg, cfg.trainer
        self.resolved = resolved
        self.model = model  # unwrapped: what the method's hooks and checkpoints see
        self.strategy = strategy or Strategy(cfg)  # distributed.strategy (lrpretrain/distributed/strategy.py)
        forward = model if forward is None else forward  # the wrapped module (DDP, engine) or the model
        self.forward = torch.compile(forward, backend=cfg.trainer.compile_backend) if cfg.trainer.compile else forward
        self.method = method
        self.optimizer = optimizer
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.data, self.val = data, val
        self.run_dir = run_dir
        self.logger = logger
        self.device = device
        self.accum_steps = accum_steps
        self.per_layer = per_layer  # in-backward updates (trainer.per_layer_update), or None: the global step
        self.flops_per_token = flops_per_token
        self.state = TrainState()
        self.ckpt = Checkpointer(run_dir, cfg.trainer.keep_last, cfg.trainer.ckpt_checksum)
        # fp32 | bf16 (autocast over fp32 master weights) | pure_bf16 (the model is bf16: no autocast)
        self.precision = cfg.trainer.resolved_precision(device.type == "cuda")
        bf16 = self.precision == "bf16"
        self.autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else nullcontext
        self._stop_signal: str | None = None
        # trainer.kernels as resolved for the device: the loss (head_loss None: from the whole logits)
        self.kernels = kernels or KernelChoice(False, "full")
        self.head_loss = head_loss(self.kernels.head_loss)

    # -- state -------------------------------------------------------------------------------
    def train_state(self) -> dict[str, Any]:
        """Counters, schedule and method state (equal on every rank); model and optimizer are the strategy's."""
        return {
            "step": self.state.step, "tokens": self.state.tokens, "nonfinite": self.state.nonfinite,
            "consecutive_nonfinite": self.state.consecutive_nonfinite,
            "schedule": {"step": self.state.step, "max_steps": self.tcfg.max_steps},
            "method": self.method.state_dict(),
        }

    def rank_state(self) -> dict[str, Any]:
        """This rank's own: data position and RNGs."""
        return {"data": self.data.state_dict(), "rng": rng_state()}

    def save_checkpoint(self) -> Path:
        step = self.state.step
        # a failed write (full disk, quota, ...) removes the partial checkpoint and stops with one line
        needed = lambda: self.ckpt.expected_bytes(tensor_bytes(self.model.state_dict())  # noqa: E731
                                                  + tensor_bytes(self.optimizer.state_dict()))
        with self.ckpt.writing(step, needed):
            path = self.strategy.save_checkpoint(self.ckpt, step, self.model, self.optimizer, self.train_state(),
                                                 self.rank_state(), OmegaConf.to_yaml(self.resolved))
        self.logger.info(f"checkpoint saved: {path}")
        return path

    def resume(self) -> None:
        """Load the checkpoint that ``trainer.resume`` names (auto: the newest complete one)."""
        loaded = self.strategy.load_checkpoint(self.ckpt, self.tcfg.resume, self.model, self.optimizer,
                                               lambda m: self.logger.info(f"warning: {m}"))
        if loaded is None:
            return
        s, mine = loaded.state, loaded.rank_state
        self.data.load_state_dict(mine["data"])
        self.method.load_state_dict(s["method"])
        set_rng_state(mine["rng"])
        self.state = TrainState(s["step"], s["tokens"], s["nonfinite"], s["consecutive_nonfinite"])
        self.logger.info(f"resumed from {loaded.path} (step {self.state.step}, {self.state.tokens} tokens)")

    # -- one update ----------------------------------------------------------------------------
    def train_step(self) -> dict[str, Any]:
        self.model.train()
        batches = [next(self.data) for _ in range(self.accum_steps)]
        targets = all_reduce_sum(torch.tensor(sum(int((b.labels[:, 1:] != -100).sum()) for b in batches),
                                              dtype=torch.float64, device=self.device))
        step = self.state.step
        factor = lr_factor(step, self.cfg.optim, self.tcfg.max_steps) * self.method.lr_factor(step)
        for group in self.optimizer.param_groups:  # before any backward: per-layer updates step inside one
            group["lr"] = group["initial_lr"] * factor
        self.method.before_step(StepContext(step, self.model, self.optimizer, self.cfg.optim.lr * factor, math.nan,
                                            micro_batches=self.accum_steps))

        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        strategy = self.strategy
        for b in batches[:-1]:
            with strategy.accumulating(last=False):
                ls = self._loss(b)
                loss_sum += ls.detach()
                strategy.backward(ls / targets, last=False)
        with strategy.accumulating(last=True):
            ls = self._loss(batches[-1])
            loss_sum += ls.detach()
            # the last backward waits until the update's loss is known
            loss = float(all_reduce_sum(loss_sum) / targets)
            if self.per_layer is not None and self.per_layer.in_backward:
                # clip, guard and step each parameter inside this backward (lrpretrain/train/per_layer.py)
                again = lambda: strategy.scale_loss(self._loss(batches[-1]) / targets)  # noqa: E731  (pass 2 of the exact global clip)
                out = self.per_layer.backward(strategy.scale_loss(ls / targets), math.isfinite(loss), again)
                grad_norm, applied, stepped = out.grad_norm, out.applied, out.stepped
            else:
                strategy.backward(ls / targets, last=True)
                closure = self._reevaluate(batches, targets) if getattr(self.optimizer, "reevaluates", False) else None
                step_out = strategy.clip_and_step(self.model, self.optimizer, self.cfg.optim.grad_clip, math.isfinite(loss),
                                                  closure)
                grad_norm, applied, stepped = step_out.grad_norm, step_out.applied, 0
        strategy.zero_grad(self.optimizer)
        record: dict[str, Any] = {"loss": loss, "grad_norm": grad_norm, "lr": self.cfg.optim.lr * factor}
        if applied:
            self.state.consecutive_nonfinite = 0
        else:
            self._nonfinite(step, loss, grad_norm, stepped)
            record["skipped"] = True
            if stepped:
                record["partial_update"] = stepped
        self.state.step += 1
        self.state.tokens += int(all_reduce_sum(torch.tensor(sum(b.tokens for b in batches), device=self.device)))
        self.method.after_step(StepContext(self.state.step, self.model, self.optimizer, record["lr"], loss,
                                           record.update))
        return record

    def _reevaluate(self, batches: list, targets: torch.Tensor) -> Callable[[], float]:
        """The closure of ``optimizer.step(closure)`` for an optimizer that ``reevaluates`` (DLRT's S-step):
        forward and backward of this update's micro-batches again, at the parameters as they are when it
        is called; returns the loss."""
        def closure() -> float:
            total = torch.zeros((), dtype=torch.float64, device=self.device)
            for i, b in enumerate(batches):
                last = i == len(batches) - 1
                with self.strategy.accumulating(last=last):
                    ls = self._loss(b)
                    total += ls.detach()
                    self.strategy.backward(ls / targets, last=last)
            return float(all_reduce_sum(total) / targets)

        return closure

    def _loss(self, b) -> torch.Tensor:
        """Forward one micro-batch: the summed loss over its target tokens."""
        return batch_loss(self.forward, b.input_ids.to(self.device, non_blocking=True),
                          b.labels.to(self.device, non_blocking=True), self.head_loss, self.autocast)[0]

    def _nonfinite(self, step: int, loss: float, grad_norm: float, stepped: int = 0) -> None:
        self.state.nonfinite += 1
        self.state.consecutive_nonfinite += 1
        what = f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} at update {step + 1} " \
               f"(loss {loss}, grad norm {grad_norm})"
        if stepped:
            what += (f"; {stepped} parameters had already stepped inside the backward before it was seen "
                     "(trainer.per_layer_clip=param)")
        if self.tcfg.on_nonfinite == "stop":
            raise TrainingStopped(f"{what}; stopping (trainer.on_nonfinite=stop)")
        if self.state.consecutive_nonfinite >= self.tcfg.max_nonfinite:
            raise TrainingStopped(f"{what}; {self.state.consecutive_nonfinite} updates in a row were skipped "
                                  f"(trainer.max_nonfinite={self.tcfg.max_nonfinite}); stopping")
        self.logger.info(f"warning: {what}; update skipped (trainer.on_nonfinite=skip)")

    # -- evaluation ------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Validation metrics on the fixed held-out set (see :mod:`lrpretrain.train.evaluate`)."""
        assert self.val is not None
        self.model.eval()
        return evaluate(self.forward, self.val, self.tcfg.eval_batch_size or self.tcfg.micro_batch_size,
                        self.cfg.eval, self.device, self.autocast, world_size(), self.head_loss)

    # -- the loop --------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        t = self.tcfg
        self.logger.start(self.state.step)
        last: dict[str, Any] = {}
        if self.state.step >= t.max_steps:
            self.logger.info(f"run already complete: step {self.state.step} of trainer.max_steps={t.max_steps}")
            return {"step": self.state.step, "status": "complete"}
        if self.state.step == 0 and t.eval_at_start and self.val is not None:
            last = {"step": 0, "tokens": 0, "lr": 0.0, **self.evaluate()}
            self.logger.log(last)
        handlers = self._install_signal_handlers()
        reset_peak_memory(self.device)
        tokens_window, time_window = 0, 0.0
        try:
            while self.state.step < t.max_steps:
                t0 = time.perf_counter()
                tokens_before = self.state.tokens
                record = self.train_step()
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                step_tokens = self.state.tokens - tokens_before
                tokens_window, time_window = tokens_window + step_tokens, time_window + dt
                step = self.state.step
                record = {"step": step, "tokens": self.state.tokens, **record, "step_time": dt,
                          "tokens_per_s": step_tokens / dt if dt > 0 else 0.0}
                if self.flops_per_token and self.device.type == "cuda":
                    record["tflops"] = self.flops_per_token * step_tokens / dt / 1e12
                is_eval = self.val is not None and (step == t.max_steps or (t.eval_every and step % t.eval_every == 0))
                logged = is_eval or step % t.log_every == 0 or step == t.max_steps
                if logged:  # the training peak since fit() began only grows: reading it when logging loses nothing
                    record["peak_mem_mb"] = peak_memory_mb(self.device)
                if is_eval:
                    record.update(self.evaluate())
                if logged:
                    self.logger.log(record)
                last = record
                # every rank must stop (and checkpoint, a collective) at the same update
                stop = bool(all_reduce_sum(torch.tensor(int(self._stop_signal is not None), device=self.device)))
                if stop and self._stop_signal is None:
                    self._stop_signal = "a signal on another rank"
                if stop or step == t.max_steps or (t.ckpt_every and step % t.ckpt_every == 0):
                    self.save_checkpoint()
                if stop:
                    self.logger.info(f"stopped by {self._stop_signal} at step {step}; resume with trainer.resume=auto")
                    return {**last, "status": "preempted", "signal": self._stop_signal}
        finally:
            self._restore_signal_handlers(handlers)
            self.data.close()
        if time_window > 0:
            last["mean_tokens_per_s"] = tokens_window / time_window
        self.logger.summary(last.get("mean_tokens_per_s"))
        return {**last, "status": "complete"}

    def _install_signal_handlers(self) -> dict[int, Any]:
        def handler(signum, _frame):
            self._stop_signal = signal.Signals(signum).name

        previous = {}
        # SIGUSR1: our sbatch script's pre-emption notice; SIGUSR2: submitit's (the SLURM sweep launcher)
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
            try:
                previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread: leave signals to the caller
                pass
        return previous

    @staticmethod
    def _restore_signal_handlers(previous: dict[int, Any]) -> None:
        for sig, h in previous.items():
            signal.signal(sig, h)
