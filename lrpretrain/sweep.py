"""Sweeps: ``lrpretrain train -m method=full,galore model=llama_tiny ...`` through Hydra's multirun.

Hydra's basic sweeper expands the overrides into jobs (the cartesian product of comma-separated values)
and a Hydra launcher runs them: ``launcher=local`` (the default) is Hydra's basic launcher, one job after
another in this process; ``launcher=slurm`` is hydra-submitit-launcher's ``submitit_slurm``, a SLURM job
array (``pip install 'lrpretrain[slurm]'``; settings in conf/launcher/slurm.yaml, ``hydra.launcher.*``).

Each job trains in ``<hydra.sweep.dir>/<its swept overrides>`` (``sweeps/abl/method=galore,optim.lr=0.01``):
the name comes from the overrides that vary, so running the same sweep again with the same
``hydra.sweep.dir`` finds every job's directory. A job whose ``sweep_job.json`` says it completed, at this
``trainer.max_steps`` and with the same config, is skipped; any other is resumed from its newest
checkpoint (``trainer.resume=auto``). A directory that holds a run with a different config fails its job
with the run directory's error: nothing is overwritten. At the end ``summary.jsonl`` and ``summary.md`` (one
row per job: method, overrides, status, final validation perplexity, tokens/s, peak memory) are written into
the sweep directory; ``lrpretrain sweep-summary DIR`` writes them again from the job directories.

Pre-emption: a job stopped by SIGTERM/SIGUSR1/SIGUSR2 saves a checkpoint (the trainer's handlers) and the
sweep starts no further job in this process. Under submitit the SLURM notice is SIGUSR2: after the trainer
has saved, submitit's own handler requeues the job, which then resumes.
"""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lrpretrain.comm import rank
from lrpretrain.config import conf_dir, job_slug, register_resolver, to_dictconfig, world_size_from_env
from lrpretrain.errors import ConfigError, UserError
from lrpretrain.metrics import read_records
from lrpretrain.report import JOB_FILE, sweep_jobs, throughput, write_report
from lrpretrain.storage import atomic_write_text
from lrpretrain.train import train
from lrpretrain.train.assemble import compose, register_configs, to_typed, validate_config
from lrpretrain.train.lock import RunLock
from lrpretrain.train.rundir import config_differences

SUMMARY_FIELDS = ("job", "method", "overrides", "status", "step", "val_loss", "val_ppl", "tokens_per_s",
                  "peak_mem_mb", "run_dir", "error")
_stopped_by: str | None = None  # a signal pre-empted a job of this process: start no further job


# ---------------------------------------------------------------------------------------------
# Job directories


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_job_file(run_dir: Path, info: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / JOB_FILE, json.dumps({**info, "updated": time.strftime("%Y-%m-%dT%H:%M:%S")},
                                                     indent=1) + "\n")


def _finished(run_dir: Path, max_steps: int, resolved: DictConfig) -> dict[str, Any] | None:
    """The job file of a run that completed at least ``max_steps`` with this config, else None."""
    info = _read_json(run_dir / JOB_FILE)
    stored = run_dir / "config.yaml"
    if not info or info.get("status") != "complete" or int(info.get("step") or 0) < max_steps or not stored.exists():
        return None
    if config_differences(OmegaConf.load(stored), resolved):  # type: ignore[arg-type]
        return None  # train() explains the difference and refuses the directory
    return info


def _check_same_run(run_dir: Path, typed, resolved: DictConfig) -> None:
    """Refuse a job directory holding a run with another config before building anything (train()
    would refuse it too, after loading data and model)."""
    stored = run_dir / "config.yaml"
    if not stored.exists() or typed.run.overwrite or typed.trainer.resume != "auto":
        return
    diffs = config_differences(OmegaConf.load(stored), resolved)  # type: ignore[arg-type]
    if diffs:
        shown = "; ".join(diffs[:3]) + (f"; and {len(diffs) - 3} more" if len(diffs) > 3 else "")
        raise ConfigError(f"run.dir {run_dir} holds a run with a different config ({shown}); run the sweep in "
                          "another hydra.sweep.dir, or with the config of the sweep that made it")


# ---------------------------------------------------------------------------------------------
# One job (Hydra's task function; runs in this process or in a SLURM job through submitit)


def _submitit_environment():
    """The submitit job environment when this process is a submitit job, else None."""
    if "SUBMITIT_EXECUTOR" not in os.environ:
        return None
    import submitit

    return submitit.JobEnvironment()


def job(cfg: DictConfig) -> dict[str, Any]:
    """Train one job of the sweep in its own run directory; returns its record (never raises for a
    failed run: the failure is recorded so that the sweep goes on and the summary shows it)."""
    global _stopped_by
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    info: dict[str, Any] = {"job": run_dir.name, "num": hc.job.num, "swept": hc.job.override_dirname,
                            "overrides": list(hc.overrides.task), "run_dir": str(run_dir)}
    if _stopped_by is not None:
        print(f"sweep: job {info['job']} not started: the sweep was stopped by {_stopped_by}", file=sys.stderr)
        return {**info, "status": "pending"}
    env = _submitit_environment()
    if env is not None and env.num_tasks > 1:  # one task per device: torch.distributed's env:// variables
        import submitit

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    is_rank0 = rank() == 0
    if is_rank0:
        print(f"sweep: job #{info['num']} {info['swept'] or '(no swept overrides)'} in {run_dir}", file=sys.stderr)

    result: dict[str, Any] = {}
    ours = False  # whether the job file is this job's to write (not when the directory holds another run)
    lock: RunLock | None = None
    try:
        cfg = copy.deepcopy(cfg)
        OmegaConf.set_readonly(cfg, False)
        cfg.run.dir = str(run_dir)
        typed = to_typed(cfg)
        validate_config(typed, world_size_from_env())
        resolved = to_dictconfig(typed)
        if is_rank0:  # the job's directory is this process's until the job file is written (train() holds it too)
            lock = RunLock(run_dir, typed.run.break_lock).acquire()
        done = _finished(run_dir, typed.trainer.max_steps, resolved)
        if done is not None:
            print(f"sweep: job {info['job']} already complete (step {done['step']}): skipped", file=sys.stderr)
            if lock is not None:
                lock.release()
            return {**info, "status": "complete", "step": done["step"], "skipped": True}
        _check_same_run(run_dir, typed, resolved)
        ours = True
        if is_rank0:
            _write_job_file(run_dir, {**info, "status": "running", "max_steps": typed.trainer.max_steps})
        result = train(typed, resolved)
        status = result.get("status", "failed")
    except UserError as e:
        status, result = "failed", {"error": " ".join(str(e).split())}
        print(f"sweep: job {info['job']} failed: {result['error']}", file=sys.stderr)
    except Exception as e:  # a bug: keep the traceback, record it, let the other jobs run
        traceback.print_exc()
        status, result = "failed", {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"}
    record = {**info, "status": status, "step": result.get("step"), "error": result.get("error"),
              "signal": result.get("signal")}
    try:
        if is_rank0 and ours:
            _write_job_file(run_dir, record)
    finally:
        if lock is not None:
            lock.release()
    if status == "preempted":
        _stopped_by = result.get("signal") or "a signal"
        if env is not None and result.get("signal") == "SIG" + env.USR_SIG:
            # The checkpoint is saved: hand the notice back to submitit, whose handler (restored when
            # training returned) requeues this job; the requeued job resumes from the checkpoint.
            signal.raise_signal(getattr(signal, "SIG" + env.USR_SIG))
    return record


# ---------------------------------------------------------------------------------------------
# The sweep


def _parse(overrides: list[str]):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create().parse_overrides(overrides)
    except Exception as e:
        raise ConfigError(f"cannot parse overrides {overrides}: {str(e).strip().splitlines()[0]}") from e


def _validate_jobs(task_overrides: list, launcher: str, swept: set[str]) -> list[list[str]]:
    """Compose and check every job's config before any job starts; returns each job's overrides."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    try:
        jobs = BasicSweeper.split_arguments(task_overrides, None)[0]
    except Exception as e:
        raise ConfigError(f"cannot expand the sweep: {str(e).strip().splitlines()[0]}") from e
    for overrides in jobs:
        try:
            typed = to_typed(compose([*overrides, "run.dir=."]))
            if launcher in ("local", "basic"):  # elsewhere the devices and world size are the job's, not ours
                validate_config(typed, 1)
            else:
                for section in (typed.model, typed.data, typed.optim, typed.trainer, typed.eval, typed.method):
                    if hasattr(section, "validate"):
                        section.validate()
        except ConfigError as e:
            name = " ".join(o for o in overrides if o.split("=", 1)[0].lstrip("+~") in swept)
            raise ConfigError(f"sweep job '{name}': {e}") from e
    return jobs


def slurm_script(launcher_cfg: dict[str, Any], n_jobs: int) -> str:
    """The sbatch script hydra-submitit-launcher would submit for ``n_jobs`` jobs (a job array when
    n_jobs > 1), built by submitit's own SlurmExecutor from the ``hydra.launcher`` config; nothing is
    submitted. submitit insists on finding ``srun`` on PATH, as on any SLURM login node."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    params = {k: v for k, v in launcher_cfg.items() if k != "_target_"}
    folder = params.pop("submitit_folder")
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm",
                                     slurm_max_num_timeout=params.pop("max_num_timeout"))
    shared = set(OmegaConf.structured(BaseQueueConf).keys())  # the launcher's cluster-independent keys
    executor.update_parameters(**{k if k in shared else f"slurm_{k}": v for k, v in params.items()})
    slurm = executor._executor  # submitit.SlurmExecutor
    if n_jobs > 1:
        slurm.parameters["map_count"] = n_jobs  # as submitit does for an array of jobs
    return slurm._make_submission_file_text(slurm._submitit_command_str, "dry-run")


def run_sweep(overrides: list[str], dry_run: bool = False) -> int:
    """``lrpretrain train -m ...``: run every job, write the summary; exit status 1 if a job failed.
    ``dry_run``: list the jobs and their directories (and the sbatch script for launcher=slurm)."""
    global _stopped_by
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from hydra.types import RunMode

    _stopped_by = None
    register_configs()
    parsed = _parse(overrides)
    task = [o for o in parsed if not o.key_or_group.startswith(("hydra.", "hydra/"))]
    if "run.dir" in {o.key_or_group for o in task}:
        raise ConfigError("run.dir cannot be set in a sweep: each job runs in <hydra.sweep.dir>/<its swept "
                          "overrides>; set hydra.sweep.dir=PATH")
    custom_sweeper = any(o.key_or_group == "hydra/sweeper" for o in parsed)
    launcher = next((str(o.value()) for o in task if o.key_or_group == "launcher"), "local")
    launcher = next((str(o.value()) for o in parsed if o.key_or_group == "hydra/launcher"), launcher)
    if launcher in ("slurm", "submitit_slurm"):
        try:
            import hydra_plugins.hydra_submitit_launcher  # noqa: F401
        except ImportError as e:
            raise ConfigError("launcher=slurm needs hydra-submitit-launcher: pip install 'lrpretrain[slurm]'") from e
    swept = {o.key_or_group for o in task if o.is_sweep_override()}
    jobs = None if custom_sweeper else _validate_jobs(task, launcher, swept)

    sweep_dir_given = next((str(o.value()) for o in parsed if o.key_or_group == "hydra.sweep.dir"), None)
    sweep_dir = Path(sweep_dir_given or f"sweeps/{time.strftime('%Y%m%d-%H%M%S')}")
    fixed = sorted({o.key_or_group for o in task if not o.is_sweep_override()})
    # Job directories are named by the swept overrides only (Hydra's override_dirname without the fixed keys).
    extra = [f"hydra.job.config.override_dirname.exclude_keys=[{','.join(fixed)}]"]
    if sweep_dir_given is None:
        extra.append(f"hydra.sweep.dir={sweep_dir}")
    all_overrides = [*overrides, *extra]

    register_resolver()
    GlobalHydra.instance().clear()
    returns: list = []
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base=None, job_name="lrpretrain"):
            hydra = GlobalHydra.instance().hydra
            assert hydra is not None
            try:
                if dry_run:
                    cfg = hydra.compose_config("config", all_overrides, run_mode=RunMode.MULTIRUN,
                                               with_log_configuration=False)
                    _print_plan(cfg, jobs, fixed, launcher)
                    return 0
                print(f"sweep: {len(jobs) if jobs is not None else 'the sweeper’s'} jobs in {sweep_dir} "
                      f"(launcher={launcher}); run it again with hydra.sweep.dir={sweep_dir} to skip the finished "
                      "jobs and resume the others", file=sys.stderr)
                returns = hydra.multirun(config_name="config", task_function=job, overrides=all_overrides)
            except HydraException as e:
                raise ConfigError(f"sweep: {str(e).strip().splitlines()[0]}") from e
    finally:
        GlobalHydra.instance().clear()
        if not dry_run and sweep_dir.exists():
            rows = write_summary(sweep_dir)
            print(f"sweep summary ({sweep_dir / 'summary.md'}):\n{markdown_table(rows)}")
    records = [r.return_value for batch in returns for r in batch]
    return 1 if any(r.get("status") == "failed" for r in records) else 0


def _print_plan(cfg: DictConfig, jobs: list[list[str]] | None, fixed: list[str], launcher: str) -> None:
    sweep_dir = Path(cfg.hydra.sweep.dir)
    print(f"sweep dir: {sweep_dir}\nlauncher: {launcher}")
    if jobs is None:
        print("jobs: chosen by the sweeper while it runs")
        return
    print(f"{len(jobs)} jobs:")
    for overrides in jobs:
        swept = sorted(o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in fixed)
        print(f"  {sweep_dir / job_slug(','.join(swept))}: {' '.join(overrides)}")
    if launcher in ("slurm", "submitit_slurm"):
        launcher_cfg = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
        print("sbatch script (submitit):\n" + slurm_script(launcher_cfg, len(jobs)))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Summary


def job_row(run_dir: Path) -> dict[str, Any]:
    """One summary row from a job directory: its job file, config.yaml and metrics.jsonl."""
    info = _read_json(run_dir / JOB_FILE) or {}
    recs = read_records(run_dir / "metrics.jsonl")
    steps = [r for r in recs if r.get("loss") is not None]
    vals = [r for r in recs if r.get("val_ppl") is not None]
    method = None
    if (run_dir / "config.yaml").exists():
        method = OmegaConf.select(OmegaConf.load(run_dir / "config.yaml"), "method.name")
    tokens_per_s = throughput(recs)[0]  # the logged steps without the first (warm-up)
    peaks = [r["peak_mem_mb"] for r in steps if r.get("peak_mem_mb") is not None]
    return {
        "job": run_dir.name, "method": method, "overrides": info.get("swept", ""),
        "status": info.get("status", "unknown"), "step": steps[-1]["step"] if steps else info.get("step"),
        "val_loss": vals[-1]["val_loss"] if vals else None, "val_ppl": vals[-1]["val_ppl"] if vals else None,
        "tokens_per_s": tokens_per_s, "peak_mem_mb": max(peaks) if peaks else None,
        "run_dir": str(run_dir), "error": info.get("error"),
    }


def summarize(sweep_dir: Path) -> list[dict[str, Any]]:
    """Rows for every job directory (one holding a ``sweep_job.json``) of the sweep, in job order."""
    return [job_row(d) for d in sweep_jobs(sweep_dir)]


def _cell(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}" if math.isfinite(v) else str(v)
    return str(v).replace("|", "\\|")


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = "| job | method | overrides | status | step | val ppl | tokens/s | peak mem (MiB) |\n" \
           "|---|---|---|---|---:|---:|---:|---:|\n"
    body = "".join(
        f"| {_cell(r['job'])} | {_cell(r['method'])} | {_cell(r['overrides'])} | {_cell(r['status'])}"
        f"{' (' + _cell(r['error']) + ')' if r.get('error') else ''} | {_cell(r['step'])} | {_cell(r['val_ppl'])} | "
        f"{_cell(r['tokens_per_s'], 0)} | {_cell(r['peak_mem_mb'], 0)} |\n" for r in rows)
    return head + body


def write_summary(sweep_dir: Path) -> list[dict[str, Any]]:
    """Write ``summary.jsonl`` and ``summary.md`` into the sweep directory, and the report beside them
    (:mod:`lrpretrain.report`: report.md and its plots); returns the rows."""
    rows = summarize(sweep_dir)
    atomic_write_text(Path(sweep_dir) / "summary.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    note = ("Peak memory: CUDA max allocated on a GPU, peak resident set size of the process on the CPU. "
            "tokens/s: the logged steps after the first.\n")
    atomic_write_text(Path(sweep_dir) / "summary.md", f"# Sweep {sweep_dir}\n\n{markdown_table(rows)}\n{note}")
    runs = [d for d in sweep_jobs(sweep_dir) if (d / "config.yaml").exists()]  # a job refused before training has none
    if runs:
        try:
            write_report(runs, Path(sweep_dir), [Path(sweep_dir)])
        except UserError as e:  # e.g. no matplotlib: the summary stands without the report
            print(f"sweep: warning: the report was not written: {e}", file=sys.stderr)
    return rows
