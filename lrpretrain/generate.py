"""Sample text from a trained run: ``lrpretrain generate run.dir=PATH [prompt=...|prompt_file=...]``.

Decoding runs the prompt once and then one token per step against a KV cache in every attention
layer (:func:`lrpretrain.model.llama.generate`); ``cache=false`` recomputes the whole context for every
token instead (same tokens; for comparison). ``num_samples`` continuations of the one prompt are drawn
together, as one batch, from a generator seeded with ``seed``.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from lrpretrain.errors import ConfigError
from lrpretrain.model import generate
from lrpretrain.train.trained import load_trained

DEFAULT_PROMPT = "ROMEO."
KEYS = "run.dir, prompt, prompt_file, max_new_tokens, temperature, top_k, num_samples, seed, checkpoint, cache, device"


@dataclass
class GenerateRun:
    dir: str = "???"


@dataclass
class GenerateConfig:
    run: GenerateRun
    prompt: str | None = None  # default "ROMEO."
    prompt_file: str | None = None  # the prompt is this file's text (UTF-8)
    max_new_tokens: int = 120
    temperature: float = 0.8  # 0: greedy
    top_k: int = 50  # 0: no top-k cut
    num_samples: int = 1
    seed: int = 0
    checkpoint: str = "latest"  # latest | step_N | PATH to a checkpoint directory
    cache: bool = True  # KV cache: prefill once, then one token per step
    device: str = "auto"  # auto (cuda if available) | cpu | cuda


def parse_overrides(args: list[str]) -> GenerateConfig:
    schema = OmegaConf.structured(GenerateConfig(run=GenerateRun()))
    try:
        cfg = OmegaConf.merge(schema, OmegaConf.from_dotlist(args))
        obj = OmegaConf.to_object(cfg)
    except Exception as e:
        raise ConfigError(f"bad generate arguments {args}: {str(e).splitlines()[0]}; keys: {KEYS}") from e
    assert isinstance(obj, GenerateConfig)
    if obj.max_new_tokens <= 0:
        raise ConfigError(f"max_new_tokens={obj.max_new_tokens} is invalid: must be > 0")
    if obj.num_samples <= 0:
        raise ConfigError(f"num_samples={obj.num_samples} is invalid: must be > 0")
    if obj.temperature < 0:
        raise ConfigError(f"temperature={obj.temperature} is invalid: must be >= 0 (0: greedy)")
    if obj.top_k < 0:
        raise ConfigError(f"top_k={obj.top_k} is invalid: must be >= 0 (0: no top-k cut)")
    if obj.device not in ("cpu", "cuda", "auto"):
        raise ConfigError(f"device={obj.device} is invalid: allowed: cpu, cuda, auto")
    if obj.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda is invalid: no CUDA device is available; allowed here: cpu, auto")
    return obj


def read_prompt(g: GenerateConfig) -> str:
    if g.prompt is not None and g.prompt_file is not None:
        raise ConfigError("give prompt= or prompt_file=, not both")
    if g.prompt_file is None:
        return DEFAULT_PROMPT if g.prompt is None else g.prompt
    path = Path(g.prompt_file)
    if not path.is_file():
        raise ConfigError(f"prompt_file={g.prompt_file} is not a file")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"prompt_file={g.prompt_file} cannot be read as UTF-8 text: {e}") from e


def generate_from_run(args: list[str]) -> list[str]:
    """The sampled texts (prompt included), one per sample."""
    g = parse_overrides(args)
    prompt = read_prompt(g)
    run = load_trained(g.run.dir, g.checkpoint)
    device = torch.device("cuda" if g.device == "cuda" or (g.device == "auto" and torch.cuda.is_available()) else "cpu")
    model = run.model.to(device)
    tok = run.tokenizer
    ids = tok.tokenizer.encode(prompt, add_special_tokens=False).ids or [tok.eos_id]
    batch = torch.tensor([ids] * g.num_samples, device=device)
    gen = torch.Generator(device=device).manual_seed(g.seed)
    t0 = time.perf_counter()
    out = generate(model, batch, g.max_new_tokens, g.temperature, g.top_k, eos_id=tok.eos_id, generator=gen,
                   use_cache=g.cache)
    seconds = time.perf_counter() - t0
    new = (out.shape[1] - batch.shape[1]) * g.num_samples
    print(f"generate: {new} tokens in {seconds:.2f} s ({new / seconds:,.0f} tokens/s, KV cache "
          f"{'on' if g.cache else 'off'}, {device}) from {run.checkpoint}", file=sys.stderr)
    texts = []
    for row in out.tolist():
        if tok.eos_id in row[len(ids):]:
            row = row[:len(ids) + row[len(ids):].index(tok.eos_id)]
        texts.append(tok.decode(row))
    return texts
