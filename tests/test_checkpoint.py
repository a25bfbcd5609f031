"""Checkpoints: atomic layout, verification, fallback to the last good one, pruning."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from lrpretrain.checkpoint import Checkpointer
from lrpretrain.errors import CheckpointError

from conftest import TINY, losses


def _save(ck: Checkpointer, step: int):
    model = {"w": torch.full((3, 4), float(step)), "b": torch.arange(4.0)}
    state = {"step": step, "opt": {"m": torch.ones(2)}, "rng": torch.get_rng_state(), "py": (3, (1, 2), None)}
    return ck.save(step, model, state, f"step: {step}\n")


def test_roundtrip_and_layout(tmp_path):
    ck = Checkpointer(tmp_path, keep_last=2)
    path = _save(ck, 7)
    assert sorted(p.name for p in path.iterdir()) == ["config.yaml", "meta.json", "model.safetensors", "train_state.pt"]
    assert (tmp_path / "checkpoints/latest").read_text() == "step_7\n"
    loaded = Checkpointer.load(path)
    assert loaded.step == 7 and torch.equal(loaded.model["w"], torch.full((3, 4), 7.0))
    assert loaded.state["py"] == (3, (1, 2), None)
    torch.load(path / "train_state.pt", weights_only=True)  # plain tensors and scalars only


def test_tied_weights_are_saved(tmp_path):
    w = torch.randn(4, 4)
    Checkpointer(tmp_path).save(1, {"a": w, "b": w}, {}, "")
    loaded = Checkpointer.load(tmp_path / "checkpoints/step_1")
    assert torch.equal(loaded.model["a"], loaded.model["b"])


def test_keep_last_prunes_oldest(tmp_path):
    ck = Checkpointer(tmp_path, keep_last=2)
    for s in (2, 4, 6, 8):
        _save(ck, s)
    assert [p.name for p in ck.complete_steps()] == ["step_8", "step_6"]


@pytest.mark.parametrize("damage, reason", [
    (lambda p: (p / "model.safetensors").write_bytes((p / "model.safetensors").read_bytes()[:-7]), "bytes, expected"),
    (lambda p: (p / "train_state.pt").write_bytes(b"x" + (p / "train_state.pt").read_bytes()[1:]), "fails its CRC32"),
    (lambda p: (p / "meta.json").unlink(), "is partial: no meta.json"),
    (lambda p: (p / "train_state.pt").unlink(), "is partial: train_state.pt is missing"),
    (lambda p: (p / "meta.json").write_text("{not json"), "unreadable meta.json"),
])
def test_damage_is_detected_and_auto_falls_back(tmp_path, damage, reason):
    ck = Checkpointer(tmp_path, keep_last=3)
    _save(ck, 2)
    damage(_save(ck, 4))
    with pytest.raises(CheckpointError, match=reason):
        Checkpointer.load(tmp_path / "checkpoints/step_4")
    warnings = []
    loaded = ck.load_latest(warnings.append)
    assert loaded.step == 2
    assert len(warnings) == 1 and "step_4" in warnings[0] and "falling back" in warnings[0]


def test_stale_temporaries_are_removed_and_ignored(tmp_path):
    ck = Checkpointer(tmp_path)
    _save(ck, 2)
    (tmp_path / "checkpoints/.tmp-step_4-123").mkdir()
    assert [p.name for p in ck.complete_steps()] == ["step_2"]
    ck.remove_stale()
    assert not (tmp_path / "checkpoints/.tmp-step_4-123").exists()


def test_resume_auto_skips_a_corrupt_checkpoint_and_continues_exactly(cli, tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    args = [*TINY, "trainer.max_steps=6", "trainer.ckpt_every=2", "trainer.keep_last=5"]
    assert cli("train", *args, f"run.dir={ref}").code == 0
    assert cli("train", *args, f"run.dir={run}").code == 0
    shutil.rmtree(run / "checkpoints/step_6")
    bad = run / "checkpoints/step_4/model.safetensors"
    data = bytearray(bad.read_bytes())
    data[-1] ^= 0xFF
    bad.write_bytes(bytes(data))
    r = cli("train", *args, f"run.dir={run}")
    assert r.code == 0, r.err
    assert "step_4 is corrupt: model.safetensors fails its CRC32 check; falling back" in r.err
    assert "resumed from" in r.err and "step_2" in r.err
    assert losses(run) == losses(ref)


def test_explicit_corrupt_checkpoint_is_an_error(cli, tmp_path):
    run = tmp_path / "run"
    assert cli("train", *TINY, f"run.dir={run}", "trainer.max_steps=2").code == 0
    ckpt = run / "checkpoints/step_2"
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["files"]["train_state.pt"]["bytes"] += 1
    (ckpt / "meta.json").write_text(json.dumps(meta))
    r = cli("train", *TINY, f"run.dir={tmp_path / 'other'}", f"trainer.resume={ckpt}", "trainer.max_steps=4")
    assert r.code == 2
    assert r.error_lines == [f"lrpretrain: error: checkpoint {ckpt} is corrupt: train_state.pt has "
                             f"{meta['files']['train_state.pt']['bytes'] - 1} bytes, expected "
                             f"{meta['files']['train_state.pt']['bytes']}"]
    r = cli("train", *TINY, f"run.dir={tmp_path / 'other2'}", f"trainer.resume={tmp_path / 'nope'}")
    assert r.code == 2 and r.error_lines == [f"lrpretrain: error: checkpoint {tmp_path / 'nope'} does not exist"]


def test_explicit_checkpoint_warm_starts_a_new_run_dir(cli, tmp_path):
    a = tmp_path / "a"
    assert cli("train", *TINY, f"run.dir={a}", "trainer.max_steps=2").code == 0
    r = cli("train", *TINY, f"run.dir={tmp_path / 'b'}", f"trainer.resume={a / 'checkpoints/step_2'}",
            "trainer.max_steps=3")
    assert r.code == 0, r.err
    assert sorted(losses(tmp_path / "b")) == [3]
