"""The zoo: small models of the real classes, trained by vlsae on ShapesWorld.

Each zoo model is one module in this package with a class decorated by
:func:`register_zoo_model`; it knows how to ``train`` itself into a folder and
how to ``load`` that folder. Trained models live in the user's cache,
``$VLSAE_CACHE/zoo/NAME`` (``VLSAE_CACHE`` defaults to ``~/.cache/vlsae``), and
can be (re)built explicitly with ``vlsae zoo train NAME`` (:func:`train_model`).
Training is seeded, so the same command gives the same model on the same
machine and thread count.

Where to load from (:func:`load_model`): the cache when it holds a trained
model; else the copy shipped in the repository (``multimodal/zoo/shipped/NAME``,
fp16 safetensors written by ``vlsae zoo ship NAME`` from a cached model, so a
fresh install runs the demo without minutes of training); else the model is
trained on first use into the cache.

>>> report = train_model("shapes-clip")        # minutes on a CPU; prints zero-shot accuracy
>>> loaded = load_model("shapes-clip")         # trains first if the cache has none
>>> loaded.model, loaded.preprocess, loaded.tokenizer
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

from vlsae.config import from_dict, to_dict
from vlsae.errors import VlsaeError
from vlsae.files import check_writable_dir, replace_dir
from vlsae.registry import Registry

from multimodal.shapesworld import ShapesWorldConfig

REPORT = "training.json"


class ZooModel:
    """Base of zoo entries: subclasses set ``name``/``summary`` and implement ``train`` and ``load``."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    #: files that must exist in a finished model folder
    files: ClassVar[tuple[str, ...]] = ()
    #: top-level entries of a trained folder left out of the shipped copy (rebuilt at load time
    #: from other zoo models, e.g. a text encoder that duplicates shapes-clip's text tower)
    ship_exclude: ClassVar[tuple[str, ...]] = ()
    #: the dataclass of its training settings (what ``--set key=value`` overrides)
    config_class: ClassVar[type | None] = None

    @classmethod
    def shipped_files(cls) -> tuple[str, ...]:
        """The ``files`` a shipped copy holds (those outside ``ship_exclude``)."""
        return tuple(f for f in cls.files if Path(f).parts[0] not in cls.ship_exclude)

    @classmethod
    def ship_extras(cls, source: Path) -> dict[str, str]:
        """Extra text files (name -> content) written into a shipped copy of the trained ``source``."""
        return {}

    @classmethod
    def train(cls, out_dir: Path, overrides: dict[str, Any], progress: bool = True) -> dict[str, Any]:
        """Train into the (empty, temporary) folder ``out_dir``; return the report (metrics, settings)."""
        raise NotImplementedError

    @classmethod
    def load(cls, folder: Path, device: Any = "cpu") -> Any:
        raise NotImplementedError

    @classmethod
    def require_files(cls, folder: str | Path, shipped: bool = False) -> Path:
        """``folder`` as a Path, after checking every file in ``files`` (``shipped_files`` for a
        shipped copy) is there (one-line error if not)."""
        folder = Path(folder)
        for name in (cls.shipped_files() if shipped else cls.files):
            if not (folder / name).is_file():
                raise VlsaeError(f"{folder} is not a trained {cls.name} ({name} missing); run vlsae zoo train {cls.name}")
        return folder

    @classmethod
    def evaluate(cls, folder: Path, device: Any = "cpu") -> dict[str, Any]:
        """Metrics of a trained folder (what ``vlsae zoo eval`` prints)."""
        raise NotImplementedError

    @classmethod
    def describe_report(cls, report: dict[str, Any]) -> str:
        """Human-readable lines about a training report (printed by ``vlsae zoo train``)."""
        return json.dumps(report.get("metrics", {}), indent=1)


def training_world(overrides: dict[str, Any] | None, model: str):
    """The ShapesWorldConfig a zoo model trains on: ShapesWorld's defaults plus ``overrides``
    (a bad key is a one-line error naming ``model``)."""

    return from_dict(ShapesWorldConfig, overrides, where=f"{model} world")


def training_bar(total: int, desc: str, progress: bool):
    """The zoo trainers' tqdm bar (None when ``progress`` is off; hidden when not on a terminal)."""
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", leave=False, disable=None)


def cosine_lr(step: int, total: int, peak: float, warmup: int = 0) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then cosine decay to 0 at ``total``:
    the learning-rate schedule of every zoo recipe and of the CNN judge."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


ZOO: Registry[type[ZooModel]] = Registry("zoo model", packages=[__name__], skip=("shipped",))


def register_zoo_model(name: str) -> Callable[[type[ZooModel]], type[ZooModel]]:
    """Class decorator: make a zoo model trainable and loadable by ``name``."""
    return ZOO.register(name)


def list_models() -> list[str]:
    """Names of every zoo model, sorted."""
    return ZOO.names()


def get_zoo_class(name: str) -> type[ZooModel]:
    return ZOO.get(name)


def cache_root() -> Path:
    """``$VLSAE_CACHE`` or ``~/.cache/vlsae``."""
    root = os.environ.get("VLSAE_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "vlsae"


def zoo_dir() -> Path:
    return cache_root() / "zoo"


def model_dir(name: str) -> Path:
    """Where the trained ``name`` lives (whether or not it exists yet)."""
    return zoo_dir() / get_zoo_class(name).name


def shipped_dir(name: str) -> Path:
    """Where the repository's shipped copy of ``name`` lives (whether or not it exists)."""
    return Path(__file__).resolve().parent / "shipped" / get_zoo_class(name).name


def _complete(cls: type[ZooModel], folder: Path, shipped: bool = False) -> bool:
    files = cls.shipped_files() if shipped else cls.files
    return (folder / REPORT).is_file() and all((folder / f).is_file() for f in files)


def is_trained(name: str) -> bool:
    """Whether the cache holds a trained ``name``."""
    return _complete(get_zoo_class(name), model_dir(name))


def is_shipped(name: str) -> bool:
    """Whether the repository ships a trained ``name``."""
    return _complete(get_zoo_class(name), shipped_dir(name), shipped=True)


def resolve_model_dir(name: str, use_shipped: bool = True) -> Path | None:
    """The folder :func:`load_model` would read: the cache, else the shipped copy, else None."""
    if is_trained(name):
        return model_dir(name)
    if use_shipped and is_shipped(name):
        return shipped_dir(name)
    return None


_SETTINGS_THAT_DO_NOT_CHANGE_THE_MODEL = {"threads"}


def cache_differs_from_shipped(name: str) -> list[str]:
    """Training settings in which the cached ``name`` differs from the shipped copy ("key: cached -> shipped").

    Empty when either is missing or they agree. The cache wins at load time (a
    user's own ``vlsae zoo train`` must), so a model cached by an older vlsae
    would otherwise silently shadow the better shipped one.
    """
    if not (is_trained(name) and is_shipped(name)):
        return []
    try:
        cached = json.loads((model_dir(name) / REPORT).read_text()).get("config", {})
        shipped = json.loads((shipped_dir(name) / REPORT).read_text()).get("config", {})
    except (OSError, ValueError):
        return []
    # A setting only one side records was added since the other was trained, and an added setting's default keeps
    # the old behaviour: the side without it trained with the default (e.g. a cached vision_tower=resnet model
    # against a shipped copy from before that option differs; a cached copy with the default does not).
    defaults = _setting_defaults(get_zoo_class(name).config_class)
    differences = []
    for key in sorted((set(cached) | set(shipped)) - _SETTINGS_THAT_DO_NOT_CHANGE_THE_MODEL):
        if key not in defaults and not (key in cached and key in shipped):
            continue  # a setting the current config no longer has, recorded by one side only
        old, new = cached.get(key, defaults.get(key)), shipped.get(key, defaults.get(key))
        if old != new:
            differences.append(f"{key}: {old} -> {new}")
    return differences


def _setting_defaults(config_class: type | None) -> dict[str, Any]:
    """Default of every training setting, as a report records it (empty without a config class)."""
    if config_class is None:
        return {}

    return to_dict(config_class())


_NOTICED: set[str] = set()


def _notice_cache_shadowing(name: str) -> None:
    """Say once per process when the cached model was trained with other settings than the shipped one."""
    if name in _NOTICED:
        return
    differences = cache_differs_from_shipped(name)
    if differences:
        _NOTICED.add(name)
        shown = "; ".join(differences[:3]) + ("; ..." if len(differences) > 3 else "")
        print(f"vlsae: using the cached {name} in {model_dir(name)}, trained with other settings than the shipped copy "
              f"({shown}); remove that folder to use the shipped one", file=sys.stderr)


def ship_model(name: str, source: str | Path | None = None, dest: str | Path | None = None) -> Path:
    """Copy a trained model (default: the cached one) to the shipped folder with fp16 weights.

    Floating-point tensors of every ``.safetensors`` file are stored as fp16
    (half the bytes; the model classes cast them back to their own dtype when
    loading); every other file is copied as it is, except the model's
    ``ship_exclude`` entries, and its ``ship_extras`` are added. Written to a
    temporary sibling and swapped into place.
    """
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    cls = get_zoo_class(name)
    src = Path(source) if source is not None else model_dir(name)
    if not _complete(cls, src):
        raise VlsaeError(f"no trained {name} at {src}; run vlsae zoo train {name} first")
    target = Path(dest) if dest is not None else shipped_dir(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        for path in sorted(src.rglob("*")):
            rel = path.relative_to(src)
            if rel.parts[0] in cls.ship_exclude:
                continue
            out = tmp / rel
            if path.is_dir():
                out.mkdir(parents=True, exist_ok=True)
                continue
            out.parent.mkdir(parents=True, exist_ok=True)
            if path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt") as handle:
                    metadata = handle.metadata()
                    tensors = {k: handle.get_tensor(k) for k in handle.keys()}
                tensors = {k: (v.half() if v.is_floating_point() and v.dtype == torch.float32 else v).contiguous()
                           for k, v in tensors.items()}
                save_file(tensors, str(out), metadata=metadata)
            else:
                shutil.copy2(path, out)
        for rel_name, text in cls.ship_extras(src).items():
            (tmp / rel_name).write_text(text)
        os.chmod(tmp, 0o755)
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


@dataclass
class TrainReport:
    name: str
    path: Path
    seconds: float
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def metrics(self) -> dict[str, Any]:
        return self.report.get("metrics", {})


def train_model(name: str, overrides: dict[str, Any] | None = None, out: str | Path | None = None,
                overwrite: bool = True, progress: bool = True) -> TrainReport:
    """Train zoo model ``name`` (seeded) into ``out`` (default: its cache folder); returns the report.

    The model is written to a temporary sibling folder and swapped into place,
    so an interrupted training never leaves a half-written model behind.
    """
    cls = get_zoo_class(name)
    target = check_writable_dir(out if out is not None else model_dir(name))
    if target.exists() and not overwrite:
        raise VlsaeError(f"{target} already exists; pass --overwrite to retrain")
    if target.exists() and any(target.iterdir()) and not (target / REPORT).is_file():
        raise VlsaeError(f"{target} is a non-empty folder that is not a zoo model; pick another --out")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    started = time.perf_counter()
    try:
        report = cls.train(tmp, dict(overrides or {}), progress=progress)
        seconds = time.perf_counter() - started
        report = {"name": cls.name, "seconds": round(seconds, 1), **report}
        (tmp / REPORT).write_text(json.dumps(report, indent=1))
        os.chmod(tmp, 0o755)
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return TrainReport(name=cls.name, path=target, seconds=seconds, report=report)


def read_report(name: str) -> dict[str, Any]:
    """The training report of a trained zoo model (cached, else shipped)."""
    path = (resolve_model_dir(name) or model_dir(name)) / REPORT
    if not path.is_file():
        raise VlsaeError(f"zoo model '{name}' is not trained yet ({path} missing); run vlsae zoo train {name}")
    return json.loads(path.read_text())


@contextlib.contextmanager
def _training_lock(name: str):
    """Serialise first-use training of one model across processes (POSIX advisory lock)."""
    zoo_dir().mkdir(parents=True, exist_ok=True)
    with open(zoo_dir() / f".{name}.lock", "w") as handle:
        try:
            import fcntl

            fcntl.flock(handle, fcntl.LOCK_EX)
        except (ImportError, OSError):
            pass
        yield


def load_model(name: str, device: Any = "cpu", train_if_missing: bool = True, folder: str | Path | None = None,
               use_shipped: bool = True) -> Any:
    """Load zoo model ``name``: from ``folder`` if given, else the cache, else the shipped copy,
    else train it first (once) into the cache."""
    cls = get_zoo_class(name)
    if folder is not None:
        return cls.load(Path(folder), device=device)
    found = resolve_model_dir(name, use_shipped=use_shipped)
    if found is not None:
        if use_shipped and found == model_dir(name):
            _notice_cache_shadowing(name)
        return cls.load(found, device=device)
    if not is_trained(name):
        if not train_if_missing:
            raise VlsaeError(f"zoo model '{name}' is not trained yet; run vlsae zoo train {name}")
        with _training_lock(cls.name):
            if not is_trained(name):  # another process may have trained it while we waited
                print(f"vlsae: zoo model '{name}' is not in {zoo_dir()} yet; training it now (once, a few minutes "
                      f"on a CPU; set VLSAE_CACHE to move the cache)", file=sys.stderr)
                train_model(name, progress=sys.stderr.isatty())
    return cls.load(model_dir(name), device=device)


def evaluate_model(name: str, folder: str | Path | None = None, device: Any = "cpu") -> dict[str, Any]:
    """Evaluate a trained zoo model (the cached one unless ``folder`` is given)."""
    cls = get_zoo_class(name)
    path = Path(folder) if folder is not None else (resolve_model_dir(name) or model_dir(name))
    if not (path / REPORT).is_file():
        raise VlsaeError(f"no trained {name} at {path}; run vlsae zoo train {name}")
    return cls.evaluate(path, device=device)


__all__ = ["ZOO", "ZooModel", "register_zoo_model", "list_models", "get_zoo_class", "cache_root", "zoo_dir", "model_dir",
           "is_trained", "is_shipped", "cache_differs_from_shipped", "shipped_dir", "resolve_model_dir", "ship_model", "train_model", "load_model", "evaluate_model", "read_report", "TrainReport"]
