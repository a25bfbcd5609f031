"""``--options`` of the subcommands that also take Hydra overrides (bench, estimate).

Below the tools that use it (it imports only :mod:`lrpretrain.errors`), not in the CLI above them."""

from __future__ import annotations

from lrpretrain.errors import UserError


def split_options(args: list[str], command: str, valued: dict[str, str],
                  flags: tuple[str, ...] = ()) -> tuple[dict[str, str], set[str], list[str]]:
    """Split ``args`` into ``--key VALUE`` / ``--key=VALUE`` options (``valued``: key -> how its value looks,
    for the messages), ``--flag`` options and the Hydra overrides; one clear error for anything else.
    Returns (values given, flags given, overrides)."""
    values: dict[str, str] = {}
    given: set[str] = set()
    overrides: list[str] = []
    it = iter(args)
    for a in it:
        key = a.split("=", 1)[0]
        if key in valued:
            value = a.split("=", 1)[1] if "=" in a else next(it, None)
            if value is None:
                raise UserError(f"{key} needs a value, e.g. {key} {valued[key]}")
            values[key] = value
        elif a in flags:
            given.add(a)
        elif a.startswith("--"):
            allowed = ", ".join([*(f"{k} {v}" for k, v in valued.items()), *flags])
            raise UserError(f"unknown option '{a}' for {command}; allowed: {allowed}")
        else:
            overrides.append(a)
    return values, given, overrides
