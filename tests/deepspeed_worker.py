"""Runs several ``lrpretrain train`` jobs in one process group (one torchrun launch for many runs).

    torchrun --nproc_per_node=2 tests/deepspeed_worker.py JOBS.json

JOBS.json: a list of argument lists for ``lrpretrain`` (``["train", ...]``). Each job's exit code,
error lines and log (stderr) go to ``<JOBS>.rank<r>.json``. DeepSpeed starts once (its import and the group
setup are most of a launch's cost); each job builds and tears down its own engine.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import time
from pathlib import Path

import torch.distributed as dist

from lrpretrain.cli.main import main

import lrp_test_plugins  # noqa: F401  (registers test_nan_forward)


def run(jobs_file: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    results = []
    for args in json.loads(jobs_file.read_text()):
        err = io.StringIO()
        t0 = time.perf_counter()
        with contextlib.redirect_stderr(err):
            code = main(args)
        errors = [ln for ln in err.getvalue().splitlines() if ln.startswith("lrpretrain: error:")]
        results.append({"args": args, "code": code, "errors": errors, "log": err.getvalue()[-20000:],
                        "seconds": round(time.perf_counter() - t0, 2)})
        sys.stderr.write(err.getvalue())
        dist.barrier()
    Path(f"{jobs_file}.rank{rank}.json").write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    run(Path(sys.argv[1]))
