"""Config schemas and their Hydra composition.

Hydra composes ``conf/`` (a defaults list over the groups ``model/ method/ data/ optim/ trainer/``)
onto the dataclasses below, registered in Hydra's ConfigStore, so a misspelled key or a value of the
wrong type fails at composition. Each method plugin brings its own config dataclass (see
``lrpretrain.methods``), handed in by the caller: this module imports nothing of lrpretrain but its
errors. :func:`compose` turns every composition failure into a one-line
:class:`~lrpretrain.errors.ConfigError`; :func:`to_typed` checks keys and types; each dataclass checks
its own fields in ``validate()`` (:func:`validate_sections`), and :func:`validate_across_sections`
the values that span sections. Loading a run's config, with the checks that need the model, the
method and the strategy together, is :func:`lrpretrain.train.load_config`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf

from lrpretrain.errors import ConfigError, allowed, check

CONF_GROUPS = ("model", "method", "data", "optim", "trainer", "distributed", "experiment", "launcher")


def _one_of(key: str, value: str, options: tuple[str, ...]) -> None:
    check(value in options, key, value, f"allowed: {allowed(options)}")


@dataclass
class ModelConfig:
    """A LLaMA decoder. Presets in conf/model/ (GaLore's configs/*.json plus CPU sizes)."""

    name: str = MISSING
    dim: int = MISSING  # hidden size
    n_layers: int = MISSING
    n_heads: int = MISSING
    ffn_dim: int = MISSING  # SwiGLU intermediate size
    vocab_size: int = 32000
    max_seq_len: int = 1024
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    init_std: float = 0.02
    tie_embeddings: bool = False

    def validate(self) -> None:
        for f in ("dim", "n_layers", "n_heads", "ffn_dim", "vocab_size", "max_seq_len"):
            check(getattr(self, f) > 0, f"model.{f}", getattr(self, f), "must be > 0")
        check(self.dim % self.n_heads == 0, "model.n_heads", self.n_heads, f"must divide model.dim={self.dim}")
        check((self.dim // self.n_heads) % 2 == 0, "model.n_heads", self.n_heads, "head dim must be even for RoPE")


@dataclass
class DataConfig:
    """Where the text comes from and how it becomes rows of tokens."""

    name: str = MISSING
    source: str = "embedded"  # embedded | jsonl | hf | shards
    files: list[str] = field(default_factory=list)  # jsonl: training files (C4 schema, optionally .gz)
    val_files: list[str] = field(default_factory=list)  # jsonl: validation files
    hf_path: str = "allenai/c4"  # hf: dataset on the hub, streamed
    hf_name: str | None = "en"
    train_split: str = "train"
    val_split: str = "validation"
    text_field: str = "text"
    path: str = ""  # shards: a directory written by `lrpretrain prepare-data pretokenize ... out=DIR`
    verify: str = "lazy"  # shards: lazy (each shard's CRC when first mapped) | size (sizes only) | full (every CRC at open)
    tokenizer: str = "embedded"  # "embedded", a tokenizer.json path, or a hub id (t5-base)
    eos_token: str = "</s>"
    pad_token: str = "<pad>"
    seq_len: int = 256
    mode: str = "pack"  # pack | truncate
    seed: int = 0  # data order; independent of the model seed
    shuffle_block: int = 1024  # documents permuted together inside a shard
    val_tokens: int = 100_000  # fixed held-out budget (non-pad tokens)

    def validate(self) -> None:
        _one_of("data.source", self.source, ("embedded", "jsonl", "hf", "shards"))
        _one_of("data.verify", self.verify, ("lazy", "size", "full"))
        _one_of("data.mode", self.mode, ("pack", "truncate"))
        check(self.seq_len > 1, "data.seq_len", self.seq_len, "must be > 1")
        check(self.shuffle_block >= 1, "data.shuffle_block", self.shuffle_block, "must be >= 1")
        check(self.val_tokens >= 0, "data.val_tokens", self.val_tokens, "must be >= 0")
        if self.source == "jsonl":
            check(len(self.files) > 0, "data.files", list(self.files), "data=jsonl needs at least one file")
        if self.source == "shards":
            check(bool(self.path), "data.path", self.path,
                  "data=shards needs the directory written by `lrpretrain prepare-data pretokenize ... out=DIR`")


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule (counted in optimizer updates)."""

    name: str = "adamw"
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    schedule: str = "cosine"  # cosine | linear | constant
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # global-norm clipping; 0 disables
    state_bits: int = 32  # 32: fp32 moments; 8: blockwise 8-bit moments (bitsandbytes' format, 8-bit Adam)

    def validate(self) -> None:
        _one_of("optim.name", self.name, ("adamw",))
        check(self.state_bits in (32, 8), "optim.state_bits", self.state_bits, "allowed: 32, 8")
        _one_of("optim.schedule", self.schedule, ("cosine", "linear", "constant"))
        check(self.lr > 0, "optim.lr", self.lr, "must be > 0")
        check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas", list(self.betas),
              "expected two values in [0, 1)")
        check(self.eps > 0, "optim.eps", self.eps, "must be > 0")
        check(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "must be >= 0")
        check(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps, "must be >= 0")
        check(0 < self.min_lr_ratio <= 1, "optim.min_lr_ratio", self.min_lr_ratio, "must be in (0, 1]")
        check(self.grad_clip >= 0, "optim.grad_clip", self.grad_clip, "must be >= 0 (0 disables clipping)")


RECOMPUTE = ("none", "full", "selective", "method")
PRECISIONS = ("auto", "fp32", "bf16", "pure_bf16")
BF16_UPDATES = ("stochastic", "nearest", "kahan")
KERNELS = ("auto", "torch", "triton")  # trainer.kernels (lrpretrain.kernels.CHOICES)
PER_LAYER_CLIP = ("global", "param")


@dataclass
class TrainerConfig:
    max_steps: int = 100  # optimizer updates
    batch_size: int = 16  # global sequences per optimizer update
    micro_batch_size: int = 16  # sequences per forward/backward on one device
    eval_every: int = 50  # 0: only at the end
    eval_at_start: bool = True
    eval_batch_size: int = 0  # 0: micro_batch_size
    ckpt_every: int = 50  # 0: only at the end (and on SIGTERM/SIGUSR1)
    keep_last: int = 2
    ckpt_checksum: bool = True  # crc32 of every checkpoint file, verified on load
    resume: str = "auto"  # auto | never | PATH to a checkpoint directory
    log_every: int = 1
    # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 (autocast, fp32 master weights) | pure_bf16 (bf16 weights,
    # gradients and activations, no fp32 copy; lrpretrain/optim/bf16.py)
    precision: str = "auto"
    bf16_update: str = "stochastic"  # pure_bf16: how the fp32 update is rounded into bf16 weights: stochastic | nearest | kahan
    device: str = "auto"  # auto | cpu | cuda
    compile: bool = False  # torch.compile the model
    compile_backend: str = "inductor"  # torch.compile's backend (aot_eager: dynamo + AOTAutograd, no code generation)
    # fused kernels (lrpretrain/kernels): auto (Triton and liger's fused loss on CUDA; elsewhere the PyTorch
    # references with the chunked loss) | torch (the PyTorch paths; the loss from the whole logits) | triton
    kernels: str = "auto"
    threads: int = 0  # torch intra-op threads on CPU; 0 keeps torch's default
    on_nonfinite: str = "skip"  # skip the update | stop the run
    max_nonfinite: int = 10  # consecutive skipped updates before stopping anyway
    recompute: str = "none"  # activation recomputation: none | full | selective | method (lrpretrain/train/recompute.py)
    recompute_every: int = 1  # full/selective: checkpoint decoder blocks 0, k, 2k, ... (1: every block)
    per_layer_update: bool = False  # step each parameter inside the backward, free its gradient at once
    per_layer_clip: str = "global"  # global: exact global-norm clip (a second backward) | param: per parameter

    def validate(self) -> None:
        for f in ("max_steps", "batch_size", "micro_batch_size", "keep_last", "log_every"):
            check(getattr(self, f) > 0, f"trainer.{f}", getattr(self, f), "must be > 0")
        for f in ("eval_every", "ckpt_every", "threads", "eval_batch_size"):
            check(getattr(self, f) >= 0, f"trainer.{f}", getattr(self, f), "must be >= 0")
        check(self.resume in ("auto", "never") or bool(self.resume), "trainer.resume", self.resume,
              "allowed: auto, never, or a checkpoint directory")
        _one_of("trainer.precision", self.precision, PRECISIONS)
        _one_of("trainer.bf16_update", self.bf16_update, BF16_UPDATES)
        _one_of("trainer.device", self.device, ("auto", "cpu", "cuda"))
        _one_of("trainer.kernels", self.kernels, KERNELS)
        _one_of("trainer.on_nonfinite", self.on_nonfinite, ("skip", "stop"))
        check(self.max_nonfinite > 0, "trainer.max_nonfinite", self.max_nonfinite, "must be > 0")
        _one_of("trainer.recompute", self.recompute, RECOMPUTE)
        check(self.recompute_every >= 1, "trainer.recompute_every", self.recompute_every,
              "must be >= 1 (1 checkpoints every block, k every k-th)")
        _one_of("trainer.per_layer_clip", self.per_layer_clip, PER_LAYER_CLIP)
        if self.compile:
            _one_of("trainer.compile_backend", self.compile_backend, _compile_backends())

    def resolved_precision(self, cuda: bool) -> str:
        """``fp32``, ``bf16`` (autocast) or ``pure_bf16``; ``auto`` is bf16 on CUDA and fp32 elsewhere."""
        if self.precision != "auto":
            return self.precision
        return "bf16" if cuda else "fp32"


STRATEGIES = ("single", "ddp", "fsdp2", "deepspeed")
DTYPES = ("fp32", "bf16", "fp16")


@dataclass
class DistributedConfig:
    """How the run is spread over processes (``conf/distributed/``; see lrpretrain/distributed/strategy.py).

    Processes come from the launcher (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT);
    ``single`` runs one process, ``ddp`` replicates the model and all-reduces gradients, ``fsdp2``
    shards parameters, gradients and optimizer state per decoder block (``fully_shard``), ``deepspeed``
    hands model and optimizer to a DeepSpeed engine (ZeRO stage ``zero_stage``).
    """

    strategy: str = "single"  # single | ddp | fsdp2 | deepspeed
    backend: str = "auto"  # process-group backend: auto (nccl on CUDA, gloo on the CPU) | nccl | gloo
    timeout_s: int = 1800  # collective timeout; a rank that dies makes the others fail after this
    # data=global: every rank reads the one global stream and keeps its slice of each update's rows, so
    # the rows of an update do not depend on the world size (same batches as single-process; exact
    # resume on another world size). data=sharded: each rank reads its own shards (no rank tokenizes
    # the others' text); resume needs the same world size.
    data: str = "global"  # global | sharded
    zero_stage: int = 1  # deepspeed: ZeRO stage 0-3
    # fsdp2: MixedPrecisionPolicy. param_dtype: the dtype of the all-gathered parameters in forward and
    # backward (the sharded master weights and the optimizer stay fp32); reduce_dtype: the gradient
    # reduce-scatter's dtype.
    param_dtype: str = "fp32"  # fp32 | bf16 | fp16
    reduce_dtype: str = "fp32"  # fp32 | bf16 | fp16
    reshard_after_forward: bool = True  # fsdp2: free gathered block parameters after forward (ZeRO-3); false: keep them to backward (ZeRO-2-like, more memory)
    ddp_bucket_mb: int = 25  # ddp: gradient bucket size

    def validate(self) -> None:
        _one_of("distributed.strategy", self.strategy, STRATEGIES)  # each is a lrpretrain.distributed strategy
        _one_of("distributed.backend", self.backend, ("auto", "nccl", "gloo"))
        _one_of("distributed.data", self.data, ("global", "sharded"))
        check(self.zero_stage in (0, 1, 2, 3), "distributed.zero_stage", self.zero_stage, "allowed: 0, 1, 2, 3")
        _one_of("distributed.param_dtype", self.param_dtype, DTYPES)
        _one_of("distributed.reduce_dtype", self.reduce_dtype, DTYPES)
        check(self.timeout_s > 0, "distributed.timeout_s", self.timeout_s, "must be > 0")
        check(self.ddp_bucket_mb > 0, "distributed.ddp_bucket_mb", self.ddp_bucket_mb, "must be > 0")


@dataclass
class EvalConfig:
    """How validation loss is reported (every ``trainer.eval_every`` updates and at the end).

    Always: ``val_loss``/``val_ppl``, the token-weighted mean over the fixed held-out set (the truth).
    ``protocol=galore`` adds ``galore_val_loss``/``galore_val_ppl``, GaLore's routine
    (``torchrun_main.py:evaluate_model``) reproduced with its quirks, for comparison with the published
    tables: batches of ``trainer.eval_batch_size`` rows (the training per-device batch by default, as
    there) until the estimated global non-pad token count (local count x world size) exceeds
    ``galore_tokens``; loss = mean of per-batch mean token losses, summed and divided by n + 1 for n
    batches (its batch counter starts at 1), so the figure is biased low by n/(n+1); ranks averaged.
    """

    protocol: str = "tokens"  # tokens | galore
    galore_tokens: int = 10_000_000  # GaLore's target_eval_tokens

    def validate(self) -> None:
        _one_of("eval.protocol", self.protocol, ("tokens", "galore"))
        check(self.galore_tokens > 0, "eval.galore_tokens", self.galore_tokens, "must be > 0")


@dataclass
class LoggingConfig:
    wandb: str = "disabled"  # disabled | offline | online
    project: str = "lrpretrain"
    entity: str | None = None
    progress: str = "auto"  # auto (bar on a terminal, lines otherwise) | bar | lines | none

    def validate(self) -> None:
        _one_of("logging.wandb", self.wandb, ("disabled", "offline", "online"))
        _one_of("logging.progress", self.progress, ("auto", "bar", "lines", "none"))


@dataclass
class RunConfig:
    dir: str = "runs/${model.name}-${method.name}-${now:%Y%m%d-%H%M%S}"
    name: str | None = None  # W&B run name; default: the run directory's name
    overwrite: bool = False  # allow starting a different run in an existing run.dir (deletes it)
    break_lock: bool = False  # take over run.dir's lock left by a process that this host cannot check (another host)


@dataclass
class Config:
    model: ModelConfig = MISSING
    method: Any = None  # the plugin's own dataclass (see lrpretrain.methods)
    data: DataConfig = MISSING
    optim: OptimConfig = MISSING
    trainer: TrainerConfig = MISSING
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    seed: int = 0


def conf_dir() -> Path:
    """The directory holding config.yaml (top-level ``conf/``, packaged as ``lrpretrain.conf``)."""
    import importlib.resources

    return Path(str(importlib.resources.files("lrpretrain.conf")))


def group_options(group: str) -> list[str]:
    """Names selectable for a config group: YAML files plus structured configs from plugins."""
    from hydra.core.config_store import ConfigStore

    names = {p.stem for p in (conf_dir() / group).glob("*.yaml")}
    names |= {k.removesuffix(".yaml") for k in ConfigStore.instance().repo.get(group, {})}
    return sorted(names)


def job_slug(override_dirname: str) -> str:
    """A sweep job's directory name from its swept overrides (Hydra's ``hydra.job.override_dirname``)."""
    slug = re.sub(r"[^\w.=,+-]", "_", override_dirname) or "job"
    if len(slug) > 120:  # keep names well below filesystem limits; the hash keeps them distinct
        slug = slug[:100] + "-" + hashlib.sha1(override_dirname.encode()).hexdigest()[:12]
    return slug


SHARDS_MANIFEST = "manifest.json"  # written last by `prepare-data pretokenize`: its presence marks a complete directory


def shards_manifest(path: str) -> dict[str, Any]:
    """The manifest of the token shards in ``path`` (data.path of data=shards), or one ConfigError line:
    no path, no such directory, a preparation that has not finished, not a manifest. The format
    itself is checked by :mod:`lrpretrain.data.shards`."""
    if not path:
        raise ConfigError("data.path is empty: data=shards needs data.path=DIR, a directory written by "
                          "`lrpretrain prepare-data pretokenize <data overrides> out=DIR`")
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ConfigError(f"data.path={path} does not exist: write token shards there with "
                          f"`lrpretrain prepare-data pretokenize <data overrides> out={path}`")
    manifest = root / SHARDS_MANIFEST
    if not manifest.is_file():
        raise ConfigError(f"data.path={path} holds no {SHARDS_MANIFEST}: its preparation has not finished "
                          "(rerun the same `lrpretrain prepare-data pretokenize` command to complete it) "
                          "or it is not a token-shard directory")
    try:
        out = json.loads(manifest.read_text())
        assert isinstance(out, dict) and isinstance(out.get("data"), dict)
        return out
    except (OSError, ValueError, AssertionError) as e:
        raise ConfigError(f"{manifest} is not a token-shard manifest ({type(e).__name__}); "
                          "prepare the shards again") from e


def shards_setting(path: str, key: str) -> Any:
    """``${lrp_shards:${.path},KEY}`` (conf/data/shards.yaml): data.KEY of the data config the shards were
    prepared with, so that data=shards rows and orders them as the source would unless overridden."""
    data = shards_manifest(path)["data"]
    if key not in data:
        raise ConfigError(f"{Path(path) / SHARDS_MANIFEST} does not record data.{key}; prepare the shards again")
    return data[key]


def register_resolver() -> None:
    """``${lrp_slug:...}`` (hydra.sweep.subdir in conf/config.yaml) and ``${lrp_shards:...}``
    (conf/data/shards.yaml)."""
    if not OmegaConf.has_resolver("lrp_slug"):
        OmegaConf.register_new_resolver("lrp_slug", job_slug)
    if not OmegaConf.has_resolver("lrp_shards"):
        OmegaConf.register_new_resolver("lrp_shards", shards_setting)


# A method plugin's name -> its config dataclass (every registered plugin; lrpretrain.methods has them).
MethodSchemas = Mapping[str, type]


def register_configs(method_schemas: MethodSchemas) -> None:
    """Put the schemas (and every method plugin's schema) into Hydra's ConfigStore."""
    from hydra.core.config_store import ConfigStore

    register_resolver()  # hydra.sweep.subdir in conf/config.yaml
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    yaml_methods = {p.stem for p in (conf_dir() / "method").glob("*.yaml")}
    for name, schema in method_schemas.items():
        # conf/method/<name>.yaml starts from this schema (`- /method_schema/<name>@_here_`);
        # a third-party plugin without a YAML is selectable through its schema alone.
        cs.store(group="method_schema", name=name, node=schema(name=name))
        if name not in yaml_methods:
            cs.store(group="method", name=name, node=schema(name=name))


# ---------------------------------------------------------------------------------------------
# Loading: Hydra composition with one-line errors


def _first_line(e: BaseException | None) -> str:
    return str(e).strip().splitlines()[0] if e is not None and str(e).strip() else type(e).__name__


def _keys_hint(section: str, overrides: list[str], method_schemas: MethodSchemas) -> str:
    """'keys in <section>: ...' for a config section (the selected method's for 'method')."""
    if not section:
        return f"top-level keys: {allowed(f.name for f in fields(Config))}"
    if section == "method":
        name = next((o.split("=", 1)[1] for o in overrides if o.startswith("method=")), "full")
        if name not in method_schemas:
            return "see conf/method/"
        return f"keys of method '{name}': {allowed(f.name for f in fields(method_schemas[name]))}"
    f = {f.name: f for f in fields(Config)}.get(section)
    schema = f.default_factory if f is not None and callable(f.default_factory) else None
    schema = schema or (globals().get(f.type) if f is not None and isinstance(f.type, str) else None)
    if isinstance(schema, type) and is_dataclass(schema):
        return f"keys in '{section}': {allowed(x.name for x in fields(schema))}"
    return "see the config tree in the README"


def _composition_error(e: Exception, overrides: list[str], method_schemas: MethodSchemas) -> ConfigError:
    msg = str(e)
    cause = e.__cause__
    m = re.search(r"Could not (?:find|load) '([\w/]+)/([^']+)'", msg)
    if m:
        group, option = m.group(1), m.group(2)
        top = group.split("/")[0]
        if top in CONF_GROUPS:
            return ConfigError(f"unknown {top} '{option}'; allowed: {allowed(group_options(top))}")
        return ConfigError(f"unknown config '{group}/{option}'")
    m = re.search(r"Could not override '([^']+)'", msg)
    if m:
        key = m.group(1)
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        return ConfigError(f"unknown config key '{key}'; {_keys_hint(parent, overrides, method_schemas)}")
    m = re.search(r"Ambiguous value for argument '([^']+)'", msg)
    if m:
        return ConfigError(f"override '{m.group(1)}' lists several values: run a sweep with `lrpretrain train -m ...`, "
                           "or write a list as key=[a,b] or a string as key='a,b'")
    m = re.search(r"Error merging override (\S+)", msg)
    if m:
        detail = _first_line(cause)
        return ConfigError(f"bad value in override '{m.group(1)}': {detail}")
    if "OverrideParseException" in type(e).__name__ or "parse" in msg.lower():
        return ConfigError(f"cannot parse overrides {overrides}: {_first_line(e)}")
    detail = _first_line(e) + (f" ({_first_line(cause)})" if cause is not None else "")
    return ConfigError(f"invalid config: {detail}")


def _unknown_keys(node: DictConfig, schema: type, prefix: str) -> list[str]:
    """Keys in ``node`` that ``schema`` does not declare (``+key=`` overrides bypass Hydra's check)."""
    declared = {f.name: f for f in fields(schema)}
    bad = []
    for key in node.keys():
        f = declared.get(str(key))
        if f is None:
            bad.append(f"{prefix}.{key}")
            continue
        default = f.default_factory() if callable(f.default_factory) else f.default
        sub = node._get_node(key)
        if isinstance(sub, DictConfig) and is_dataclass(default):
            bad += _unknown_keys(sub, type(default), f"{prefix}.{key}")
    return bad


def compose(overrides: list[str], method_schemas: MethodSchemas) -> DictConfig:
    """Compose conf/config.yaml with Hydra overrides; any failure becomes one ConfigError line."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs(method_schemas)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
            cfg = hydra_compose("config", overrides=list(overrides))
    except Exception as e:  # Hydra raises several exception types; all are the user's overrides
        raise _composition_error(e, list(overrides), method_schemas) from e
    finally:
        GlobalHydra.instance().clear()
    return cfg


def to_typed(cfg: DictConfig, method_schema: Callable[[str], type]) -> Config:
    """Resolve and convert to dataclasses, rejecting unknown keys and invalid values.
    ``method_schema(name)``: the method plugin's config dataclass (a ConfigError for an unknown name)."""
    try:
        OmegaConf.resolve(cfg)
    except Exception as e:
        own = e.__cause__ or e.__context__
        if isinstance(own, ConfigError):  # a resolver's own one-line error (lrp_shards)
            raise own from e
        raise ConfigError(f"cannot resolve config: {_first_line(e)}") from e
    for section in ("model", "data", "optim", "trainer", "distributed", "eval", "logging", "run"):
        schema = {f.name: f for f in fields(Config)}[section].type
        schema_cls = globals()[schema] if isinstance(schema, str) else schema
        bad = _unknown_keys(cfg[section], schema_cls, section)
        if bad:
            known = ", ".join(f.name for f in fields(schema_cls))
            raise ConfigError(f"unknown config key '{bad[0]}'; keys in '{section}': {known}")
    method_name = cfg.method.get("name") if isinstance(cfg.get("method"), DictConfig) else None
    if not method_name:
        raise ConfigError("method.name is missing; select a method with method=NAME")
    schema = method_schema(method_name)
    bad = _unknown_keys(cfg.method, schema, "method")
    if bad:
        known = ", ".join(f.name for f in fields(schema))
        raise ConfigError(f"unknown config key '{bad[0]}' for method '{method_name}'; keys: {known}")
    try:
        method_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), cfg.method))
        missing = OmegaConf.missing_keys(cfg)
        if missing:
            raise ConfigError(f"config value missing for '{sorted(missing)[0]}'")
        typed: Config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), {k: v for k, v in cfg.items() if k != "method"}))  # type: ignore[assignment]
    except ConfigError:
        raise
    except Exception as e:
        key = getattr(e, "full_key", None)
        raise ConfigError(f"invalid config{f' at {key}' if key else ''}: {_first_line(e)}") from e
    typed.method = method_cfg
    return typed


def validate_sections(cfg: Config) -> None:
    """Each section's own checks (its dataclass's ``validate()``, the method's included)."""
    for section in (cfg.model, cfg.data, cfg.optim, cfg.trainer, cfg.distributed, cfg.eval, cfg.logging, cfg.method):
        if hasattr(section, "validate"):
            section.validate()


def validate_across_sections(cfg: Config, world_size: int) -> None:
    """The checks that span sections of this module's schemas (rows, batch split, device)."""
    check(cfg.data.seq_len <= cfg.model.max_seq_len, "data.seq_len", cfg.data.seq_len,
          f"must be <= model.max_seq_len={cfg.model.max_seq_len} for model={cfg.model.name}")
    t = cfg.trainer
    per_step = t.micro_batch_size * world_size
    check(t.batch_size % per_step == 0, "trainer.batch_size", t.batch_size,
          f"must be a multiple of trainer.micro_batch_size x world_size = {t.micro_batch_size} x {world_size}")
    check(cfg.trainer.device != "cuda" or _cuda_available(), "trainer.device", "cuda", "no CUDA device is available")


def _compile_backends() -> tuple[str, ...]:
    """torch.compile's registered backends, those tagged as debugging tools (aot_eager, eager) included,
    torch's own test fixtures left out."""
    from torch._dynamo import list_backends

    return tuple(b for b in list_backends(exclude_tags=()) if "TESTING_ONLY" not in b)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def to_dictconfig(cfg: Config) -> DictConfig:
    return OmegaConf.structured(cfg)
