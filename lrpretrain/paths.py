"""Where lrpretrain keeps prepared data and downloads."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$LRPRETRAIN_CACHE``, default ``~/.cache/lrpretrain``."""
    return Path(os.environ.get("LRPRETRAIN_CACHE") or Path.home() / ".cache" / "lrpretrain").expanduser()
