"""What every model adapter shares: the result type, token selection, hooks.

An adapter wraps one model and turns a batch of image-caption pairs into
activations per modality at a named hook point:

- ``prepare(pairs)`` does the CPU side (image transforms, tokenising) and can
  run in a background thread while the model works on the previous batch;
- ``forward(prepared, hook, tokens)`` runs the model and selects tokens;
- ``extract(pairs, hook, tokens) = forward(prepare(pairs), ...)``.

Token selection (``tokens=``), for hook points that hold a sequence:

=========  ==============================================  ================================================
mode       image rows per pair                             text rows per pair (causal CLIP text tower)
=========  ==============================================  ================================================
``cls``    1: the class token                              1: the token the model pools (CLIP: end-of-text)
``patch``  grid patches (no class/register tokens)         the caption's word tokens (no start/end tokens)
``all``    class (and register) tokens + patches           start, words and end token (no padding)
``mean``   1: mean over the patches                        1: mean over the word tokens
=========  ==============================================  ================================================

Final embeddings (hook ``final``) hold one vector per input: only ``cls``
applies. Every row carries the position of its pair in the batch
(:attr:`Extracted.pair_index`), so image and caption rows of one pair stay
together even when a modality has several rows per pair.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, Sequence

import torch
from torch import Tensor

from vlsae.errors import VlsaeError

TOKEN_MODES = ("cls", "patch", "all", "mean")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """"fp32" | "bf16" | "fp16" (or a torch dtype among those) -> torch dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise VlsaeError(f"dtype {dtype} not supported; use fp32, bf16 or fp16")
        return dtype
    key = str(dtype).strip().lower()
    aliases = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}
    key = aliases.get(key, key)
    if key not in DTYPES:
        raise VlsaeError(f"unknown dtype '{dtype}'; use fp32, bf16 or fp16")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def pair_fields(record: Any) -> tuple[str, Any, Any]:
    """(key, image, caption) of a pair record: an object with ``key``/``image``/``caption``
    attributes, or a mapping with those keys (webdataset's ``__key__`` also accepted)."""
    if isinstance(record, dict):
        key = record.get("key", record.get("__key__"))
        return key, record.get("image"), record.get("caption")
    return getattr(record, "key"), getattr(record, "image", None), getattr(record, "caption", None)


@dataclass
class Extracted:
    """Activations of one batch of pairs.

    keys:        one webdataset key per pair, in batch order.
    acts:        modality -> (rows, width) tensor on the CPU.
    pair_index:  modality -> (rows,) int64, the position in ``keys`` of each row's pair.
    """

    keys: list[str]
    acts: dict[str, Tensor]
    pair_index: dict[str, Tensor] = field(default_factory=dict)

    def __getitem__(self, modality: str) -> Tensor:
        return self.acts[modality]

    @property
    def modalities(self) -> list[str]:
        return list(self.acts)

    def one_row_per_pair(self) -> bool:
        n = len(self.keys)
        return all(t.shape[0] == n for t in self.acts.values())


@dataclass
class Prepared:
    """The CPU side of a batch: keys plus model inputs (tensors) per modality."""

    keys: list[str]
    inputs: dict[str, Tensor]
    extra: dict[str, Any] = field(default_factory=dict)


def select_tokens(hidden: Tensor, tokens: str, cls_pos: Tensor | None, patch_mask: Tensor,
                  all_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Rows of ``hidden`` chosen by a token mode.

    hidden:     (batch, seq, width) tokens of one hook point.
    cls_pos:    (batch,) position of the pooled token (None: the model has none).
    patch_mask: (batch, seq) bool, content tokens ("patch" rows, averaged by "mean").
    all_mask:   (batch, seq) bool, every real token ("all" rows).
    Returns (rows, width) and the (rows,) int64 batch position of each row.
    """
    batch = hidden.shape[0]
    arange = torch.arange(batch, device=hidden.device)
    if tokens == "cls":
        if cls_pos is None:
            raise VlsaeError("this hook point has no class token; use --tokens mean, patch or all")
        return hidden[arange, cls_pos], arange
    if tokens == "mean":
        weights = patch_mask.to(hidden.dtype)
        counts = weights.sum(dim=1, keepdim=True).clamp_min(1)
        return (hidden * weights.unsqueeze(-1)).sum(dim=1) / counts, arange
    mask = patch_mask if tokens == "patch" else all_mask
    index = arange.unsqueeze(1).expand_as(mask)[mask]
    return hidden[mask], index


class _StopForward(Exception):
    """Raised by a capture hook once every requested block has run."""


class BlockCapture:
    """Forward hooks that store the outputs of chosen blocks and stop the
    forward pass after the deepest one (later blocks would be wasted work).

    >>> with BlockCapture({3: blocks[3]}) as cap:
    ...     cap.run(lambda: tower(x))
    >>> cap.outputs[3]   # (batch, seq, width)
    """

    def __init__(self, blocks: dict[int, torch.nn.Module], seq_first: bool = False, stop: bool = True):
        self.blocks = blocks
        self.seq_first = seq_first
        self.stop = stop  # False: let the forward finish (its output is wanted too)
        self.outputs: dict[int, Tensor] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> "BlockCapture":
        last = max(self.blocks, default=None)
        for index, module in self.blocks.items():
            def hook(_module, _inputs, output, index=index):
                out = output[0] if isinstance(output, (tuple, list)) else output
                self.outputs[index] = out.transpose(0, 1) if self.seq_first else out
                if self.stop and index == last and len(self.outputs) == len(self.blocks):
                    raise _StopForward
            self._handles.append(module.register_forward_hook(hook))
        return self

    def run(self, fn) -> Any:
        try:
            return fn()
        except _StopForward:
            return None

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class Adapter:
    """Base class of model adapters; see the module docstring.

    Subclasses set ``usage`` (spec syntax) and ``summary`` (one line), implement
    ``from_spec``, ``hook_points``, ``hook_modality``, ``widths``, ``prepare``
    and ``forward``.
    """

    registry_name: ClassVar[str] = ""
    usage: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    modalities: tuple[str, ...] = ()
    default_hook: str = "final"

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.spec = ""
        self.device = device
        self.dtype = dtype

    # -- to implement ---------------------------------------------------------
    @classmethod
    def from_spec(cls, rest: str, device: torch.device, dtype: torch.dtype, **options: Any) -> "Adapter":
        raise NotImplementedError

    def hook_points(self) -> list[str]:
        """Every hook point name this model offers."""
        raise NotImplementedError

    def hook_modalities(self, point: str) -> tuple[str, ...]:
        """The modalities one (valid) hook point yields."""
        raise NotImplementedError

    def widths(self, hook: str) -> dict[str, int]:
        """modality -> activation width at ``hook``."""
        raise NotImplementedError

    def prepare(self, pairs: Sequence[Any]) -> Prepared:
        raise NotImplementedError

    def forward(self, prepared: Prepared, hook: str, tokens: str) -> Extracted:
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------
    def forward_hooks(self, prepared: Prepared, hooks: Sequence[str], tokens: str) -> dict[str, Extracted]:
        """Activations at several hooks of one batch: hook -> what :meth:`forward` gives there. This default
        runs one forward per hook; adapters whose model yields all the points in one pass override it."""
        return {hook: self.forward(prepared, hook, tokens) for hook in hooks}

    def extract(self, pairs: Sequence[Any], hook: str | None = None, tokens: str = "cls") -> Extracted:
        """Activations of ``pairs`` at ``hook`` (default: the final embeddings)."""
        return self.forward(self.prepare(pairs), hook or self.default_hook, tokens)

    def parse_hook(self, hook: str) -> dict[str, str]:
        """Validate a hook string and map modality -> hook point.

        A hook is one point (``final``, ``visual.blocks.3``) or a comma-joined
        list of points for different modalities (``visual.blocks.5,text.blocks.3``).
        """
        points = [p.strip() for p in str(hook).split(",") if p.strip()]
        if not points:
            raise VlsaeError(f"empty hook; {self._hook_hint()}")
        valid = set(self.hook_points())
        result: dict[str, str] = {}
        for point in points:
            if point not in valid:
                raise VlsaeError(f"unknown hook point '{point}' for {self.spec or self.registry_name}; {self._hook_hint()}")
            for modality in self.hook_modalities(point):
                if modality in result:
                    raise VlsaeError(f"hook '{hook}' names two points for the {modality} modality; give one per modality")
                result[modality] = point
        return result

    def check_tokens(self, tokens: str) -> str:
        if tokens not in TOKEN_MODES:
            raise VlsaeError(f"unknown token selection '{tokens}'; use one of {', '.join(TOKEN_MODES)}")
        return tokens

    def _hook_hint(self) -> str:
        points = self.hook_points()
        shown = ", ".join(points[:12]) + (", ..." if len(points) > 12 else "")
        return f"valid hook points: {shown}"

    def autocast(self):
        """Run the model in ``self.dtype`` (no-op for fp32)."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def _finish(self, keys: list[str], acts: dict[str, Tensor], index: dict[str, Tensor]) -> Extracted:
        return Extracted(
            keys=keys,
            acts={m: t.detach().to(device="cpu", dtype=self.dtype).contiguous() for m, t in acts.items()},
            pair_index={m: t.detach().to(device="cpu", dtype=torch.int64) for m, t in index.items()},
        )

    def describe(self) -> dict[str, Any]:
        """A JSON-safe description recorded in activation-cache manifests."""
        return {"spec": self.spec, "adapter": self.registry_name, "modalities": list(self.modalities)}


def to_rgb(image: Any) -> Any:
    """A PIL image in RGB (palette, greyscale and RGBA images are converted)."""
    if image is None:
        raise VlsaeError("a pair has no image; image adapters need the png/jpg field of every record")
    return image if getattr(image, "mode", "RGB") == "RGB" else image.convert("RGB")


_PASS_THROUGH = {"MaybeConvertMode", "MaybeToTensor", "ToTensor", "ConvertImageDtype"}


def _identity_size_normalise(transform: Any) -> tuple[int, Tensor, Tensor] | None:
    """(size, mean, std) when ``transform`` is resize-to-S / centre-crop-S / to-tensor / normalise,
    i.e. the identity plus normalisation for S x S images; None for anything else."""
    steps = getattr(transform, "transforms", None)
    if not steps:
        return None
    sizes, mean, std = set(), None, None
    for step in steps:
        name = type(step).__name__
        if name in ("Resize", "CenterCrop"):
            size = step.size
            if isinstance(size, int):
                size = (size, size)
            if len(size) == 1:
                size = (size[0], size[0])
            if getattr(step, "max_size", None) is not None or size[0] != size[1]:
                return None
            sizes.add(int(size[0]))
        elif name == "Normalize":
            mean, std = step.mean, step.std
        elif name not in _PASS_THROUGH:
            return None
    if len(sizes) != 1 or mean is None or "ToTensor" not in "".join(type(s).__name__ for s in steps):
        return None
    return sizes.pop(), torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), \
        torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)


def stack_images(images: Iterable[Any], transform) -> Tensor:
    """(batch, 3, H, W) float tensor of transformed PIL images.

    When every image already has the transform's output size and the transform
    is resize/crop to that size + to-tensor + normalise (open_clip's eval
    transform on ShapesWorld), the batch is converted in one vectorised step:
    same operations in the same order, so the same numbers, several times faster.
    """
    images = [to_rgb(image) for image in images]
    fast = _identity_size_normalise(transform)
    if fast is not None and images and all(image.size == (fast[0], fast[0]) for image in images):
        import numpy as np

        _, mean, std = fast
        batch = torch.from_numpy(np.stack([np.asarray(image, dtype=np.uint8) for image in images]))
        batch = batch.permute(0, 3, 1, 2).contiguous().to(torch.float32).div(255)
        return batch.sub_(mean).div_(std)
    return torch.stack([transform(image) for image in images])
