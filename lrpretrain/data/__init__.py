"""Data: document sources, tokenizers, the resumable token stream and the validation set."""

from lrpretrain.data.pipeline import Batch, Position, TokenStream, ValidationSet
from lrpretrain.data.tokenizer import TokenizerInfo, load_tokenizer

__all__ = ["Batch", "Position", "TokenStream", "ValidationSet", "TokenizerInfo", "load_tokenizer"]
