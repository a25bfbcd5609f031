"""DeepSpeed: ``distributed.strategy=deepspeed distributed.zero_stage=1|2|3``.

The model and *our* optimizer (the method's :class:`~lrpretrain.optim.ParamwiseOptimizer`, never a
DeepSpeed optimizer: FusedAdam would JIT-compile for a minute and differ from our AdamW) go to
``deepspeed.initialize`` with a config generated from ours (:func:`deepspeed_config`): micro batch,
gradient accumulation, global-norm clipping, bf16 or fp32, the ZeRO stage. The learning rate stays
ours: the trainer sets each group's ``lr`` (counted in optimizer updates) before every update.

ZeRO-1 partitions the optimizer state over the ranks, ZeRO-2 the gradients too, ZeRO-3 also the
parameters (gathered block by block in forward and backward). Under ZeRO the optimizer no longer
sees the model's parameters: it steps flat 1-D fp32 *partitions* of each param group, and the engine
copies them back into the module after every step. So these are refused at config time
(:func:`refusal`, one line) rather than trained silently wrong:

- a method that brings its own optimizer (GaLore, GaLore-DCT, Fira, APOLLO, FRUGAL project 2-D
  gradients; SwitchLoRA keeps per-row step counters): it needs each parameter whole;
- a method whose ``after_step`` rewrites parameters or optimizer state (ReLoRA and PeriodicLoRA
  merges and resets, SwitchLoRA switches, SST resampling): the next copy-back from the fp32
  partitions would undo its edits of the module, and the optimizer state it edits is keyed by
  partitions it cannot find (ZeRO-3 also frees the parameters it would read);
- 8-bit optimizer states (they keep small tensors in 32 bits by size; a flat partition mixes them),
  per-layer updates (the engine owns backward and step), ``trainer.compile``, and
  ``zero_stage=0`` (plain data parallelism: ``distributed=ddp`` runs it natively, every method included).

- models with 0-dim parameters (a third-party plugin's scalars): DeepSpeed's engine views every
  parameter as bytes to broadcast it, which fails for scalars; refused when the model is built
  (:meth:`wrap`). CR-Net's gates are 1-element vectors for this reason.
- what a method's own ``strategy_refusal`` names (CR-Net's recomputation under ZeRO-3).

Full-rank training, the reparameterizations without periodic edits (lowrank, lora, sltrain) and the
architectures (cola, cola_m, crnet) run at every stage.

Checkpoints (:meth:`DeepSpeedStrategy.save_checkpoint`): ``step_N/engine/`` is DeepSpeed's own
``save_checkpoint`` (module, fp32 partitions, optimizer state, one file per rank), next to our
``train_state.pt`` (counters, schedule, method state), ``rank_<r>.pt`` (each rank's data position
and RNGs), ``model.safetensors`` (the full fp32 weights, for ``lrpretrain generate`` and export) and
``config.yaml``. All of it is written into ``.tmp-step_N-<pid>``; rank 0 then fsyncs, records every
file's size and CRC32 in ``meta.json`` and renames the directory into place, so a crash at any
moment leaves the last good checkpoint intact, and ``trainer.resume=auto`` takes the newest one that
verifies. Resume is exact on the same world size (ZeRO partitions belong to their ranks).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lrpretrain import comm
from lrpretrain.checkpoint import unshared
from lrpretrain.distributed.strategy import Resumed, StepOutcome, Strategy, method_fallback, register_strategy
from lrpretrain.errors import CheckpointError, ConfigError
from lrpretrain.methods import Method, get_method

if TYPE_CHECKING:
    from lrpretrain.checkpoint import Checkpointer
    from lrpretrain.config import Config

ENGINE_TAG = "engine"  # DeepSpeed's checkpoint "tag": the subdirectory of step_N holding its files


# -- config time ------------------------------------------------------------------------------------


def bf16(cfg: Config) -> bool:
    """The trainer's precision rule: bf16 when asked, or ``auto`` on CUDA."""
    t = cfg.trainer
    return t.resolved_precision(t.device != "cpu" and torch.cuda.is_available()) == "bf16"


def refusal(cfg: Config) -> str | None:
    """Why this config cannot train correctly under DeepSpeed (one line), or None."""
    stage, name = cfg.distributed.zero_stage, cfg.method.name
    if stage == 0:
        return ("distributed.zero_stage=0 is plain data parallelism, which distributed=ddp runs natively (with every "
                "method); allowed with distributed=deepspeed: 1, 2, 3")
    if cfg.trainer.compile:
        return "trainer.compile=true is not supported with distributed=deepspeed (the engine wraps the module); use trainer.compile=false"
    if cfg.trainer.precision == "pure_bf16":
        return ("trainer.precision=pure_bf16 is not supported with distributed=deepspeed: DeepSpeed's bf16 mode keeps "
                "fp32 master weights in its ZeRO partitions (the copy pure_bf16 leaves out) and steps them with its own "
                "loop, not our bf16 rounding; use distributed=fsdp2 or ddp, or trainer.precision=bf16")
    zero = f"ZeRO-{stage} hands the optimizer flat 1-D fp32 partitions of all parameters, not the module's parameters"
    plugin = type(get_method(name)(cfg.method, cfg.model))
    why = plugin.strategy_refusal("deepspeed", cfg)
    if why:
        return f"method '{name}' cannot run under distributed=deepspeed: {why}; use {method_fallback(cfg)}"
    if plugin.build_optimizer is not Method.build_optimizer:
        return (f"method '{name}' cannot run under distributed=deepspeed: its optimizer needs each parameter whole "
                f"(2-D gradients to project, per-row or per-column state), but {zero}; use distributed=ddp or fsdp2")
    if plugin.after_step is not Method.after_step:
        return (f"method '{name}' cannot run under distributed=deepspeed: its after_step rewrites parameters or "
                f"optimizer state (merges, resets, switches, resampling), but {zero} and copies them back over the "
                "module after every update, so those edits would be lost; use distributed=ddp or fsdp2")
    if cfg.optim.state_bits != 32:
        return (f"optim.state_bits={cfg.optim.state_bits} cannot run under distributed=deepspeed: 8-bit states keep "
                f"small tensors (norms) in 32 bits by their size, but {zero}; use optim.state_bits=32")
    return None


def deepspeed_config(cfg: Config, world_size: int) -> dict[str, Any]:
    """DeepSpeed's JSON config, generated from ours (no optimizer or scheduler section: both are ours)."""
    t, stage = cfg.trainer, cfg.distributed.zero_stage
    accum = t.batch_size // (t.micro_batch_size * world_size)
    zero: dict[str, Any] = {"stage": stage}
    if stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False  # model.safetensors gathers the fp32 masters itself
    return {
        "train_batch_size": t.batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": cfg.optim.grad_clip,  # global norm; 0 disables
        # fp32 master weights in the optimizer either way; a non-finite gradient skips the update
        "bf16": {"enabled": bf16(cfg), "check_grad_overflow": True},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # our own torch optimizer
        "steps_per_print": 1 << 62,
        "wall_clock_breakdown": False,
    }


class _ExpectedWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "untested optimizer" not in record.getMessage()  # ours, on purpose


def _quiet_deepspeed() -> None:
    """DeepSpeed logs every engine detail at INFO on every rank; keep its warnings, drop the expected one."""
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)
    if not any(isinstance(f, _ExpectedWarnings) for f in logger.filters):
        logger.addFilter(_ExpectedWarnings())


def _prefer_venv_tools() -> None:
    """Build DeepSpeed's ops with the ninja installed next to this Python (pip's), not whichever is on
    PATH: two ninja versions rewrite each other's build log, and each switch rebuilds the op."""
    here = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if os.path.exists(os.path.join(here, "ninja")) and not path.startswith(here + os.pathsep):
        os.environ["PATH"] = here + os.pathsep + path


def extensions_dir() -> Path:
    """Where DeepSpeed's JIT-built ops (the CPU comm op, ~40 s to build) are cached."""
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")


# -- the strategy --------------------------------------------------------------------------------------


@register_strategy("deepspeed")
class DeepSpeedStrategy(Strategy):
    """Model and optimizer in a DeepSpeed engine; DeepSpeed's checkpoints plus ours, atomically."""

    multi_process = True

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.engine: Any = None

    # -- config time ---------------------------------------------------------------------------
    @classmethod
    def supports_per_layer(cls) -> bool:
        return False  # the engine owns backward and step

    @classmethod
    def validate(cls, cfg: Config, world_size: int) -> None:
        super().validate(cfg, world_size)
        why = refusal(cfg)
        if why:
            raise ConfigError(why)

    # -- process group -------------------------------------------------------------------------
    def setup(self, device: torch.device) -> torch.device:
        device = super().setup(device)  # the torch process group, from the launcher's environment
        import deepspeed

        _quiet_deepspeed()
        _prefer_venv_tools()
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), auto_mpi_discovery=False)
        return device

    # -- model and optimizer ---------------------------------------------------------------------
    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer, per_layer_in_backward: bool) -> nn.Module:
        import deepspeed

        # Refused here, not at config time: only the built model shows it (before the run directory exists).
        scalar = next((n for n, p in model.named_parameters() if p.dim() == 0), None)
        if scalar is not None:
            raise ConfigError(f"method '{self.cfg.method.name}' cannot run under distributed=deepspeed: its parameter "
                              f"{scalar} is a 0-dim scalar, which DeepSpeed's engine cannot broadcast or partition; "
                              "use distributed=ddp or fsdp2")

        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                    config=deepspeed_config(self.cfg, self.world_size))
        return self.engine

    # -- one update ------------------------------------------------------------------------------
    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.world_size  # DeepSpeed averages gradients over ranks; ours must sum

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        # The loss is already normalised by the update's target tokens: no division by the accumulation.
        self.engine.backward(self.scale_loss(loss), scale_wrt_gas=False)
        if not last:
            self.engine.step()  # inside an accumulation: only advances the engine's micro-step counter

    def clip_and_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, max_norm: float,
                      loss_is_finite: bool, closure=None) -> StepOutcome:
        """The engine reduces, clips (``gradient_clipping``), steps, copies back and zeroes gradients;
        a non-finite gradient norm makes it skip the update."""
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        norm = float("nan") if norm is None else float(norm)
        applied = bool(self.engine.was_step_applied())
        if applied and not loss_is_finite:  # cannot happen (a non-finite loss has non-finite gradients)
            raise RuntimeError("DeepSpeed applied an update whose loss was not finite; the weights are suspect")
        return StepOutcome(norm, applied)

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        pass  # the engine's step() zeroes the gradients it reduced

    # -- checkpoints -----------------------------------------------------------------------------
    def model_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The full model, trained parameters at their fp32 master values (every rank must call this:
        the gathers are collective); tied entries stay one tensor's values."""
        from deepspeed.utils import safe_get_full_fp32_param

        gather = _gathered(list(model.parameters())) if self.cfg.distributed.zero_stage == 3 else nullcontext()
        with gather:  # ZeRO-3: every parameter whole for the duration
            held = model.state_dict(keep_vars=True)
            state = {k: v.detach().clone() for k, v in held.items()}
        masters = {}
        for p in model.parameters():  # unique parameters, the same order on every rank
            if p.requires_grad:
                full = safe_get_full_fp32_param(p)  # the optimizer's fp32 copy (bf16 modules hold a cast)
                if full is not None:
                    masters[id(p)] = full.detach().clone()
        out = {k: masters.get(id(held[k]), state[k]) for k in state}
        return {k: v.float() if v.is_floating_point() else v for k, v in out.items()}  # one dtype: fp32

    def save_checkpoint(self, ckpt: Checkpointer, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                        state: dict[str, Any], rank_state: dict[str, Any], config_yaml: str) -> Path:
        from safetensors.torch import save_file

        tmp = Path(comm.on_main(lambda: str(ckpt.begin(step))))
        # DeepSpeed's part: every rank writes its partitions (and barriers inside)
        self.engine.save_checkpoint(str(tmp), tag=ENGINE_TAG, client_state={"step": step}, save_latest=False)
        full = self.model_state(model)
        torch.save(rank_state, tmp / f"rank_{self.rank}.pt")
        if self.rank == 0:
            save_file(unshared(full), str(tmp / "model.safetensors"), metadata={"step": str(step)})
            torch.save({**state, "world_size": self.world_size, "zero_stage": self.cfg.distributed.zero_stage},
                       tmp / "train_state.pt")
            (tmp / "config.yaml").write_text(config_yaml)
        comm.barrier()
        if os.environ.get("LRPRETRAIN_FAULT_KILL_IN_SAVE") == str(step):  # fault injection for the crash test:
            os.kill(os.getpid(), signal.SIGKILL)  # every rank dies with its files written, before the commit
        about = {"engine": "deepspeed", "world_size": self.world_size, "zero_stage": self.cfg.distributed.zero_stage}
        path = comm.on_main(lambda: str(ckpt.seal(step, tmp, about)))
        comm.barrier()
        return Path(path)

    def load_checkpoint(self, ckpt: Checkpointer, how: str, model: nn.Module, optimizer: torch.optim.Optimizer,
                        warn: Callable[[str], None]) -> Resumed | None:
        path = self.find_checkpoint(ckpt, how, warn)
        if path is None:
            return None
        meta = json.loads((path / "meta.json").read_text())
        if meta.get("engine") != "deepspeed":
            raise CheckpointError(f"checkpoint {path} was not written by distributed.strategy=deepspeed; resume it "
                                  "with the strategy that wrote it")
        if meta.get("world_size") != self.world_size:
            raise CheckpointError(f"checkpoint {path} holds DeepSpeed ZeRO partitions of {meta.get('world_size')} "
                                  f"processes and this run has {self.world_size}; resume with the same number of "
                                  "processes (or convert it with DeepSpeed's universal checkpoint tools)")
        stage = self.cfg.distributed.zero_stage
        if meta.get("zero_stage") != stage:
            raise CheckpointError(f"checkpoint {path} was written with distributed.zero_stage={meta.get('zero_stage')} "
                                  f"and this run has {stage}; resume with the same ZeRO stage")
        loaded, _ = self.engine.load_checkpoint(str(path), tag=ENGINE_TAG, load_module_strict=True,
                                                load_optimizer_states=True, load_lr_scheduler_states=False)
        if loaded is None:
            raise CheckpointError(f"checkpoint {path}: DeepSpeed could not load {path / ENGINE_TAG}")
        try:
            state = torch.load(path / "train_state.pt", map_location="cpu", weights_only=True)
            mine = torch.load(path / f"rank_{self.rank}.pt", map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"checkpoint {path} is corrupt: {str(e).splitlines()[0]}") from e
        return Resumed(path, state, mine)


def _gathered(params: list[nn.Parameter]):
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def build_ops() -> None:
    """Build (or find in the cache) the ops DeepSpeed JIT-compiles on first use, so that the first run
    does not pay for it (``make setup`` calls this)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    _quiet_deepspeed()
    _prefer_venv_tools()
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")  # the CPU all-reduce op
    if builder is not None and deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        builder.load(verbose=False)
    print(f"deepspeed {deepspeed.__version__}: ops cached in {extensions_dir()}")


if __name__ == "__main__":
    build_ops()
