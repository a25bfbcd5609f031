"""Config composition: every YAML composes, and every bad override is one clear ConfigError line."""

from __future__ import annotations

import json

import pytest

from lrpretrain.config import conf_dir, group_options
from lrpretrain.errors import ConfigError
from lrpretrain.train import load_config


@pytest.mark.parametrize("group", ["model", "method", "data", "optim", "trainer"])
def test_every_yaml_in_every_group_composes(group, tmp_path):
    options = group_options(group)
    assert options, group
    # data=shards takes its settings from the manifest of the shards it reads (here a stand-in)
    (tmp_path / "manifest.json").write_text(json.dumps({"data": {"mode": "pack", "seq_len": 128, "shuffle_block": 64,
                                                                 "seed": 0, "val_tokens": 1000, "eos_token": "</s>",
                                                                 "pad_token": "<pad>"}}))
    for name in options:
        extra = {"jsonl": ["data.files=[x.jsonl]"], "shards": [f"data.path={tmp_path}"]}.get(name, []) if group == "data" else []
        cfg, resolved = load_config([f"{group}={name}", *extra])
        assert resolved[group] is not None
        if group in ("model", "data", "method"):
            assert getattr(cfg, group).name == name


def test_every_experiment_preset_composes_and_validates():
    presets = group_options("experiment")
    assert {"demo", "full_c4_60m", "full_c4_7b"} <= set(presets)
    for name in presets:
        cfg, _ = load_config([f"experiment={name}"])
        assert cfg.trainer.batch_size % cfg.trainer.micro_batch_size == 0, name


def test_c4_presets_follow_the_galore_protocol():
    cfg, _ = load_config(["experiment=full_c4_60m"])
    assert (cfg.model.name, cfg.data.name, cfg.data.mode, cfg.data.seq_len, cfg.data.tokenizer) == \
        ("llama_60m", "c4", "truncate", 256, "t5-base")
    assert (cfg.trainer.batch_size, cfg.trainer.max_steps, cfg.optim.warmup_steps, cfg.optim.min_lr_ratio,
            cfg.optim.weight_decay) == (512, 10000, 1000, 0.1, 0.0)


def test_defaults_and_resolved_run_dir():
    cfg, resolved = load_config([])
    assert (cfg.model.name, cfg.method.name, cfg.data.name) == ("llama_small", "full", "embedded")
    assert cfg.run.dir.startswith("runs/llama_small-full-") and "${" not in cfg.run.dir
    assert resolved.trainer.resume == "auto"


def test_overrides_reach_the_typed_config():
    cfg, _ = load_config(["model=llama_60m", "trainer.max_steps=7", "optim.lr=0.01", "seed=3", "data=c4",
                          "trainer.batch_size=512", "trainer.micro_batch_size=256", "run.dir=/tmp/x"])
    assert (cfg.model.dim, cfg.trainer.max_steps, cfg.optim.lr, cfg.seed) == (512, 7, 0.01, 3)
    assert (cfg.data.source, cfg.data.tokenizer, cfg.data.mode) == ("hf", "t5-base", "truncate")
    assert cfg.run.dir == "/tmp/x"


@pytest.mark.parametrize("overrides, expected", [
    (["model=llama_9000"], "unknown model 'llama_9000'; allowed: llama_130m, llama_1b"),
    (["method=magic"], "unknown method 'magic'; allowed: "),  # the list grows with every plugin
    (["data=wiki"], "unknown data 'wiki'; allowed: c4, embedded, jsonl"),
    (["trainer.max_stepz=3"], "unknown config key 'trainer.max_stepz'; keys in 'trainer': max_steps"),
    (["+trainer.foo=1"], "unknown config key 'trainer.foo'"),
    (["+method.rank=4"], "unknown config key 'method.rank' for method 'full'"),
    (["bogus=1"], "unknown config key 'bogus'; top-level keys: model"),
    (["trainer.max_steps=ten"], "bad value in override 'trainer.max_steps=ten'"),
    (["optim.lr=fast"], "bad value in override 'optim.lr=fast'"),
    (["trainer.max_steps=0"], "trainer.max_steps=0 is invalid: must be > 0"),
    (["optim.lr=-1"], "optim.lr=-1.0 is invalid: must be > 0"),
    (["data.mode=zip"], "data.mode='zip' is invalid: allowed: pack, truncate"),
    (["trainer.precision=fp8"], "trainer.precision='fp8' is invalid: allowed: auto, fp32, bf16"),
    (["logging.wandb=maybe"], "logging.wandb='maybe' is invalid: allowed: disabled, offline, online"),
    (["data.seq_len=4096"], "data.seq_len=4096 is invalid: must be <= model.max_seq_len=512"),
    (["trainer.batch_size=10", "trainer.micro_batch_size=4"],
     "trainer.batch_size=10 is invalid: must be a multiple of trainer.micro_batch_size x world_size = 4 x 1"),
    (["model.n_heads=3"], "model.n_heads=3 is invalid: must divide model.dim=256"),
    (["data=jsonl"], "data=jsonl needs at least one file"),
    (["data=shards"], "data.path is empty: data=shards needs data.path=DIR, a directory written by `lrpretrain "
                      "prepare-data pretokenize"),
    (["data=shards", "data.path=/nonexistent/shards"], "data.path=/nonexistent/shards does not exist"),
    (["data.verify=often"], "data.verify='often' is invalid: allowed: lazy, size, full"),
    (["optim.min_lr_ratio=0"], "optim.min_lr_ratio=0.0 is invalid: must be in (0, 1]"),
    (["trainer.compile=true", "trainer.compile_backend=inductr"],
     "trainer.compile_backend='inductr' is invalid: allowed: aot_eager, "),
])
def test_bad_config_is_one_clear_line(overrides, expected):
    with pytest.raises(ConfigError) as e:
        load_config(overrides)
    msg = str(e.value)
    assert expected in msg
    assert "\n" not in msg


def test_batch_divisibility_counts_the_world_size():
    load_config(["trainer.batch_size=16", "trainer.micro_batch_size=4", "distributed=ddp"], world_size=2)
    with pytest.raises(ConfigError, match="4 x 3"):
        load_config(["trainer.batch_size=16", "trainer.micro_batch_size=4", "distributed=ddp"], world_size=3)


def test_conf_dir_is_the_repository_conf():
    assert (conf_dir() / "config.yaml").exists()
