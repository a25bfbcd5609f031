"""Document sources: one split of a corpus as an ordered list of shards of text documents.

Every source goes through the same code path, HF ``datasets`` streaming: ``data=c4`` streams
``allenai/c4`` from the hub; ``data=jsonl`` and ``data=embedded`` stream local gzipped JSONL files in
C4's schema with the ``json`` builder. A shard is one file (``IterableDataset.shard`` with as many
pieces as the dataset has files), so a position in a source is (shard, document index).
"""

from __future__ import annotations

import glob
import gzip
import os
from collections.abc import Iterator
from pathlib import Path

from lrpretrain.config import DataConfig
from lrpretrain.data_recipes import embedded
from lrpretrain.errors import DataError

_UTF8_CHECK_BYTES = 8 << 20  # decode this much of each local file up front; the rest is checked while reading


def _expand(patterns: list[str], key: str) -> list[str]:
    files: list[str] = []
    for pat in patterns:
        hits = sorted(glob.glob(os.path.expanduser(pat))) if glob.has_magic(pat) else [os.path.expanduser(pat)]
        if not hits:
            raise DataError(f"{key}: no file matches {pat!r}")
        files += hits
    return files


def check_local_file(path: str) -> None:
    """Exists, is not empty, and starts with valid UTF-8: otherwise one DataError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file {path} does not exist")
    opener = gzip.open if p.suffix == ".gz" else open
    try:
        with opener(p, "rb") as f:
            head = f.read(_UTF8_CHECK_BYTES)
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read data file {path}: {e}") from e
    if not head.strip():
        raise DataError(f"data file {path} is empty")
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        if len(head) < _UTF8_CHECK_BYTES or e.start < len(head) - 4:  # not a character cut at the boundary
            raise DataError(f"data file {path} is not valid UTF-8 (byte {e.start}: {e.reason})") from e


class DocumentSource:
    """The documents of one split (``train`` or ``validation``) of the configured corpus."""

    def __init__(self, cfg: DataConfig, split: str):
        self.cfg = cfg
        self.split = split
        self.text_field = cfg.text_field
        if cfg.source == "hf":
            hf_split = cfg.train_split if split == "train" else cfg.val_split
            self.files: list[str] | None = None
            self.description = f"{cfg.hf_path}" + (f" ({cfg.hf_name})" if cfg.hf_name else "") + f" split {hf_split}"
            self._ds = self._load(lambda: _hf_load(cfg.hf_path, cfg.hf_name, split=hf_split, streaming=True))
        else:
            if cfg.source == "embedded":
                root = embedded.prepare()
                files = sorted(str(p) for p in root.glob(f"{'train' if split == 'train' else 'validation'}-*.jsonl.gz"))
            else:
                patterns = cfg.files if split == "train" else cfg.val_files
                files = _expand(list(patterns), "data.files" if split == "train" else "data.val_files")
            for f in files:
                check_local_file(f)
            self.files = files
            self.description = ", ".join(files) if len(files) <= 3 else f"{files[0]} ... ({len(files)} files)"
            self._ds = self._load(lambda: _hf_load("json", data_files=files, split="train", streaming=True))
        self.n_shards = self._ds.n_shards
        if self.files is not None:
            assert self.n_shards == len(self.files), (self.n_shards, self.files)

    def _load(self, fn):
        try:
            return fn()
        except Exception as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if self.files is None:
                raise DataError(f"cannot stream {self.description} from the Hugging Face hub ({type(e).__name__}: {msg}); "
                                "offline? use data=jsonl data.files=[...] with local files in C4's schema") from e
            raise DataError(f"cannot open data files {self.description}: {msg}") from e

    def shard_name(self, shard: int) -> str:
        return self.files[shard] if self.files is not None else f"{self.description} shard {shard}"

    def iter_shard(self, shard: int, skip: int = 0) -> Iterator[str]:
        """Texts of ``shard`` in file order, after the first ``skip`` documents."""
        ds = self._ds.shard(num_shards=self.n_shards, index=shard, contiguous=True)
        if skip:
            ds = ds.skip(skip)
        name = self.shard_name(shard)
        it = iter(ds)
        while True:
            try:
                record = next(it)
            except StopIteration:
                return
            except UnicodeDecodeError as e:
                raise DataError(f"data file {name} is not valid UTF-8 ({e.reason})") from e
            except DataError:
                raise
            except Exception as e:
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise DataError(f"cannot read {name}: {msg}") from e
            if self.text_field not in record:
                raise DataError(f"{name}: a record has no field {self.text_field!r} (data.text_field); "
                                f"fields: {', '.join(record)}")
            yield record[self.text_field]


def _hf_load(*args, **kwargs):
    from datasets import load_dataset
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    return load_dataset(*args, **kwargs)
