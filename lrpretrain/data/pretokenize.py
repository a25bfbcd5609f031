"""``lrpretrain prepare-data pretokenize <data overrides> out=DIR``: token shards from any text source.

Reads the configured source (``data=c4`` streamed from the hub, ``data=jsonl``, ``data=embedded``)
through the stream's own :class:`~lrpretrain.data.sources.DocumentSource` and tokenizes with the
run's tokenizer (:class:`~lrpretrain.data.tokenizer.TokenizerInfo`, as the stream does), one token
shard per source shard (same index), documents in file order, into the format of
:mod:`lrpretrain.data.shards`.

Parallel: ``num_proc`` processes (default: every core) tokenize different shards; each has
``cores / num_proc`` threads for the tokenizer's own batch parallelism (all of them when a single
shard is left). Progress: tokens/s and ETA (a bar on a terminal, else a line every few seconds).

Atomic per shard and resumable: a worker writes a shard's two files under temporary names, renames
them, then writes the shard's record, which commits it. A rerun of the same command keeps every
committed shard whose sizes and CRC-32 check out, deletes temporaries, and does the rest; a shard's
name is its source shard's index, so nothing is ever written twice. The manifest comes last. The
result does not depend on kills, reruns or the number of processes: the same command writes the same
bytes. A directory holding another preparation (other source, tokenizer or budget) is refused.

Budgets. ``max_tokens`` stops the train split early, counted as the run consumes tokens: rows x
``data.seq_len`` in ``data.mode`` (truncate: one row per non-empty document; pack: document tokens
+ EOS), so ``trainer.max_steps x trainer.batch_size x data.seq_len`` is one epoch of the result (the
60M C4 protocol: 10000 x 512 x 256 = 1,310,720,000). The documents are the ones the stream reads
first: whole shards in the stream's epoch-0 order for ``data.seed``, the last one up to the end of
the block of ``data.shuffle_block`` documents where the budget is reached. The other shards are left
out, not renumbered, so ``data=shards`` reads what the source on the fly would have read in that
epoch, row for row (with ``distributed.data=global``, the default; ``sharded`` ranks read the held
shards of their share). ``val_max_tokens`` does the same for the validation split in file order
(its reading order), counted as ``data.val_tokens`` counts (non-pad tokens). Without them, the
whole split.

Why not ``datasets.map(num_proc=...)``: it needs a map-style dataset (C4 would be downloaded whole,
~300 GB for ``en``) and writes Arrow, not memory-mappable token arrays with document offsets; a shard
per source shard is also what keeps the stream's order rules identical.
"""

from __future__ import annotations

import concurrent.futures as cf
import ctypes
import fcntl
import json
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from lrpretrain.config import SHARDS_MANIFEST, DataConfig
from lrpretrain.data.pipeline import shard_order
from lrpretrain.data.shards import (
    FORMAT,
    OFFSETS_DTYPE,
    PLAN,
    SPLITS,
    TOKENIZER,
    VERSION,
    canonical_json,
    check_crc,
    check_files,
    shard_files,
    token_dtype,
)
from lrpretrain.data.sources import DocumentSource
from lrpretrain.data.tokenizer import TokenizerInfo, load_tokenizer
from lrpretrain.errors import DataError, UserError
from lrpretrain.storage import atomic_write_text, fsync_dir, guarded_write

CHUNK_DOCS = 512  # documents tokenized at a time (progress and cancellation points)
# data=shards inherits these from the data config the shards were prepared with (conf/data/shards.yaml)
INHERITED = ("mode", "seq_len", "shuffle_block", "seed", "val_tokens", "eos_token", "pad_token")
FAULT_ENV = "LRPRETRAIN_FAULT_KILL_IN_PRETOKENIZE"  # SPLIT:SHARD:DOCS, fault injection for the crash tests


@dataclass
class Options:
    out: Path
    num_proc: int = 0  # 0: every core
    max_tokens: int | None = None
    val_max_tokens: int | None = None
    progress: str = "auto"  # auto | bar | lines | none


def budget_units(lengths: np.ndarray, split: str, mode: str, seq_len: int) -> np.ndarray:
    """What each document (of ``lengths`` tokens) counts towards a budget: train: tokens of rows
    (truncate: one row, seq_len; pack: its tokens + EOS); validation: non-pad tokens, as data.val_tokens."""
    lengths = np.asarray(lengths, np.int64)
    if mode == "pack":
        units = lengths + 1
    elif split == "train":
        units = np.full_like(lengths, seq_len)
    else:
        units = np.minimum(lengths, seq_len - 1) + 1
    return np.where(lengths > 0, units, 0)


# ---------------------------------------------------------------------------------------------- worker side
class _Worker:
    """What a tokenizing worker needs; one per process (set by the pool's initializer) or the thread."""

    def __init__(self, cfg: dict[str, Any], tokenizer_json: str, eos_id: int, pad_id: int, root: str, dtype: str,
                 counters: list[Any], cancel: list[Any], ppid: int | None):
        self.cfg = DataConfig(**cfg)
        self.tok = TokenizerInfo(Tokenizer.from_str(tokenizer_json), "pretokenize", eos_id, pad_id, 0)
        self.root, self.dtype = Path(root), np.dtype(dtype)
        # per split: tokens, documents and budget units done of each shard (one writer each: no locks),
        # and a flag per shard that cancels it
        self.counters, self.cancel, self.ppid = counters, cancel, ppid
        self.sources: dict[str, DocumentSource] = {}
        fault = os.environ.get(FAULT_ENV, "")
        self.fault = (fault.split(":")[0], int(fault.split(":")[1]), int(fault.split(":")[2])) if fault else None

    def source(self, split: str) -> DocumentSource:
        if split not in self.sources:
            self.sources[split] = DocumentSource(self.cfg, split)
        return self.sources[split]

    def cancelled(self, split: str, index: int) -> bool:
        if self.ppid is not None and os.getppid() != self.ppid:  # the driver died: stop, commit nothing
            os._exit(1)
        return bool(self.cancel[SPLITS.index(split)][index])

    def die(self) -> None:
        """Fault injection: the whole preparation is SIGKILLed (driver and workers), mid-shard."""
        if self.ppid is not None:
            os.kill(self.ppid, signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)

    def shard(self, split: str, index: int, stop_after: int | None, block: int) -> dict[str, Any] | None:
        """Tokenize shard ``index`` of ``split`` and commit it; None if cancelled. Given ``stop_after``
        budget units, stop with the document that reaches them, or at the end of its block of ``block``
        documents (the stream reads a block whole)."""
        tokens_path, offsets_path, record_path = shard_files(self.root, split, index)
        tmp_t = tokens_path.with_name(f".{tokens_path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        tmp_o = offsets_path.with_name(f".{offsets_path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        mode, L = self.cfg.mode, self.cfg.seq_len
        src = self.source(split)
        offsets, n_tok, units, max_id, crc, complete = [0], 0, 0, -1, 0, True
        target: int | None = None  # documents to keep, once the budget is reached
        counter = self.counters[SPLITS.index(split)]
        try:
            with guarded_write(tmp_t), open(tmp_t, "wb") as f:
                texts = src.iter_shard(index)
                while read := [t for _, t in zip(range(CHUNK_DOCS), texts)]:
                    docs = len(offsets) - 1
                    ids = self.tok.encode(read if target is None else read[: target - docs])
                    lens = np.fromiter(map(len, ids), np.int64, len(ids))
                    cum = units + np.cumsum(budget_units(lens, split, mode, L))
                    if stop_after is not None and target is None:
                        hit = int(np.searchsorted(cum, stop_after, side="left"))
                        if hit < len(ids):  # this document reaches the budget
                            target = -(-(docs + hit + 1) // block) * block
                            ids, lens = ids[: target - docs], lens[: target - docs]
                    units = int(cum[len(ids) - 1]) if len(ids) else units
                    flat = np.fromiter(chain.from_iterable(ids), self.dtype, int(lens.sum()))
                    data = flat.tobytes()
                    f.write(data)
                    crc = zlib.crc32(data, crc)
                    offsets.extend((n_tok + np.cumsum(lens)).tolist())
                    n_tok += len(flat)
                    if len(flat):
                        max_id = max(max_id, int(flat.max()))
                    counter[3 * index : 3 * index + 3] = (n_tok, len(offsets) - 1, units)
                    if self.fault is not None and self.fault[:2] == (split, index) and len(offsets) - 1 >= self.fault[2]:
                        f.flush()
                        self.die()
                    if self.cancelled(split, index):
                        raise _Cancelled
                    if target is not None and len(offsets) - 1 >= target:
                        complete = len(ids) == len(read) and next(texts, None) is None  # nothing left out
                        break
                f.flush()
                os.fsync(f.fileno())
            offsets_bytes = np.asarray(offsets, OFFSETS_DTYPE).tobytes()
            with guarded_write(tmp_o, len(offsets_bytes)), open(tmp_o, "wb") as f:
                f.write(offsets_bytes)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp_t, tokens_path)
            os.replace(tmp_o, offsets_path)
        except _Cancelled:
            return None
        finally:
            tmp_t.unlink(missing_ok=True)
            tmp_o.unlink(missing_ok=True)
        lens = np.diff(np.asarray(offsets, np.int64))
        record = {"index": index, "source": src.shard_name(index), "docs": len(lens),
                  "nonempty_docs": int((lens > 0).sum()), "tokens": n_tok, "max_id": max_id, "complete": complete,
                  "crc32": {"tokens": crc, "offsets": zlib.crc32(offsets_bytes)}}
        if stop_after is not None:
            record["units"] = units
        atomic_write_text(record_path, canonical_json(record))
        return record


class _Cancelled(Exception):
    pass


_WORKER: _Worker | None = None


def _init_process(args: tuple, threads: int) -> None:
    """Pool initializer: die with the driver, leave Ctrl-C to it, size the tokenizer's thread pool."""
    global _WORKER
    try:  # Linux: SIGKILL when the driver dies, so that no orphan keeps writing
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # the ppid check between chunks covers it
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ["RAYON_NUM_THREADS"] = str(threads)  # read when the tokenizer first runs a batch
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads > 1 else "false"
    _WORKER = _Worker(*args, ppid=os.getppid())


def _run_shard(split: str, index: int, stop_after: int | None, block: int) -> dict[str, Any] | None:
    assert _WORKER is not None
    return _WORKER.shard(split, index, stop_after, block)


# ---------------------------------------------------------------------------------------------- driver side
class _Progress:
    """tokens/s and ETA of one split's preparation (from the workers' counters): a tqdm bar, or a line
    every few seconds."""

    def __init__(self, split: str, style: str, counts: np.ndarray, weights: list[float], todo: list[int],
                 budget: int | None):
        self.split, self.style, self.counts, self.weights = split, style, counts, weights
        self.todo, self.done = todo, set()
        self.budget = budget  # budget units left for this run's shards
        self.total_w = sum(weights[i] for i in todo) or 1.0
        self.t0 = self.last = time.monotonic()
        self.done_w, self.done_tokens, self.printed = 0.0, 0, -1
        self.bar = None
        if style == "bar":
            from tqdm import tqdm

            self.bar = tqdm(desc=f"pretokenize {split}", unit="tok", unit_scale=True, dynamic_ncols=True, file=sys.stderr)

    def shard_done(self, index: int, rec: dict[str, Any]) -> None:
        self.done.add(index)
        self.done_w += self.weights[index]
        self.done_tokens += rec["tokens"]

    def fraction(self) -> float | None:
        """Of this run's work, done (None while unknown)."""
        if self.budget is not None:
            units = int(self.counts[self.todo, 2].sum())
            return min(1.0, units / self.budget) if units and self.budget > 0 else None
        if not self.done_tokens:
            return None
        per_w = self.done_tokens / self.done_w
        partial = sum(min(self.counts[i, 0] / per_w, self.weights[i]) for i in self.todo if i not in self.done)
        return min(1.0, (self.done_w + partial) / self.total_w)

    def show(self, force: bool = False) -> None:
        now, tokens = time.monotonic(), int(self.counts[self.todo, 0].sum())
        elapsed, f = now - self.t0, self.fraction()
        if self.bar is not None:
            self.bar.update(tokens - self.bar.n)
            if f:
                self.bar.total = int(tokens / f)
            self.bar.set_postfix_str(self._shards(), refresh=False)
            self.bar.refresh()
            return
        if self.style != "lines" or (not force and now - self.last < 5.0) or self.printed == tokens:
            return
        self.last, self.printed = now, tokens
        eta = f"{_fmt_time(elapsed * (1 - f) / f)}" if f else "?"
        print(f"pretokenize {self.split}: {self._shards()} | {_count(tokens)} tokens | "
              f"{_count(tokens / max(elapsed, 1e-9))} tok/s | eta {eta}", file=sys.stderr, flush=True)

    def _shards(self) -> str:
        return f"{len(self.done)} shards" if self.budget is not None else f"{len(self.done)}/{len(self.todo)} shards"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _fmt_time(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _count(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class Pretokenizer:
    """One preparation of ``cfg``'s source into ``opts.out``."""

    def __init__(self, cfg: DataConfig, opts: Options, log: Callable[[str], None]):
        if cfg.source == "shards":
            raise UserError("data=shards is already tokenized; pretokenize reads data=c4, data=jsonl or data=embedded")
        for key, value in (("max_tokens", opts.max_tokens), ("val_max_tokens", opts.val_max_tokens)):
            if value is not None and value <= 0:
                raise UserError(f"{key}={value} is invalid: must be > 0 (or left out for the whole split)")
        if opts.num_proc < 0:
            raise UserError(f"num_proc={opts.num_proc} is invalid: must be >= 1 (0: every core)")
        self.cfg, self.opts, self.log = cfg, opts, log
        self.root = opts.out.expanduser()
        self.tok = load_tokenizer(cfg.tokenizer, cfg.eos_token, cfg.pad_token)
        self.dtype = token_dtype(self.tok.id_limit)
        self.sources = {"train": DocumentSource(cfg, "train")}
        if cfg.source != "jsonl" or cfg.val_files:
            self.sources["validation"] = DocumentSource(cfg, "validation")
        self.budgets = {"train": opts.max_tokens, "validation": opts.val_max_tokens}
        self.plan = self._plan()

    def _plan(self) -> dict[str, Any]:
        """What this preparation writes: a rerun must ask for the same to continue a directory."""
        cfg = self.cfg
        src: dict[str, Any] = {"source": cfg.source, "text_field": cfg.text_field, "splits": {}}
        if cfg.source == "hf":
            src.update(hf_path=cfg.hf_path, hf_name=cfg.hf_name)
        for split, s in self.sources.items():
            src["splits"][split] = {"shards": s.n_shards, "description": s.description,
                                    "files": [{"path": str(Path(f).resolve()), "bytes": Path(f).stat().st_size}
                                              for f in s.files] if s.files is not None else None}
            if cfg.source == "hf":
                src["splits"][split]["hf_split"] = cfg.train_split if split == "train" else cfg.val_split
        budget = {"max_tokens": self.opts.max_tokens, "val_max_tokens": self.opts.val_max_tokens}
        if self.opts.max_tokens or self.opts.val_max_tokens:  # what the budget counts
            budget.update(mode=cfg.mode, seq_len=cfg.seq_len)
        if self.opts.max_tokens:  # the order it takes the documents in
            budget.update(seed=cfg.seed, shuffle_block=cfg.shuffle_block)
        t = self.tok
        return {"format": FORMAT, "version": VERSION, "source": src, "dtype": self.dtype.name, "budget": budget,
                "tokenizer": {"name": t.name, "sha256": t.sha256, "eos_token": cfg.eos_token, "eos_id": t.eos_id,
                              "pad_token": cfg.pad_token, "pad_id": t.pad_id, "id_limit": t.id_limit}}

    # -- the directory ---------------------------------------------------------------------------
    def _claim(self) -> Any:
        """Lock ``out`` (one preparer at a time) and check that it is new, empty or this preparation's."""
        root, plan_path = self.root, self.root / PLAN
        if root.exists() and not root.is_dir():
            raise UserError(f"out={self.opts.out} is a file; pretokenize writes a directory")
        if root.is_dir() and not plan_path.exists():
            others = sorted(p.name for p in root.iterdir() if p.name != ".lock" and not (
                p.name in SPLITS and p.is_dir() and not any(p.iterdir())))
            if others:
                raise UserError(f"out={self.opts.out} is not empty ({', '.join(others[:3])}"
                                f"{', ...' if len(others) > 3 else ''}) and holds no {PLAN}: pretokenize writes into "
                                "a new or empty directory, or continues one it wrote")
        with guarded_write(root):
            root.mkdir(parents=True, exist_ok=True)
        lock = open(root / ".lock", "a+")  # noqa: SIM115 -- held until the preparation ends
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise UserError(f"out={self.opts.out} is being written by another prepare-data pretokenize; wait for it "
                            "or choose another out=") from None
        try:
            if plan_path.exists():
                diff = _first_difference(_identity(_load_json(plan_path)), _identity(self.plan))
                if diff is not None:
                    raise UserError(f"out={self.opts.out} holds shards of another preparation ({diff}); choose "
                                    "another out= or delete that directory")
            else:
                atomic_write_text(plan_path, canonical_json(self.plan))
            atomic_write_text(root / TOKENIZER, self.tok.tokenizer.to_str())
            for split in self.sources:
                (root / split).mkdir(exist_ok=True)
                for p in (root / split).glob(".*.tmp-*"):  # temporaries of a killed run
                    p.unlink(missing_ok=True)
        except BaseException:
            lock.close()
            raise
        return lock

    def _complete(self) -> bool:
        """Whether ``out`` already holds this preparation, complete, every shard checking out (CRC-32s
        included); an incomplete or damaged one loses its manifest until it is finished again."""
        manifest = self.root / SHARDS_MANIFEST
        if not manifest.exists():
            return False
        self.log(f"{self.opts.out} is complete; checking every shard (sizes and CRC-32)")
        try:
            m = _load_json(manifest)
            for split, info in m["splits"].items():
                for rec in info["shards"]:
                    check_files(self.root, split, rec, self.dtype)
                    check_crc(self.root, split, rec)
            self.splits = {split: info["shards"] for split, info in m["splits"].items()}
            return set(self.splits) == set(self.sources)
        except (DataError, KeyError, TypeError) as e:
            self.log(f"{self.opts.out}: {e}; writing what is missing or damaged again")
            manifest.unlink()
            return False

    def _existing(self, split: str, index: int) -> dict[str, Any] | None:
        """The committed record of a shard whose files check out (sizes, CRC-32), else None (and the
        shard's leftovers are removed)."""
        files = shard_files(self.root, split, index)
        if not files[2].exists():
            for p in files[:2]:
                p.unlink(missing_ok=True)
            return None
        try:
            rec = _load_json(files[2])
            check_files(self.root, split, rec, self.dtype)
            check_crc(self.root, split, rec)
            return rec
        except (DataError, KeyError, TypeError):
            for p in files:
                p.unlink(missing_ok=True)
            return None

    # -- one split ----------------------------------------------------------------------------------
    def _order(self, split: str) -> tuple[list[int], int]:
        """The order in which a budget takes the split's shards, and the block it cuts at: train in the
        stream's own order (epoch 0 of data.seed, whole blocks of data.shuffle_block documents), so that
        the shards hold exactly what a run reads first; validation in file order, as it is read."""
        n = self.sources[split].n_shards
        if split == "train" and self.budgets[split] is not None:
            return shard_order(n, self.cfg.seed, 0), self.cfg.shuffle_block
        return list(range(n)), 1

    def _split(self, split: str, run: Callable[..., cf.Future], cancel: Any, counts: np.ndarray) -> list[dict[str, Any]]:
        src, budget = self.sources[split], self.budgets[split]
        n = src.n_shards
        order, block = self._order(split)
        records: dict[int, dict[str, Any]] = {}
        for i in range(n):
            if (rec := self._existing(split, i)) is not None:
                records[i] = rec
        kept = len(records)
        weights = ([float(Path(f).stat().st_size) for f in src.files] if src.files is not None else [1.0] * n)
        todo = [i for i in range(n) if i not in records]
        left = None if budget is None else budget - sum(self._units(split, r) for r in records.values())
        progress = _Progress(split, self.progress_style, counts.reshape(-1, 3)[:n], weights, todo, left)
        if kept:
            self.log(f"pretokenize {split}: {kept} of {n} shards already written and verified")
        futures: dict[cf.Future, int] = {}
        final: list[dict[str, Any]] = []
        j = nxt = prefix = 0  # in `order`: next shard to finalize, next to consider submitting; budget units before j
        cut: int | None = None
        try:
            while cut is None and j < n:
                while j < n and order[j] in records and cut is None:  # finalize in order
                    rec = records[order[j]]
                    if budget is not None and not rec["complete"] and self._units(split, rec) < budget - prefix:
                        del records[order[j]]  # a part of a shard that is not enough (cannot happen: bounds only shrink)
                        continue
                    if budget is not None and self._units(split, rec) >= budget - prefix:
                        rec, cut = self._cut(split, rec, budget - prefix, block), j
                    prefix += self._units(split, rec) if budget is not None else 0
                    final.append(rec)
                    j += 1
                if cut is not None or j == n:
                    break
                nxt = max(nxt, j)
                while len(futures) < self.workers and nxt < n:
                    i = order[nxt]
                    if i not in records and i not in futures.values():
                        stop = None
                        if budget is not None:  # an upper bound of what this shard can still need
                            stop = budget - prefix - sum(self._units(split, records[order[k]]) for k in range(j, nxt)
                                                         if order[k] in records)
                            if stop <= 0:
                                break
                        futures[run(split, i, stop, block)] = i
                    nxt += 1
                if not futures and order[j] not in records:
                    raise AssertionError(f"pretokenize: shard {order[j]} of {split} was never submitted")
                done, _ = cf.wait(list(futures), timeout=0.25, return_when=cf.FIRST_COMPLETED)
                for fut in done:
                    i = futures.pop(fut)
                    rec = fut.result()  # a worker's error (DataError, StorageError, ...) stops here
                    if rec is not None:
                        records[i] = rec
                        progress.shard_done(i, rec)
                progress.show()
        finally:
            for i in order[len(final):]:  # in-flight shards past the cut (or all, after an error) stop
                cancel[i] = 1
            for fut in futures:
                fut.cancel()
            cf.wait(list(futures))
            progress.show(force=True)
            progress.close()
        for i in order[len(final):]:  # shards past the budget (this run's or an earlier one's): not part of it
            for p in shard_files(self.root, split, i):
                p.unlink(missing_ok=True)
        if budget is not None and cut is None:
            self.log(f"pretokenize {split}: the source holds {prefix:,} budget tokens, fewer than "
                     f"{'max_tokens' if split == 'train' else 'val_max_tokens'}={budget:,}: all of it was prepared")
        return sorted(final, key=lambda r: r["index"])

    def _units(self, split: str, rec: dict[str, Any]) -> int:
        if "units" not in rec:
            rec["units"] = int(budget_units(self._lengths(split, rec), split, self.cfg.mode, self.cfg.seq_len).sum())
        return rec["units"]

    def _lengths(self, split: str, rec: dict[str, Any]) -> np.ndarray:
        return np.diff(np.fromfile(shard_files(self.root, split, rec["index"])[1], dtype=OFFSETS_DTYPE))

    def _cut(self, split: str, rec: dict[str, Any], need: int, block: int) -> dict[str, Any]:
        """The shard where the budget is reached: its documents up to the one reaching ``need`` units, or
        to the end of that one's block of ``block`` documents."""
        lens = self._lengths(split, rec)
        keep = int(np.searchsorted(np.cumsum(budget_units(lens, split, self.cfg.mode, self.cfg.seq_len)), need)) + 1
        keep = -(-keep // block) * block
        if keep >= rec["docs"]:
            return rec
        tokens_path, offsets_path, record_path = shard_files(self.root, split, rec["index"])
        offsets = np.fromfile(offsets_path, dtype=OFFSETS_DTYPE)[: keep + 1]
        tokens = np.fromfile(tokens_path, dtype=self.dtype, count=int(offsets[-1]))
        out = {**rec, "docs": keep, "nonempty_docs": int((lens[:keep] > 0).sum()), "tokens": int(offsets[-1]),
               "max_id": int(tokens.max()) if tokens.size else -1, "complete": False,
               "units": int(budget_units(lens[:keep], split, self.cfg.mode, self.cfg.seq_len).sum()),
               "crc32": {"tokens": zlib.crc32(tokens.tobytes()), "offsets": zlib.crc32(offsets.tobytes())}}
        record_path.unlink()  # uncommitted while its files change
        for path, arr in ((tokens_path, tokens), (offsets_path, offsets)):
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            with guarded_write(tmp, arr.nbytes):
                arr.tofile(tmp)
            os.replace(tmp, path)
        atomic_write_text(record_path, canonical_json(out))
        return out

    # -- all of it ------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        t0 = time.monotonic()
        lock = self._claim()
        try:
            if self._complete():
                manifest = self._manifest(self.splits)
                atomic_write_text(self.root / SHARDS_MANIFEST, canonical_json(manifest))
                self._summary(manifest, time.monotonic() - t0)
                return manifest
            style = self.opts.progress
            self.progress_style = ("bar" if sys.stderr.isatty() else "lines") if style == "auto" else style
            n_todo = sum(s.n_shards for s in self.sources.values())
            num_proc = self.opts.num_proc or _cores()
            self.workers = max(1, min(num_proc, n_todo))
            args = (asdict(self.cfg), self.tok.tokenizer.to_str(), self.tok.eos_id, self.tok.pad_id, str(self.root),
                    self.dtype.name)
            splits: dict[str, list[dict[str, Any]]] = {}
            sizes = [max(1, self.sources[s].n_shards if s in self.sources else 0) for s in SPLITS]
            if self.workers == 1:  # in this process: a thread, so that progress and Ctrl-C stay here
                counters: list[Any] = [np.zeros(3 * n, np.int64) for n in sizes]
                cancel: list[Any] = [np.zeros(n, np.int8) for n in sizes]
                worker = _Worker(*args, counters=counters, cancel=cancel, ppid=None)
                pool: cf.Executor = cf.ThreadPoolExecutor(1)
                submit: Callable[..., cf.Future] = lambda *a: pool.submit(worker.shard, *a)  # noqa: E731
            else:
                ctx = mp.get_context("spawn")  # no fork of a process holding threads and the tokenizer's pool
                counters = [ctx.RawArray("q", 3 * n) for n in sizes]  # shared memory, no locks or semaphores
                cancel = [ctx.RawArray("b", n) for n in sizes]
                threads = max(1, _cores() // self.workers)
                pool = cf.ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_init_process,
                                              initargs=((*args, counters, cancel), threads))
                submit = lambda *a: pool.submit(_run_shard, *a)  # noqa: E731
            with pool:
                for split in self.sources:
                    k = SPLITS.index(split)
                    splits[split] = self._split(split, submit, cancel[k], np.frombuffer(counters[k], np.int64))
            manifest = self._manifest(splits)
            atomic_write_text(self.root / SHARDS_MANIFEST, canonical_json(manifest))
            fsync_dir(self.root)
        finally:
            lock.close()  # the file stays: removing it would let two later preparers lock different files
        self._summary(manifest, time.monotonic() - t0)
        return manifest

    def _manifest(self, splits: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
        out = {**self.plan, "data": {"name": self.cfg.name, "tokenizer": self.cfg.tokenizer,
                                     **{k: getattr(self.cfg, k) for k in INHERITED}}, "splits": {}}
        for split, recs in splits.items():
            n_src = self.sources[split].n_shards
            out["splits"][split] = {"shards": recs, "docs": sum(r["docs"] for r in recs),
                                    "tokens": sum(r["tokens"] for r in recs), "source_shards": n_src,
                                    "whole": len(recs) == n_src and all(r["complete"] for r in recs)}
        return out

    def _summary(self, m: dict[str, Any], seconds: float) -> None:
        size = sum(f.stat().st_size for split in m["splits"] for f in (self.root / split).iterdir()
                   if f.suffix in (".tokens", ".offsets"))
        parts = [f"{split} {len(s['shards'])} shards, {s['docs']:,} documents, {s['tokens']:,} tokens"
                 + ("" if s["whole"] else " (part of the source)") for split, s in m["splits"].items()]
        self.log(f"wrote {self.opts.out}: {'; '.join(parts)}; {m['dtype']}, {size / 2**20:,.1f} MiB of shards "
                 f"({size / max(1, sum(s['tokens'] for s in m['splits'].values())):.2f} bytes/token); {seconds:.1f} s")
        self.log(f"train with: data=shards data.path={self.opts.out}")


def _load_json(path: Path) -> dict[str, Any]:
    try:
        out = json.loads(path.read_text())
        assert isinstance(out, dict)
        return out
    except (OSError, ValueError, AssertionError) as e:
        raise DataError(f"{path} is unreadable ({type(e).__name__})") from e


def _identity(plan: dict[str, Any]) -> dict[str, Any]:
    """What must match for a rerun to continue a directory: all of the plan but the tokenizer's name
    (its hash identifies it: t5-base from the hub and a copy of its tokenizer.json are the same)."""
    return {**plan, "tokenizer": {k: v for k, v in plan.get("tokenizer", {}).items() if k != "name"}}


def _first_difference(old: Any, new: Any, key: str = "") -> str | None:
    """'KEY: OLD there, NEW now' for the first value that differs, or None."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new)):
            d = _first_difference(old.get(k), new.get(k), f"{key}.{k}" if key else k)
            if d is not None:
                return d
        return None
    if old != new:
        short = lambda v: (str(v)[:60] + "...") if len(str(v)) > 60 else str(v)  # noqa: E731
        return f"{key}: {short(old)} there, {short(new)} now"
    return None


def pretokenize(cfg: DataConfig, opts: Options, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Write (or finish) the token shards of ``cfg``'s source into ``opts.out``; returns the manifest."""
    return Pretokenizer(cfg, opts, log or (lambda m: print(m, file=sys.stderr, flush=True))).run()
