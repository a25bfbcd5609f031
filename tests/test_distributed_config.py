"""``distributed.*`` at config time: one line per bad value, before anything is built."""

from __future__ import annotations

import pytest

from lrpretrain.errors import ConfigError
from lrpretrain.train import load_config

from conftest import TINY

TWO = ["model=llama_tiny", "trainer.batch_size=4", "trainer.micro_batch_size=2"]


@pytest.mark.parametrize("args, world, expected", [
    (["distributed.strategy=horovod"], 1, "distributed.strategy='horovod' is invalid: allowed: single, ddp, fsdp2, deepspeed"),
    (["distributed.data=random"], 1, "distributed.data='random' is invalid: allowed: global, sharded"),
    (["distributed=fsdp2", "distributed.param_dtype=fp8"], 2, "distributed.param_dtype='fp8' is invalid"),
    (["distributed.zero_stage=4"], 1, "distributed.zero_stage=4 is invalid: allowed: 0, 1, 2, 3"),
    ([], 2, "distributed.strategy=single runs one process, but WORLD_SIZE=2"),
    (["distributed=fsdp2", "optim.state_bits=8"], 2, "optim.state_bits=8 is not supported with distributed.strategy=fsdp2"),
    (["distributed=fsdp2", "method=galore", "method.rank=8", "method.state_bits=8"], 2,
     "method.state_bits=8 is not supported with distributed.strategy=fsdp2"),
    (["distributed=fsdp2", "method=gradnorm_lorp", "method.rank=8", "method.state_bits=8"], 2,
     "method.state_bits=8 is not supported with distributed.strategy=fsdp2"),
    (["distributed=fsdp2", "method=switchlora", "method.rank=8"], 2,
     "method=switchlora is not supported with distributed.strategy=fsdp2: its VectorwiseAdamW"),
    (["distributed=fsdp2", "method=sst", "method.rank=8"], 2, "method=sst is not supported with distributed.strategy=fsdp2"),
    (["distributed=fsdp2", "method=crnet", "method.rank=8", "trainer.recompute=method"], 2,
     "method=crnet is not supported with distributed.strategy=fsdp2: its recomputation (trainer.recompute=method)"),
    (["distributed=ddp", "method=dlrt", "method.rank=8"], 2,
     "method=dlrt is not supported with distributed.strategy=ddp: its integrator changes the parameters' shapes"),
    (["distributed=fsdp2", "method=dlrt", "method.rank=8"], 2,
     "method=dlrt is not supported with distributed.strategy=fsdp2: its integrator changes the parameters' shapes"),
    (["distributed=fsdp2", "method=loro", "method.rank=8"], 2,
     "method=loro is not supported with distributed.strategy=fsdp2: its exact Riemannian step takes QR"),
    (["distributed=fsdp2", "model.tie_embeddings=true"], 2,
     "model.tie_embeddings=true is not supported with distributed.strategy=fsdp2"),
])
def test_bad_values_are_one_line(args, world, expected):
    with pytest.raises(ConfigError) as e:
        load_config([*TWO, *args], world_size=world)
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_every_other_method_passes_config_under_ddp_and_fsdp2():
    for strategy in ("ddp", "fsdp2"):
        load_config([*TWO, f"distributed={strategy}", "method=galore", "method.rank=8"], world_size=2)
    load_config([*TWO, "distributed=ddp", "method=switchlora", "method.rank=8"], world_size=2)
    load_config([*TWO, "distributed=ddp", "method=loro", "method.rank=8"], world_size=2)
    for strategy in ("ddp", "fsdp2"):
        for method in (["method=lost", "method.rank=8"], ["method=gradnorm_lorp", "method.rank=8"]):
            load_config([*TWO, f"distributed={strategy}", *method], world_size=2)


def test_ddp_without_torchrun_is_one_line(cli, tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    r = cli("train", *TINY, f"run.dir={tmp_path / 'run'}", "distributed=ddp")
    assert r.code == 2
    assert r.error_lines == ["lrpretrain: error: distributed.strategy=ddp needs a process group: launch with torchrun "
                             "(torchrun --nproc_per_node=N -m lrpretrain.cli.main train ...)"]
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_of_another_engine_is_one_line(cli, tmp_path):
    """A DeepSpeed checkpoint (ZeRO partitions) given to a single-process run: one line, no traceback."""
    import json

    from test_errors import one_line

    src = tmp_path / "src"
    r = cli("train", *TINY, "trainer.threads=1", "trainer.max_steps=2", "trainer.ckpt_every=2",
            "data.val_tokens=0", f"run.dir={src}")
    assert r.code == 0, r.err
    ckpt = src / "checkpoints" / "step_2"
    meta = json.loads((ckpt / "meta.json").read_text())
    (ckpt / "meta.json").write_text(json.dumps({**meta, "engine": "deepspeed", "zero_stage": 2, "world_size": 2}))
    r = cli("train", *TINY, "trainer.threads=1", "trainer.max_steps=4", "data.val_tokens=0",
            f"run.dir={tmp_path / 'dst'}", f"trainer.resume={ckpt}")
    one_line(r, "was written by distributed=deepspeed (ZeRO stage 2, 2 processes); resume it with that strategy")
