"""A run's config, loaded where the run is assembled: composed with every method plugin's schema,
type-checked and validated across the parts, before any heavy work.

:mod:`lrpretrain.config` holds the schemas and the Hydra composition and knows no other part; what
needs several parts happens here: the plugins' schemas for composition and typing, a method's checks
against the model's shapes, the strategy's refusals, a method's own recompute policy. The CLI,
``bench``, ``estimate``, ``generate`` and sweeps load configs through :func:`load_config` (or the
steps below); every failure is one :class:`~lrpretrain.errors.ConfigError` line.
"""

from __future__ import annotations

import os

from omegaconf import DictConfig, OmegaConf

from lrpretrain import config
from lrpretrain.config import Config
from lrpretrain.distributed.strategy import get_strategy
from lrpretrain.errors import check
from lrpretrain.methods import available_methods, get_method


def method_schemas() -> dict[str, type]:
    """Every registered method plugin's config dataclass, by name (third-party plugins included)."""
    return {name: get_method(name).Config for name in available_methods()}


def method_schema(name: str) -> type:
    """The config dataclass of method ``name``; one ConfigError line for an unknown one."""
    return get_method(name).Config


def register_configs() -> None:
    """Put the schemas, every method plugin's included, into Hydra's ConfigStore."""
    config.register_configs(method_schemas())


def compose(overrides: list[str]) -> DictConfig:
    """Compose conf/config.yaml with Hydra overrides; any failure becomes one ConfigError line."""
    return config.compose(overrides, method_schemas())


def to_typed(cfg: DictConfig) -> Config:
    """Resolve and convert to dataclasses (the method's own included), rejecting unknown keys."""
    return config.to_typed(cfg, method_schema)


def validate_config(cfg: Config, world_size: int = 1) -> None:
    """Section checks, then the checks that span sections and parts."""
    config.validate_sections(cfg)
    if hasattr(cfg.method, "validate_for_model"):  # checks that need the model's shapes (e.g. rank <= min(m, n))
        cfg.method.validate_for_model(cfg.model)
    if hasattr(cfg.method, "resolve_for_precision"):  # e.g. GaLore's basis_dtype=auto: the weights' dtype
        cfg.method.resolve_for_precision(cfg.trainer.precision)
    config.validate_across_sections(cfg, world_size)
    get_strategy(cfg.distributed.strategy).validate(cfg, world_size)  # combinations the strategy refuses
    t = cfg.trainer
    if t.per_layer_update:
        why = get_method(cfg.method.name).per_layer_refusal(cfg)
        check(why is None, "trainer.per_layer_update", True, f"method '{cfg.method.name}' cannot update per layer: {why}")
    if t.recompute == "method":
        has_policy = get_method(cfg.method.name)(cfg.method, cfg.model).recompute_policy() is not None
        check(has_policy, "trainer.recompute", t.recompute,
              f"method '{cfg.method.name}' has no recompute policy of its own; allowed: none, full, selective")


def load_config(overrides: list[str], world_size: int | None = None) -> tuple[Config, DictConfig]:
    """Compose, resolve, type-check and validate. Returns the typed config and its resolved DictConfig."""
    raw = compose(overrides)
    typed = to_typed(raw)
    validate_config(typed, config.world_size_from_env() if world_size is None else world_size)
    return typed, config.to_dictconfig(typed)


def from_yaml(path: str | os.PathLike) -> Config:
    """Load a resolved config.yaml written into a run directory."""
    raw = OmegaConf.load(path)
    assert isinstance(raw, DictConfig)
    typed = to_typed(raw)
    validate_config(typed, 1)
    return typed
