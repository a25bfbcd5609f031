"""Atomic, verified checkpoints.

Layout of ``<run.dir>/checkpoints/``::

    step_<N>/model.safetensors   the model's weights (as prepared by the method); or, from FSDP2,
    step_<N>/dcp/                model and optimizer sharded by torch.distributed.checkpoint
    step_<N>/train_state.pt      optimizer, schedule, counters, data position, RNGs, method state
                                 (plain tensors and Python scalars: loads with weights_only=True)
    step_<N>/config.yaml         the resolved config of the run
    step_<N>/meta.json           step and the size and CRC32 of every file above; written last
    latest                       "step_<N>", replaced atomically after the directory is in place

A checkpoint is written into ``.tmp-step_<N>-<host>-<pid>`` next to its final place, every file
fsynced, then renamed into place, so a crash at any moment leaves either the complete new checkpoint or
none (plus a temporary directory that the next start removes) and never harms the previous one. A
write that fails (a full disk, a quota, a read-only filesystem) removes the temporary directory at once
and stops the run with one line (:class:`~lrpretrain.errors.StorageError`); the earlier checkpoints
and ``latest`` stay as they were.
"""

from lrpretrain.checkpoint.checkpointer import FILES, FORMAT, SHARDED, Checkpointer, Loaded
from lrpretrain.checkpoint.files import tensor_bytes, unshared
from lrpretrain.checkpoint.sharded import load_sharded_model

__all__ = ["FILES", "FORMAT", "SHARDED", "Checkpointer", "Loaded", "load_sharded_model", "tensor_bytes", "unshared"]
