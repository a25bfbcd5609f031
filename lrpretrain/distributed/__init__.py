"""Distribution strategies (``distributed.strategy``): :mod:`lrpretrain.distributed.strategy`.

The process-group helpers live in :mod:`lrpretrain.comm` (below every part that uses them); they are
re-exported here for callers that import them from ``lrpretrain.distributed``.
"""

from __future__ import annotations

from lrpretrain.comm import (
    all_gather_object,
    all_reduce_sum,
    barrier,
    broadcast_object,
    is_distributed,
    local,
    on_main,
    rank,
    shard_rows,
    world_size,
)

__all__ = ["all_gather_object", "all_reduce_sum", "barrier", "broadcast_object", "is_distributed", "local", "on_main",
           "rank", "shard_rows", "world_size"]
