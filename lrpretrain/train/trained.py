"""A trained run loaded for use (``generate``, ``export``, ``eval``): its config, the method's model
holding a checkpoint's weights, and the tokenizer the run trained with.

Any checkpoint a strategy wrote loads here, in one process on the CPU: ``model.safetensors`` (single,
DDP, DeepSpeed) or the sharded ``dcp/`` directory of FSDP2, in whatever dtype it stores (fp32, or bf16
under bf16 weights); the model is built in fp32, which holds a bf16 value exactly.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lrpretrain.checkpoint import Checkpointer, Loaded, load_sharded_model
from lrpretrain.config import Config
from lrpretrain.data import TokenizerInfo, load_tokenizer
from lrpretrain.errors import CheckpointError, ConfigError
from lrpretrain.methods import Method, get_method
from lrpretrain.model import build_model
from lrpretrain.train.assemble import from_yaml
from lrpretrain.train.rng import seed_everything

_STEP = re.compile(r"^step_\d+$")


@dataclass
class TrainedRun:
    run_dir: Path
    cfg: Config
    method: Method
    model: nn.Module  # the method's prepared model (fp32, eval mode, CPU) with the checkpoint's weights
    tokenizer: TokenizerInfo
    checkpoint: Path
    step: int
    stored_dtype: torch.dtype  # the dtype of the checkpoint's floating-point weights


def run_config(run_dir: str | os.PathLike) -> Config:
    """The resolved, validated config of the run in ``run_dir`` (one line if there is none)."""
    path = Path(run_dir) / "config.yaml"
    if not Path(run_dir).is_dir():
        raise ConfigError(f"run.dir={run_dir} holds no run: the directory does not exist")
    if not path.exists():
        raise ConfigError(f"run.dir={run_dir} holds no run (no config.yaml)")
    return from_yaml(path)


def find_checkpoint(run_dir: str | os.PathLike, spec: str = "latest") -> Loaded:
    """``latest`` (the newest checkpoint that verifies), ``step_N`` (that checkpoint of the run) or the
    path of a checkpoint directory; verified (sizes, CRC32s) and read."""
    run_dir = Path(run_dir)
    if spec == "latest":
        skipped: list[str] = []
        loaded = Checkpointer(run_dir).load_latest(skipped.append)
        if loaded is None:
            why = f" ({skipped[0]})" if skipped else ""
            raise CheckpointError(f"run.dir={run_dir} has no complete checkpoint{why}")
        return loaded
    path = run_dir / "checkpoints" / spec if _STEP.match(spec) else Path(spec)
    if not path.is_dir():
        have = ", ".join(p.name for p in Checkpointer(run_dir).complete_steps()) or "none"
        raise CheckpointError(f"checkpoint={spec} is not a checkpoint directory ({path} does not exist); "
                              f"allowed: latest, step_N of {run_dir}/checkpoints (there: {have}), or a path")
    return Checkpointer.load(path)


def model_weights(loaded: Loaded) -> dict[str, torch.Tensor]:
    """The full model state of a checkpoint, from model.safetensors or from FSDP2's sharded dcp/."""
    return loaded.model if loaded.model is not None else load_sharded_model(loaded.path)


def stored_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    """The dtype most of the checkpoint's floating-point entries are stored in."""
    counts = Counter(t.dtype for t in state.values() if t.is_floating_point())
    return counts.most_common(1)[0][0] if counts else torch.float32


def load_trained(run_dir: str | os.PathLike, checkpoint: str = "latest") -> TrainedRun:
    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    loaded = find_checkpoint(run_dir, checkpoint)
    state = model_weights(loaded)
    tokenizer = load_tokenizer(cfg.data.tokenizer, cfg.data.eos_token, cfg.data.pad_token)
    method = get_method(cfg.method.name)(cfg.method, cfg.model)
    seed_everything(cfg.seed)  # surgery that draws (a fixed random support) draws what training drew
    model = method.prepare_model(build_model(cfg.model, "cpu"))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {loaded.path} does not fit the model of {run_dir}/config.yaml "
                              f"({cfg.model.name}, method={cfg.method.name}): {str(e).splitlines()[0]}") from e
    model.eval()
    return TrainedRun(run_dir, cfg, method, model, tokenizer, loaded.path, loaded.step, stored_dtype(state))
