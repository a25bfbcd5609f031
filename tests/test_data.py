"""The data pipeline: determinism, sharding, exact resume, row modes, validation set, bad files."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

from lrpretrain.config import DataConfig
from lrpretrain.data import Position, TokenStream, ValidationSet, load_tokenizer
from lrpretrain.data.sources import DocumentSource
from lrpretrain.errors import DataError


@pytest.fixture(scope="module")
def tok(cache_root):
    return load_tokenizer("embedded", "</s>", "<pad>")


def embedded(**kw) -> DataConfig:
    base = dict(name="embedded", source="embedded", tokenizer="embedded", seq_len=64, shuffle_block=32, mode="pack")
    return DataConfig(**{**base, **kw})


def take(stream: TokenStream, n: int):
    return [next(stream) for _ in range(n)]


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x.input_ids, y.input_ids) and torch.equal(x.labels, y.labels)
                                    for x, y in zip(a, b))


def write_jsonl_gz(path: Path, texts: list[str]) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t, "timestamp": "2019-04-25T12:57:54Z", "url": "https://example.com"}) + "\n")
    return path


@pytest.mark.parametrize("mode", ["pack", "truncate"])
def test_same_seed_same_batches_other_seed_other_batches(tok, mode):
    a = take(TokenStream(embedded(mode=mode), tok, 4), 12)
    b = take(TokenStream(embedded(mode=mode), tok, 4, prefetch=0), 12)
    c = take(TokenStream(embedded(mode=mode, seed=1), tok, 4), 12)
    assert same(a, b)
    assert not same(a, c)


@pytest.mark.parametrize("mode", ["pack", "truncate"])
@pytest.mark.parametrize("cut", [1, 7, 23])
def test_resume_yields_exactly_the_uninterrupted_batches(tok, mode, cut):
    cfg = embedded(mode=mode)
    ref = take(TokenStream(cfg, tok, 3), 40)
    first = TokenStream(cfg, tok, 3)
    take(first, cut)
    state = first.state_dict()
    first.close()
    resumed = TokenStream(cfg, tok, 3)
    resumed.load_state_dict(state)
    assert same(take(resumed, 40 - cut), ref[cut:])


def test_resume_across_an_epoch_boundary(tmp_path, tok):
    files = [write_jsonl_gz(tmp_path / f"s{i}.jsonl.gz", [f"doc {i} {j} " * (j + 3) for j in range(5)]) for i in range(2)]
    cfg = DataConfig(name="jsonl", source="jsonl", files=[str(f) for f in files], tokenizer="embedded",
                     seq_len=16, shuffle_block=3, mode="pack")
    ref = take(TokenStream(cfg, tok, 2), 60)
    assert ref[-1].position.epoch >= 2
    for cut in (13, 29, 44):
        s = TokenStream(cfg, tok, 2)
        take(s, cut)
        state = s.state_dict()
        r = TokenStream(cfg, tok, 2)
        r.load_state_dict(state)
        assert same(take(r, 60 - cut), ref[cut:])


def test_epochs_reshuffle(tmp_path, tok):
    f = write_jsonl_gz(tmp_path / "a.jsonl.gz", [f"document number {j}" for j in range(20)])
    cfg = DataConfig(name="jsonl", source="jsonl", files=[str(f)], tokenizer="embedded", seq_len=16,
                     shuffle_block=20, mode="truncate")
    rows = [b.input_ids[0].tolist() for b in take(TokenStream(cfg, tok, 1), 40)]
    assert sorted(map(tuple, rows[:20])) == sorted(map(tuple, rows[20:]))  # every document once per epoch
    assert rows[:20] != rows[20:]  # in another order


def _epoch_documents(cfg: DataConfig, tok, rank: int, world: int) -> list[tuple[int, ...]]:
    """This rank's documents of epoch 0."""
    s = TokenStream(cfg, tok, 1, rank=rank, world_size=world)
    docs = []
    for epoch, *_, ids in s._documents(Position()):
        if epoch > 0:
            return docs
        docs += [tuple(d.tolist()) for d in ids]
    raise AssertionError("unreachable")


@pytest.mark.parametrize("world", [2, 3])  # 8 shards: whole shards per rank for 2, strided blocks for 3
def test_sharding_partitions_each_epoch(tmp_path, tok, world):
    files = [write_jsonl_gz(tmp_path / f"c4-{i}.jsonl.gz", [f"shard {i} document {j}" for j in range(25)])
             for i in range(8)]
    cfg = _jsonl(files, seq_len=16, shuffle_block=10, mode="truncate")
    everything = _epoch_documents(cfg, tok, 0, 1)
    assert len(everything) == len(set(everything)) == 200
    per_rank = [_epoch_documents(cfg, tok, r, world) for r in range(world)]
    assert sorted(d for docs in per_rank for d in docs) == sorted(everything)  # disjoint, complete
    assert max(map(len, per_rank)) - min(map(len, per_rank)) <= 8  # balanced


def test_sharded_resume_per_rank(tok):
    cfg = embedded()
    for rank in range(2):
        ref = take(TokenStream(cfg, tok, 2, rank=rank, world_size=2), 20)
        s = TokenStream(cfg, tok, 2, rank=rank, world_size=2)
        take(s, 9)
        r = TokenStream(cfg, tok, 2, rank=rank, world_size=2)
        r.load_state_dict(s.state_dict())
        assert same(take(r, 11), ref[9:])
    with pytest.raises(DataError, match="world_size=2, this run has world_size=1"):
        TokenStream(cfg, tok, 2).load_state_dict(s.state_dict())


def test_truncate_rows_are_masked_documents(tmp_path, tok):
    texts = ["short one", "a somewhat longer document " * 3, "a very long document that is cut " * 20, "x"]
    cfg = _jsonl([write_jsonl_gz(tmp_path / "t.jsonl.gz", texts)], seq_len=32, mode="truncate")
    b = next(TokenStream(cfg, tok, 4))
    for ids, labels in zip(b.input_ids, b.labels):
        n = int((labels != -100).sum())
        assert ids[n - 1] == tok.eos_id  # each row ends with EOS (also when truncated)
        assert (ids[n:] == tok.pad_id).all() and (labels[n:] == -100).all()
        assert torch.equal(labels[:n], ids[:n])
    assert b.tokens == int((b.labels != -100).sum())
    assert (b.labels == -100).any() and (b.labels != -100).all(1).any()  # short ones padded, long ones cut


def test_pack_rows_are_full_and_join_documents_with_eos(tok):
    batches = take(TokenStream(embedded(mode="pack"), tok, 8), 4)
    for b in batches:
        assert (b.labels != -100).all() and torch.equal(b.labels, b.input_ids)
        assert b.tokens == 8 * 64
    assert any((b.input_ids == tok.eos_id).any() for b in batches)


def test_pack_keeps_every_token_in_order(tmp_path, tok):
    texts = [f"alpha beta gamma {i} " * (i + 1) for i in range(30)]
    f = write_jsonl_gz(tmp_path / "a.jsonl.gz", texts)
    cfg = DataConfig(name="jsonl", source="jsonl", files=[str(f)], tokenizer="embedded", seq_len=16,
                     shuffle_block=1, mode="pack")  # block of 1: file order
    stream = [t for b in take(TokenStream(cfg, tok, 1), 20) for t in b.input_ids[0].tolist()]
    expected = [t for ids in tok.encode(texts) for t in ids + [tok.eos_id]]
    assert stream == expected[: len(stream)]


def test_validation_set_is_fixed_and_sharded(tok):
    cfg = embedded(val_tokens=3000)
    a, b = ValidationSet(cfg, tok), ValidationSet(cfg, tok)
    assert torch.equal(a.input_ids, b.input_ids) and a.available_tokens >= 3000 and not a.short
    assert a.input_ids.shape[0] == 3000 // 64 + (3000 % 64 > 0)
    r0, r1 = ValidationSet(cfg, tok, 0, 2), ValidationSet(cfg, tok, 1, 2)
    assert torch.equal(torch.cat([r0.input_ids, r1.input_ids]).sort(0).values, a.input_ids.sort(0).values)
    assert sum(x.shape[0] for x, _ in a.batches(5)) == a.input_ids.shape[0]


def test_jsonl_on_local_c4_files_is_the_embedded_stream(corpus, tok):
    """data=jsonl on the embedded shards (C4 schema, gzipped) goes through the same code path."""
    files = sorted(str(p) for p in corpus.glob("train-*.jsonl.gz"))
    cfg = DataConfig(name="jsonl", source="jsonl", files=files, tokenizer=str(corpus / "tokenizer.json"),
                     seq_len=64, shuffle_block=32, mode="pack")
    assert same(take(TokenStream(cfg, tok, 2), 10), take(TokenStream(embedded(), tok, 2), 10))


def test_vocab_limit(tok):
    s = TokenStream(embedded(), tok, 2, vocab_size=100)
    with pytest.raises(DataError, match="outside model.vocab_size=100"):
        next(s)


def _jsonl(files, **kw) -> DataConfig:
    return DataConfig(name="jsonl", source="jsonl", files=[str(f) for f in files], tokenizer="embedded", **kw)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=f"data file {tmp_path}/nope.jsonl.gz does not exist"):
        DocumentSource(_jsonl([tmp_path / "nope.jsonl.gz"]), "train")


def test_empty_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match=f"data file {tmp_path}/empty.jsonl is empty"):
        DocumentSource(_jsonl([tmp_path / "empty.jsonl"]), "train")
    write_jsonl_gz(tmp_path / "blank.jsonl.gz", [])
    with pytest.raises(DataError, match="blank.jsonl.gz is empty"):
        DocumentSource(_jsonl([tmp_path / "blank.jsonl.gz"]), "train")


def test_files_with_only_empty_texts(tmp_path, tok):
    f = write_jsonl_gz(tmp_path / "e.jsonl.gz", ["", "", ""])
    with pytest.raises(DataError, match="no documents with text"):
        next(TokenStream(_jsonl([f], seq_len=16), tok, 1))


def test_non_utf8_file(tmp_path):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes('{"text": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=f"data file {bad} is not valid UTF-8"):
        DocumentSource(_jsonl([bad]), "train")


def test_non_utf8_after_the_checked_prefix_is_named_while_reading(tmp_path, tok, monkeypatch):
    import lrpretrain.data.sources as sources

    monkeypatch.setattr(sources, "_UTF8_CHECK_BYTES", 64)
    bad = tmp_path / "late.jsonl"
    good = "".join(json.dumps({"text": f"fine text number {i}"}) + "\n" for i in range(20)).encode()
    bad.write_bytes(good + '{"text": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=f"{bad}"):
        take(TokenStream(_jsonl([bad], seq_len=16), tok, 1, prefetch=0), 100)


def test_record_without_text_field(tmp_path, tok):
    f = tmp_path / "x.jsonl"
    f.write_text(json.dumps({"content": "hello"}) + "\n")
    with pytest.raises(DataError, match="has no field 'text'"):
        next(TokenStream(_jsonl([f], seq_len=16), tok, 1))


def test_c4_offline_is_one_clear_error():
    cfg = DataConfig(name="c4", source="hf", hf_path="allenai/c4", hf_name="en", tokenizer="t5-base")
    with pytest.raises(DataError) as e:
        DocumentSource(cfg, "train")
    msg = str(e.value)
    assert "cannot stream allenai/c4 (en) split train from the Hugging Face hub" in msg and "data=jsonl" in msg
    assert "\n" not in msg


def test_hub_tokenizer_offline_is_one_clear_error():
    with pytest.raises(DataError, match="cannot load tokenizer 't5-base' from the Hugging Face hub"):
        load_tokenizer("t5-base", "</s>", "<pad>")
    with pytest.raises(DataError, match="tokenizer file /nonexistent/tok.json does not exist"):
        load_tokenizer("/nonexistent/tok.json", "</s>", "<pad>")
