"""Data: document sources, tokenizers, token shards, the resumable token stream and the validation set."""

from lrpretrain.data.pipeline import (
           Batch,
           Position,
           TokenStream,
           ValidationSet,
           has_validation,
           open_documents,
)
from lrpretrain.data.tokenizer import TokenizerInfo, load_tokenizer

__all__ = ["Batch", "Position", "TokenStream", "ValidationSet", "TokenizerInfo", "has_validation", "load_tokenizer",
           "open_documents"]
