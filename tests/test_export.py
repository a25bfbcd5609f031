"""``lrpretrain export``: the directory transformers loads offline, unchanged, computes what our model
computes (logits, greedy tokens), its tokenizer is the run's; bf16 and sharded weights; refusals."""

from __future__ import annotations

import json
import shutil
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_errors import one_line

from lrpretrain.config import ModelConfig
from lrpretrain.export import EXPORTED_FIELDS
from lrpretrain.model import generate
from lrpretrain.storage import crc32
from lrpretrain.train.trained import load_trained

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["ROMEO. But soft, what light through yonder window breaks?\n\tJULIET.  Ay me!  ",
         "  leading spaces, unicode: é ü ß 日本語 — ‘quotes’ “double”  \n\n", "", " ", "a</s>b <pad> end"]


def hf_model(path: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()


@pytest.fixture(scope="module")
def exported(tiny_runs, tmp_path_factory, cli_main) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("exported")
    for name, run in tiny_runs.items():
        assert cli_main(["export", f"run.dir={run}", f"out={out / name}"]) == 0
    return {name: out / name for name in tiny_runs}


@pytest.fixture(scope="module")
def cli_main():
    from lrpretrain.cli.main import main

    return main


@pytest.mark.parametrize("name", ["full", "lora"])
def test_logits_in_transformers_equal_ours(tiny_runs, exported, name):
    run = load_trained(tiny_runs[name])
    hf = hf_model(exported[name])
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert hf.config.tie_word_embeddings is (name == "lora")
    ids = torch.randint(0, run.cfg.model.vocab_size, (2, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = run.model(ids), hf(ids).logits
    diff = (ours - theirs).abs().max().item()
    assert diff <= 1e-5, diff
    if name == "lora":  # the adapters trained, so merging them matters: the base weights alone differ
        assert any(n.endswith("lora_B") and p.abs().max() > 0 for n, p in run.model.named_parameters())


def test_greedy_generation_in_transformers_equals_ours(tiny_runs, exported):
    run = load_trained(tiny_runs["full"])
    hf = hf_model(exported["full"])
    prompt = torch.tensor([run.tokenizer.tokenizer.encode("ROMEO. What", add_special_tokens=False).ids])
    ours = generate(run.model, prompt, 24, temperature=0)
    theirs = hf.generate(prompt, max_new_tokens=24, min_new_tokens=24, do_sample=False,
                         attention_mask=torch.ones_like(prompt))
    assert ours.tolist() == theirs.tolist()


def test_the_tokenizer_is_the_runs(tiny_runs, exported):
    run = load_trained(tiny_runs["full"])
    tok = transformers.AutoTokenizer.from_pretrained(exported["full"], local_files_only=True)
    ours = run.tokenizer.tokenizer
    for text in TEXTS:
        ids = ours.encode(text, add_special_tokens=False).ids
        assert tok.encode(text, add_special_tokens=False) == ids
        assert tok(text)["input_ids"] == ours.encode(text).ids  # the run's post-processing, if any
        assert tok.decode(ids) == ours.decode(ids, skip_special_tokens=False)
        if "</s>" not in text and "<pad>" not in text:
            assert tok.decode(ids) == text
    assert (tok.eos_token, tok.pad_token) == (run.cfg.data.eos_token, run.cfg.data.pad_token)
    assert (tok.eos_token_id, tok.pad_token_id) == (run.tokenizer.eos_id, run.tokenizer.pad_id)
    config = json.loads((exported["full"] / "config.json").read_text())
    m = run.cfg.model
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"], config["intermediate_size"],
            config["vocab_size"], config["max_position_embeddings"], config["rms_norm_eps"], config["rope_theta"],
            config["torch_dtype"], config["eos_token_id"], config["pad_token_id"]) == (
        m.dim, m.n_layers, m.n_heads, m.ffn_dim, m.vocab_size, m.max_seq_len, m.norm_eps, m.rope_theta, "float32",
        run.tokenizer.eos_id, run.tokenizer.pad_id)
    gen = json.loads((exported["full"] / "generation_config.json").read_text())
    assert gen["eos_token_id"] == run.tokenizer.eos_id


def test_a_unigram_tokenizer_with_unk_and_an_eos_post_processor(tmp_path):
    """t5-base's kind of tokenizer (Unigram, <unk>, "$A </s>" appended): transformers encodes as the run did."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from lrpretrain.data.tokenizer import load_tokenizer
    from lrpretrain.export import tokenizer_files

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tok.train_from_iterator([TEXTS[0], "Whether 'tis nobler in the mind to suffer"] * 20, trainers.UnigramTrainer(
        vocab_size=200, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok.save(str(tmp_path / "t.json"))
    info = load_tokenizer(str(tmp_path / "t.json"), "</s>", "<pad>")
    cfg = ModelConfig(name="x", dim=8, n_layers=1, n_heads=2, ffn_dim=8)
    for name, text in tokenizer_files(info, cfg, "</s>", "<pad>").items():
        (tmp_path / "hf" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "hf" / name).write_text(text)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    assert hf.unk_token == "<unk>" and hf.eos_token_id == 1 and hf.pad_token_id == 0
    for text in [*TEXTS, "zebra xylophone!"]:
        assert hf(text)["input_ids"] == tok.encode(text).ids and hf(text)["input_ids"][-1] == 1
        ids = tok.encode(text, add_special_tokens=False).ids
        assert hf.encode(text, add_special_tokens=False) == ids
        assert hf.decode(ids) == tok.decode(ids, skip_special_tokens=False)


def test_bf16_checkpoints_and_sharded_weights(tiny_runs, tmp_path, cli_main):
    """A checkpoint holding bf16 weights exports as bf16 by default (dtype=auto), as fp32 on request;
    a small shard size splits the weights with an index that transformers follows."""
    run = tmp_path / "bf16run"
    shutil.copytree(tiny_runs["full"], run)
    ckpt = run / "checkpoints" / "step_4"
    weights = {k: v.to(torch.bfloat16) for k, v in load_file(ckpt / "model.safetensors").items()}
    save_file(weights, str(ckpt / "model.safetensors"))
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["files"]["model.safetensors"] = {"bytes": (ckpt / "model.safetensors").stat().st_size,
                                          "crc32": crc32(ckpt / "model.safetensors")}
    (ckpt / "meta.json").write_text(json.dumps(meta))

    assert cli_main(["export", f"run.dir={run}", f"out={tmp_path / 'auto'}"]) == 0
    config = json.loads((tmp_path / "auto" / "config.json").read_text())
    stored = load_file(tmp_path / "auto" / "model.safetensors")
    assert config["torch_dtype"] == "bfloat16" and {t.dtype for t in stored.values()} == {torch.bfloat16}
    assert torch.equal(stored["model.layers.1.mlp.down_proj.weight"], weights["layers.1.mlp.down_proj.weight"])

    assert cli_main(["export", f"run.dir={run}", f"out={tmp_path / 'sharded'}", "dtype=fp32",
                     "max_shard_bytes=1000000"]) == 0
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 3 and not (tmp_path / "sharded" / "model.safetensors").exists()
    assert all((tmp_path / "sharded" / f).exists() for f in files)
    hf = hf_model(tmp_path / "sharded")
    assert hf.dtype == torch.float32
    ours = load_trained(run).model
    ids = torch.randint(0, 8192, (1, 32))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() <= 1e-5


def test_refusals(tiny_runs, exported, cli, tmp_path):
    run = tiny_runs["full"]
    one_line(cli("export", f"run.dir={run}", f"out={exported['full']}"), "exists and is not empty")
    one_line(cli("export", f"run.dir={run}", f"out={run}", "overwrite=true"), "holds the run itself")
    one_line(cli("export", f"run.dir={run}", f"out={tmp_path / 'x'}", "dtype=fp8"), "dtype=fp8 is invalid")
    one_line(cli("export", f"run.dir={tmp_path / 'nothing'}", f"out={tmp_path / 'x'}"), "does not exist")
    one_line(cli("export", f"run.dir={run}"), "out")
    before = sorted(p.name for p in exported["full"].iterdir())
    r = cli("export", f"run.dir={run}", f"out={exported['full']}", "overwrite=true", "checkpoint=step_2")
    assert r.code == 0, r.err
    assert sorted(p.name for p in exported["full"].iterdir()) == before
    assert not list(exported["full"].parent.glob(".tmp-export-*"))


def test_cola_is_refused_in_one_line(cli, tmp_path):
    from conftest import TINY

    run = tmp_path / "cola"
    assert cli("train", *TINY, "method=cola", "method.rank=8", "trainer.max_steps=1", f"run.dir={run}").code == 0
    one_line(cli("export", f"run.dir={run}", f"out={tmp_path / 'hf'}"), "method=cola cannot be exported")
    assert not (tmp_path / "hf").exists()


def test_export_writes_every_model_field():
    """A new ModelConfig field (an architecture change) must be mapped into config.json by lrpretrain/export.py."""
    assert {f.name for f in fields(ModelConfig)} == set(EXPORTED_FIELDS)
