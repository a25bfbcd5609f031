"""Where lrpretrain keeps prepared data and downloads."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def cache_dir() -> Path:
    """``$LRPRETRAIN_CACHE``, default ``~/.cache/lrpretrain``."""
    return Path(os.environ.get("LRPRETRAIN_CACHE") or Path.home() / ".cache" / "lrpretrain").expanduser()


def unshadow_pypi_kernels() -> None:
    """Take a source checkout's root off ``sys.path`` where its ``kernels/`` folder would stand in for the
    PyPI package ``kernels``, which transformers imports (``python -m ...`` or pytest started in the
    checkout puts the root first). Our kernels import as ``lrpretrain.kernels``, never as ``kernels``."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "kernels" / "__init__.py").is_file():
        return  # an installed wheel: nothing shadows
    sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != root]
    loaded = sys.modules.get("kernels")
    if loaded is not None and Path(getattr(loaded, "__file__", None) or "/").resolve().parent == root / "kernels":
        del sys.modules["kernels"]
