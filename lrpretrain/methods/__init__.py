"""Method registry.

Built-in methods are the modules of this package; each registers its plugin class with
:func:`register_method`. Third-party plugins register through the ``lrpretrain.methods`` entry-point
group (``name = "package.module:PluginClass"``). Adding a method = one plugin file + one YAML.
"""

from __future__ import annotations

import importlib
import pkgutil
import warnings
from importlib.metadata import entry_points

from lrpretrain.errors import ConfigError, allowed
from lrpretrain.methods.base import Method, MethodConfig, StepContext

__all__ = ["Method", "MethodConfig", "StepContext", "register_method", "get_method", "available_methods"]

_REGISTRY: dict[str, type[Method]] = {}
_loaded = False


def register_method(name: str):
    """Class decorator: make a :class:`Method` subclass selectable as ``method=<name>``."""

    def deco(cls: type[Method]) -> type[Method]:
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise TypeError(f"{cls!r} must subclass lrpretrain.methods.Method")
        other = _REGISTRY.get(name)
        if other is not None and other is not cls:
            raise ValueError(f"method '{name}' is registered twice: {other.__module__} and {cls.__module__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in pkgutil.iter_modules(__path__):
        if mod.name != "base" and not mod.name.startswith("_"):
            importlib.import_module(f"{__name__}.{mod.name}")
    for ep in entry_points(group="lrpretrain.methods"):
        try:
            cls = ep.load()
            if ep.name not in _REGISTRY:
                register_method(ep.name)(cls)
        except Exception as e:  # a broken third-party plugin must not take down the others
            warnings.warn(f"could not load method plugin '{ep.name}' ({ep.value}): {e}", stacklevel=2)


def available_methods() -> list[str]:
    _load()
    return sorted(_REGISTRY)


def get_method(name: str) -> type[Method]:
    _load()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown method '{name}'; allowed: {allowed(sorted(_REGISTRY))}")
    return _REGISTRY[name]
