"""Several ``lrpretrain train`` runs in one torchrun launch (tests/test_distributed.py).

    torchrun --standalone --nproc_per_node=2 tests/dist_worker.py JOBS.json OUT_DIR

JOBS.json: a list of {"name": ..., "args": [...], "env": {...}} (a training run; env: set for it) or {"name": ..., "init": [...]}
(build the model with the strategy from these overrides and compare its full weights on rank 0
with a single-process build: the result is the largest absolute difference). One process group serves every run (a torchrun
start costs more than a tiny run). Each rank writes OUT_DIR/rank<R>.json: per job, the exit code
and the CLI's error lines. ``method=test_kill`` is full-rank training whose rank
$LRP_TEST_KILL_RANK SIGKILLs itself after update $LRP_TEST_KILL_AT (and rank $LRP_TEST_SIGNAL_RANK
sends itself SIGUSR1 after update $LRP_TEST_SIGNAL_AT).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch.distributed as dist  # noqa: E402

from lrpretrain.methods import Method, StepContext, register_method  # noqa: E402

import lrp_test_plugins  # noqa: E402, F401  (registers the test methods)


@register_method("test_kill")
class Kill(Method):
    def after_step(self, ctx: StepContext) -> None:
        if str(ctx.step) == os.environ.get("LRP_TEST_KILL_AT") and \
                str(dist.get_rank()) == os.environ.get("LRP_TEST_KILL_RANK", "1"):
            os.kill(os.getpid(), signal.SIGKILL)
        if str(ctx.step) == os.environ.get("LRP_TEST_SIGNAL_AT") and \
                str(dist.get_rank()) == os.environ.get("LRP_TEST_SIGNAL_RANK", "1"):
            os.kill(os.getpid(), signal.SIGUSR1)  # pre-emption seen by this rank only


def init_difference(overrides: list[str]) -> float | None:
    import torch

    from lrpretrain.distributed.strategy import build_strategy
    from lrpretrain.methods import get_method
    from lrpretrain.train import load_config, model_builder

    cfg, _ = load_config(overrides)
    strategy = build_strategy(cfg)
    strategy.setup(torch.device("cpu"))
    plugin = get_method(cfg.method.name)(cfg.method, cfg.model)
    full = strategy.model_state(strategy.build_model(model_builder(cfg, plugin)))
    if dist.get_rank() != 0:
        return None
    ref = model_builder(cfg, get_method(cfg.method.name)(cfg.method, cfg.model))("cpu").state_dict()
    assert sorted(full) == sorted(ref), (sorted(full), sorted(ref))
    return max(float((full[k].float() - ref[k].float()).abs().max()) for k in ref)


def main() -> None:
    from lrpretrain.cli.main import main as cli

    jobs = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    dist.init_process_group("gloo")
    results = {}
    for job in jobs:
        if "init" in job:
            results[job["name"]] = {"init_max_diff": init_difference(job["init"])}
            continue
        err = io.StringIO()
        os.environ.update(job.get("env", {}))
        with contextlib.redirect_stderr(err):
            code = cli(["train", *job["args"]])
        for key in job.get("env", {}):
            del os.environ[key]
        lines = [ln for ln in err.getvalue().splitlines() if ln.startswith("lrpretrain: error:")]
        results[job["name"]] = {"code": code, "errors": lines}
        if code not in (0, 2):
            sys.stderr.write(err.getvalue())
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
