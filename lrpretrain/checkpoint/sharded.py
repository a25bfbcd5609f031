"""Reading a sharded (FSDP2, ``dcp/``) checkpoint's full model in one process (generation, export)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from lrpretrain.checkpoint.checkpointer import SHARDED


def load_sharded_model(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The full model weights of a sharded (FSDP2, ``dcp/``) checkpoint, read in one process."""
    checkpoint_id = str(Path(path) / SHARDED)
    meta = dcp.FileSystemReader(checkpoint_id).read_metadata().state_dict_metadata
    model = {k.removeprefix("model."): torch.empty(m.size, dtype=m.properties.dtype)
             for k, m in meta.items() if k.startswith("model.") and isinstance(m, TensorStorageMetadata)}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({"model": model}, checkpoint_id=checkpoint_id, no_dist=True)
    return model
