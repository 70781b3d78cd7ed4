"""Model adapters: where activations come from, named by a spec string.

A spec is ``PREFIX:REST`` (``open_clip:ViT-B-32:laion2b_s34b_b79k``,
``timm:vit_small_patch16_224``) or a bare name (``shapes-clip``). Each adapter
class registers itself under its prefix or name with :func:`register_adapter`
and parses the rest of the spec in ``from_spec``. Adding an adapter (LLaVA, a
diffusers text encoder) means one new module in this package with one
decorated class; every module here is imported on first use, so
:func:`create_adapter`, :func:`list_adapters` and ``vlsae extract --model``
see it. Modules import their heavy libraries (open_clip, timm, transformers)
lazily, inside the class, so listing the registry stays cheap.

>>> adapter = create_adapter("shapes-clip", device="cpu")
>>> adapter.hook_points()[:3]
['final', 'visual.final', 'text.final']
>>> out = adapter.extract(pairs, hook="visual.blocks.1", tokens="patch")
>>> out["image"].shape, out.pair_index["image"].shape, out.keys[:2]
"""
from __future__ import annotations

import difflib
from typing import Any, Callable

from vlsae.devices import resolve_device
from vlsae.errors import VlsaeError
from vlsae.registry import Registry

from multimodal.adapters.base import TOKEN_MODES, Adapter, Extracted, resolve_dtype

ADAPTERS: Registry[type[Adapter]] = Registry("model adapter", packages=[__name__], name_attr="registry_name")


def register_adapter(name: str) -> Callable[[type[Adapter]], type[Adapter]]:
    """Class decorator: make an adapter buildable from specs ``name`` or ``name:REST``."""
    return ADAPTERS.register(name)


def list_adapters() -> list[str]:
    """Registered adapter names (spec prefixes and bare names), sorted."""
    return ADAPTERS.names()


def adapter_usage() -> dict[str, str]:
    """name -> spec syntax with a one-line description, for help texts and errors."""
    return {name: f"{cls.usage}  ({cls.summary})" for name, cls in ADAPTERS.items()}


def get_adapter_class(spec: str) -> tuple[type[Adapter], str]:
    """The adapter class a spec names and the rest of the spec after its prefix."""
    usages = "; ".join(cls.usage for _, cls in ADAPTERS.items())
    if not isinstance(spec, str) or not spec.strip():
        raise VlsaeError(f"empty model spec; use one of: {usages}")
    spec = spec.strip()
    if spec in ADAPTERS:
        return ADAPTERS.get(spec), ""
    prefix, sep, rest = spec.partition(":")
    if sep and prefix in ADAPTERS:
        return ADAPTERS.get(prefix), rest
    match = difflib.get_close_matches(prefix, ADAPTERS.names(), n=1)
    hint = f"did you mean '{match[0]}'? " if match else ""
    raise VlsaeError(f"unknown model spec '{spec}': {hint}valid forms: {usages}")


def create_adapter(spec: str, device: str = "auto", dtype: str = "fp32", **options: Any) -> Adapter:
    """Build the adapter a spec string names, on ``device`` ("auto", "cpu", "cuda", "cuda:1").

    ``dtype`` ("fp32", "bf16", "fp16") is the precision the model runs in
    (autocast) and the dtype of the activations it returns. ``options`` go to
    the adapter class (``model_kwargs={"img_size": 64}`` for timm, ...).
    """
    cls, rest = get_adapter_class(spec)
    adapter = cls.from_spec(rest, device=resolve_device(device), dtype=resolve_dtype(dtype), **options)
    adapter.spec = spec.strip()
    return adapter


__all__ = ["ADAPTERS", "Adapter", "Extracted", "TOKEN_MODES", "register_adapter", "create_adapter", "list_adapters",
           "adapter_usage", "get_adapter_class", "resolve_device", "resolve_dtype"]
