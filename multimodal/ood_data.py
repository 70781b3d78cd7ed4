"""Far-OOD image sets for the OOD benchmarks, written as webdataset pair shards.

Each kind is a registered generator of seeded images (record ``i`` depends only
on ``(kind, seed, i)``, like ShapesWorld), written in the ShapesWorld shard
format (``__key__``, ``png``, ``txt``, ``json``) so the same pair reader,
extraction and activation cache serve it:

- ``noise``: pixel noise: white RGB noise, or low-resolution noise upsampled
  (smooth colour blobs), at a random contrast;
- ``texture``: procedural textures with no objects: oriented sinusoidal
  gratings, plaids (two gratings) and rotated checkerboards in random colours;
- ``photo``: crops of the real photographs scikit-image ships in its wheel
  (``skimage.data``: astronaut, cat, coffee, rocket, the Hubble deep field, ...;
  the ones that need a download are not used), random position, size and flip,
  resized to the image size; greyscale photographs are used as grey RGB.
- ``greyscale``: ShapesWorld scenes (seeded, any holdout rules) turned grey: the
  objects and backgrounds of the training distribution with their colour gone,
  a near-OOD covariate shift.

The caption of a record says what the image is ("random noise", "a photograph
(astronaut)"); the json holds the kind, the generator's parameters and, for
photos, the source image. ``vlsae ood`` scores the images; the caption is there
because a pair record has one.

    from multimodal.ood_data import write_ood_set
    write_ood_set("photo", "data/ood/photo", n=500, image_size=64)
"""
from __future__ import annotations

import io
import json
import math
import os
import shutil
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from vlsae.config import to_dict
from vlsae.errors import VlsaeError
from vlsae.files import atomic_write_json, check_writable_dir
from vlsae.registry import Registry

from multimodal.shapesworld import ShapesWorldConfig, render_sample

#: scikit-image sample images that are photographs (or micrographs) and ship inside its wheel
SKIMAGE_PHOTOS: tuple[str, ...] = ("astronaut", "camera", "cat", "chelsea", "coffee", "coins", "clock", "moon",
                                   "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "page", "text",
                                   "brick", "grass", "gravel")

Generator = Callable[[np.random.Generator, int, dict[str, Any]], tuple[Image.Image, str, dict[str, Any]]]
KINDS: Registry[Generator] = Registry("OOD image kind", name_attr="kind")


def register_kind(name: str) -> Callable[[Generator], Generator]:
    """Decorator: a generator ``(rng, image_size, options) -> (image, caption, meta)`` for ``write_ood_set``."""
    return KINDS.register(name)


def list_kinds() -> list[str]:
    return KINDS.names()


def _to_image(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@register_kind("noise")
def _noise(rng: np.random.Generator, size: int, options: dict[str, Any]) -> tuple[Image.Image, str, dict[str, Any]]:
    contrast = float(rng.uniform(0.3, 1.0))
    mean = rng.uniform(0.2, 0.8, size=3) * 255
    if rng.random() < 0.5:
        pixels = rng.uniform(-1, 1, size=(size, size, 3))
        style, cells = "white", size
    else:
        cells = int(rng.integers(2, max(3, size // 4)))
        small = rng.uniform(-1, 1, size=(cells, cells, 3))
        grid = Image.fromarray(((small + 1) * 127.5).astype(np.uint8)).resize((size, size), Image.BICUBIC)
        pixels = np.asarray(grid, dtype=np.float64) / 127.5 - 1
        style = "smooth"
    image = _to_image(mean + contrast * 127.5 * pixels)
    return image, f"{style} random noise", {"style": style, "cells": cells, "contrast": round(contrast, 3)}


def _grating(size: int, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
    """(size, size) values in [-1, 1] of a sinusoidal grating, with its parameters."""
    angle = float(rng.uniform(0, math.pi))
    period = float(rng.uniform(3, size / 2))
    phase = float(rng.uniform(0, 2 * math.pi))
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    wave = np.sin(2 * math.pi * (x * math.cos(angle) + y * math.sin(angle)) / period + phase)
    return wave, {"angle": round(angle, 3), "period": round(period, 2)}


@register_kind("texture")
def _texture(rng: np.random.Generator, size: int, options: dict[str, Any]) -> tuple[Image.Image, str, dict[str, Any]]:
    style = str(rng.choice(["grating", "plaid", "checker"]))
    if style == "grating":
        pattern, params = _grating(size, rng)
    elif style == "plaid":
        first, a = _grating(size, rng)
        second, b = _grating(size, rng)
        pattern, params = (first + second) / 2, {"first": a, "second": b}
    else:
        angle = float(rng.uniform(0, math.pi / 2))
        cell = float(rng.uniform(2, size / 3))
        y, x = np.mgrid[0:size, 0:size].astype(np.float64)
        u, v = x * math.cos(angle) + y * math.sin(angle), -x * math.sin(angle) + y * math.cos(angle)
        pattern = np.where((np.floor(u / cell) + np.floor(v / cell)) % 2 == 0, 1.0, -1.0)
        params = {"angle": round(angle, 3), "cell": round(cell, 2)}
    low, high = rng.uniform(0, 255, size=3), rng.uniform(0, 255, size=3)
    weight = (pattern[..., None] + 1) / 2
    image = _to_image(low * (1 - weight) + high * weight)
    return image, f"a {style} texture", {"style": style, **params}


@lru_cache(maxsize=None)
def _skimage_photo(name: str) -> np.ndarray | None:
    """One scikit-image sample image as (h, w, 3) uint8 RGB; None when it cannot be loaded offline."""
    import skimage.data

    try:
        pixels = np.asarray(getattr(skimage.data, name)())
    except Exception:  # noqa: BLE001 - an image that needs a download (pooch) or is missing is skipped
        return None
    if pixels.dtype != np.uint8:
        pixels = (255 * (pixels - pixels.min()) / max(float(np.ptp(pixels)), 1e-12)).astype(np.uint8)
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=2)
    return np.ascontiguousarray(pixels[..., :3])


def available_photos() -> list[str]:
    """The :data:`SKIMAGE_PHOTOS` that load on this machine without a download (needs scikit-image)."""
    try:
        import skimage.data  # noqa: F401
    except ImportError:
        raise VlsaeError("the photo OOD set crops scikit-image's bundled sample images: pip install scikit-image") from None
    return [name for name in SKIMAGE_PHOTOS if _skimage_photo(name) is not None]


@register_kind("photo")
def _photo(rng: np.random.Generator, size: int, options: dict[str, Any]) -> tuple[Image.Image, str, dict[str, Any]]:
    names = options["photos"]
    name = names[int(rng.integers(len(names)))]
    pixels = _skimage_photo(name)
    height, width = pixels.shape[:2]
    side = int(rng.integers(max(8, min(height, width) // 4), min(height, width) + 1))
    top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
    crop = Image.fromarray(pixels[top:top + side, left:left + side]).resize((size, size), Image.LANCZOS)
    flipped = bool(rng.random() < 0.5)
    if flipped:
        crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
    return crop.convert("RGB"), f"a photograph ({name.replace('_', ' ')})", {
        "source": f"skimage.data.{name}", "crop": [top, left, side], "flipped": flipped}


@register_kind("greyscale")
def _greyscale(rng: np.random.Generator, size: int, options: dict[str, Any]) -> tuple[Image.Image, str, dict[str, Any]]:
    world = options["world"]
    index = int(options["index"])
    sample = render_sample(world, index)
    image = sample.image.convert("L").convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.LANCZOS)
    return image, f"a greyscale picture: {sample.caption}", {"scene": sample.meta}


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def kind_options(kind: str, seed: int = 0, image_size: int = 64, world: ShapesWorldConfig | None = None) -> dict[str, Any]:
    """What the generator of ``kind`` reads besides its random numbers (the photo list, the world)."""
    if kind not in KINDS:
        raise VlsaeError(KINDS.unknown_message(kind))
    if kind == "photo":
        photos = available_photos()
        if not photos:
            raise VlsaeError("none of scikit-image's bundled photographs loads here; reinstall scikit-image")
        return {"photos": photos}
    if kind == "greyscale":
        return {"world": world or ShapesWorldConfig(seed=seed, image_size=image_size)}
    return {}


def render_ood(kind: str, index: int, seed: int = 0, image_size: int = 64,
               options: dict[str, Any] | None = None) -> tuple[str, Image.Image, str, dict[str, Any]]:
    """(key, image, caption, meta) of record ``index`` of ``kind`` (depends only on kind, seed, index);
    ``options`` as :func:`kind_options` gives them (computed when not given)."""
    generator = KINDS.get(kind)
    options = kind_options(kind, seed, image_size) if options is None else options
    rng = np.random.default_rng([seed, index, sum(kind.encode()) + 11])
    image, caption, params = generator(rng, image_size, {**options, "index": index})
    key = f"{kind}{seed:04d}{index:09d}"
    return key, image, caption, {"kind": kind, "index": index, "seed": seed, **params}


def write_ood_set(kind: str, out_dir: str | Path, n: int, shard_size: int = 5000, image_size: int = 64,
                  seed: int = 0, world: ShapesWorldConfig | None = None, overwrite: bool = False,
                  progress: bool = False) -> dict[str, Any]:
    """Write ``n`` records of ``kind`` as shards ``out_dir/000000.tar`` ... plus ``ood.json``; returns its summary.

    ``world`` is the ShapesWorld the ``greyscale`` kind renders (default: seed ``seed``). Shards are
    written under a temporary name and renamed when complete; a non-empty ``out_dir`` is refused
    unless ``overwrite``.
    """
    import webdataset as wds

    if n <= 0 or shard_size <= 0:
        raise VlsaeError(f"n and shard_size must be positive, got n={n}, shard_size={shard_size}")
    if image_size < 16:
        raise VlsaeError(f"image_size must be at least 16, got {image_size}")
    generator_options = kind_options(kind, seed, image_size, world)
    out = check_writable_dir(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise VlsaeError(f"{out} is not empty; choose another folder or pass overwrite=True to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    from tqdm.auto import tqdm

    shards = []
    for number, start in enumerate(tqdm(range(0, n, shard_size), desc=f"ood {kind}", unit="shard", disable=not progress)):
        path = out / f"{number:06d}.tar"
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as stream:
            writer = wds.TarWriter(stream)
            for index in range(start, min(start + shard_size, n)):
                key, image, caption, meta = render_ood(kind, index, seed, image_size, generator_options)
                writer.write({"__key__": key, "png": _png(image), "txt": caption, "json": json.dumps(meta).encode()})
            writer.close()
        os.replace(tmp, path)
        shards.append(path.name)
    summary = {"kind": kind, "n": n, "seed": seed, "image_size": image_size, "shard_size": shard_size,
               "shards": len(shards), "pattern": f"{out}/{{000000..{len(shards) - 1:06d}}}.tar"}
    if kind == "photo":
        summary["photos"] = generator_options["photos"]
    if kind == "greyscale":
        summary["world"] = to_dict(generator_options["world"])
    atomic_write_json(out / "ood.json", summary)
    return summary


__all__ = ["KINDS", "SKIMAGE_PHOTOS", "available_photos", "kind_options", "list_kinds", "register_kind", "render_ood", "write_ood_set"]
