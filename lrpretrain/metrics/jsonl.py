"""``metrics.jsonl``: reading it back; on resume, records past the checkpoint move to ``metrics.rewound.jsonl``."""

from __future__ import annotations

import json
import os
from pathlib import Path

from lrpretrain.storage import guarded_write

STOPPED = ("the run stops rather than train on with holes in metrics.jsonl; the checkpoints are intact: continue "
           "with trainer.resume=auto once it is fixed")

def read_records(path: Path) -> list[dict]:
    """The JSON objects of a JSONL file, one per line; a line cut by a crash is skipped; [] if absent."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def rewind_jsonl(path: Path, step: int) -> int:
    """Keep the records with ``step <= step``; move later ones to ``<name>.rewound.jsonl``."""
    if not path.exists():
        return 0
    keep, moved = [], []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec_step = json.loads(line).get("step", 0)
        except ValueError:  # a line cut by the crash
            moved.append(line)
            continue
        (keep if rec_step <= step else moved).append(line)
    rewound = path.with_suffix(".rewound.jsonl")
    if moved:
        with guarded_write(rewound, sum(len(m) + 1 for m in moved), STOPPED), open(rewound, "a") as f:
            f.write("\n".join(moved) + "\n")
    tmp = path.with_name(path.name + ".tmp")
    text = "".join(line + "\n" for line in keep)
    with guarded_write(path, len(text), STOPPED):
        try:
            tmp.write_text(text)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return len(moved)
