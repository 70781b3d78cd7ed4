"""Reading steered images with shapes-diffusion's three judges, and the rates a steering run reports.

The judges (:mod:`multimodal.judges`): shapes-clip zero-shot (colour and
shape), the small CNN trained on real renders (colour and shape) and the
pixel colour check (colour only). Each is weak in its own way, so every rate
is given per judge. For a steered image the questions are:

- **flip**: does the judge read the target value (``colour=blue``)?
- **preservation**: does it still read the prompt's value of each *other*
  attribute (the shape, when steering colour)? Reported beside the same rate
  on the unsteered images of the same seeds;
- **gone**: does it no longer read the prompt's value of the steered attribute
  (removal: "the named colour disappears")?
- **change**: mean absolute pixel difference to the unsteered image of the same seed, in [0, 1].
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor

from vlsae.errors import VlsaeError
from vlsae.files import atomic_save_tensors, read_safetensors

from multimodal.judges import ClipJudge, CnnJudge, pixel_colours, train_cnn_judge
from multimodal.shapesworld import vocabulary
from multimodal.zoo import cache_root
from multimodal.zoo.shapes_diffusion import TRAIN_WORLD, world_config

JUDGES = ("clip", "cnn", "pixel")
#: which attributes each judge reads
READS = {"clip": ("colour", "shape"), "cnn": ("colour", "shape"), "pixel": ("colour",)}

Readings = dict[str, dict[str, list[Any]]]  # judge -> attribute -> value per image


@dataclass
class JudgePanel:
    """The judges a steering run reads its images with (any subset of :data:`JUDGES`)."""

    judges: tuple[str, ...] = JUDGES
    clip: ClipJudge | None = field(default=None, repr=False)
    cnn: CnnJudge | None = field(default=None, repr=False)

    @classmethod
    def load(cls, judges: Sequence[str] = JUDGES, seed: int = 0, cnn_steps: int = 300, cnn_train: int = 4000,
             clip_folder: str | None = None) -> "JudgePanel":
        """The judges named: shapes-clip from the zoo, the CNN trained now on shapes-diffusion's training world
        (seeded, seconds)."""
        unknown = [j for j in judges if j not in JUDGES]
        if unknown or not judges:
            raise VlsaeError(f"unknown judge '{unknown[0] if unknown else ''}'; choose from {', '.join(JUDGES)}")
        clip = ClipJudge.from_zoo(clip_folder) if "clip" in judges else None
        cnn = cnn_judge(seed, cnn_train, cnn_steps) if "cnn" in judges else None
        return cls(judges=tuple(judges), clip=clip, cnn=cnn)

    def reads(self, attribute: str) -> list[str]:
        """The panel's judges that read ``attribute``."""
        return [j for j in self.judges if attribute in READS[j]]

    @torch.no_grad()
    def read(self, images: Tensor) -> Readings:
        """judge -> attribute -> the value it reads in each image ((n, 3, H, W) uint8)."""
        out: Readings = {}
        if self.clip is not None:
            out["clip"] = self.clip.classify(images)
        if self.cnn is not None:
            out["cnn"] = self.cnn.classify(images)
        if "pixel" in self.judges:
            out["pixel"] = {"colour": pixel_colours(images)}
        return out


def cnn_judge(seed: int, n: int, steps: int, cache: bool = True) -> CnnJudge:
    """The CNN judge trained on ``n`` renders of shapes-diffusion's training world for ``steps`` steps; kept in
    ``$VLSAE_CACHE/judges/`` (safetensors) after the first training, as the same seed and settings train the
    same weights and every steering run would otherwise spend a minute of CPU on it."""
    path = cache_root() / "judges" / f"cnn-seed{seed}-n{n}-steps{steps}.safetensors"
    if cache and path.is_file():
        try:
            tensors = read_safetensors(path, what="the cached CNN judge")
            vocab = vocabulary()
            judge = CnnJudge({a: len(vocab[a]) for a in ("shape", "colour")})
            judge.load_state_dict(tensors)
            return judge.eval()
        except (VlsaeError, RuntimeError):
            pass  # a stale or damaged cache entry: train again and replace it
    judge = train_cnn_judge(world_config(dict(TRAIN_WORLD)), seed, n=n, steps=steps)
    if cache:
        try:
            atomic_save_tensors({k: v.detach().contiguous() for k, v in judge.state_dict().items()}, path)
        except OSError:
            pass  # an unwritable cache only costs the next run the training again
    return judge


def rate_of(values: Sequence[Any], wanted: Sequence[Any] | Any) -> float:
    """Fraction of ``values`` equal to ``wanted`` (one value for all, or one per image)."""
    if not len(values):
        return 0.0
    if isinstance(wanted, (list, tuple)):
        return sum(v == w for v, w in zip(values, wanted)) / len(values)
    return sum(v == wanted for v in values) / len(values)


def image_change(steered: Tensor, base: Tensor) -> float:
    """Mean absolute pixel difference of ``steered`` to ``base`` (same seeds, same order), in [0, 1]."""
    return float((steered.float() - base.float()).abs().mean() / 255.0)


def steering_rates(steered: Readings, base: Readings, asked: Sequence[dict[str, str]],
                   target: tuple[str, str] | None, steered_attribute: str | None = None,
                   attributes: Sequence[str] = ("colour", "shape")) -> dict[str, Any]:
    """judge -> {flip, gone, preserve: {attribute: rate}, and each one's unsteered rate} for one set of images.

    ``asked``: per image, the attributes its prompt names (``{"colour": "red",
    "shape": "circle"}``); ``target``: (attribute, value) steered toward, or
    None (removal: no flip rate); ``steered_attribute``: the attribute the
    edit is about (default ``target``'s). ``gone``: the image no longer shows
    the prompt's value of the steered attribute; ``preserve``: it still shows
    the prompt's value of each other attribute.
    """
    out: dict[str, Any] = {}
    steered_attribute = steered_attribute or (target[0] if target else None)
    for judge, readings in steered.items():
        entry: dict[str, Any] = {}
        if target is not None and target[0] in readings:
            entry["flip"] = rate_of(readings[target[0]], target[1])
            entry["flip_unsteered"] = rate_of(base[judge][target[0]], target[1])
        for attribute in attributes:
            if attribute not in readings or not all(attribute in a for a in asked):
                continue
            truth = [a[attribute] for a in asked]
            if attribute == steered_attribute:
                entry["gone"] = 1.0 - rate_of(readings[attribute], truth)
                entry["gone_unsteered"] = 1.0 - rate_of(base[judge][attribute], truth)
            else:
                entry.setdefault("preserve", {})[attribute] = rate_of(readings[attribute], truth)
                entry.setdefault("preserve_unsteered", {})[attribute] = rate_of(base[judge][attribute], truth)
        out[judge] = entry
    return out


__all__ = ["JUDGES", "READS", "Readings", "JudgePanel", "cnn_judge", "rate_of", "image_change", "steering_rates"]
