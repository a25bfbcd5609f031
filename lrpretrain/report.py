"""``lrpretrain report PATH... [--out DIR]``: a table and plots comparing runs.

Each PATH is a run directory (``config.yaml`` + ``metrics.jsonl``), a sweep directory (its jobs, in
job order), or a folder whose subdirectories are runs. Written into ``--out`` (default: the sweep
directory when PATH is one sweep, else ``./report``); only these files are replaced:

- ``report.md``: one row per run (method, model, parameters / trainable, tokens, final and best
  validation perplexity, tokens/s, step time, peak memory measured and estimated, status), the
  downstream results that ``lrpretrain eval`` recorded, and the plots;
- ``report.json``: the same figures at full precision;
- ``val_ppl.png`` (validation perplexity vs tokens, log scale), ``train_loss.png`` (training loss vs
  tokens: raw faint, smoothed bold), ``throughput.png`` (tokens/s per run), ``memory.png`` (peak
  memory per run, the analytic estimate of :mod:`lrpretrain.estimate` beside the measured value).

One colour per method in every plot; several runs of one method differ by line style (or hatch).
The figures are read from ``metrics.jsonl``: tokens/s over the logged steps after the first
(warm-up), weighted by step time, as the sweep summary counts it; step time is their mean.
matplotlib draws headless (the Agg canvas, without pyplot), imported on first use.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from lrpretrain.errors import UserError
from lrpretrain.estimate import estimate
from lrpretrain.methods import get_method
from lrpretrain.metrics import read_records
from lrpretrain.options import split_options
from lrpretrain.storage import atomic_write_text, guarded_write, pid_alive
from lrpretrain.train.assemble import from_yaml
from lrpretrain.train.lock import LOCK_NAME

JOB_FILE = "sweep_job.json"  # what a sweep writes into each job's directory (lrpretrain/sweep.py)
EVAL_FILE = "eval_results.jsonl"  # what lrpretrain eval appends to a run's directory
PLOTS = ("val_ppl.png", "train_loss.png", "throughput.png", "memory.png")
MiB = 2**20


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        out = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return out if isinstance(out, dict) else None


# -- figures of one run -----------------------------------------------------------------------------


def throughput(records: list[dict[str, Any]]) -> tuple[float | None, float | None]:
    """(tokens/s, mean step time in s) over the logged training steps after the first (warm-up)."""
    timed = [r for r in records if r.get("loss") is not None and r.get("step", 0) > 1 and r.get("step_time")]
    seconds = sum(r["step_time"] for r in timed)
    if seconds <= 0:
        return None, None
    return sum(r["tokens_per_s"] * r["step_time"] for r in timed) / seconds, seconds / len(timed)


@dataclass
class RunReport:
    name: str
    run_dir: str
    method: str | None = None
    model: str | None = None
    params: float | None = None
    trainable_params: float | None = None
    step: int | None = None
    max_steps: int | None = None
    tokens: int | None = None
    final_val_ppl: float | None = None
    best_val_ppl: float | None = None
    tokens_per_s: float | None = None
    step_time: float | None = None
    peak_mem_mb: float | None = None
    estimated_peak_mb: float | None = None
    memory_kind: str | None = None  # what peak_mem_mb measured: CUDA allocator or the process's RSS
    status: str = "unknown"
    train: list[tuple[int, float]] = field(default_factory=list)  # (tokens, loss)
    val: list[tuple[int, float]] = field(default_factory=list)  # (tokens, val ppl)
    downstream: dict[str, dict[str, Any]] = field(default_factory=dict)  # task -> newest lm-eval record


def _status(run_dir: Path, step: int | None, max_steps: int | None) -> str:
    job = _read_json(run_dir / JOB_FILE)
    if job and job.get("status"):
        return str(job["status"])
    holder = _read_json(run_dir / LOCK_NAME)
    if holder and (holder.get("host") != socket.gethostname() or
                   (isinstance(holder.get("pid"), int) and pid_alive(holder["pid"], holder.get("pid_start")))):
        return "running"
    if step is not None and max_steps is not None and step >= max_steps:
        return "complete"
    return f"stopped at step {step or 0}" if max_steps is None else f"stopped at step {step or 0}/{max_steps}"


def _estimate_mb(run_dir: Path, on_cuda: bool) -> float | None:
    """The analytic peak for the run's config, where it describes what was measured (one process)."""
    try:
        cfg = from_yaml(run_dir / "config.yaml")
        if cfg.distributed.strategy != "single":
            return None  # per-rank memory of a sharded/replicated run depends on the world size, not recorded
        precision = None if cfg.trainer.precision != "auto" else ("bf16" if on_cuda else "fp32")
        return estimate(cfg, precision=precision).peak / MiB
    except (UserError, NotImplementedError, OSError):
        return None


def _downstream(run_dir: Path) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for rec in read_records(run_dir / EVAL_FILE):
        if isinstance(rec.get("task"), str):
            out[rec["task"]] = rec  # the newest record of each task
    return out


def read_run(run_dir: Path, name: str | None = None) -> RunReport:
    records = read_records(run_dir / "metrics.jsonl")
    train = [r for r in records if r.get("loss") is not None]
    val = [r for r in records if r.get("val_ppl") is not None]
    rep = RunReport(name=name or run_dir.name, run_dir=str(run_dir))
    raw = OmegaConf.load(run_dir / "config.yaml") if (run_dir / "config.yaml").exists() else None
    if raw is not None:
        rep.method = OmegaConf.select(raw, "method.name")
        rep.model = OmegaConf.select(raw, "model.name")
        rep.max_steps = OmegaConf.select(raw, "trainer.max_steps")
        try:
            cfg = from_yaml(run_dir / "config.yaml")
            cost = get_method(cfg.method.name)(cfg.method, cfg.model).cost(cfg.model, cfg.data.seq_len)
            rep.params, rep.trainable_params = cost["params"], cost["trainable_params"]
        except UserError:
            pass
    if train:
        rep.step, rep.tokens = train[-1]["step"], train[-1]["tokens"]
    if val:
        rep.final_val_ppl = val[-1]["val_ppl"]
        rep.best_val_ppl = min(r["val_ppl"] for r in val)
    rep.tokens_per_s, rep.step_time = throughput(records)
    peaks = [r["peak_mem_mb"] for r in train if r.get("peak_mem_mb") is not None]
    rep.peak_mem_mb = max(peaks) if peaks else None
    on_cuda = any("tflops" in r for r in train)  # the trainer logs TFLOP/s on CUDA only
    rep.memory_kind = "CUDA max allocated" if on_cuda else "peak RSS of the process"
    if raw is not None:
        rep.estimated_peak_mb = _estimate_mb(run_dir, on_cuda)
    rep.status = _status(run_dir, rep.step, rep.max_steps)
    rep.train = [(r["tokens"], r["loss"]) for r in train]
    rep.val = [(r.get("tokens", 0), r["val_ppl"]) for r in val]
    rep.downstream = _downstream(run_dir)
    return rep


# -- finding runs ---------------------------------------------------------------------------------------


def _is_run(path: Path) -> bool:
    return (path / "config.yaml").is_file() and (path / "metrics.jsonl").is_file()


def sweep_jobs(sweep_dir: Path) -> list[Path]:
    """The job directories of a sweep (each holds a ``sweep_job.json``), in job order."""
    dirs = [p.parent for p in Path(sweep_dir).glob(f"*/{JOB_FILE}")]
    order = {d: ((_read_json(d / JOB_FILE) or {}).get("num", math.inf), d.name) for d in dirs}
    return sorted(dirs, key=order.__getitem__)


def find_runs(paths: list[Path]) -> list[Path]:
    runs: list[Path] = []
    for p in paths:
        if not p.is_dir():
            raise UserError(f"report: {p} is not a directory; give run directories or sweep directories")
        if _is_run(p):
            found = [p]
        else:
            jobs = sweep_jobs(p)
            found = jobs or sorted(d for d in p.iterdir() if d.is_dir() and _is_run(d))
        if not found:
            raise UserError(f"report: {p} holds no run (no config.yaml + metrics.jsonl) and no sweep job; "
                            "give run directories or sweep directories")
        runs.extend(d for d in found if d not in runs)
    return runs


def _names(runs: list[Path]) -> list[str]:
    """Each run's directory name, with its parent's where two runs share one."""
    names = [r.name for r in runs]
    return [f"{r.parent.name}/{r.name}" if names.count(r.name) > 1 else r.name for r in runs]


# -- the table ------------------------------------------------------------------------------------------


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}" if math.isfinite(v) else str(v)
    if isinstance(v, int):
        return f"{v:,}"
    return str(v).replace("|", "\\|")


def _millions(v: float | None) -> str:
    return "-" if v is None else f"{v / 1e6:,.2f}"


def table(reports: list[RunReport]) -> str:
    head = ("| run | method | model | params (M) | trainable (M) | tokens | final val ppl | best val ppl | "
            "tokens/s | step time (s) | peak mem (MiB) | estimated peak (MiB) | status |\n"
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n")
    rows = "".join(
        f"| {_fmt(r.name)} | {_fmt(r.method)} | {_fmt(r.model)} | {_millions(r.params)} | "
        f"{_millions(r.trainable_params)} | {_fmt(r.tokens)} | {_fmt(r.final_val_ppl)} | {_fmt(r.best_val_ppl)} | "
        f"{_fmt(r.tokens_per_s, 0)} | {_fmt(r.step_time, 3)} | {_fmt(r.peak_mem_mb, 0)} | "
        f"{_fmt(r.estimated_peak_mb, 0)} | {_fmt(r.status)} |\n" for r in reports)
    return head + rows


def downstream_table(reports: list[RunReport]) -> str:
    rows = []
    for r in reports:
        for task, rec in sorted(r.downstream.items()):
            for metric, value in sorted((rec.get("metrics") or {}).items()):
                if metric.endswith("_stderr") or not isinstance(value, (int, float)):
                    continue
                err = (rec.get("metrics") or {}).get(f"{metric}_stderr")
                shown = _fmt(float(value), 4) + (f" ± {float(err):.4f}" if isinstance(err, (int, float)) else "")
                rows.append(f"| {_fmt(r.name)} | {_fmt(r.method)} | {_fmt(task)} | {_fmt(metric)} | {shown} | "
                            f"{_fmt(rec.get('num_fewshot'))} | {_fmt(rec.get('step'))} |\n")
    if not rows:
        return ""
    return ("| run | method | task | metric | value | few-shot | checkpoint step |\n"
            "|---|---|---|---|---:|---:|---:|\n" + "".join(rows))


# -- the plots --------------------------------------------------------------------------------------------


def _matplotlib():
    """matplotlib and its Figure class (imported on first use, ~1 s). Figures are made without pyplot:
    they render with the Agg canvas whatever backend the process has, and leave no global state."""
    try:
        import matplotlib
        from matplotlib.figure import Figure
    except ImportError as e:
        raise UserError(f"the report's plots need matplotlib ({e}): pip install matplotlib") from e
    return matplotlib, Figure


def method_colours(reports: list[RunReport]) -> dict[str, Any]:
    """One colour per method (sorted names), the same in every plot of the report."""
    matplotlib, _ = _matplotlib()
    methods = sorted({r.method or "?" for r in reports})
    cmap = matplotlib.colormaps["tab10" if len(methods) <= 10 else "tab20"]
    return {m: cmap(i % cmap.N) for i, m in enumerate(methods)}


def smooth(values: list[float], window: int) -> list[float]:
    """Exponential moving average over about ``window`` points, bias-corrected (it starts at the data)."""
    beta = 1.0 - 1.0 / max(window, 1)
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**i) if beta > 0 else v)
    return out


def smoothing_window(n: int) -> int:
    """Points the training-loss EMA averages over: a tenth of the logged steps, at most 100."""
    return min(100, max(1, n // 10))


_STYLES = ["-", "--", ":", "-."]
_HATCHES = ["", "//", "..", "xx"]


def _labels(reports: list[RunReport]) -> list[str]:
    """The method's name, with the run's where a method has several runs."""
    per_method: dict[str, int] = {}
    for r in reports:
        per_method[r.method or "?"] = per_method.get(r.method or "?", 0) + 1
    return [f"{r.method or '?'}" if per_method[r.method or "?"] == 1 else f"{r.method or '?'} ({r.name})"
            for r in reports]


def _variants(reports: list[RunReport]) -> list[int]:
    seen: dict[str, int] = {}
    out = []
    for r in reports:
        out.append(seen.get(r.method or "?", 0))
        seen[r.method or "?"] = out[-1] + 1
    return out


def _tokens_axis(ax) -> None:
    from matplotlib.ticker import EngFormatter

    ax.xaxis.set_major_formatter(EngFormatter())
    ax.set_xlabel("training tokens")
    ax.grid(True, which="both", alpha=0.3)


def plot_all(reports: list[RunReport], out: Path) -> list[str]:
    """Write the four PNGs into ``out``; returns their names."""
    _, Figure = _matplotlib()

    colours = method_colours(reports)
    labels, variants = _labels(reports), _variants(reports)
    colour = [colours[r.method or "?"] for r in reports]
    names = [r.name for r in reports]
    written = []

    def figure(height: float = 5.0):
        fig = Figure(figsize=(8, height))
        return fig, fig.subplots()

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        written.append(name)

    # validation perplexity vs tokens
    fig, ax = figure()
    for r, lab, c, v in zip(reports, labels, colour, variants):
        if r.val:
            x, y = zip(*r.val)
            ax.plot(x, y, _STYLES[v % 4], color=c, marker="o", markersize=3, linewidth=1.8, label=lab)
    ax.set_yscale("log")
    ax.set_ylabel("validation perplexity (log scale)")
    ax.set_title("Validation perplexity vs training tokens")
    _tokens_axis(ax)
    _legend(ax)
    save(fig, "val_ppl.png")

    # training loss vs tokens
    fig, ax = figure()
    for r, lab, c, v in zip(reports, labels, colour, variants):
        if r.train:
            x, y = zip(*r.train)
            ax.plot(x, y, color=c, alpha=0.25, linewidth=0.8)
            ax.plot(x, smooth(list(y), smoothing_window(len(y))), _STYLES[v % 4], color=c, linewidth=2, label=lab)
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title("Training loss vs training tokens\n(faint: every logged step; bold: exponential moving average)",
                 fontsize=11)
    _tokens_axis(ax)
    _legend(ax)
    save(fig, "train_loss.png")

    # tokens/s per run
    fig, ax = figure(max(3.0, 1.2 + 0.45 * len(reports)))
    ys = list(range(len(reports)))[::-1]
    vals = [r.tokens_per_s or 0.0 for r in reports]
    bars = ax.barh(ys, vals, color=colour, hatch=None)
    for b, v, r in zip(bars, variants, reports):
        b.set_hatch(_HATCHES[v % 4])
        ax.annotate("n/a" if r.tokens_per_s is None else f"{r.tokens_per_s:,.0f}", (b.get_width(), b.get_y() + b.get_height() / 2),
                    xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
    ax.set_yticks(ys, names)
    ax.set_xlabel("training throughput (tokens/s)")
    ax.set_title("Throughput per run (logged steps after the first)")
    ax.set_xlim(0, max(vals + [1.0]) * 1.15)
    ax.grid(True, axis="x", alpha=0.3)
    _method_legend(ax, colours, reports)
    save(fig, "throughput.png")

    # peak memory per run, estimate beside the measurement
    fig, ax = figure(max(3.0, 1.2 + 0.6 * len(reports)))
    h = 0.38
    gib = max([(r.peak_mem_mb or 0) for r in reports] + [(r.estimated_peak_mb or 0) for r in reports]) >= 2048
    unit, div = ("GiB", 1024.0) if gib else ("MiB", 1.0)
    for y, r, c in zip(ys, reports, colour):
        for off, value, hatch, alpha in ((h / 2, r.peak_mem_mb, "", 1.0), (-h / 2, r.estimated_peak_mb, "//", 0.45)):
            if value is None:
                continue
            b = ax.barh(y + off, value / div, height=h, color=c, alpha=alpha, hatch=hatch, edgecolor="black",
                        linewidth=0.5)[0]
            ax.annotate(f"{value / div:,.1f}", (b.get_width(), b.get_y() + h / 2), xytext=(3, 0),
                        textcoords="offset points", va="center", fontsize=8)
    ax.set_yticks(ys, names)
    ax.set_xlabel(f"peak memory ({unit})")
    kinds = sorted({r.memory_kind for r in reports if r.peak_mem_mb is not None and r.memory_kind})
    ax.set_title("Peak memory per run: measured (solid) and estimated (hatched)\n"
                 f"measured = {'; '.join(kinds) or 'n/a'}", fontsize=10)
    ax.grid(True, axis="x", alpha=0.3)
    top = max([(r.peak_mem_mb or 0) / div for r in reports] + [(r.estimated_peak_mb or 0) / div for r in reports] + [1e-9])
    ax.set_xlim(0, top * 1.18)
    _method_legend(ax, colours, reports)
    save(fig, "memory.png")
    return written


def _legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(title="method", fontsize=8, title_fontsize=9, loc="best")


def _method_legend(ax, colours: dict[str, Any], reports: list[RunReport]) -> None:
    from matplotlib.patches import Patch

    used = sorted({r.method or "?" for r in reports})
    ax.legend(handles=[Patch(color=colours[m], label=m) for m in used], title="method", fontsize=8,
              title_fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


# -- writing ----------------------------------------------------------------------------------------------


def write_report(runs: list[Path], out: Path, sources: list[Path] | None = None) -> list[RunReport]:
    """report.md, report.json and the PNGs for ``runs`` in ``out``; returns the rows."""
    reports = [read_run(r, n) for r, n in zip(runs, _names(runs))]
    out.mkdir(parents=True, exist_ok=True)
    with guarded_write(out, after="the report was not written"):
        plots = plot_all(reports, out)
    rel = os.path.relpath
    md = [f"# Report: {len(reports)} run{'s' if len(reports) != 1 else ''}\n\n",
          f"From: {', '.join(str(s) for s in (sources or runs))}; written {time.strftime('%Y-%m-%d %H:%M:%S')}.\n\n",
          table(reports)]
    down = downstream_table(reports)
    if down:
        md += ["\n## Downstream evaluation (lm-evaluation-harness, `lrpretrain eval`)\n\n", down]
    kinds = sorted({r.memory_kind for r in reports if r.memory_kind and r.peak_mem_mb is not None})
    md.append(
        "\nParameters: analytic, from the method's cost (exact for the built model). tokens: training tokens "
        "(non-pad) at the last logged step. Perplexities: the run's held-out set (`metrics.jsonl`). tokens/s and step "
        "time: the logged steps after the first. Peak memory measured: " + ("; ".join(kinds) or "n/a") +
        " (RSS includes the interpreter and libraries, ~0.3-0.5 GiB); estimated: `lrpretrain estimate` for the "
        "run's config, single-process runs only.\n")
    md += ["\n## Plots\n\n"] + [f"![{p}]({rel(out / p, out)})\n\n" for p in plots]
    atomic_write_text(out / "report.md", "".join(md).rstrip() + "\n")
    payload = [{k: v for k, v in asdict(r).items()} for r in reports]
    atomic_write_text(out / "report.json", json.dumps(payload, indent=1) + "\n")
    return reports


def main(args: list[str]) -> int:
    values, _flags, paths = split_options(args, "report", {"--out": "DIR"}, ())
    if not paths:
        raise UserError("report takes one or more run or sweep directories: lrpretrain report PATH... [--out DIR]")
    sources = [Path(p) for p in paths]
    runs = find_runs(sources)
    if "--out" in values:
        out = Path(values["--out"])
    elif len(sources) == 1 and sweep_jobs(sources[0]):
        out = sources[0]
    else:
        out = Path("report")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; choose a directory")
    reports = write_report(runs, out, sources)
    print(table(reports))
    print(f"report: {out / 'report.md'} and {', '.join(PLOTS)} ({len(reports)} runs)", file=sys.stderr)
    return 0


