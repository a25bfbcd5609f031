"""Sample text from a trained run: ``lrpretrain generate run.dir=PATH [prompt=...]``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from lrpretrain.checkpoint import Checkpointer, load_sharded_model
from lrpretrain.data import load_tokenizer
from lrpretrain.errors import CheckpointError, ConfigError
from lrpretrain.methods import get_method
from lrpretrain.model import build_model, generate
from lrpretrain.train import from_yaml


@dataclass
class GenerateRun:
    dir: str = "???"


@dataclass
class GenerateConfig:
    run: GenerateRun
    prompt: str = "ROMEO."
    max_new_tokens: int = 120
    temperature: float = 0.8
    top_k: int = 50
    seed: int = 0
    checkpoint: str = "latest"  # latest | PATH to a step_N directory


def parse_overrides(args: list[str]) -> GenerateConfig:
    schema = OmegaConf.structured(GenerateConfig(run=GenerateRun()))
    try:
        cfg = OmegaConf.merge(schema, OmegaConf.from_dotlist(args))
        obj = OmegaConf.to_object(cfg)
    except Exception as e:
        raise ConfigError(f"bad generate arguments {args}: {str(e).splitlines()[0]}; keys: run.dir, prompt, "
                          "max_new_tokens, temperature, top_k, seed, checkpoint") from e
    assert isinstance(obj, GenerateConfig)
    if obj.max_new_tokens <= 0:
        raise ConfigError(f"max_new_tokens={obj.max_new_tokens} is invalid: must be > 0")
    return obj


def generate_from_run(args: list[str]) -> str:
    g = parse_overrides(args)
    run_dir = Path(g.run.dir)
    if not (run_dir / "config.yaml").exists():
        raise ConfigError(f"run.dir={run_dir} holds no run (no config.yaml)")
    cfg = from_yaml(run_dir / "config.yaml")
    if g.checkpoint == "latest":
        loaded = Checkpointer(run_dir).load_latest(lambda m: None)
        if loaded is None:
            raise CheckpointError(f"run.dir={run_dir} has no complete checkpoint")
    else:
        loaded = Checkpointer.load(g.checkpoint)
    tok = load_tokenizer(cfg.data.tokenizer, cfg.data.eos_token, cfg.data.pad_token)
    method = get_method(cfg.method.name)(cfg.method, cfg.model)
    torch.manual_seed(g.seed)
    model = method.prepare_model(build_model(cfg.model, "cpu"))
    model.load_state_dict(loaded.model if loaded.model is not None else load_sharded_model(loaded.path))
    model.eval()
    ids = torch.tensor([tok.tokenizer.encode(g.prompt, add_special_tokens=False).ids or [tok.eos_id]])
    gen = torch.Generator().manual_seed(g.seed)
    out = generate(model, ids, g.max_new_tokens, g.temperature, g.top_k, eos_id=tok.eos_id, generator=gen)
    return tok.decode(out[0].tolist())
