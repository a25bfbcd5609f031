"""Metrics: console progress, ``<run.dir>/metrics.jsonl`` and Weights & Biases.

One JSON object per logged step (``step``, ``loss``, ``lr``, ``tokens``, ``peak_mem_mb``, ..., plus
``val_loss`` and ``val_ppl`` on eval steps). On resume, records past the checkpoint's step (written after it and lost
with the crash) move to ``metrics.rewound.jsonl``, so ``metrics.jsonl`` always describes the one
run that continues, and nothing is deleted.

A record that cannot be written (a full disk, a quota, a read-only filesystem) stops the run with one
line, as a failed checkpoint does: training on would leave holes in the record of the run (and, with a
full disk, the next checkpoint would fail anyway), while stopping loses nothing that resuming from the
last checkpoint does not recompute exactly. The W&B mirror is written by wandb's own service process:
its failures are wandb's to report.
"""

from lrpretrain.metrics.jsonl import read_records, rewind_jsonl
from lrpretrain.metrics.logger import MetricsLogger
from lrpretrain.metrics.memory import peak_memory_mb, reset_peak_memory

__all__ = ["MetricsLogger", "peak_memory_mb", "read_records", "reset_peak_memory", "rewind_jsonl"]
