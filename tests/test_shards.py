"""Pre-tokenized token shards: `prepare-data pretokenize` and `data=shards`.

The format against an independent reading of the source (json + the tokenizer, no lrpretrain); the
same rows, positions and validation set as the on-the-fly stream for every world size and both
`distributed.data` modes; every row once per epoch across ranks; exact and O(1) resume, also from an
on-the-fly position; budgets; a preparation killed mid-shard and rerun writes the same bytes; one
line for every bad input. The C4-schema set is written here; nothing touches the network.
"""

from __future__ import annotations

import fcntl
import gzip
import json
import os
import random
import shutil
import signal
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from lrpretrain.config import DataConfig
from lrpretrain.data import TokenStream, ValidationSet, load_tokenizer
from lrpretrain.data.pipeline import shard_order
from lrpretrain.data.pretokenize import Options, budget_units, pretokenize
from lrpretrain.data.shards import ShardSplit, verify_directory
from lrpretrain.distributed.data import stream_for
from lrpretrain.errors import DataError, UserError

from conftest import TINY, losses, read_metrics, spawn_cli

WORDS = ("the of and to in is was for on that with as by at from his her they this which be or an had are not "
         "but were one all their there been has have who more when will would into its no some what out up "
         "café naïve Zürich 東京 — “quoted” 42 3.14 e-mail https://example.org").split()


def _c4_texts(rng: random.Random, n: int) -> list[str]:
    texts = []
    for _ in range(n):
        r = rng.random()
        if r < 0.08:
            texts.append("")  # C4 has none, a user's JSONL may: no tokens, no row, but an item
        elif r < 0.15:
            texts.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(60, 200))))  # longer than a row
        else:
            texts.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40))) + ("\n\n" if r < 0.5 else ""))
    return texts


def write_c4(path: Path, texts: list[str]) -> Path:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"text": t, "timestamp": "2019-04-25T12:57:54Z", "url": f"https://example.com/{i}"}) + "\n")
    return path


@pytest.fixture(scope="module")
def c4(tmp_path_factory) -> dict:
    """A small C4-schema set: 5 train files (gzipped and plain, uneven sizes), 2 validation files."""
    root = tmp_path_factory.mktemp("c4")
    rng = random.Random(16)
    train = [write_c4(root / f"c4-train.{i:05d}-of-00005.json{'.gz' if i % 2 == 0 else ''}", _c4_texts(rng, n))
             for i, n in enumerate((23, 40, 17, 31, 9))]
    val = [write_c4(root / f"c4-validation.{i:05d}-of-00002.json.gz", _c4_texts(rng, n)) for i, n in enumerate((12, 8))]
    return {"train": [str(f) for f in train], "validation": [str(f) for f in val]}


def c4_cfg(c4: dict, **kw) -> DataConfig:
    base = dict(name="jsonl", source="jsonl", files=c4["train"], val_files=c4["validation"], tokenizer="embedded",
                seq_len=32, shuffle_block=8, mode="truncate", val_tokens=400)
    return DataConfig(**{**base, **kw})


def shards_cfg(path: Path, like: DataConfig, **kw) -> DataConfig:
    keep = {k: getattr(like, k) for k in ("mode", "seq_len", "shuffle_block", "seed", "val_tokens")}
    return DataConfig(**{"name": "shards", "source": "shards", "path": str(path), "tokenizer": str(path / "tokenizer.json"),
                         **keep, **kw})


def quiet(_msg: str) -> None:
    pass


@pytest.fixture(scope="module")
def tok(cache_root):
    return load_tokenizer("embedded", "</s>", "<pad>")


@pytest.fixture(scope="module")
def c4_shards(c4, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("c4s") / "shards"
    pretokenize(c4_cfg(c4), Options(out=out, num_proc=1, progress="none"), quiet)
    return out


@pytest.fixture(scope="module")
def c4_budget(c4, tmp_path_factory) -> Path:
    """max_tokens = 50 truncate rows of 32 (reached in the stream's second shard), val_max_tokens=150."""
    out = tmp_path_factory.mktemp("c4b") / "shards"
    pretokenize(c4_cfg(c4), Options(out=out, num_proc=1, progress="none", max_tokens=50 * 32, val_max_tokens=150), quiet)
    return out


@pytest.fixture(scope="module")
def emb_shards(corpus, tmp_path_factory) -> Path:
    from lrpretrain.train import load_config

    out = tmp_path_factory.mktemp("embs") / "shards"
    pretokenize(load_config(["data=embedded"])[0].data, Options(out=out, num_proc=1, progress="none"), quiet)
    return out


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def take(stream, n: int):
    return [next(stream) for _ in range(n)]


def same_batches(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.labels, y.labels)
        assert (x.tokens, x.position) == (y.tokens, y.position)


# ---------------------------------------------------------------------------------------------- format
def test_shards_hold_each_document_in_file_order(c4, c4_shards, tok):
    """Independent reading: json per line, the tokenizer file, no lrpretrain code."""
    m = json.loads((c4_shards / "manifest.json").read_text())
    assert (m["format"], m["version"], m["dtype"]) == ("lrpretrain-token-shards", 1, "uint16")
    raw = Tokenizer.from_file(str(c4_shards / "tokenizer.json"))
    assert (m["tokenizer"]["eos_id"], m["tokenizer"]["pad_id"]) == (raw.token_to_id("</s>"), raw.token_to_id("<pad>"))
    assert m["tokenizer"]["sha256"] == tok.sha256
    for split in ("train", "validation"):
        info = m["splits"][split]
        assert info["whole"] and len(info["shards"]) == len(c4[split]) == info["source_shards"]
        for i, path in enumerate(c4[split]):
            opener = gzip.open if path.endswith(".gz") else open
            with opener(path, "rt", encoding="utf-8") as f:
                texts = [json.loads(line)["text"] for line in f]
            expected = [e.ids for e in raw.encode_batch(texts, add_special_tokens=False)]
            base = c4_shards / split / f"{i:05d}"
            tokens = np.fromfile(base.with_suffix(".tokens"), dtype="<u2")
            offsets = np.fromfile(base.with_suffix(".offsets"), dtype="<i8")
            assert len(offsets) == len(texts) + 1 and offsets[0] == 0
            assert [tokens[offsets[d] : offsets[d + 1]].tolist() for d in range(len(texts))] == expected
            rec = info["shards"][i]
            assert rec == json.loads(base.with_suffix(".json").read_text())
            assert (rec["docs"], rec["tokens"], rec["complete"]) == (len(texts), len(tokens), True)
            assert rec["nonempty_docs"] == sum(1 for e in expected if e) and rec["max_id"] == tokens.max()
            assert rec["crc32"]["tokens"] == zlib.crc32(base.with_suffix(".tokens").read_bytes())
            assert rec["crc32"]["offsets"] == zlib.crc32(base.with_suffix(".offsets").read_bytes())
    assert m["data"]["shuffle_block"] == 8 and m["data"]["mode"] == "truncate"  # what data=shards inherits
    verify_directory(str(c4_shards), log=quiet)


def test_the_hub_code_path(cli, c4, c4_shards, tok, tmp_path):
    """data=c4 streams with `load_dataset(hf_path, hf_name, streaming=True)`; a local directory of C4-named
    files takes that code path offline. Same token files as through data=jsonl, same rows as on the fly."""
    out = tmp_path / "hub"
    root = Path(c4["train"][0]).parent
    r = cli("prepare-data", "pretokenize", "data=c4", f"data.hf_path={root}", "data.hf_name=null",
            "data.tokenizer=embedded", f"out={out}", "num_proc=1", "progress=lines")
    assert r.code == 0, r.err
    assert "pretokenize train: 5/5 shards" in r.err and f"train with: data=shards data.path={out}" in r.err
    assert {k: v for k, v in files_of(out).items() if k.endswith((".tokens", ".offsets"))} == {
        k: v for k, v in files_of(c4_shards).items() if k.endswith((".tokens", ".offsets"))}
    text_cfg = DataConfig(name="c4", source="hf", hf_path=str(root), hf_name=None, tokenizer="embedded", seq_len=32,
                          shuffle_block=8, mode="truncate", val_tokens=300)
    same_batches(take(TokenStream(text_cfg, tok, 2, 1, 2), 20), take(TokenStream(shards_cfg(out, text_cfg), tok, 2, 1, 2), 20))
    assert torch.equal(ValidationSet(text_cfg, tok).input_ids, ValidationSet(shards_cfg(out, text_cfg), tok).input_ids)


def test_a_vocabulary_past_uint16_is_stored_as_uint32(tmp_path, tok):
    """A word-level tokenizer of 70,000 ids (not a BPE): ids above 65,535 survive the round trip."""
    from tokenizers import models, pre_tokenizers

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, 70_000)}}
    big = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    big.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok_path = tmp_path / "wordlevel.json"
    big.save(str(tok_path))
    rng = random.Random(3)
    files = [str(write_c4(tmp_path / f"big-{i}.jsonl", [" ".join(f"w{rng.randrange(3, 70_000)}" for _ in range(rng.randint(0, 30)))
                                                          for _ in range(25)])) for i in range(3)]
    cfg = DataConfig(name="jsonl", source="jsonl", files=files, tokenizer=str(tok_path), seq_len=16, shuffle_block=4,
                     mode="pack")
    m = pretokenize(cfg, Options(out=tmp_path / "shards", num_proc=1, progress="none"), quiet)
    assert m["dtype"] == "uint32" and max(r["max_id"] for r in m["splits"]["train"]["shards"]) >= 1 << 16
    wl = load_tokenizer(str(tok_path), "</s>", "<pad>")
    same_batches(take(TokenStream(cfg, wl, 3), 25), take(TokenStream(shards_cfg(tmp_path / "shards", cfg), wl, 3), 25))


def test_embedded_corpus_in_shards(emb_shards, corpus):
    m = json.loads((emb_shards / "manifest.json").read_text())
    emb = json.loads((corpus / "manifest.json").read_text())
    assert len(m["splits"]["train"]["shards"]) == 8 and len(m["splits"]["validation"]["shards"]) == 1
    assert (m["splits"]["train"]["docs"], m["splits"]["validation"]["docs"]) == (emb["train_docs"], emb["validation_docs"])
    shard_bytes = sum(p.stat().st_size for p in emb_shards.rglob("*") if p.suffix in (".tokens", ".offsets"))
    tokens = m["splits"]["train"]["tokens"] + m["splits"]["validation"]["tokens"]
    assert 2.0 <= shard_bytes / tokens < 2.05  # uint16 ids + 8 bytes per ~660-token document


# ---------------------------------------------------------------------------------------------- equality
@pytest.mark.parametrize("mode", ["truncate", "pack"])
@pytest.mark.parametrize("world,how", [(1, "global"), (2, "global"), (2, "sharded"), (3, "sharded"), (5, "sharded")])
def test_shards_give_the_on_the_fly_rows(c4, c4_shards, tok, mode, world, how):
    """Same rows, tokens and positions, rank by rank, as distributed.data=global / sharded build them
    (5 shards: strided items across 2 and 3 ranks, whole shards for 5), across epochs."""
    text_cfg = c4_cfg(c4, mode=mode, seed=7)
    shard_cfg = shards_cfg(c4_shards, text_cfg)
    for rank in range(world):
        streams = [stream_for(how, lambda mb, r, w, cfg=cfg: TokenStream(cfg, tok, mb, r, w), 2, rank, world)
                   for cfg in (text_cfg, shard_cfg)]
        batches = [take(s, 10) for s in streams]
        while batches[0][-10].position.epoch == 0:  # until 10 batches into the second epoch
            batches = [b + take(s, 10) for b, s in zip(batches, streams)]
        same_batches(*batches)
        for s in streams:
            s.close()
    va, vb = ValidationSet(text_cfg, tok, 1, 2), ValidationSet(shard_cfg, tok, 1, 2)
    assert torch.equal(va.input_ids, vb.input_ids) and torch.equal(va.labels, vb.labels)
    assert (va.available_tokens, va.total_rows) == (vb.available_tokens, vb.total_rows)


def test_embedded_shards_give_the_embedded_stream(emb_shards, tok):
    for mode in ("pack", "truncate"):
        text_cfg = DataConfig(name="embedded", source="embedded", tokenizer="embedded", seq_len=64, shuffle_block=256,
                              mode=mode, val_tokens=3000)
        shard_cfg = shards_cfg(emb_shards, text_cfg)
        same_batches(take(TokenStream(text_cfg, tok, 4), 30), take(TokenStream(shard_cfg, tok, 4), 30))
        assert torch.equal(ValidationSet(text_cfg, tok).input_ids, ValidationSet(shard_cfg, tok).input_ids)


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_cover_every_row_once_per_epoch(c4_shards, c4, tok, world):
    """truncate: a row per non-empty document; the ranks' rows of epoch 0 are the single process's, once each."""
    cfg = shards_cfg(c4_shards, c4_cfg(c4, mode="truncate", seed=3))
    n_rows = sum(r["nonempty_docs"] for r in json.loads((c4_shards / "manifest.json").read_text())["splits"]["train"]["shards"])

    def epoch_rows(rank: int, w: int) -> list[tuple[int, ...]]:
        s, rows = TokenStream(cfg, tok, 1, rank, w, prefetch=0), []
        while (b := next(s)).position.epoch == 0:
            rows.append(tuple(b.input_ids[0].tolist()))
        return rows

    single = epoch_rows(0, 1)
    assert len(single) == n_rows
    per_rank = [epoch_rows(r, world) for r in range(world)]
    assert sorted(row for rows in per_rank for row in rows) == sorted(single)
    assert max(map(len, per_rank)) - min(map(len, per_rank)) <= 5


# ---------------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("mode", ["pack", "truncate"])
def test_resume_is_exact_and_reads_only_the_current_shard(c4, c4_shards, tok, mode):
    text_cfg = c4_cfg(c4, mode=mode)
    cfg = shards_cfg(c4_shards, text_cfg)
    ref = take(TokenStream(cfg, tok, 3), 60)
    for cut in (1, 13, 37):
        first = TokenStream(cfg, tok, 3)
        take(first, cut)
        state = first.state_dict()
        first.close()
        resumed = TokenStream(cfg, tok, 3, prefetch=0)
        resumed.load_state_dict(state)
        nxt = next(resumed)
        # O(1): the resumed stream maps the shards from its position to the batch's end, nothing before
        walk, (e, i) = set(), (state["epoch"], state["shard"])
        while (e, i) <= (nxt.position.epoch, nxt.position.shard):
            order = resumed._shards(e)[0]
            walk.add(order[i])
            e, i = (e, i + 1) if i + 1 < len(order) else (e + 1, 0)
        assert set(resumed.source._mapped) <= walk
        same_batches([nxt, *take(resumed, 60 - cut - 1)], ref[cut:])
    # a position saved while reading the text resumes on the shards (and back): a run may switch at a resume
    on_the_fly = TokenStream(text_cfg, tok, 3)
    take(on_the_fly, 21)
    switched = TokenStream(cfg, tok, 3)
    switched.load_state_dict(on_the_fly.state_dict())
    same_batches(take(switched, 10), take(on_the_fly, 10))


@pytest.mark.slow
def test_sigkill_resume_from_shards_is_the_on_the_fly_run(tmp_path, emb_shards):
    """Through the CLI: a run on data=shards, SIGKILLed and resumed, reproduces bit for bit the losses
    of an uninterrupted run reading the same corpus on the fly (data=embedded); and a checkpoint of the
    on-the-fly run continues on the shards (a switch at a resume) as it would have on the fly."""
    from lrpretrain.cli.main import main

    args = [*TINY, "trainer.threads=1", "trainer.batch_size=8", "trainer.micro_batch_size=4", "trainer.max_steps=14",
            "trainer.ckpt_every=4", "trainer.keep_last=4", "trainer.eval_every=7"]
    ref = tmp_path / "ref"
    assert main(["train", *args, "data=embedded", f"run.dir={ref}"]) == 0
    run = tmp_path / "run"
    shard_args = ["train", *args, "data=shards", f"data.path={emb_shards}", f"run.dir={run}"]
    proc = spawn_cli(shard_args)
    deadline = time.time() + 240
    while not any(r.get("step", 0) >= 6 for r in (read_metrics(run) if (run / "metrics.jsonl").exists() else [])):
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline, "child too slow"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert (run / "checkpoints" / "latest").read_text().strip() != "step_14"
    assert main(shard_args) == 0
    assert losses(run) == losses(ref) and len(losses(ref)) == 14
    vals = lambda d: [(r["step"], r["val_loss"]) for r in read_metrics(d) if "val_loss" in r]  # noqa: E731
    assert vals(run) == vals(ref)
    switched = tmp_path / "switched"
    assert main(["train", *args, "data=shards", f"data.path={emb_shards}", f"run.dir={switched}",
                 f"trainer.resume={ref / 'checkpoints' / 'step_8'}"]) == 0
    assert losses(switched) == {k: v for k, v in losses(ref).items() if k > 8}


# ---------------------------------------------------------------------------------------------- budgets
def test_max_tokens_holds_what_the_stream_reads_first(c4, c4_shards, c4_budget, tok):
    """The budget counts rows x seq_len; the shards are the stream's first documents (its epoch-0 shard
    order, whole blocks), so their first epoch is row for row the start of the on-the-fly run."""
    m = json.loads((c4_budget / "manifest.json").read_text())
    full = {r["index"]: r for r in json.loads((c4_shards / "manifest.json").read_text())["splits"]["train"]["shards"]}
    train = m["splits"]["train"]
    assert not train["whole"] and train["source_shards"] == 5
    assert m["budget"] == {"max_tokens": 1600, "val_max_tokens": 150, "mode": "truncate", "seq_len": 32, "seed": 0,
                           "shuffle_block": 8}
    order = shard_order(5, 0, 0)
    held = {r["index"]: r for r in train["shards"]}
    *first, last = order[: len(held)]
    assert first and sorted(held) == sorted(order[: len(held)])
    no_units = lambda r: {k: v for k, v in r.items() if k != "units"}  # noqa: E731 -- counted for the budget only
    assert all(held[i]["complete"] and no_units(held[i]) == full[i] for i in first)
    assert not held[last]["complete"] and held[last]["docs"] % 8 == 0 and held[last]["docs"] < full[last]["docs"]
    for i in held:  # the cut shard is a prefix of the whole one
        a = np.fromfile(c4_budget / "train" / f"{i:05d}.tokens", dtype="<u2")
        b = np.fromfile(c4_shards / "train" / f"{i:05d}.tokens", dtype="<u2")
        assert np.array_equal(a, b[: len(a)])
    assert not set(int(p.stem) for p in (c4_budget / "train").glob("*.json")) - set(held)
    cfg = c4_cfg(c4)
    on_the_fly, shards = TokenStream(cfg, tok, 1, prefetch=0), TokenStream(shards_cfg(c4_budget, cfg), tok, 1, prefetch=0)
    rows = 0
    while (b := next(shards)).position.epoch == 0:
        same_batches([next(on_the_fly)], [b])
        rows += 1
    assert 50 <= rows < 50 + 8  # max_tokens / seq_len rows, and the rest of the last block
    # validation: in file order, non-pad tokens as data.val_tokens counts them; reached with its last document
    lens = np.concatenate([np.diff(np.fromfile(c4_budget / "validation" / f"{r['index']:05d}.offsets", dtype="<i8"))
                           for r in m["splits"]["validation"]["shards"]])
    units = budget_units(lens, "validation", "truncate", 32)
    assert units.sum() >= 150 > units.sum() - units[-1]
    assert ValidationSet(shards_cfg(c4_budget, cfg, val_tokens=150), tok).input_ids.equal(
        ValidationSet(c4_cfg(c4, val_tokens=150), tok).input_ids)


def test_a_shard_written_past_the_budget_is_cut_to_the_same_bytes(c4, c4_shards, c4_budget, tmp_path):
    """A worker bounded by what its shard could need (the shards before it still in flight) writes more
    than the budget takes; the driver cuts it at the block the budget ends in, and deletes shards past it."""
    out = tmp_path / "over"
    shutil.copytree(c4_budget, out)
    last = shard_order(5, 0, 0)[1]
    for suffix in (".tokens", ".offsets"):  # the whole shard, as a loosely bounded worker would have written it
        shutil.copy(c4_shards / "train" / f"{last:05d}{suffix}", out / "train" / f"{last:05d}{suffix}")
    rec = json.loads((c4_shards / "train" / f"{last:05d}.json").read_text())
    lens = np.diff(np.fromfile(c4_shards / "train" / f"{last:05d}.offsets", dtype="<i8"))
    rec["units"] = int(budget_units(lens, "train", "truncate", 32).sum())
    (out / "train" / f"{last:05d}.json").write_text(json.dumps(rec))
    beyond = shard_order(5, 0, 0)[2]
    for suffix in (".tokens", ".offsets", ".json"):
        shutil.copy(c4_shards / "train" / f"{beyond:05d}{suffix}", out / "train" / f"{beyond:05d}{suffix}")
    pretokenize(c4_cfg(c4), Options(out=out, num_proc=1, progress="none", max_tokens=50 * 32, val_max_tokens=150), quiet)
    assert files_of(out) == files_of(c4_budget)


def test_pack_budget(c4, tmp_path):
    """pack: a document counts its tokens + EOS; block 1 cuts right after the one reaching the budget."""
    out = tmp_path / "pack"
    m = pretokenize(c4_cfg(c4, mode="pack", shuffle_block=1, seed=5),
                    Options(out=out, num_proc=1, progress="none", max_tokens=700), quiet)
    held = {r["index"] for r in m["splits"]["train"]["shards"]}
    order = [i for i in shard_order(5, 5, 0) if i in held]
    assert order == shard_order(5, 5, 0)[: len(held)]
    lens = np.concatenate([np.diff(np.fromfile(out / "train" / f"{i:05d}.offsets", dtype="<i8")) for i in order])
    units = budget_units(lens, "train", "pack", 32)
    assert np.array_equal(units, np.where(lens > 0, lens + 1, 0))
    assert units.sum() >= 700 > units.sum() - units[-1]
    assert "validation" in m["splits"] and m["splits"]["validation"]["whole"]


def test_rerun_of_a_complete_directory_verifies_and_rewrites_nothing(c4, c4_shards, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(c4_shards, copy)
    before = files_of(copy)
    lines: list[str] = []
    pretokenize(c4_cfg(c4), Options(out=copy, num_proc=1, progress="none"), lines.append)
    assert files_of(copy) == before and any("is complete; checking every shard" in m for m in lines)
    # a damaged shard of a complete directory is written again, and only that one
    path = copy / "train" / "00003.tokens"
    path.write_bytes(path.read_bytes()[:-2])
    pretokenize(c4_cfg(c4), Options(out=copy, num_proc=1, progress="none"), lines.append)
    assert files_of(copy) == before and "pretokenize train: 4 of 5 shards already written and verified" in lines


@pytest.mark.slow
def test_killed_preparation_rerun_writes_the_same_bytes(c4, c4_budget, tmp_path):
    """SIGKILL (driver and its 2 workers) in the middle of writing a shard, then the same command in
    this process with 1 worker: byte for byte the directory of an uninterrupted run (budget cut included)."""
    out = tmp_path / "shards"
    args = ["prepare-data", "pretokenize", "data=jsonl", f"data.files=[{','.join(c4['train'])}]",
            f"data.val_files=[{','.join(c4['validation'])}]", "data.tokenizer=embedded", "data.seq_len=32",
            "data.shuffle_block=8", "data.mode=truncate", "data.val_tokens=400", f"out={out}", "max_tokens=1600",
            "val_max_tokens=150", "progress=lines"]
    second = shard_order(5, 0, 0)[1]  # the stream's second shard: the budget is reached in it
    proc = spawn_cli([*args, "num_proc=2"], env={"LRPRETRAIN_FAULT_KILL_IN_PRETOKENIZE": f"train:{second}:4"})
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, err
    assert not (out / "manifest.json").exists()
    assert list((out / "train").glob(f".{second:05d}.tokens.tmp-*"))  # killed while writing it
    from lrpretrain.cli.main import main

    assert main([*args, "num_proc=1"]) == 0
    assert files_of(out) == files_of(c4_budget)


# ---------------------------------------------------------------------------------------------- bad inputs
def one_line(r, *expected: str) -> None:
    assert r.code == 2, r.err
    assert "Traceback" not in r.err and len(r.error_lines) == 1, r.err
    assert all(e in r.error_lines[0] for e in expected), r.error_lines[0]


def _train(cli, tmp_path, *extra):
    return cli("train", *TINY, "trainer.max_steps=1", f"run.dir={tmp_path / 'run'}", *extra)


def _damaged(src: Path, tmp_path: Path) -> Path:
    out = tmp_path / "damaged"
    shutil.copytree(src, out)
    return out


def test_missing_and_incomplete_directories(cli, tmp_path, c4_shards):
    one_line(_train(cli, tmp_path, "data=shards"), "data.path is empty: data=shards needs data.path=DIR")
    one_line(_train(cli, tmp_path, "data=shards", f"data.path={tmp_path / 'nope'}"),
             f"data.path={tmp_path / 'nope'} does not exist: write token shards there with `lrpretrain prepare-data "
             "pretokenize")
    half = _damaged(c4_shards, tmp_path)
    (half / "manifest.json").unlink()
    one_line(_train(cli, tmp_path, "data=shards", f"data.path={half}"),
             f"data.path={half} holds no manifest.json: its preparation has not finished (rerun the same")


def test_truncated_shard(cli, tmp_path, emb_shards):
    bad = _damaged(emb_shards, tmp_path)
    p = bad / "train" / "00005.tokens"
    p.write_bytes(p.read_bytes()[:1000])
    one_line(_train(cli, tmp_path, "data=shards", f"data.path={bad}"),
             f"token shard file {p} has 1,000 bytes, its manifest says ", "the file is truncated; prepare the shards again")
    (bad / "validation" / "00000.offsets").unlink()
    p.unlink()
    one_line(cli("prepare-data", "verify", str(bad)), f"token shard file {p} is missing")


def test_checksum_mismatch(cli, tmp_path, emb_shards, tok):
    bad = _damaged(emb_shards, tmp_path)
    p = bad / "train" / "00002.tokens"
    data = bytearray(p.read_bytes())
    data[1000] ^= 0x01  # one flipped bit: same size, different content
    p.write_bytes(bytes(data))
    expected = f"checksum mismatch in token shard file {p} (crc32 "
    one_line(_train(cli, tmp_path, "data=shards", f"data.path={bad}", "data.verify=full"), expected)
    one_line(cli("prepare-data", "verify", str(bad)), expected)
    cfg = shards_cfg(bad, DataConfig(name="x", seq_len=64, shuffle_block=256), verify="lazy")
    stream = TokenStream(cfg, tok, 8)
    take(stream, 3)  # lazily: shards are checked when first read...
    state = stream.state_dict()
    state.update(shard=stream._shards(0)[0].index(2), block=0, item=0, token=0)
    stream.load_state_dict(state)
    with pytest.raises(DataError, match=expected.replace("(", r"\(")):  # ...so before the bad one's first row
        next(stream)
    stream = TokenStream(shards_cfg(bad, cfg, verify="size"), tok, 8)  # size: CRCs are not read
    stream.load_state_dict(state)
    next(stream)


def test_tokenizer_and_special_token_mismatch(cli, tmp_path, emb_shards, corpus):
    other = Tokenizer.from_file(str(corpus / "tokenizer.json"))
    other.add_tokens(["<extra>"])  # encodes differently: a different tokenizer
    other_path = tmp_path / "other.json"
    other.save(str(other_path))
    one_line(_train(cli, tmp_path, "data=shards", f"data.path={emb_shards}", f"data.tokenizer={other_path}"),
             f"data.tokenizer={other_path} (sha256 ", f"is not the tokenizer the shards in {emb_shards} were prepared with")
    one_line(_train(cli, tmp_path, "data=shards", f"data.path={emb_shards}", "data.eos_token='<pad>'"),
             "data.eos_token='<pad>' is id 0 in this run, the shards in")
    # the same tokenizer from another file is fine
    same = tmp_path / "same.json"
    shutil.copy(corpus / "tokenizer.json", same)
    cfg = shards_cfg(emb_shards, DataConfig(name="x", seq_len=64, shuffle_block=256), tokenizer=str(same))
    ShardSplit(cfg, load_tokenizer(str(same), "</s>", "<pad>"), "train")


def test_other_format_version_and_malformed_manifests(cli, tmp_path, emb_shards, tok):
    bad = _damaged(emb_shards, tmp_path)
    m = json.loads((bad / "manifest.json").read_text())
    (bad / "manifest.json").write_text(json.dumps({**m, "version": 99}))
    one_line(_train(cli, tmp_path, "data=shards", f"data.path={bad}"),
             "holds lrpretrain-token-shards version 99; this lrpretrain reads lrpretrain-token-shards version 1")
    cfg = shards_cfg(bad, DataConfig(name="x", seq_len=64, shuffle_block=256))
    for broken in ({**m, "splits": {"train": {**m["splits"]["train"], "shards": [{"index": 0}]}}},
                   {**m, "tokenizer": {"name": "x"}}, {**m, "dtype": "float77"}):
        (bad / "manifest.json").write_text(json.dumps(broken))
        with pytest.raises(DataError, match=f"{bad / 'manifest.json'} is malformed"):
            TokenStream(cfg, tok, 2)
    (bad / "manifest.json").write_text("{not json")
    one_line(_train(cli, tmp_path, "data=shards", f"data.path={bad}", "data.mode=pack", "data.shuffle_block=8",
                    "data.seed=0", "data.val_tokens=100", "data.eos_token='</s>'", "data.pad_token='<pad>'"),
             f"{bad / 'manifest.json'} is not a token-shard manifest (JSONDecodeError)")


def test_unreadable_shard_file(emb_shards, tok, monkeypatch):
    """A read refused by the OS (permissions; tests run as root here, so it is injected) is one line."""
    import lrpretrain.data.shards as shards

    def refused(path):
        raise PermissionError(13, "Permission denied", str(path))

    split = ShardSplit(shards_cfg(emb_shards, DataConfig(name="x", seq_len=64, shuffle_block=256)), tok, "train")
    monkeypatch.setattr(shards, "crc32", refused)
    with pytest.raises(DataError, match=r"cannot read token shard file .*00003.tokens: Permission denied"):
        split.mapped(3)
    monkeypatch.setattr(shards.np, "memmap", lambda path, **kw: refused(path))
    split.verify = "size"
    with pytest.raises(DataError, match=r"cannot read token shard file .*00004.offsets: Permission denied"):
        split.mapped(4)


def test_bad_pretokenize_arguments(cli, tmp_path, c4, c4_shards):
    one_line(cli("prepare-data", "pretokenize", "data=embedded"), "prepare-data pretokenize needs out=DIR")
    one_line(cli("prepare-data", "pretokenize", f"out={tmp_path / 'x'}", "max_tokens=lots"),
             "max_tokens=lots is invalid: expected a whole number")
    one_line(cli("prepare-data", "pretokenize", f"out={tmp_path / 'x'}", "max_tokens=0"), "max_tokens=0 is invalid")
    one_line(cli("prepare-data", "pretokenize", f"out={tmp_path / 'x'}", "progress=loud"), "progress=loud is invalid")
    one_line(cli("prepare-data", "pretokenize", f"out={tmp_path / 'x'}", "data=shards", f"data.path={c4_shards}"),
             "data=shards is already tokenized")
    one_line(cli("prepare-data", "pretokenize", f"out={tmp_path / 'x'}", "data=jsonl", "data.tokenizer=embedded",
                 f"data.files=[{tmp_path / 'missing.jsonl'}]"), f"data file {tmp_path / 'missing.jsonl'} does not exist")
    one_line(cli("prepare-data", "tokenize"), "unknown dataset 'tokenize' for prepare-data; allowed: embedded, pretokenize")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    one_line(cli("prepare-data", "pretokenize", f"out={foreign}"), f"out={foreign} is not empty (notes.txt) and holds no plan.json")
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]  # nothing written into it


def test_another_preparation_in_the_directory_is_refused(tmp_path, c4, c4_shards):
    copy = _damaged(c4_shards, tmp_path)
    with pytest.raises(UserError, match=r"holds shards of another preparation \(budget.max_tokens: None there, 640 now\)"):
        pretokenize(c4_cfg(c4), Options(out=copy, num_proc=1, progress="none", max_tokens=640), quiet)
    with pytest.raises(UserError, match=r"another preparation \(source.splits.train.description: "):
        pretokenize(c4_cfg(c4, files=c4["train"][:2]), Options(out=copy, num_proc=1, progress="none"), quiet)


def test_a_directory_being_written_is_refused(tmp_path, c4):
    out = tmp_path / "busy"
    out.mkdir()
    with open(out / ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(UserError, match=f"out={out} is being written by another prepare-data pretokenize"):
            pretokenize(c4_cfg(c4), Options(out=out, num_proc=1, progress="none"), quiet)


def test_data_shards_settings_come_from_the_manifest(emb_shards):
    """Those of conf/data/embedded.yaml, which the shards were prepared with; the experiment's win."""
    from lrpretrain.train import load_config

    cfg, _ = load_config(["data=shards", f"data.path={emb_shards}"])
    assert (cfg.data.mode, cfg.data.seq_len, cfg.data.shuffle_block, cfg.data.val_tokens, cfg.data.tokenizer) == (
        "pack", 256, 256, 32768, os.path.join(str(emb_shards), "tokenizer.json"))
    cfg, _ = load_config(["experiment=full_c4_60m", "data=shards", f"data.path={emb_shards}"])
    assert (cfg.data.source, cfg.data.mode, cfg.data.seq_len, cfg.data.shuffle_block) == ("shards", "truncate", 256, 256)
    with pytest.raises(UserError, match="data.verify='often' is invalid: allowed: lazy, size, full"):
        load_config(["data=shards", f"data.path={emb_shards}", "data.verify=often"])


def test_no_validation_split(tmp_path, c4, tok):
    out = tmp_path / "noval"
    m = pretokenize(c4_cfg(c4, val_files=[]), Options(out=out, num_proc=1, progress="none"), quiet)
    assert list(m["splits"]) == ["train"]
    from lrpretrain.data import has_validation

    assert not has_validation(shards_cfg(out, c4_cfg(c4)))
    with pytest.raises(DataError, match="have no validation split"):
        ValidationSet(shards_cfg(out, c4_cfg(c4)), tok)
