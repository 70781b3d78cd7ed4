"""One registry mechanism for every kind of named thing in vlsae.

SAE architectures, model adapters, zoo models, planted-feature suites, data
sources and evaluation tasks are each a :class:`Registry`: a name -> object
map filled by a decorator where the object is defined,

    SAES = Registry("SAE architecture", packages=["vlsae.saes"], name_attr="arch")

    @SAES.register("topk")
    class TopKSAE(SAE): ...

so adding one means one new module plus one decorator line. The registry
imports the modules of its ``packages`` on first lookup (so listing never
misses an entry that was never imported by hand) and, for registries other
packages extend, the modules named by an installed entry-point group (so a
lower layer can list what a higher one registers without importing it). A
typo gets a "did you mean" and the valid names; :meth:`Registry.listing` is
what ``--help`` texts print.
"""
from __future__ import annotations

import difflib
import importlib
import pkgutil
from importlib.metadata import entry_points
from typing import Any, Callable, Generic, Iterator, Sequence, TypeVar

from vlsae.errors import VlsaeError

T = TypeVar("T")


class Registry(Generic[T]):
    """name -> registered object (a class or a function), with lazy module discovery.

    kind: what the entries are, for messages ("SAE architecture");
    packages: packages whose modules register entries when imported (modules whose
    name starts with ``_`` or is in ``skip`` are not imported);
    entry_point_group: an ``importlib.metadata`` entry-point group whose entries name
    modules to import (how ``multimodal`` and ``evals`` add data sources to ``vlsae``);
    name_attr: attribute set on each registered object to its name (``None``: none).
    """

    def __init__(self, kind: str, packages: Sequence[str] = (), entry_point_group: str | None = None,
                 name_attr: str | None = "name", skip: Sequence[str] = ("base",)):
        self.kind = kind
        self.packages = tuple(packages)
        self.entry_point_group = entry_point_group
        self.name_attr = name_attr
        self.skip = set(skip)
        self._entries: dict[str, T] = {}
        self._loaded = False

    # ------------------------------------------------------------ filling
    def register(self, name: str, **attributes: Any) -> Callable[[T], T]:
        """Decorator: register the object under ``name``; ``attributes`` are set on it too."""
        def wrap(obj: T) -> T:
            existing = self._entries.get(name)
            if existing is not None and existing is not obj and _qualname(existing) != _qualname(obj):
                raise ValueError(f"{self.kind} '{name}' registered twice ({_qualname(existing)} and {_qualname(obj)})")
            if self.name_attr:
                setattr(obj, self.name_attr, name)
            for key, value in attributes.items():
                setattr(obj, key, value)
            self._entries[name] = obj
            return obj
        return wrap

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True  # set first: the imported modules call back into this registry
        for package_name in self.packages:
            package = importlib.import_module(package_name)
            for module in pkgutil.iter_modules(getattr(package, "__path__", [])):
                if module.name.startswith("_") or module.name in self.skip:
                    continue
                importlib.import_module(f"{package_name}.{module.name}")
        if self.entry_point_group:
            for point in entry_points(group=self.entry_point_group):
                try:
                    importlib.import_module(point.value.split(":")[0])
                except ImportError:
                    continue  # an optional package that is not installed contributes nothing

    # ------------------------------------------------------------ lookup
    def get(self, name: str) -> T:
        """The object registered as ``name``; a one-line error with a suggestion otherwise."""
        self._load()
        if name in self._entries:
            return self._entries[name]
        raise VlsaeError(self.unknown_message(name))

    def unknown_message(self, name: str) -> str:
        """"unknown KIND 'x'; registered: a, b, c (did you mean 'b'?)"."""
        self._load()
        match = difflib.get_close_matches(str(name), list(self._entries), n=1)
        hint = f" (did you mean '{match[0]}'?)" if match else ""
        return f"unknown {self.kind} '{name}'; registered: {self.listing()}{hint}"

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        self._load()
        return sorted(self._entries)

    def items(self) -> list[tuple[str, T]]:
        self._load()
        return sorted(self._entries.items())

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        self._load()
        return len(self._entries)

    def listing(self, sep: str = ", ") -> str:
        """The names joined for a help text or an error."""
        return sep.join(self.names())

    def summaries(self) -> dict[str, str]:
        """name -> one line: the object's ``summary`` attribute, else its docstring's first line."""
        out = {}
        for name, obj in self.items():
            text = getattr(obj, "summary", "") or (obj.__doc__ or "").strip()
            out[name] = text.splitlines()[0] if text else ""
        return out


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"
