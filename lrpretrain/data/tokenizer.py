"""Tokenizers: the embedded corpus's BPE, any tokenizer.json, or a hub tokenizer such as t5-base."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from tokenizers import Tokenizer

from lrpretrain.data_recipes import embedded
from lrpretrain.errors import DataError


@dataclass
class TokenizerInfo:
    tokenizer: Tokenizer
    name: str
    eos_id: int
    pad_id: int
    vocab_needed: int  # 1 + the largest id that text can produce (model.vocab_size must cover it)

    @cached_property
    def sha256(self) -> str:
        """Identity of the tokenizer: the SHA-256 of its canonical JSON (``Tokenizer.to_str()``: model,
        vocabulary, merges, normalizer, pre-tokenizer, added tokens). The same tokenizer loaded from
        a file, the hub or a copy hashes the same; any change to how text is encoded changes it."""
        return hashlib.sha256(self.tokenizer.to_str().encode()).hexdigest()

    @property
    def id_limit(self) -> int:
        """1 + the largest id encoding can produce (added tokens included)."""
        return 1 + max(max(self.tokenizer.get_vocab(with_added_tokens=True).values(), default=0),
                       self.eos_id, self.pad_id)

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without special tokens (EOS is added by the row builder)."""
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def _load(spec: str) -> tuple[Tokenizer, str]:
    if spec == "embedded":
        path = embedded.prepare() / "tokenizer.json"
        return Tokenizer.from_file(str(path)), str(path)
    p = Path(spec).expanduser()
    if p.exists() or spec.startswith(("/", ".", "~")) or spec.endswith(".json"):
        if p.is_dir():
            p = p / "tokenizer.json"
        if not p.is_file():
            raise DataError(f"tokenizer file {p} does not exist")
        try:
            return Tokenizer.from_file(str(p)), str(p)
        except Exception as e:
            raise DataError(f"cannot read tokenizer {p}: {str(e).splitlines()[0]}") from e
    # a hub id: t5-base as in the papers (the fast tokenizer's tokenizer.json on the HF hub)
    try:
        return Tokenizer.from_pretrained(spec), spec
    except Exception as e:
        raise DataError(f"cannot load tokenizer '{spec}' from the Hugging Face hub ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); offline? pass data.tokenizer=PATH/tokenizer.json") from e


def load_tokenizer(spec: str, eos_token: str, pad_token: str) -> TokenizerInfo:
    tok, name = _load(spec)
    eos_id, pad_id = tok.token_to_id(eos_token), tok.token_to_id(pad_token)
    if eos_id is None:
        raise DataError(f"tokenizer {name} has no token data.eos_token={eos_token!r}")
    if pad_id is None:
        raise DataError(f"tokenizer {name} has no token data.pad_token={pad_token!r}")
    base_ids = tok.get_vocab(with_added_tokens=False).values()
    vocab_needed = 1 + max(max(base_ids, default=0), eos_id, pad_id)
    return TokenizerInfo(tok, name, eos_id, pad_id, vocab_needed)
