"""``lrpretrain eval run.dir=PATH tasks=[...]``: downstream tasks through EleutherAI's
lm-evaluation-harness (``pip install 'lrpretrain[eval]'``), on the run exported to transformers.

The checkpoint is exported (:mod:`lrpretrain.export`) into a temporary directory, which lm-eval's own
``HFLM`` loads, in this process, exactly as it loads any Hugging Face model: tokenization,
batching, log-likelihoods and generation are the harness's, so the figures are comparable with
published lm-eval numbers (one reason not to write our own ``LM`` over the native model). The
price: methods without a LLaMA form (CoLA, CR-Net) are refused, as by ``export``.

Tasks are lm-eval's names (``hellaswag``, ``arc_easy``, ...; their datasets come from the HF hub) or
tasks of your own: ``include_path=DIR`` adds every task YAML in DIR (a local JSONL file through
``dataset_path: json`` and ``dataset_kwargs: {data_files: ...}`` needs no network).

Results go into the run directory: one line per task appended to ``eval_results.jsonl`` (checkpoint
step, task, few-shot, limit, every metric with its stderr), which ``lrpretrain report`` shows, and
lm-eval's whole results (configs, versions, sample counts) in ``eval/step_<N>-<time>.json``.
Nothing else of the run is touched, so it takes no lock.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from lrpretrain.errors import ConfigError, UserError
from lrpretrain.export import export_run
from lrpretrain.paths import unshadow_pypi_kernels
from lrpretrain.report import EVAL_FILE
from lrpretrain.storage import atomic_write_text, guarded_write
from lrpretrain.train.trained import load_trained

KEYS = ("run.dir, tasks, checkpoint, num_fewshot, limit, batch_size, device, dtype, include_path, "
        "bootstrap_iters, seed")


@dataclass
class EvalRun:
    dir: str = "???"


@dataclass
class EvalConfig:
    run: EvalRun
    tasks: list[str] = field(default_factory=list)
    checkpoint: str = "latest"  # latest | step_N | PATH to a checkpoint directory
    num_fewshot: int | None = None  # None: each task's default
    limit: float | None = None  # at most this many documents per task (a fraction if < 1); None: all
    batch_size: str = "8"  # an integer, or auto (lm-eval finds the largest that fits, on CUDA)
    device: str = "auto"  # auto (cuda if available) | cpu | cuda
    dtype: str = "auto"  # the export's dtype: auto (as the checkpoint stores it) | fp32 | bf16
    include_path: str | None = None  # a folder of task YAMLs of your own
    bootstrap_iters: int = 100000  # lm-eval's bootstrap for the stderr of non-mean metrics
    seed: int = 0


def parse_overrides(args: list[str]) -> EvalConfig:
    schema = OmegaConf.structured(EvalConfig(run=EvalRun()))
    try:
        obj = OmegaConf.to_object(OmegaConf.merge(schema, OmegaConf.from_dotlist(args)))
    except Exception as e:
        raise ConfigError(f"bad eval arguments {args}: {str(e).splitlines()[0]}; keys: {KEYS}") from e
    assert isinstance(obj, EvalConfig)
    if not obj.tasks:
        raise ConfigError("tasks=[] is invalid: name at least one lm-eval task, e.g. tasks=[hellaswag,arc_easy]")
    if not (obj.batch_size == "auto" or obj.batch_size.isdigit() and int(obj.batch_size) > 0):
        raise ConfigError(f"batch_size={obj.batch_size} is invalid: a positive integer or auto")
    if obj.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device={obj.device} is invalid: allowed: auto, cpu, cuda")
    if obj.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda is invalid: no CUDA device is available; allowed here: auto, cpu")
    if obj.limit is not None and obj.limit <= 0:
        raise ConfigError(f"limit={obj.limit} is invalid: must be > 0 (a count, or a fraction below 1)")
    if obj.num_fewshot is not None and obj.num_fewshot < 0:
        raise ConfigError(f"num_fewshot={obj.num_fewshot} is invalid: must be >= 0")
    if obj.include_path is not None and not Path(obj.include_path).is_dir():
        raise ConfigError(f"include_path={obj.include_path} is not a directory")
    return obj


def _lm_eval():
    """lm_eval's modules (imported on first use: seconds to import, and an optional dependency)."""
    unshadow_pypi_kernels()  # transformers imports the PyPI package `kernels`
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ConfigError(f"lrpretrain eval needs lm-evaluation-harness with its HF backend ({e}): "
                          "pip install 'lrpretrain[eval]'") from e
    return lm_eval, HFLM, TaskManager


def metrics_of(task_results: dict[str, Any]) -> dict[str, float]:
    """lm-eval's ``{"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": ...}`` -> ``{"acc": 0.5,
    "acc_stderr": 0.1}`` (a filter other than ``none`` stays in the name: ``exact_match,flexible``)."""
    out = {}
    for key, value in task_results.items():
        if "," not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        metric, filt = key.split(",", 1)
        out[metric if filt == "none" else f"{metric},{filt}"] = float(value)
    return out


def evaluate_run(e: EvalConfig) -> list[dict[str, Any]]:
    """Export, evaluate, record; returns the records appended to ``eval_results.jsonl``."""
    lm_eval, HFLM, TaskManager = _lm_eval()
    run_dir = Path(e.run.dir)
    manager = TaskManager(include_path=e.include_path) if e.include_path else TaskManager()
    unknown = [t for t in e.tasks if not manager.match_tasks([t])]
    if unknown:
        raise ConfigError(f"tasks={list(e.tasks)}: unknown lm-eval task(s) {', '.join(unknown)}; see `lm-eval ls tasks`, "
                          "or add your own task YAMLs with include_path=DIR")
    run = load_trained(run_dir, e.checkpoint)
    device = "cuda" if e.device == "cuda" or (e.device == "auto" and torch.cuda.is_available()) else "cpu"
    tmp = Path(tempfile.mkdtemp(prefix="lrpretrain-eval-"))
    try:
        hf_dir = tmp / "hf"
        export_run(run, hf_dir, e.dtype)
        del run.model  # the harness loads its own copy
        for name in ("lm_eval", "transformers"):  # the harness's INFO lines would bury the progress bars
            logging.getLogger(name).setLevel(logging.WARNING)
        lm = HFLM(pretrained=str(hf_dir), tokenizer=str(hf_dir), device=device, dtype="auto",
                  batch_size=e.batch_size if e.batch_size == "auto" else int(e.batch_size))
        try:
            results = lm_eval.simple_evaluate(
                model=lm, tasks=list(e.tasks), num_fewshot=e.num_fewshot, limit=e.limit, task_manager=manager,
                log_samples=False, bootstrap_iters=e.bootstrap_iters, random_seed=e.seed, numpy_random_seed=e.seed,
                torch_random_seed=e.seed, fewshot_random_seed=e.seed)
        except (ConnectionError, OSError, ValueError) as err:  # e.g. a hub dataset offline
            raise UserError(f"lm-eval failed on tasks={list(e.tasks)}: {type(err).__name__}: "
                            f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return record(run_dir, run.step, run.checkpoint, e, results or {})


def record(run_dir: Path, step: int, checkpoint: Path, e: EvalConfig, results: dict[str, Any]) -> list[dict[str, Any]]:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    version = results.get("versions", {})
    records = []
    for task, res in results.get("results", {}).items():
        records.append({"time": stamp, "step": step, "checkpoint": str(checkpoint), "task": task,
                        "num_fewshot": results.get("n-shot", {}).get(task, e.num_fewshot), "limit": e.limit,
                        "n_samples": (results.get("n-samples", {}).get(task) or {}).get("effective"),
                        "version": version.get(task), "metrics": metrics_of(res)})
    lines = "".join(json.dumps(r) + "\n" for r in records)
    full = json.dumps({k: v for k, v in results.items() if k != "samples"}, indent=1, default=str) + "\n"
    detail = run_dir / "eval" / f"step_{step}-{stamp.replace(':', '')}.json"
    path = run_dir / EVAL_FILE
    with guarded_write(path, len(lines), after="the evaluation's results were not recorded"):
        detail.parent.mkdir(exist_ok=True)
        atomic_write_text(detail, full)
        with open(path, "a") as f:
            f.write(lines)
    return records


def format_records(records: list[dict[str, Any]]) -> str:
    lines = []
    for r in records:
        shown = ", ".join(f"{k} {v:.4f}" + (f" ± {r['metrics'][k + '_stderr']:.4f}" if f"{k}_stderr" in r["metrics"] else "")
                          for k, v in r["metrics"].items() if not k.endswith("_stderr"))
        lines.append(f"{r['task']} (step {r['step']}, {r['num_fewshot']}-shot, {r['n_samples']} docs): {shown}")
    return "\n".join(lines)


def main(args: list[str]) -> int:
    e = parse_overrides(args)
    records = evaluate_run(e)
    print(format_records(records))
    print(f"eval: results appended to {Path(e.run.dir) / EVAL_FILE}", file=sys.stderr)
    return 0
