"""User-facing errors.

Every mistake a user can make (a bad config value, missing data, a corrupt checkpoint) raises
:class:`UserError` with a one-line message naming the bad value and what is allowed. The CLI prints
that line to stderr and exits non-zero, without a traceback unless ``LRPRETRAIN_DEBUG=1``.
"""

from __future__ import annotations

from collections.abc import Iterable


class UserError(Exception):
    """A problem with the user's input, reported as one line."""


class ConfigError(UserError):
    """A config value is invalid."""


class DataError(UserError):
    """Training or validation data is missing, empty or unreadable."""


class CheckpointError(UserError):
    """A checkpoint is missing, partial or corrupt."""


class StorageError(UserError):
    """A write into the run directory failed (no space, quota, read-only, permission); see lrpretrain.storage."""


class RunDirInUse(UserError):
    """Another process holds the run directory's lock."""


def allowed(values: Iterable[object]) -> str:
    return ", ".join(str(v) for v in values)


def check(cond: bool, key: str, value: object, expected: str) -> None:
    """Raise ConfigError ``key=value: expected`` unless ``cond``."""
    if not cond:
        raise ConfigError(f"{key}={value!r} is invalid: {expected}")
