"""Which weights a method acts on: target selection by module name, shared by every method.

Targets are the 2-D projections of the decoder blocks, named as in HF LLaMA: ``q_proj k_proj v_proj
o_proj`` (under ``attn``) and ``gate_proj up_proj down_proj`` (under ``mlp``). The aliases ``attn``
and ``mlp`` name each family. Embeddings, the LM head and norms are never targets: every low-rank
C4 repository keeps them full rank and trains them with plain AdamW (METHODS.md §0).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from lrpretrain.errors import ConfigError, allowed
from lrpretrain.methods.base import MethodConfig

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
ALIASES: dict[str, tuple[str, ...]] = {"attn": ATTN, "mlp": MLP}
NAMES = ATTN + MLP


def expand_targets(targets: list[str]) -> tuple[str, ...]:
    """Projection names for a list of names and aliases, in model order; one ConfigError if unknown."""
    if not targets:
        raise ConfigError(f"method.targets=[] is invalid: name at least one of {allowed((*ALIASES, *NAMES))}")
    chosen: set[str] = set()
    for t in targets:
        if t in ALIASES:
            chosen.update(ALIASES[t])
        elif t in NAMES:
            chosen.add(t)
        else:
            raise ConfigError(f"method.targets: unknown target '{t}'; allowed: {allowed((*ALIASES, *NAMES))}")
    return tuple(n for n in NAMES if n in chosen)


@dataclass
class TargetsConfig(MethodConfig):
    """Base config of methods that act on target projections."""

    targets: list[str] = field(default_factory=lambda: ["attn", "mlp"])

    def validate(self) -> None:
        expand_targets(list(self.targets))


def select_targets(model: nn.Module, targets: list[str]) -> list[tuple[str, nn.Module]]:
    """``(qualified name, module)`` of every target projection in ``model``, in model order.

    A module is a target when its own name is one of the selected projection names and it sits
    inside a decoder block (``layers.<i>.attn`` or ``layers.<i>.mlp``); it may already have been
    replaced by a method's module (any class), so methods can select after surgery too.
    """
    names = set(expand_targets(list(targets)))
    found = []
    for qual, module in model.named_modules():
        parts = qual.split(".")
        if len(parts) >= 4 and parts[0] == "layers" and parts[2] in ALIASES and parts[-1] in names:
            found.append((qual, module))
    if not found:
        raise ConfigError(f"method.targets={list(targets)} matches no module of this model")
    return found


def set_module(model: nn.Module, qual: str, new: nn.Module) -> None:
    """Replace the submodule at dotted path ``qual``."""
    parent_name, _, leaf = qual.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, new)
