"""Documents -> token rows -> micro-batches, deterministic and exactly resumable.

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
into full rows.

Position. ``Position(epoch, shard, block, item, token)`` names a document and how many of its tokens
(EOS included) are already in emitted rows. Every batch carries the position right after it, so the
trainer checkpoints the position of the last batch it consumed, and :meth:`TokenStream.load_state_dict`
restarts the stream there: re-read that block (skipping the shard's earlier documents), permute it
again, drop the consumed tokens. The resumed stream yields exactly the batches the uninterrupted one
would have.
"""

from __future__ import annotations

import hashlib
import queue
import random
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace

import torch

from lrpretrain.config import DataConfig
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
        self.source = DocumentSource(cfg, "train")
        self.position = Position()
        self._it: Iterator[Batch] | None = None
        self._thread: _Prefetcher | None = None

    # -- order -----------------------------------------------------------------------------
    def _shards(self, epoch: int) -> tuple[list[int], bool]:
        """This rank's shard order for ``epoch`` and whether items are strided across ranks."""
        perm = _permutation(self.source.n_shards, self.cfg.seed, epoch)
        if self.source.n_shards % self.world == 0:
            return perm[self.rank :: self.world], False
        return perm, True

    def _documents(self, start: Position) -> Iterator[tuple[Position, list[int]]]:
        """(position, token ids) of this rank's documents from ``start`` on, tokenized a block at a time."""
        epoch, shard_i, block, item = start.epoch, start.shard, start.block, start.item
        B = self.cfg.shuffle_block
        while True:
            shards, strided = self._shards(epoch)
            whole_epoch, seen_in_epoch = (shard_i, block, item) == (0, 0, 0), False
            while shard_i < len(shards):
                shard = shards[shard_i]
                texts_it = self.source.iter_shard(shard, skip=block * B)
                while True:
                    texts = [t for _, t in zip(range(B), texts_it)]
                    if not texts:
                        break
                    order = _permutation(len(texts), self.cfg.seed, epoch, shard, block)
                    if strided:  # round robin over the shard's documents, rotated per shard
                        first = (self.rank - block * B - shard_i) % self.world
                        order = order[first :: self.world]
                    mine = order
                    chosen = [texts[j] for j in mine[item:]]
                    ids = self.tok.encode(chosen) if chosen else []
                    for k, doc_ids in enumerate(ids):
                        if doc_ids:  # empty documents carry no tokens
                            seen_in_epoch = True
                            yield Position(epoch, shard_i, block, item + k, 0), doc_ids
                    if len(texts) < B:
                        break
                    block, item = block + 1, 0
                shard_i, block, item = shard_i + 1, 0, 0
            if whole_epoch and not seen_in_epoch:
                raise DataError(f"no documents with text for rank {self.rank} of {self.world} in "
                                f"{self.source.description}")
            epoch, shard_i, block, item = epoch + 1, 0, 0, 0

    # -- rows -------------------------------------------------------------------------------
    def _rows(self, start: Position) -> Iterator[tuple[list[int], Position]]:
        L, eos = self.cfg.seq_len, self.tok.eos_id
        first = replace(start, token=0)  # the document the stream restarts in
        if self.cfg.mode == "truncate":
            for pos, ids in self._documents(start):
                if pos == first and start.token > 0:
                    continue  # this document's row was already emitted
                yield ids[: L - 1] + [eos], Position(pos.epoch, pos.shard, pos.block, pos.item, 1)
            return
        pending: list[int] = []
        for pos, ids in self._documents(start):
            toks = ids + [eos]
            base = start.token if pos == first else 0
            toks = toks[base:]
            pending.extend(toks)
            while len(pending) >= L:
                row, pending = pending[:L], pending[L:]
                # pending is shorter than a row before each document, so what is left is this document's
                yield row, Position(pos.epoch, pos.shard, pos.block, pos.item, base + len(toks) - len(pending))

    def _batches(self, start: Position) -> Iterator[Batch]:
        rows: list[list[int]] = []
        for row, pos in self._rows(start):
            rows.append(row)
            if len(rows) == self.micro_batch_size:
                yield self._collate(rows, pos)
                rows = []

    def _collate(self, rows: list[list[int]], pos: Position) -> Batch:
        L, pad = self.cfg.seq_len, self.tok.pad_id
        ids = torch.full((len(rows), L), pad, dtype=torch.long)
        labels = torch.full((len(rows), L), -100, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            labels[i, : len(r)] = ids[i, : len(r)]
        tokens = sum(len(r) for r in rows)
        if int(ids.max()) >= self.vocab_limit:
            raise DataError(f"token id {int(ids.max())} from tokenizer {self.tok.name} is outside "
                            f"model.vocab_size={self.vocab_limit}")
        return Batch(ids, labels, tokens, pos)

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
        source = DocumentSource(cfg, "validation")
        L, eos, pad = cfg.seq_len, tokenizer.eos_id, tokenizer.pad_id
        rows: list[list[int]] = []
        tokens = 0
        pending: list[int] = []

        def documents() -> Iterator[list[int]]:
            for shard in range(source.n_shards):
                texts_it = source.iter_shard(shard)
                while texts := [t for _, t in zip(range(256), texts_it)]:
                    yield from (ids for ids in tokenizer.encode(texts) if ids)

        for ids in documents():
            if tokens >= cfg.val_tokens:
                break
            if cfg.mode == "truncate":
                row = ids[: L - 1] + [eos]
                rows.append(row)
                tokens += len(row)
            else:
                pending.extend(ids + [eos])
                while len(pending) >= L and tokens < cfg.val_tokens:
                    rows.append(pending[:L])
                    pending = pending[L:]
                    tokens += L
        if not rows:
            raise DataError(f"no validation documents in {source.description}")
        self.available_tokens = tokens
        self.short = tokens < cfg.val_tokens  # the split holds fewer tokens than the budget
        ids = torch.full((len(rows), L), pad, dtype=torch.long)
        labels = torch.full((len(rows), L), -100, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            labels[i, : len(r)] = ids[i, : len(r)]
        self.input_ids, self.labels = ids[rank::world_size], labels[rank::world_size]
        self.total_rows = len(rows)
        self.description = source.description

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, self.input_ids.shape[0], batch_size):
            yield self.input_ids[i : i + batch_size], self.labels[i : i + batch_size]
