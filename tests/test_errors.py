"""Bad input through the real CLI: one line on stderr, exit status 2, no traceback."""

from __future__ import annotations

import gzip
import json

import pytest

from conftest import TINY, losses


def one_line(r, expected: str):
    assert r.code == 2, r.err
    assert "Traceback" not in r.err
    assert len(r.error_lines) == 1, r.err
    assert expected in r.error_lines[0], r.error_lines[0]


@pytest.mark.parametrize("args, expected", [
    (["model=llama_2t"], "unknown model 'llama_2t'; allowed: llama_130m, llama_1b, llama_350m, llama_3b, llama_60m, "
                         "llama_7b, llama_small, llama_tiny"),
    (["method=lora9"], "unknown method 'lora9'; allowed: "),
    (["data=pile"], "unknown data 'pile'; allowed: c4, embedded, jsonl"),
    (["trainer.max_step=5"], "unknown config key 'trainer.max_step'; keys in 'trainer': max_steps"),
    (["optim.lr=high"], "bad value in override 'optim.lr=high': Value 'high' of type 'str' could not be converted to Float"),
    (["data.seq_len=1024"], "data.seq_len=1024 is invalid: must be <= model.max_seq_len=512 for model=llama_small"),
    (["trainer.batch_size=6", "trainer.micro_batch_size=4"], "trainer.batch_size=6 is invalid: must be a multiple"),
    (["trainer.resume="], "trainer.resume='' is invalid"),
])
def test_bad_config(cli, tmp_path, args, expected):
    one_line(cli("train", f"run.dir={tmp_path / 'run'}", *args), expected)
    assert not (tmp_path / "run").exists()  # nothing was created


def _jsonl(cli, tmp_path, *files):
    return cli("train", *TINY, f"run.dir={tmp_path / 'run'}", "data=jsonl", f"data.files=[{','.join(map(str, files))}]",
               "data.tokenizer=embedded", "trainer.max_steps=1")


def test_missing_data_file(cli, tmp_path):
    one_line(_jsonl(cli, tmp_path, tmp_path / "c4-train.00000.json.gz"),
             f"data file {tmp_path / 'c4-train.00000.json.gz'} does not exist")
    assert not (tmp_path / "run").exists()


def test_empty_data_file(cli, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    one_line(_jsonl(cli, tmp_path, tmp_path / "empty.jsonl"), f"data file {tmp_path / 'empty.jsonl'} is empty")


def test_non_utf8_data_file(cli, tmp_path):
    bad = tmp_path / "latin1.jsonl.gz"
    with gzip.open(bad, "wb") as f:
        f.write(json.dumps({"text": "x"}).encode() + b"\n" + '{"text": "na\u00efve"}\n'.encode("latin-1"))
    one_line(_jsonl(cli, tmp_path, bad), f"data file {bad} is not valid UTF-8")


def test_no_glob_match(cli, tmp_path):
    one_line(_jsonl(cli, tmp_path, tmp_path / "*.json.gz"), f"data.files: no file matches '{tmp_path}/*.json.gz'")


def test_c4_offline(cli, tmp_path):
    one_line(cli("train", f"run.dir={tmp_path / 'run'}", "data=c4", "model=llama_60m", "data.tokenizer=embedded"),
             "cannot stream allenai/c4 (en) split train from the Hugging Face hub")
    one_line(cli("train", f"run.dir={tmp_path / 'run'}", "data=c4", "model=llama_60m"),
             "cannot load tokenizer 't5-base' from the Hugging Face hub")


def test_vocab_too_small_for_the_tokenizer(cli, tmp_path):
    one_line(cli("train", *TINY, f"run.dir={tmp_path / 'run'}", "model.vocab_size=4096"),
             "model.vocab_size=4096 is smaller than the 8192 ids of tokenizer")


def test_run_dir_with_a_different_config_is_refused(cli, tmp_path):
    run = tmp_path / "run"
    assert cli("train", *TINY, f"run.dir={run}", "trainer.max_steps=2").code == 0
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    one_line(cli("train", *TINY, f"run.dir={run}", "trainer.max_steps=2", "optim.lr=0.01"),
             f"run.dir {run} holds a run with a different config (optim.lr: 0.001 -> 0.01)")
    one_line(cli("train", *TINY, f"run.dir={run}", "trainer.max_steps=2", "trainer.resume=never"),
             f"run.dir {run} already holds a run and trainer.resume=never")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before  # nothing lost
    r = cli("train", *TINY, f"run.dir={run}", "trainer.max_steps=2", "optim.lr=0.01", "run.overwrite=true")
    assert r.code == 0 and "replacing the run" in r.err
    assert "lr: 0.01" in (run / "config.yaml").read_text()
    assert sorted(losses(run)) == [1, 2]


def test_run_dir_with_run_files_but_no_config(cli, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    one_line(cli("train", *TINY, f"run.dir={run}"), f"run.dir {run} holds run files but no config.yaml")


def test_debug_shows_the_traceback(cli, tmp_path, monkeypatch):
    from lrpretrain.errors import ConfigError

    monkeypatch.setenv("LRPRETRAIN_DEBUG", "1")
    with pytest.raises(ConfigError):
        cli("train", "model=nope")


def test_unknown_command(cli):
    r = cli("fly")
    assert r.code == 2 and r.err.strip() == ("lrpretrain: error: unknown command 'fly'; "
                                             "allowed: train, generate, export, eval, prepare-data, sweep-summary, report, bench, "
                                             "estimate")
