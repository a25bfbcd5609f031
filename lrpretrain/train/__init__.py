"""Load a run's config (:mod:`lrpretrain.train.assemble`), build every part of the run from it and hand
them to the Trainer."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from lrpretrain import comm, kernels
from lrpretrain.config import Config
from lrpretrain.data import TokenStream, ValidationSet, has_validation, load_tokenizer
from lrpretrain.distributed.strategy import Strategy, build_strategy
from lrpretrain.errors import ConfigError
from lrpretrain.kernels.adam import fused_adam_step
from lrpretrain.methods import Method, get_method
from lrpretrain.metrics import MetricsLogger
from lrpretrain.model import build_model, cast_parameters
from lrpretrain.optim import ParamwiseOptimizer
from lrpretrain.optim.bf16 import Bf16Update
from lrpretrain.train.assemble import from_yaml, load_config
from lrpretrain.train.lock import RunLock
from lrpretrain.train.per_layer import PerLayerUpdate
from lrpretrain.train.recompute import apply_recompute, graph_is_reusable
from lrpretrain.train.rng import seed_everything
from lrpretrain.train.rundir import prepare_run_dir
from lrpretrain.train.trainer import Trainer, TrainingStopped

__all__ = ["Trainer", "TrainingStopped", "build_trainer", "train", "resolve_device", "load_config", "from_yaml"]


def resolve_device(cfg: Config) -> torch.device:
    if cfg.trainer.device == "cuda" or (cfg.trainer.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def model_builder(cfg: Config, plugin: Method) -> Callable[..., torch.nn.Module]:
    """``build(device, reference=False)`` for :meth:`Strategy.build_model`."""

    def build(dev: torch.device | str, reference: bool = False) -> torch.nn.Module:
        """LLaMA + the method's surgery + recomputation, initialised from cfg.seed; on the meta device
        nothing is allocated. ``reference``: with a throwaway method instance (a copy to load from)."""
        method = get_method(cfg.method.name)(cfg.method, cfg.model) if reference else plugin
        seed_everything(cfg.seed)
        m = method.prepare_model(build_model(cfg.model, dev, materialize=torch.device(dev).type != "meta"))
        if cfg.trainer.precision == "pure_bf16":  # initialised (and the surgery done) in fp32, then stored in bf16
            cast_parameters(m, torch.bfloat16)
        apply_recompute(m, cfg.trainer.recompute, cfg.trainer.recompute_every, method)
        return m

    return build


def build_trainer(cfg: Config, resolved: DictConfig) -> Trainer:
    """Validate what needs the data; build data, model, method (recompute, per-layer updates) and
    optimizer; only then prepare the run dir and the logger. Takes no lock on the run directory
    (``bench`` runs in a temporary one): :func:`train` does."""
    strategy = build_strategy(cfg)
    return _build(cfg, resolved, strategy, _start(cfg, resolved, strategy), [])


def _start(cfg: Config, resolved: DictConfig, strategy: Strategy) -> torch.device:
    """Threads, the process group and the device; every rank takes rank 0's run.dir (it may hold
    ``${now:...}``, resolved per process)."""
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    device = strategy.setup(resolve_device(cfg))
    cfg.run.dir = comm.broadcast_object(cfg.run.dir)
    resolved.run.dir = cfg.run.dir
    return device


def _build(cfg: Config, resolved: DictConfig, strategy: Strategy, device: torch.device, notes: list[str]) -> Trainer:
    """``notes``: warnings from before the logger existed (taking the run directory's lock)."""
    r, w = strategy.rank, strategy.world_size
    run_dir = Path(cfg.run.dir)
    cuda = device.type == "cuda"
    why = kernels.refusal(cfg.trainer.kernels, cuda)
    if why is not None:
        raise ConfigError(why)
    choice = kernels.choose(cfg.trainer.kernels, cuda)
    if choice.note:
        notes = [*notes, choice.note]

    tokenizer = load_tokenizer(cfg.data.tokenizer, cfg.data.eos_token, cfg.data.pad_token)
    if tokenizer.vocab_needed > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the {tokenizer.vocab_needed} ids "
                          f"of tokenizer {tokenizer.name} (data.tokenizer={cfg.data.tokenizer}); use a model whose "
                          "vocab_size covers it")
    data = strategy.data_stream(lambda mb, rank, world: TokenStream(cfg.data, tokenizer, mb, rank, world,
                                                                    vocab_size=cfg.model.vocab_size),
                                cfg.trainer.micro_batch_size)
    val = ValidationSet(cfg.data, tokenizer, r, w) if cfg.data.val_tokens > 0 and has_validation(cfg.data) else None

    # Model, method and optimizer before the run directory: a combination they refuse leaves nothing behind.
    plugin = get_method(cfg.method.name)(cfg.method, cfg.model)
    plugin.kernels = "triton" if choice.triton else "torch"  # its modules' fused ops (lrpretrain/kernels)
    model = strategy.build_model(model_builder(cfg, plugin))
    optimizer = strategy.build_optimizer(model, lambda: plugin.build_optimizer(plugin.param_groups(model, cfg.optim),
                                                                               cfg.optim))
    if cfg.trainer.precision == "pure_bf16":
        attach_bf16_update(optimizer, cfg.trainer.bf16_update, cfg.seed)
    if choice.triton and isinstance(optimizer, ParamwiseOptimizer):  # element-wise steps in one kernel a piece
        optimizer.fused_adam = fused_adam_step
    accum = cfg.trainer.batch_size // (cfg.trainer.micro_batch_size * w)
    per_layer = PerLayerUpdate(model, optimizer, cfg.trainer.per_layer_clip, cfg.optim.grad_clip, accum,
                               graph_is_reusable(cfg.trainer.recompute), strategy) if cfg.trainer.per_layer_update else None
    # counted before wrapping: DeepSpeed ZeRO-3 leaves the module's parameters empty outside forward/backward
    n_params, n_train = sum(p.numel() for p in model.parameters()), plugin.trainable_parameters(model)
    forward = strategy.wrap(model, optimizer, per_layer is not None and per_layer.in_backward)

    logs: list[str] = comm.on_main(lambda: _prepare_run_dir(run_dir, resolved, cfg))
    logger = MetricsLogger(cfg, run_dir, OmegaConf.to_container(resolved), cfg.trainer.max_steps, r)  # type: ignore[arg-type]
    for m in [*notes, *logs]:
        logger.info(f"warning: {m}")
    if val is None:
        logger.info("no validation data (data.val_files is empty, no validation shards, or data.val_tokens=0): evaluation is off")
    elif val.short:
        logger.info(f"validation: {val.available_tokens} tokens available, fewer than data.val_tokens={cfg.data.val_tokens}")
    if val is not None and cfg.eval.protocol == "galore" and val.available_tokens <= cfg.eval.galore_tokens:
        logger.info(f"warning: eval.protocol=galore evaluates until more than eval.galore_tokens="
                    f"{cfg.eval.galore_tokens} tokens, but the held-out set has {val.available_tokens} "
                    f"(data.val_tokens={cfg.data.val_tokens}): its figure covers fewer batches than GaLore's")

    if cfg.trainer.precision == "bf16" and device.type == "cpu":
        logger.info("warning: trainer.precision=bf16 on the CPU: autocast's bf16 matmuls are far slower than fp32 "
                    "(29x on the CPU in benchmarks/results/README.md)")
    if cfg.trainer.precision == "pure_bf16" and device.type == "cpu" and not cpu_has_bf16_matmul():
        logger.info("warning: trainer.precision=pure_bf16 on a CPU without bf16 matrix instructions (avx512_bf16, "
                    "amx_bf16 or Arm's bf16): its bf16 matmuls are emulated and far slower than fp32")
    cost = plugin.cost(cfg.model, cfg.data.seq_len)
    trainer = Trainer(cfg, resolved, model, plugin, optimizer, data, val, run_dir, logger, device, accum,
                      flops_per_token=cost["flops_per_token"], per_layer=per_layer, strategy=strategy, forward=forward,
                      kernels=choice)
    logger.info(f"run {run_dir} | model {cfg.model.name} ({n_params / 1e6:.2f}M params, {n_train / 1e6:.2f}M trainable) | "
                f"method {cfg.method.name} | data {cfg.data.name} ({cfg.data.mode}, seq {cfg.data.seq_len}) | "
                f"{cfg.trainer.batch_size} seq/update = {accum} x {cfg.trainer.micro_batch_size} x {w} | "
                f"device {device} | {trainer.precision}"
                f"{f' ({cfg.trainer.bf16_update} rounding of the updates)' if trainer.precision == 'pure_bf16' else ''} | "
                f"distributed.strategy={strategy.name} | kernels {choice.name}")
    if cfg.trainer.recompute != "none":
        k = cfg.trainer.recompute_every
        which = "" if cfg.trainer.recompute == "method" else " (every block)" if k == 1 else f" (blocks 0, {k}, {2 * k}, ...)"
        logger.info(f"activation recomputation: {cfg.trainer.recompute}{which}")
    if per_layer is not None:
        logger.info(per_layer.describe())
    return trainer


def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (x86 AVX512-BF16 or AMX-BF16, Arm BF16), from
    the flags Linux reports; elsewhere (no /proc/cpuinfo) False."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def attach_bf16_update(optimizer: torch.optim.Optimizer, rule: str, seed: int) -> None:
    """``trainer.precision=pure_bf16``: the optimizer steps bf16 weights through fp32 working copies and
    rounds back with ``trainer.bf16_update`` (:mod:`lrpretrain.optim.bf16`)."""
    if not isinstance(optimizer, ParamwiseOptimizer):
        raise ConfigError(f"trainer.precision=pure_bf16 needs a lrpretrain.optim.ParamwiseOptimizer (it rounds each "
                          f"parameter's update into bf16); the method's optimizer is {type(optimizer).__name__}")
    optimizer.bf16_update = Bf16Update(rule, seed)


def _prepare_run_dir(run_dir: Path, resolved: DictConfig, cfg: Config) -> list[str]:
    logs: list[str] = []
    prepare_run_dir(run_dir, resolved, cfg.trainer.resume, cfg.run.overwrite, logs.append)
    return logs


def train(cfg: Config, resolved: DictConfig) -> dict[str, Any]:
    """Run (or resume) training to ``trainer.max_steps``; returns the last metrics record. Rank 0 holds
    the run directory's lock from before the data and the model are built until the end."""
    strategy = build_strategy(cfg)
    ok = False
    threads = torch.get_num_threads()  # trainer.threads is this run's: a later run in this process starts afresh
    notes: list[str] = []
    lock: RunLock | None = None
    try:
        device = _start(cfg, resolved, strategy)
        lock = RunLock(cfg.run.dir, cfg.run.break_lock, notes.append)
        comm.on_main(lock.hold)
        trainer = _build(cfg, resolved, strategy, device, notes)
        try:
            trainer.resume()
            result = trainer.fit()
            ok = True
            return result
        finally:
            trainer.logger.close()
    finally:
        if lock is not None:
            lock.release()
        torch.set_num_threads(threads)
        # barrier + destroy on success; after an error another rank may never reach a barrier
        strategy.cleanup() if ok else strategy.abort()
