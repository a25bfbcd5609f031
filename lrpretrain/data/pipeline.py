"""Documents -> token rows -> micro-batches, deterministic and exactly resumable.

Documents. Either text, tokenized a block at a time as it is read (``data=c4``, ``jsonl``,
``embedded``: :class:`TextDocuments` over a :class:`~lrpretrain.data.sources.DocumentSource`), or
token ids memory-mapped from pre-tokenized shards (``data=shards``:
:class:`~lrpretrain.data.shards.ShardSplit`, one token shard per source shard, documents in file
order). Both offer the same thing, a split's shards cut into blocks of documents, and everything below
is shared: the same documents give the same rows in the same order, and the same positions.

Order. For each epoch the source's shards are permuted with a seed derived from (data.seed, epoch).
Inside a shard, documents are read in blocks of ``data.shuffle_block`` and each block is permuted
with a seed derived from (data.seed, epoch, shard, block). No shuffle buffer with hidden state: the
order is a pure function of the seed, so a position is five integers.

Sharding by (rank, world_size). When the shard count divides evenly, each rank reads whole shards
(``perm[rank::world]``, as ``split_dataset_by_node`` does); otherwise every rank reads every shard and
takes every world-th item of each permuted block (round robin over the shard's documents, the
starting rank rotated from shard to shard so that no rank is always the one with an extra document).

Rows. ``truncate`` (the GaLore protocol): one document per row, truncated to seq_len - 1 tokens plus
EOS and right-padded; padding is masked out of the loss. ``pack``: documents joined with EOS and cut
into full rows. Rows are built a block at a time with numpy (the shards reach memory speed).

Position. ``Position(epoch, shard, block, item, token)`` names a document and how many of its tokens
(EOS included) are already in emitted rows. Every batch carries the position right after it, so the
trainer checkpoints the position of the last batch it consumed, and :meth:`TokenStream.load_state_dict`
restarts the stream there: re-read that block (text: skipping the shard's earlier documents; shards:
O(1), by offset), permute it again, drop the consumed tokens. The resumed stream yields exactly the
batches the uninterrupted one would have. Positions mean the same for text and for its shards: a run
can switch between them at a resume.
"""

from __future__ import annotations

import hashlib
import queue
import random
import threading
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from lrpretrain.config import DataConfig
from lrpretrain.data.shards import ShardSplit, has_split
from lrpretrain.data.sources import DocumentSource
from lrpretrain.data.tokenizer import TokenizerInfo
from lrpretrain.errors import DataError


def _seed(*parts: int) -> int:
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _permutation(n: int, *seed_parts: int) -> list[int]:
    order = list(range(n))
    random.Random(_seed(*seed_parts)).shuffle(order)
    return order


def shard_order(n_shards: int, seed: int, epoch: int) -> list[int]:
    """The order in which the single stream (world size 1) reads a split's shards in ``epoch``."""
    return _permutation(n_shards, seed, epoch)


@dataclass(frozen=True)
class Position:
    epoch: int = 0
    shard: int = 0  # index into this epoch's shard order for this rank
    block: int = 0  # block of `shuffle_block` documents within the shard
    item: int = 0  # index into this rank's items of the permuted block
    token: int = 0  # tokens of this document (EOS included) already emitted


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) int64
    labels: torch.Tensor  # (B, T) int64, -100 where not a target (padding)
    tokens: int  # non-pad input tokens (what "tokens seen" counts, as in GaLore)
    position: Position  # stream position right after this batch


# -- documents ----------------------------------------------------------------------------------
class _TextBlock:
    def __init__(self, texts: list[str], tok: TokenizerInfo):
        self.texts, self.tok = texts, tok

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, items: Sequence[int]) -> list[np.ndarray]:
        """Token ids of the documents ``items`` (only these are tokenized)."""
        if not items:
            return []
        return [np.array(ids, dtype=np.int64) for ids in self.tok.encode([self.texts[j] for j in items])]


class TextDocuments:
    """A text source's documents, tokenized a block at a time as the stream reads them."""

    def __init__(self, source: DocumentSource, tok: TokenizerInfo):
        self.source, self.tok = source, tok
        self.n_shards, self.description = source.n_shards, source.description

    def blocks(self, shard: int, first_block: int, size: int) -> Iterator[_TextBlock]:
        texts_it = self.source.iter_shard(shard, skip=first_block * size)
        while texts := [t for _, t in zip(range(size), texts_it)]:
            yield _TextBlock(texts, self.tok)
            if len(texts) < size:
                return


Documents = TextDocuments | ShardSplit


def open_documents(cfg: DataConfig, tok: TokenizerInfo, split: str) -> Documents:
    """The documents of ``split`` (train | validation) of the configured data, text or token shards."""
    if cfg.source == "shards":
        return ShardSplit(cfg, tok, split)
    return TextDocuments(DocumentSource(cfg, split), tok)


def has_validation(cfg: DataConfig) -> bool:
    """Whether the configured data has a validation split."""
    if cfg.source == "shards":
        return has_split(cfg, "validation")
    return cfg.source != "jsonl" or len(cfg.val_files) > 0


# -- rows -----------------------------------------------------------------------------------------
def _truncate_rows(docs: list[np.ndarray], L: int, eos: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """One row per document: its first L - 1 tokens, EOS, padding. Returns (rows, non-pad lengths)."""
    n = len(docs)
    cut = np.fromiter((min(len(d), L - 1) for d in docs), np.int64, n)
    rows = np.full((n, L), pad, np.int64)
    for i, d in enumerate(docs):
        rows[i, : cut[i]] = d[: cut[i]]
    rows[np.arange(n), cut] = eos
    return rows, cut + 1


class _Packer:
    """Documents joined with EOS and cut into full rows; the rest waits for the next documents."""

    def __init__(self, L: int, eos: int):
        self.L, self.pending, self.eos = L, np.empty(0, np.int64), np.array([eos], np.int64)

    def add(self, docs: list[np.ndarray], skip: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows completed by ``docs`` (the first ``skip`` tokens of ``docs[0]`` + EOS left out: already
        emitted), and for each row the index in ``docs`` of the document holding its last token and how
        many tokens of that document (EOS included) are then in rows."""
        pieces = [self.pending]
        for d in docs:
            pieces += (d, self.eos)
        seg = np.fromiter((len(d) + 1 for d in docs), np.int64, len(docs))
        if skip:
            pieces[1], pieces[2] = docs[0][skip:], self.eos[: max(0, len(docs[0]) + 1 - skip)]
            seg[0] -= skip
        cat = np.concatenate(pieces, dtype=np.int64)
        n, before = len(cat) // self.L, len(self.pending)
        self.pending = cat[n * self.L :].copy()
        ends = np.cumsum(seg)
        t = np.arange(1, n + 1, dtype=np.int64) * self.L - before  # row ends, counted from docs[0]'s first new token
        d = np.searchsorted(ends, t, side="left")
        tok = t - (ends[d] - seg[d])
        tok[d == 0] += skip
        return cat[: n * self.L].reshape(n, self.L), d, tok


def _labels(ids: torch.Tensor, lens: np.ndarray) -> torch.Tensor:
    """``ids`` as targets, -100 on padding (past each row's length)."""
    pad = torch.arange(ids.shape[1]) >= torch.from_numpy(lens)[:, None]
    return ids.masked_fill(pad, -100)


class TokenStream:
    """An endless, resumable stream of micro-batches for one rank."""

    def __init__(self, cfg: DataConfig, tokenizer: TokenizerInfo, micro_batch_size: int,
                 rank: int = 0, world_size: int = 1, prefetch: int = 2, vocab_size: int | None = None):
        self.cfg = cfg
        self.vocab_limit = vocab_size or (1 << 62)
        self.tok = tokenizer
        self.micro_batch_size = micro_batch_size
        self.rank, self.world = rank, world_size
        self.prefetch = prefetch
        self.source = open_documents(cfg, tokenizer, "train")
        self.position = Position()
        self._it: Iterator[Batch] | None = None
        self._thread: _Prefetcher | None = None

    # -- order -----------------------------------------------------------------------------
    def _shards(self, epoch: int) -> tuple[list[int], bool]:
        """This rank's shard order for ``epoch`` and whether items are strided across ranks."""
        perm = shard_order(self.source.n_shards, self.cfg.seed, epoch)
        if self.source.n_shards % self.world == 0:
            return perm[self.rank :: self.world], False
        return perm, True

    def _documents(self, start: Position) -> Iterator[tuple[int, int, int, list[int], list[np.ndarray]]]:
        """This rank's documents from ``start`` on, a block at a time: (epoch, shard, block, items, token
        ids), ``items`` being the documents' indices among this rank's items of the permuted block.
        Empty documents carry no tokens and are left out."""
        epoch, shard_i, block, item = start.epoch, start.shard, start.block, start.item
        B, empty_epochs = self.cfg.shuffle_block, 0
        while True:
            shards, strided = self._shards(epoch)
            whole_epoch, seen_in_epoch = (shard_i, block, item) == (0, 0, 0), False
            while shard_i < len(shards):
                shard = shards[shard_i]
                for blk in self.source.blocks(shard, block, B):
                    order = _permutation(len(blk), self.cfg.seed, epoch, shard, block)
                    if strided:  # round robin over the shard's documents, rotated per shard
                        first = (self.rank - block * B - shard_i) % self.world
                        order = order[first :: self.world]
                    ids = blk.take(order[item:])
                    items = [item + k for k, d in enumerate(ids) if len(d)]
                    if items:
                        seen_in_epoch = True
                        yield epoch, shard_i, block, items, [d for d in ids if len(d)]
                    block, item = block + 1, 0
                shard_i, block, item = shard_i + 1, 0, 0
            if whole_epoch:
                empty_epochs = 0 if seen_in_epoch else empty_epochs + 1
                # shards holding part of a source (max_tokens) may leave a rank nothing in an epoch
                if empty_epochs and (not getattr(self.source, "partial", False) or empty_epochs >= 100):
                    raise DataError(f"no documents with text for rank {self.rank} of {self.world} in "
                                    f"{self.source.description}")
            epoch, shard_i, block, item = epoch + 1, 0, 0, 0

    # -- rows -------------------------------------------------------------------------------
    def _rows(self, start: Position) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Rows a block at a time: (rows (n, L) int64, non-pad lengths (n,), position after each row (n, 5))."""
        L, eos, pad = self.cfg.seq_len, self.tok.eos_id, self.tok.pad_id
        resume_in = (start.epoch, start.shard, start.block, start.item) if start.token > 0 else None
        packer = _Packer(L, eos) if self.cfg.mode == "pack" else None
        for epoch, shard_i, block, items, docs in self._documents(start):
            skip = 0
            if resume_in is not None:  # the document the stream restarts in: its first `token` tokens are out
                skip = start.token if (epoch, shard_i, block, items[0]) == resume_in else 0
                resume_in = None
            if packer is None:
                if skip:  # truncate: that document's row was already emitted
                    items, docs = items[1:], docs[1:]
                if not docs:
                    continue
                rows, lens = _truncate_rows(docs, L, eos, pad)
                item_of_row, token_of_row = np.asarray(items), 1
            else:
                rows, d, token_of_row = packer.add(docs, skip)
                if not len(rows):
                    continue
                lens, item_of_row = np.full(len(rows), L, np.int64), np.asarray(items)[d]
            pos = np.empty((len(rows), 5), np.int64)
            pos[:, :3] = (epoch, shard_i, block)
            pos[:, 3], pos[:, 4] = item_of_row, token_of_row
            yield rows, lens, pos

    def _batches(self, start: Position) -> Iterator[Batch]:
        mb = self.micro_batch_size
        rows = lens = pos = None
        for r, n, p in self._rows(start):
            if rows is not None and len(rows):
                r, n, p = np.concatenate([rows, r]), np.concatenate([lens, n]), np.concatenate([pos, p])
            i = 0
            while len(r) - i >= mb:
                yield self._collate(r[i : i + mb], n[i : i + mb], p[i + mb - 1])
                i += mb
            rows, lens, pos = r[i:], n[i:], p[i:]

    def _collate(self, rows: np.ndarray, lens: np.ndarray, pos: np.ndarray) -> Batch:
        top = int(rows.max())
        if top >= self.vocab_limit:
            raise DataError(f"token id {top} from tokenizer {self.tok.name} is outside "
                            f"model.vocab_size={self.vocab_limit}")
        ids = torch.from_numpy(np.ascontiguousarray(rows))
        labels = ids.clone() if self.cfg.mode == "pack" else _labels(ids, lens)
        return Batch(ids, labels, int(lens.sum()), Position(*pos.tolist()))

    # -- iteration and state -----------------------------------------------------------------
    def __iter__(self) -> TokenStream:
        return self

    def __next__(self) -> Batch:
        if self._it is None:
            gen = self._batches(self.position)
            self._thread = _Prefetcher(gen, self.prefetch) if self.prefetch > 0 else None
            self._it = iter(self._thread) if self._thread else gen
        batch = next(self._it)
        self.position = batch.position
        return batch

    def state_dict(self) -> dict[str, int]:
        """The position after the last batch returned (plus what it is only valid for)."""
        return {**asdict(self.position), "seed": self.cfg.seed, "rank": self.rank, "world_size": self.world,
                "n_shards": self.source.n_shards, "seq_len": self.cfg.seq_len,
                "shuffle_block": self.cfg.shuffle_block, "micro_batch_size": self.micro_batch_size,
                "pack": int(self.cfg.mode == "pack")}

    def load_state_dict(self, state: dict[str, int]) -> None:
        mine = self.state_dict()
        for key in ("world_size", "rank", "seed", "n_shards", "seq_len", "shuffle_block", "pack"):
            if key in state and int(state[key]) != mine[key]:
                raise DataError(f"the checkpoint's data position was saved with {key}={int(state[key])}, "
                                f"this run has {key}={mine[key]}; it cannot be resumed exactly")
        self.close()
        self.position = Position(**{k: int(state[k]) for k in ("epoch", "shard", "block", "item", "token")})

    def close(self) -> None:
        if self._thread is not None:
            self._thread.stop()
        self._thread, self._it = None, None


class _Prefetcher:
    """Runs a batch generator ahead in a thread (tokenization releases the GIL)."""

    _END = object()

    def __init__(self, gen: Iterator[Batch], depth: int):
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._gen = gen
        self._t = threading.Thread(target=self._run, name="lrpretrain-data", daemon=True)
        self._t.start()

    def _run(self) -> None:
        try:
            for item in self._gen:
                while not self._stop.is_set():
                    try:
                        self._q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            self._q.put(self._END)
        except BaseException as e:  # re-raised in the consumer
            self._q.put(e)

    def __iter__(self) -> Iterator[Batch]:
        while True:
            item = self._q.get()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def stop(self) -> None:
        self._stop.set()
        self._t.join(timeout=5)


class ValidationSet:
    """A fixed held-out set: the first ``data.val_tokens`` non-pad tokens of the validation split,
    in file order, cut into rows like the training data. Identical at every evaluation; each rank
    evaluates rows ``rank::world``."""

    def __init__(self, cfg: DataConfig, tokenizer: TokenizerInfo, rank: int = 0, world_size: int = 1):
        self.cfg = cfg
        source = open_documents(cfg, tokenizer, "validation")
        L, eos, pad = cfg.seq_len, tokenizer.eos_id, tokenizer.pad_id
        packer = _Packer(L, eos)
        chunks: list[tuple[np.ndarray, np.ndarray]] = []
        tokens = 0

        def documents() -> Iterator[list[np.ndarray]]:
            for shard in range(source.n_shards):
                for blk in source.blocks(shard, 0, 256):
                    yield [ids for ids in blk.take(range(len(blk))) if len(ids)]

        for docs in documents():
            if tokens >= cfg.val_tokens:
                break
            if not docs:
                continue
            if cfg.mode == "truncate":
                rows, lens = _truncate_rows(docs, L, eos, pad)
            else:
                rows = packer.add(docs)[0]
                lens = np.full(len(rows), L, np.int64)
            keep = int((tokens + np.cumsum(lens) - lens < cfg.val_tokens).sum())  # rows that start under budget
            chunks.append((rows[:keep], lens[:keep]))
            tokens += int(lens[:keep].sum())
        if not tokens:
            raise DataError(f"no validation documents in {source.description}")
        self.available_tokens = tokens
        self.short = tokens < cfg.val_tokens  # the split holds fewer tokens than the budget
        ids = torch.from_numpy(np.concatenate([r for r, _ in chunks]))
        labels = _labels(ids, np.concatenate([n for _, n in chunks]))
        self.input_ids, self.labels = ids[rank::world_size], labels[rank::world_size]
        self.total_rows = ids.shape[0]
        self.description = source.description

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, self.input_ids.shape[0], batch_size):
            yield self.input_ids[i : i + batch_size], self.labels[i : i + batch_size]
