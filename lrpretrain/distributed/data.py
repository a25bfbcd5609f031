"""How ranks read the training data (``distributed.data``).

``global`` (default): every rank runs the one global stream (rank 0 of 1) with ``micro_batch_size x
world_size`` rows per micro-step and keeps rows ``[rank x mb, (rank + 1) x mb)``. The rows of an
update are then exactly the rows a single process reads for that update, whatever the world size,
and the stream position saved in a checkpoint is global: a run resumes exactly on another world
size (as long as ``trainer.batch_size`` stays the same). Cost: every rank tokenizes and packs all
the text (world_size x the tokenizer work of ``sharded``); with pre-tokenized or cheaply tokenized
data that is negligible next to a training step, for small models on many GPUs it may not be.

``sharded``: each rank reads its own shards (:class:`~lrpretrain.data.TokenStream` with its rank and
world size), so no rank tokenizes another's text. The update's rows differ from a single process's,
and a checkpoint's per-rank positions resume only on the same world size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lrpretrain.data.pipeline import Batch


class RankSlice:
    """This rank's rows of the global stream's micro-steps (``distributed.data=global``)."""

    def __init__(self, stream: Any, rank: int, micro_batch_size: int):
        self.stream, self.rank, self.mb = stream, rank, micro_batch_size

    def __iter__(self) -> RankSlice:
        return self

    def __next__(self) -> Batch:
        b = next(self.stream)
        rows = slice(self.rank * self.mb, (self.rank + 1) * self.mb)
        labels = b.labels[rows]
        return Batch(b.input_ids[rows], labels, int((labels != -100).sum()), b.position)

    def state_dict(self) -> dict[str, int]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.stream.load_state_dict(state)

    def close(self) -> None:
        self.stream.close()


def stream_for(mode: str, make: Callable[[int, int, int], Any], micro_batch_size: int, rank: int, world: int) -> Any:
    """The training stream of ``rank``; ``make(micro_batch_size, rank, world_size)`` builds a TokenStream."""
    if world == 1 or mode == "sharded":
        return make(micro_batch_size, rank, world)
    return RankSlice(make(micro_batch_size * world, 0, 1), rank, micro_batch_size)
