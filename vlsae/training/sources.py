"""Data sources: the registry that turns a run config's ``data:`` section into activations.

A ``data:`` section names exactly one source by its key, plus options:

    data: {path: acts.safetensors}                      # a tensor file (this module)
    data: {acts: runs/acts, modality: image}            # an activation cache (multimodal.sources)
    data: {synthetic: hierarchical, n_train: 50000}     # a planted-feature suite (evals.synthetic.source)

Each kind is a function ``(DataSpec) -> ResolvedData`` registered under its key
with :func:`register_data_source`, in the package that owns the data: tensor
files here, the activation cache in ``multimodal``, the planted suites in
``evals``. This package imports neither of those; they announce their modules
in the ``vlsae.data_sources`` entry-point group (``pyproject.toml``), which the
registry imports on first lookup. So ``vlsae train``, the demo and any Python
caller build a source the same way: :func:`resolve_data`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from vlsae.config import option
from vlsae.errors import VlsaeError
from vlsae.registry import Registry
from vlsae.training.data import ActivationSource, TensorSource, open_tensor_file

ENTRY_POINT_GROUP = "vlsae.data_sources"
SOURCE_KEYS = ("path", "acts", "synthetic")


@dataclass
class DataSpec:
    path: str | None = option(None, help="a .safetensors or .npy tensor file (one tensor, or tensors named by modality)")
    acts: str | None = option(None, help="an activation cache folder written by `vlsae extract`")
    modality: str | None = option(None, help="train on one modality of paired data (e.g. image) with a single-stream SAE")
    synthetic: str | None = option(None, help="a planted-feature suite: independent, hierarchical, bidirectional, multimodal")
    preset: str | None = option(None, help="preset of the synthetic suite")
    n_train: int = option(50_000, help="rows drawn from the synthetic suite")
    n_test: int = option(5000, help="held-out rows drawn from the synthetic suite for the final metrics")
    seed: int = option(0, help="seed of the synthetic suite")
    noise: float = option(0.0, help="noise sigma of the synthetic suite")
    options: dict = option(factory=dict, help="extra options of the synthetic suite, e.g. {correlation: 0.3}")
    held_out: float = option(0.05, help="fraction of a tensor file's rows (its tail) held out for the final metrics; 0: none")

    def __post_init__(self) -> None:
        given = [name for name in SOURCE_KEYS if getattr(self, name)]
        if len(given) > 1:
            raise VlsaeError(f"data has both '{given[0]}' and '{given[1]}'; give exactly one source")
        if not 0 <= self.held_out < 1:
            raise VlsaeError(f"data.held_out must be in [0, 1), got {self.held_out}")

    @property
    def kind(self) -> str:
        """The registry key of the source this section names ('path', 'acts' or 'synthetic')."""
        for name in SOURCE_KEYS:
            if getattr(self, name):
                return name
        raise VlsaeError("no training data: give data.path (a tensor file), data.acts (an activation cache) "
                         "or data.synthetic (a planted-feature suite)")


@dataclass
class ResolvedData:
    """What a data source returns: the training source and, if any, held-out rows."""

    train: ActivationSource
    held_out: ActivationSource | None = None
    hook: str = ""  # where the activations came from (e.g. "shapes-clip final cls"), recorded as sae.hook


DataSourceBuilder = Callable[[DataSpec], ResolvedData]
DATA_SOURCES: Registry[DataSourceBuilder] = Registry("data source", entry_point_group=ENTRY_POINT_GROUP,
                                                     name_attr="source_key")


def register_data_source(key: str, selects_modality: bool = False) -> Callable[[DataSourceBuilder], DataSourceBuilder]:
    """Decorator: ``fn(spec) -> ResolvedData`` builds the source that ``data: {key: ...}`` names.

    ``selects_modality``: the builder honours ``spec.modality`` itself (the cache
    reads only that modality); otherwise :func:`resolve_data` narrows paired data."""
    return DATA_SOURCES.register(key, selects_modality=selects_modality)


@register_data_source("path")
def tensor_file_source(spec: DataSpec) -> ResolvedData:
    """A tensor file, split into training rows and a held-out tail (``data.held_out``)."""
    train_rows, held = open_tensor_file(spec.path).split(spec.held_out)  # type: ignore[arg-type]
    return ResolvedData(train_rows, held)


def resolve_data(spec: DataSpec) -> ResolvedData:
    """The training source (and held-out rows where the data has them) for a run config's ``data``."""
    kind = spec.kind
    if kind not in DATA_SOURCES:
        raise VlsaeError(f"data.{kind} needs a package that registers that source and is not installed here "
                         f"(registered: {DATA_SOURCES.listing()}); install vlsae with `pip install -e .` "
                         "or use data.path with a tensor file")
    builder = DATA_SOURCES.get(kind)
    resolved = builder(spec)
    if spec.modality and not getattr(builder, "selects_modality", False):
        resolved = ResolvedData(_one_modality(resolved.train, spec.modality),  # type: ignore[arg-type]
                                _one_modality(resolved.held_out, spec.modality), hook=resolved.hook)
    return resolved


def _one_modality(source: ActivationSource | None, modality: str) -> ActivationSource | None:
    if source is None:
        return None
    if not isinstance(source.d_in, dict):
        raise VlsaeError(f"--modality {modality} needs paired data, but this data is a single tensor")
    if modality not in source.d_in:
        raise VlsaeError(f"unknown modality '{modality}'; the data has {', '.join(source.d_in)}")
    return TensorSource(source.data[modality])  # type: ignore[attr-defined]
