"""The :class:`MetricsLogger`: console progress (bar or lines, with ETA), ``metrics.jsonl`` and W&B."""

from __future__ import annotations

import json
import math
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from lrpretrain.config import Config
from lrpretrain.metrics.jsonl import STOPPED, rewind_jsonl
from lrpretrain.storage import guarded_write


def _fmt_count(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.1f}{unit}"
    return f"{n:.0f}"


def _fmt_time(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _eval_line(r: dict[str, Any]) -> str:
    line = f"eval step {r['step']} | val_loss {r['val_loss']:.4f} | val_ppl {r['val_ppl']:.2f}"
    if "galore_val_ppl" in r:
        line += f" | galore protocol: val_ppl {r['galore_val_ppl']:.2f} ({r['galore_val_batches']} batches)"
    return line


class MetricsLogger:
    def __init__(self, cfg: Config, run_dir: Path, resolved: dict[str, Any], max_steps: int, rank: int = 0):
        self.enabled = rank == 0
        self.run_dir = run_dir
        self.max_steps = max_steps
        self.path = run_dir / "metrics.jsonl"
        mode = cfg.logging.progress
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.mode = mode
        self._bar = None
        self._wandb = None
        self._last_print = 0.0
        self._first_train_step: int | None = None
        self._start_time = time.time()
        if self.enabled and cfg.logging.wandb != "disabled":
            self._wandb = self._init_wandb(cfg, resolved)

    def _init_wandb(self, cfg: Config, resolved: dict[str, Any]):
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        id_file = self.run_dir / "wandb_id.txt"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
        with guarded_write(id_file, len(run_id) + 1):
            id_file.write_text(run_id + "\n")
        return wandb.init(project=cfg.logging.project, entity=cfg.logging.entity, mode=cfg.logging.wandb,
                          name=cfg.run.name or self.run_dir.name, dir=str(self.run_dir), id=run_id,
                          resume="allow", config=resolved)

    def start(self, step: int) -> None:
        """Training starts (or resumes) at ``step``: rewind the JSONL and start the clocks."""
        self._first_train_step = None
        if not self.enabled:
            return
        moved = rewind_jsonl(self.path, step)
        if moved:
            self.info(f"resumed at step {step}: {moved} later metric records moved to {self.path.with_suffix('.rewound.jsonl').name}")
        if self.mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=self.max_steps, initial=step, unit="step", dynamic_ncols=True, file=sys.stderr)

    def info(self, msg: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    def log(self, record: dict[str, Any]) -> None:
        """Write one step's record everywhere."""
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        line = json.dumps(clean) + "\n"
        with guarded_write(self.path, len(line), STOPPED), open(self.path, "a") as f:
            f.write(line)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))},
                            step=record["step"])
        self._console(record)

    def _console(self, r: dict[str, Any]) -> None:
        step = r["step"]
        if "loss" in r and self._first_train_step is None:  # the clock starts with training, not the first eval
            self._first_train_step, self._start_time = step - 1, time.time() - r.get("step_time", 0.0)
        done = step - (self._first_train_step if self._first_train_step is not None else step)
        elapsed = time.time() - self._start_time
        eta = elapsed / done * (self.max_steps - step) if done > 0 else math.inf
        if self._bar is not None:
            if "loss" in r:
                self._bar.n = step
                self._bar.set_postfix_str(f"loss {r['loss']:.4f} | {_fmt_count(r.get('tokens_per_s', 0))} tok/s",
                                          refresh=False)
                self._bar.refresh()
            if "val_loss" in r:
                self._bar.write(_eval_line(r), file=sys.stderr)
            return
        if self.mode != "lines":
            return
        now = time.time()
        if "loss" in r and ("val_loss" in r or step == self.max_steps or now - self._last_print >= 2.0 or done == 1):
            self._last_print = now
            print(f"step {step}/{self.max_steps} | loss {r['loss']:.4f} | lr {r['lr']:.2e} | "
                  f"{_fmt_count(r.get('tokens_per_s', 0))} tok/s | tokens {_fmt_count(r['tokens'])} | "
                  f"eta {_fmt_time(eta)}", file=sys.stderr, flush=True)
        if "val_loss" in r:
            print(_eval_line(r), file=sys.stderr, flush=True)

    def summary(self, mean_tokens_per_s: float | None) -> None:
        """One line at the end of a run: tokens, throughput, and validation perplexity first -> last."""
        if not self.enabled or not self.path.exists():
            return
        recs = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        train = [r for r in recs if r.get("loss") is not None]
        vals = [r for r in recs if r.get("val_ppl") is not None]
        parts = [f"done: step {recs[-1]['step'] if recs else 0}/{self.max_steps}"]
        if train:
            parts.append(f"{_fmt_count(train[-1]['tokens'])} tokens, final loss {train[-1]['loss']:.4f}")
        if mean_tokens_per_s:
            parts.append(f"{_fmt_count(mean_tokens_per_s)} tok/s")
        if vals:
            parts.append(f"val_ppl {vals[0]['val_ppl']:.2f} (step {vals[0]['step']}) -> "
                         f"{vals[-1]['val_ppl']:.2f} (step {vals[-1]['step']})")
        self.info(" | ".join(parts))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
