"""The SAE registry: every architecture registered by name.

Adding an architecture means one new file in this package with a config
dataclass, a module, and ``@register_sae("name")``; the registry imports every
module here on first lookup, so ``vlsae train --arch name`` and the docs see it.
"""
from __future__ import annotations

from typing import Any, Callable

from vlsae.config import from_dict, to_dict
from vlsae.errors import VlsaeError
from vlsae.registry import Registry
from vlsae.saes.base import SAE, MultimodalSAE, SAEConfig, TrainContext, TrainOutput

SAES: Registry[type[SAE]] = Registry("SAE architecture", packages=[__name__], name_attr="arch")


def register_sae(name: str) -> Callable[[type[SAE]], type[SAE]]:
    """Class decorator: make an SAE architecture buildable by ``name``."""
    return SAES.register(name)


def list_archs() -> list[str]:
    """Names of every registered architecture, sorted."""
    return SAES.names()


def get_sae_class(name: str) -> type[SAE]:
    return SAES.get(name)


def is_multimodal_arch(name: str) -> bool:
    """True when the architecture trains on paired batches (a dict of modality -> rows)."""
    return issubclass(get_sae_class(name), MultimodalSAE)


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
            values = {**to_dict(config), **overrides}
        else:
            values = config
    else:
        values = {**(config or {}), **overrides}
    return get_sae_class(arch)(make_config(arch, values))


__all__ = ["SAES", "SAE", "MultimodalSAE", "SAEConfig", "is_multimodal_arch", "TrainContext", "TrainOutput", "register_sae", "list_archs",
           "get_sae_class", "make_config", "create_sae"]
