"""The SAE registry: every architecture registered by name.

Adding an architecture means one new file in this package with a config
dataclass, a module, and ``@register_sae("name")``; the package imports every
module here at start, so ``vlsae train --arch name`` and the docs see it.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Callable

from vlsae.config import from_dict
from vlsae.errors import VlsaeError
from vlsae.saes.base import SAE, SAEConfig, TrainContext, TrainOutput

_REGISTRY: dict[str, type[SAE]] = {}


def register_sae(name: str) -> Callable[[type[SAE]], type[SAE]]:
    """Class decorator: make an SAE architecture buildable by ``name``."""
    def wrap(cls: type[SAE]) -> type[SAE]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"SAE architecture '{name}' registered twice")
        cls.arch = name
        _REGISTRY[name] = cls
        return cls
    return wrap


def list_archs() -> list[str]:
    """Names of every registered architecture, sorted."""
    return sorted(_REGISTRY)


def get_sae_class(name: str) -> type[SAE]:
    if name not in _REGISTRY:
        raise VlsaeError(f"unknown SAE architecture '{name}'; registered: {', '.join(list_archs())}")
    return _REGISTRY[name]


def make_config(arch: str, values: dict[str, Any] | SAEConfig) -> SAEConfig:
    """The architecture's config dataclass from a mapping (unknown keys are errors)."""
    cls = get_sae_class(arch)
    if isinstance(values, SAEConfig):
        if not isinstance(values, cls.config_class):
            raise VlsaeError(f"config of type {type(values).__name__} does not fit architecture '{arch}'")
        return values
    return from_dict(cls.config_class, values, where=f"sae config ({arch})")


def create_sae(arch: str, config: dict[str, Any] | SAEConfig | None = None, **overrides: Any) -> SAE:
    """Build an SAE by registry name: ``create_sae("topk", d_in=64, n_latents=512, k=8)``."""
    values: dict[str, Any] | SAEConfig
    if isinstance(config, SAEConfig):
        if overrides:
            from vlsae.config import to_dict
            values = {**to_dict(config), **overrides}
        else:
            values = config
    else:
        values = {**(config or {}), **overrides}
    return get_sae_class(arch)(make_config(arch, values))


def _import_all() -> None:
    for module in pkgutil.iter_modules(__path__):
        if module.name != "base":
            importlib.import_module(f"{__name__}.{module.name}")


_import_all()

__all__ = ["SAE", "SAEConfig", "TrainContext", "TrainOutput", "register_sae", "list_archs",
           "get_sae_class", "make_config", "create_sae"]
