"""The run directory: never silently overwritten.

A run directory holds one run: ``config.yaml`` (the resolved config), ``metrics.jsonl`` and
``checkpoints/``. Starting in a directory that already holds a run is allowed only to continue that
run (``trainer.resume=auto`` with the same config, up to the operational keys below; or an explicit
``trainer.resume=PATH``), or when the user asks to replace it (``run.overwrite=true``). Where the
directory lives is not part of the run: a run directory moved or copied elsewhere resumes there.
One process at a time uses it (:mod:`lrpretrain.train.lock`).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lrpretrain.errors import ConfigError
from lrpretrain.storage import atomic_write_text

# Keys that do not change what is trained (or, for max_steps, only extend it): they may differ when
# a run is resumed.
OPERATIONAL = (
    "trainer.resume", "trainer.max_steps", "trainer.eval_every", "trainer.eval_at_start", "trainer.ckpt_every",
    "trainer.keep_last", "trainer.ckpt_checksum", "trainer.log_every", "trainer.threads", "trainer.compile",
    "trainer.compile_backend", "trainer.eval_batch_size", "trainer.on_nonfinite", "trainer.max_nonfinite",
    "trainer.recompute", "trainer.recompute_every", "eval", "logging", "run.overwrite", "run.name", "run.dir",
    "run.break_lock",
)
RUN_FILES = ("config.yaml", "metrics.jsonl", "checkpoints")


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def config_differences(old: DictConfig, new: DictConfig, ignore: tuple[str, ...] = OPERATIONAL) -> list[str]:
    """``key: old -> new`` for every leaf that differs, except ``ignore`` keys (and their children)."""
    a = _flatten(OmegaConf.to_container(old, resolve=True))
    b = _flatten(OmegaConf.to_container(new, resolve=True))
    diffs = []
    for key in sorted(set(a) | set(b)):
        if any(key == i or key.startswith(i + ".") for i in ignore):
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            diffs.append(f"{key}: {a.get(key, '<absent>')} -> {b.get(key, '<absent>')}")
    return diffs


def prepare_run_dir(run_dir: Path, resolved: DictConfig, resume: str, overwrite: bool, warn) -> None:
    """Check that this run may use ``run_dir``, clear it if asked to, and write config.yaml."""
    stored = run_dir / "config.yaml"
    holds_run = any((run_dir / f).exists() for f in RUN_FILES)
    how = "use trainer.resume=auto to continue it, another run.dir, or run.overwrite=true to replace it"
    if holds_run and not overwrite:
        if resume == "never":
            raise ConfigError(f"run.dir {run_dir} already holds a run and trainer.resume=never; {how}")
        if not stored.exists():
            raise ConfigError(f"run.dir {run_dir} holds run files but no config.yaml; use another run.dir "
                              "or run.overwrite=true to replace it")
        diffs = config_differences(OmegaConf.load(stored), resolved)  # type: ignore[arg-type]
        if diffs and resume == "auto":
            shown = "; ".join(diffs[:3]) + (f"; and {len(diffs) - 3} more" if len(diffs) > 3 else "")
            raise ConfigError(f"run.dir {run_dir} holds a run with a different config ({shown}); "
                              "use another run.dir, run.overwrite=true to replace it, or "
                              "trainer.resume=PATH to load its checkpoint into this config")
        before = OmegaConf.load(stored)
        changed = config_differences(before, resolved,  # type: ignore[arg-type]
                                     ignore=("trainer.resume", "run.overwrite", "run.dir", "run.break_lock"))
        if changed:
            warn("config changes on resume: " + "; ".join(changed))
        old_dir = OmegaConf.select(before, "run.dir")
        if old_dir is not None and Path(old_dir).absolute() != run_dir.absolute():
            warn(f"this run was moved: it was trained in {old_dir} and continues in {run_dir}")
    if holds_run and overwrite:
        warn(f"run.overwrite=true: replacing the run in {run_dir}")
        for f in (*RUN_FILES, "metrics.rewound.jsonl", "wandb", "wandb_id.txt"):
            p = run_dir / f
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(stored, OmegaConf.to_yaml(resolved))
