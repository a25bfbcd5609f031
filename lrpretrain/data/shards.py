"""Pre-tokenized token shards: the on-disk format and the memory-mapped reader behind ``data=shards``.

Written by ``lrpretrain prepare-data pretokenize`` (:mod:`lrpretrain.data.pretokenize`), one token
shard per shard (file) of the source, so that the stream's order rules (shard permutation per epoch,
blocks of ``data.shuffle_block`` documents permuted from the seed, ranks by whole shards or by
documents) see the same shards and documents as when reading the source on the fly::

    DIR/manifest.json        format, the source, the data config it was prepared with, the tokenizer
                             (name, SHA-256, EOS/pad ids), dtype, and per split and shard: documents,
                             tokens, largest id, CRC-32 of both files; written last (marks DIR complete)
    DIR/plan.json            what is being prepared (a rerun must ask for the same to continue)
    DIR/tokenizer.json       the tokenizer (canonical JSON; data=shards trains with it by default)
    DIR/{train,validation}/NNNNN.tokens    token ids of the shard's documents, one after the other,
                             uint16 when every id fits, else uint32, little-endian, no header
    DIR/{train,validation}/NNNNN.offsets   int64, documents + 1 entries: document d is
                             tokens[offsets[d]:offsets[d + 1]] (empty documents included, as in the source)
    DIR/{train,validation}/NNNNN.json      the shard's record (also in the manifest); written after its
                             two files, so its presence commits the shard

About 2 bytes per token with uint16 (plus 8 bytes per document). No EOS is stored: the stream adds
it as it does on the fly, so the same shards serve ``pack`` and ``truncate`` at any ``seq_len``.

Verification (``data.verify``), chosen so that start-up and resume stay O(number of shards) whatever
the size of the data: every shard's two files are checked against the manifest's byte sizes when the
stream opens (a truncated or half-copied shard is one line before training starts); ``lazy``
(default) also checks a shard's CRC-32 and offsets the first time this process maps it, from the
data thread (one extra sequential read of a shard before its first rows: for a C4 shard of ~340 MB
about 0.2-0.5 s per shard and process, off the training thread; at a resume, only the current shard);
``size`` skips the CRCs; ``full`` checks every CRC at open. ``lrpretrain prepare-data verify DIR``
checks every CRC on demand, and a rerun of ``prepare-data pretokenize`` checks each existing shard's
CRC before keeping it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lrpretrain.config import DataConfig, shards_manifest
from lrpretrain.data.tokenizer import TokenizerInfo
from lrpretrain.errors import DataError
from lrpretrain.storage import crc32

FORMAT = "lrpretrain-token-shards"
VERSION = 1
SPLITS = ("train", "validation")
PLAN = "plan.json"
TOKENIZER = "tokenizer.json"
OFFSETS_DTYPE = np.dtype("<i8")


def token_dtype(id_limit: int) -> np.dtype:
    """uint16 when every id fits (vocabularies up to 65,536, t5-base's 32,100 included), else uint32."""
    return np.dtype("<u2") if id_limit <= 1 << 16 else np.dtype("<u4")


def shard_files(root: Path, split: str, index: int) -> tuple[Path, Path, Path]:
    """(tokens, offsets, record) of shard ``index`` of ``split``."""
    base = root / split / f"{index:05d}"
    return base.with_suffix(".tokens"), base.with_suffix(".offsets"), base.with_suffix(".json")


def check_files(root: Path, split: str, rec: dict[str, Any], dtype: np.dtype) -> None:
    """Both files of a shard exist with the sizes its record says, or one DataError line."""
    tokens, offsets, _ = shard_files(root, split, rec["index"])
    for path, want in ((tokens, rec["tokens"] * dtype.itemsize), (offsets, (rec["docs"] + 1) * OFFSETS_DTYPE.itemsize)):
        try:
            have = path.stat().st_size
        except FileNotFoundError:
            raise DataError(f"token shard file {path} is missing; prepare the shards again (rerunning the "
                            "same prepare-data pretokenize command rewrites only missing or bad shards)") from None
        if have != want:
            raise DataError(f"token shard file {path} has {have:,} bytes, its manifest says {want:,}: the file is "
                            f"{'truncated' if have < want else 'longer than written'}; prepare the shards again "
                            "(rerunning the same prepare-data pretokenize command rewrites only bad shards)")


def check_crc(root: Path, split: str, rec: dict[str, Any]) -> None:
    """The CRC-32 of both files of a shard match its record, or one DataError line."""
    tokens, offsets, _ = shard_files(root, split, rec["index"])
    for path, want in ((tokens, rec["crc32"]["tokens"]), (offsets, rec["crc32"]["offsets"])):
        try:
            have = crc32(path)
        except OSError as e:
            raise DataError(f"cannot read token shard file {path}: {e.strerror or e}") from e
        if have != want:
            raise DataError(f"checksum mismatch in token shard file {path} (crc32 {have:08x}, its manifest says "
                            f"{want:08x}): the file is corrupt; prepare the shards again (rerunning the same "
                            "prepare-data pretokenize command rewrites only bad shards)")


def check_offsets(path: Path, offsets: np.ndarray, tokens: int) -> None:
    if offsets[0] != 0 or offsets[-1] != tokens or (offsets.size > 1 and bool((np.diff(offsets) < 0).any())):
        raise DataError(f"token shard file {path} holds inconsistent document offsets: the file is corrupt; "
                        "prepare the shards again")


def read_manifest(path: str) -> dict[str, Any]:
    """The manifest of ``path`` in a format this version reads, or one line saying why not."""
    m = shards_manifest(path)
    if m.get("format") != FORMAT or m.get("version") != VERSION:
        raise DataError(f"{path} holds {m.get('format')} version {m.get('version')}; this lrpretrain reads "
                        f"{FORMAT} version {VERSION}: prepare the shards again")
    try:  # every field the reader uses, with its type
        np.dtype(m["dtype"])
        assert all(isinstance(m["tokenizer"][k], t) for k, t in (("sha256", str), ("eos_id", int), ("pad_id", int)))
        for info in m["splits"].values():
            assert isinstance(info["source_shards"], int) and isinstance(info["whole"], bool)
            for r in info["shards"]:
                assert all(isinstance(r[k], int) for k in ("index", "docs", "nonempty_docs", "tokens"))
                assert isinstance(r["crc32"]["tokens"], int) and isinstance(r["crc32"]["offsets"], int)
    except (KeyError, TypeError, ValueError, AssertionError, AttributeError) as e:
        raise DataError(f"{Path(path) / 'manifest.json'} is malformed ({type(e).__name__}"
                        f"{': ' + str(e) if isinstance(e, KeyError) else ''}); prepare the shards again") from e
    return m


def check_tokenizer(m: dict[str, Any], tok: TokenizerInfo, cfg: DataConfig) -> None:
    """The run's tokenizer and EOS/pad ids are the ones the shards were prepared with, or one line."""
    want = m["tokenizer"]
    if tok.sha256 != want["sha256"]:
        raise DataError(f"data.tokenizer={cfg.tokenizer} (sha256 {tok.sha256[:12]}) is not the tokenizer the shards "
                        f"in {cfg.path} were prepared with ({want['name']}, sha256 {want['sha256'][:12]}): train "
                        f"with data.tokenizer={Path(cfg.path) / TOKENIZER} (the default of data=shards) or "
                        "pretokenize again with this tokenizer")
    for what, have in (("eos", tok.eos_id), ("pad", tok.pad_id)):
        if have != want[f"{what}_id"]:
            raise DataError(f"data.{what}_token={getattr(cfg, f'{what}_token')!r} is id {have} in this run, the shards "
                            f"in {cfg.path} were prepared with data.{what}_token={want[f'{what}_token']!r} (id "
                            f"{want[f'{what}_id']}): use the same token or pretokenize again")


class _Block:
    """``shuffle_block`` consecutive documents of a mapped shard."""

    def __init__(self, tokens: np.ndarray, offsets: list[int]):
        self.tokens, self.offsets = tokens, offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def take(self, items: Sequence[int]) -> list[np.ndarray]:
        o, t = self.offsets, self.tokens
        return [t[o[j] : o[j + 1]] for j in items]


class ShardSplit:
    """One split of a token-shard directory, for :class:`~lrpretrain.data.TokenStream` and
    :class:`~lrpretrain.data.ValidationSet` (the interface of the on-the-fly source): ``n_shards``,
    ``description``, ``blocks(shard, first_block, size)``.

    Shards are numbered as the source's: with ``max_tokens`` the directory holds some of them (those the
    stream reads first) and the others read as empty, so that the order rules, the rank split and the
    positions are the source's."""

    def __init__(self, cfg: DataConfig, tok: TokenizerInfo, split: str, manifest: dict[str, Any] | None = None):
        m = read_manifest(cfg.path) if manifest is None else manifest
        check_tokenizer(m, tok, cfg)
        self.root, self.split, self.verify = Path(cfg.path).expanduser(), split, cfg.verify
        self.dtype = np.dtype(m["dtype"])
        info = m["splits"].get(split, {})
        self.records: dict[int, dict[str, Any]] = {r["index"]: r for r in info.get("shards", [])}
        if not self.records:
            raise DataError(f"the token shards in {cfg.path} have no {split} split")
        self.n_shards = info["source_shards"]
        self.partial = not info["whole"]
        self.docs = sum(r["docs"] for r in self.records.values())
        self.tokens = sum(r["tokens"] for r in self.records.values())
        if not any(r["nonempty_docs"] for r in self.records.values()):
            raise DataError(f"no documents with text in the {split} shards in {cfg.path}")
        for rec in self.records.values():
            check_files(self.root, split, rec, self.dtype)
        if self.verify == "full":
            for rec in self.records.values():
                check_crc(self.root, split, rec)
        held = f"{len(self.records)} of {self.n_shards}" if self.partial else f"{self.n_shards}"
        self.description = (f"{cfg.path} ({split}: {held} token shards, {self.docs:,} documents, "
                            f"{self.tokens:,} tokens)")
        self._mapped: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def mapped(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, offsets) of ``shard``, memory-mapped on first use (and then checked per data.verify)."""
        if shard not in self._mapped:
            rec = self.records[shard]
            tokens_path, offsets_path, _ = shard_files(self.root, self.split, shard)
            try:
                if self.verify == "lazy":
                    check_crc(self.root, self.split, rec)
                offsets = np.asarray(np.memmap(offsets_path, dtype=OFFSETS_DTYPE, mode="r"))
                tokens = (np.asarray(np.memmap(tokens_path, dtype=self.dtype, mode="r")) if rec["tokens"]
                          else np.empty(0, self.dtype))  # mmap refuses an empty file
            except OSError as e:
                raise DataError(f"cannot read token shard file {e.filename or tokens_path}: "
                                f"{e.strerror or e}") from e
            check_offsets(offsets_path, offsets, rec["tokens"])
            self._mapped[shard] = tokens, offsets
        return self._mapped[shard]

    def blocks(self, shard: int, first_block: int, size: int) -> Iterator[_Block]:
        """The shard's documents ``size`` at a time, from block ``first_block`` on: O(1) to start anywhere.
        A source shard that the directory does not hold (past ``max_tokens``) has none."""
        if shard not in self.records:
            return
        tokens, offsets = self.mapped(shard)
        n = len(offsets) - 1
        for lo in range(first_block * size, n, size):
            yield _Block(tokens, offsets[lo : min(lo + size, n) + 1].tolist())


def has_split(cfg: DataConfig, split: str) -> bool:
    """Whether the shards in data.path hold documents of ``split``."""
    info = read_manifest(cfg.path)["splits"].get(split, {})
    return bool(info.get("docs"))


def verify_directory(path: str, log=print) -> dict[str, Any]:
    """Every check on every shard of ``path``, CRCs included (``lrpretrain prepare-data verify``)."""
    m = read_manifest(path)
    root, dtype = Path(path).expanduser(), np.dtype(m["dtype"])
    for split, info in m["splits"].items():
        for rec in info["shards"]:
            check_files(root, split, rec, dtype)
            check_crc(root, split, rec)
            offsets_path = shard_files(root, split, rec["index"])[1]
            check_offsets(offsets_path, np.fromfile(offsets_path, dtype=OFFSETS_DTYPE), rec["tokens"])
        log(f"{split}: {len(info['shards'])} shards, {info['docs']:,} documents, {info['tokens']:,} tokens: ok")
    tok_path = root / TOKENIZER
    if hashlib.sha256(tok_path.read_bytes()).hexdigest() != m["tokenizer"]["sha256"]:
        raise DataError(f"{tok_path} is not the tokenizer recorded in the manifest (sha256 differs): it was changed")
    return m


def canonical_json(obj: Any) -> str:
    """The text of a record, plan or manifest (sorted keys: a rerun writes identical bytes)."""
    return json.dumps(obj, indent=1, sort_keys=True) + "\n"
