"""ShapesWorld: procedurally generated image-caption pairs with planted concepts.

Every image holds one to three objects with planted attributes (shape, colour,
size, position) on a textured background; the caption names some of them,
each attribute with its own probability, through several templates and
synonyms. Record ``i`` depends only on ``(seed, i)``, so shards can be written
independently, in parallel, and reproduced exactly. The ``json`` of each record
holds every object's attributes, which of them the caption mentions, and any
corruption applied (for the data-filtering experiments).

    vlsae world --out data/world --n 50000 --shard-size 5000 --holdout shape=star --noise 0.3
"""
from __future__ import annotations

import io
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from vlsae.config import option, to_dict
from vlsae.errors import VlsaeError
from vlsae.files import atomic_output, atomic_write_text, check_writable_dir

SHAPE_FAMILIES: dict[str, tuple[str, ...]] = {
    "round": ("circle", "ellipse", "ring"),
    "polygon": ("triangle", "square", "pentagon", "hexagon"),
    "other": ("star", "cross", "heart"),
}
COLOUR_FAMILIES: dict[str, tuple[str, ...]] = {
    "warm": ("red", "orange", "yellow", "pink"),
    "cool": ("green", "blue", "purple", "cyan"),
    "neutral": ("white", "black"),
}
RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "orange": (245, 135, 20), "yellow": (240, 220, 30), "pink": (245, 130, 200),
    "green": (30, 170, 50), "blue": (30, 70, 225), "purple": (140, 40, 190), "cyan": (30, 215, 225),
    "white": (250, 250, 250), "black": (10, 10, 10),
}
SIZES: dict[str, float] = {"small": 0.11, "medium": 0.16, "large": 0.23}  # object radius / image size
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.22, 0.22), "top": (0.5, 0.22), "top right": (0.78, 0.22),
    "left": (0.22, 0.5), "center": (0.5, 0.5), "right": (0.78, 0.5),
    "bottom left": (0.22, 0.78), "bottom": (0.5, 0.78), "bottom right": (0.78, 0.78),
}
TEXTURES: tuple[str, ...] = ("plain", "stripes", "dots", "checker")
ATTRIBUTES: tuple[str, ...] = ("shape", "colour", "size", "position", "texture")

SYNONYMS: dict[str, tuple[str, ...]] = {
    "large": ("large", "big"), "small": ("small", "tiny"), "medium": ("medium", "medium-sized"),
    "square": ("square",), "circle": ("circle",), "cross": ("cross", "plus sign"),
}
POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "top left": ("in the top left", "at the upper left"), "top": ("at the top",), "top right": ("in the top right", "at the upper right"),
    "left": ("on the left",), "center": ("in the center", "in the middle"), "right": ("on the right",),
    "bottom left": ("in the bottom left", "at the lower left"), "bottom": ("at the bottom",),
    "bottom right": ("in the bottom right", "at the lower right"),
}
TEXTURE_PHRASES: dict[str, tuple[str, ...]] = {
    "plain": ("on a plain background",), "stripes": ("on a striped background", "on stripes"),
    "dots": ("on a dotted background", "on polka dots"), "checker": ("on a checkered background",),
}
TEMPLATES_ONE = ("{aobj}", "a photo of {aobj}", "there is {aobj}", "an image showing {aobj}", "a picture of {aobj}")
TEMPLATES_MANY = ("{objs}", "a photo of {objs}", "there are {n} shapes: {objs}", "an image with {objs}")
NUMBER_WORDS = {2: "two", 3: "three"}


def vocabulary() -> dict[str, Any]:
    """Attribute values and their families: for prompts, probes and holdout rules."""
    return {
        "shape": [s for family in SHAPE_FAMILIES.values() for s in family],
        "colour": [c for family in COLOUR_FAMILIES.values() for c in family],
        "size": list(SIZES), "position": list(POSITIONS), "texture": list(TEXTURES),
        "families": {"shape": {k: list(v) for k, v in SHAPE_FAMILIES.items()},
                     "colour": {k: list(v) for k, v in COLOUR_FAMILIES.items()}},
    }


@dataclass
class ShapesWorldConfig:
    seed: int = option(0, help="world seed; record i depends only on (seed, i)")
    image_size: int = option(64, help="image side in pixels")
    min_objects: int = option(1, help="fewest objects per image")
    max_objects: int = option(3, help="most objects per image")
    textures: tuple[str, ...] = option(TEXTURES, help="background textures to draw from")
    mention_shape: float = option(1.0, help="probability that the caption names an object's shape")
    mention_colour: float = option(0.9, help="probability that the caption names an object's colour")
    mention_size: float = option(0.6, help="probability that the caption names an object's size")
    mention_position: float = option(0.5, help="probability that the caption names an object's position")
    mention_texture: float = option(0.3, help="probability that the caption names the background texture")
    holdout: tuple[str, ...] = option((), help="rules like shape=star or shape=circle+colour=blue that objects must not match")
    holdout_only: bool = option(False, help="invert the holdout: the first object of every image matches a rule (an OOD split)")
    noise: float = option(0.0, help="fraction of pairs whose caption is corrupted (flagged in the json)")
    supersample: int = option(3, help="render at this multiple of the size, then downsample (antialiasing)")

    def __post_init__(self) -> None:
        vocab = vocabulary()
        if self.image_size < 16:
            raise VlsaeError(f"image_size must be at least 16, got {self.image_size}")
        if not 1 <= self.min_objects <= self.max_objects <= 3:
            raise VlsaeError("objects per image must satisfy 1 <= min_objects <= max_objects <= 3")
        unknown = [t for t in self.textures if t not in TEXTURES]
        if unknown or not self.textures:
            raise VlsaeError(f"unknown texture '{unknown[0] if unknown else ''}'; choose from {', '.join(TEXTURES)}")
        if not 0 <= self.noise <= 1:
            raise VlsaeError(f"noise must be a fraction in [0, 1], got {self.noise}")
        self.holdout = tuple(self.holdout)
        self.textures = tuple(self.textures)
        self._rules = [parse_rule(r, vocab) for r in self.holdout]
        if self.holdout_only and not self._rules:
            raise VlsaeError("holdout_only needs at least one holdout rule, e.g. shape=star")

    @property
    def rules(self) -> list[dict[str, str]]:
        return self._rules


def parse_rule(rule: str, vocab: dict[str, Any] | None = None) -> dict[str, str]:
    """'shape=circle+colour=blue' -> {'shape': 'circle', 'colour': 'blue'} (checked against the vocabulary)."""
    vocab = vocab or vocabulary()
    parsed: dict[str, str] = {}
    for part in rule.split("+"):
        if "=" not in part:
            raise VlsaeError(f"holdout rule '{rule}' must look like attribute=value, e.g. shape=star or shape=circle+colour=blue")
        attr, value = (s.strip() for s in part.split("=", 1))
        attr = "colour" if attr == "color" else attr
        if attr not in ("shape", "colour", "size", "position"):
            raise VlsaeError(f"holdout attribute '{attr}' unknown; use shape, colour, size or position")
        if value not in vocab[attr]:
            raise VlsaeError(f"'{value}' is not a ShapesWorld {attr}; choose from {', '.join(vocab[attr])}")
        parsed[attr] = value
    return parsed


class Sample(NamedTuple):
    image: Image.Image
    caption: str
    meta: dict[str, Any]
    key: str
    caption_state: dict | None = None  # the random state the clean caption was drawn from (for swapped captions)


def _matches(obj: dict[str, str], rule: dict[str, str]) -> bool:
    return all(obj[a] == v for a, v in rule.items())


def _sample_objects(cfg: ShapesWorldConfig, rng: np.random.Generator) -> list[dict[str, str]]:
    vocab = vocabulary()
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    positions = rng.choice(len(POSITIONS), size=n, replace=False)
    names = list(POSITIONS)
    objects = []
    for i in range(n):
        for _ in range(1000):
            obj = {"shape": str(rng.choice(vocab["shape"])), "colour": str(rng.choice(vocab["colour"])),
                   "size": str(rng.choice(vocab["size"])), "position": names[int(positions[i])]}
            if cfg.holdout_only and i == 0:
                rule = cfg.rules[int(rng.integers(len(cfg.rules)))]
                obj.update(rule)
                if "position" in rule and any(o["position"] == rule["position"] for o in objects):
                    continue
                break
            if not any(_matches(obj, r) for r in cfg.rules):
                break
        else:
            raise VlsaeError("the holdout rules exclude every object; hold out fewer values")
        objects.append(obj)
    if cfg.holdout_only:  # the first object may have moved onto another's position
        used = {objects[0]["position"]}
        for obj in objects[1:]:
            if obj["position"] in used:
                obj["position"] = next(p for p in names if p not in used)
            used.add(obj["position"])
    return objects


def _polygon(cx: float, cy: float, r: float, sides: int, rotation: float) -> list[tuple[float, float]]:
    return [(cx + r * math.cos(rotation + 2 * math.pi * i / sides), cy + r * math.sin(rotation + 2 * math.pi * i / sides))
            for i in range(sides)]


def _shape_points(shape: str, cx: float, cy: float, r: float, rotation: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return _polygon(cx, cy, r, 3, -math.pi / 2 + rotation)
    if shape == "square":
        return _polygon(cx, cy, r * 1.1, 4, math.pi / 4 + rotation)
    if shape == "pentagon":
        return _polygon(cx, cy, r, 5, -math.pi / 2 + rotation)
    if shape == "hexagon":
        return _polygon(cx, cy, r, 6, rotation)
    if shape == "star":
        return [(cx + (r if i % 2 == 0 else r * 0.45) * math.cos(-math.pi / 2 + rotation + math.pi * i / 5),
                 cy + (r if i % 2 == 0 else r * 0.45) * math.sin(-math.pi / 2 + rotation + math.pi * i / 5)) for i in range(10)]
    if shape == "cross":
        w = r * 0.36
        pts = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w)]
        c, s = math.cos(rotation), math.sin(rotation)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]
    if shape == "heart":
        pts = []
        for i in range(40):
            t = 2 * math.pi * i / 40
            x = 16 * math.sin(t) ** 3
            y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
            pts.append((cx + x * r / 17, cy + y * r / 17 - r * 0.05))
        return pts
    raise ValueError(shape)


def _background(draw: ImageDraw.ImageDraw, texture: str, size: int, rng: np.random.Generator) -> None:
    base = tuple(int(v) for v in rng.integers(120, 165, size=3))
    accent = tuple(max(0, min(255, b + int(d))) for b, d in zip(base, rng.choice([-28, 28], size=3)))
    draw.rectangle([0, 0, size, size], fill=base)
    step = size / 8
    if texture == "stripes":
        for i in range(0, 8, 2):
            draw.rectangle([0, i * step, size, (i + 1) * step], fill=accent)
    elif texture == "dots":
        for i in range(8):
            for j in range(8):
                x, y = (i + 0.5) * step, (j + 0.5) * step
                draw.ellipse([x - step * 0.2, y - step * 0.2, x + step * 0.2, y + step * 0.2], fill=accent)
    elif texture == "checker":
        for i in range(8):
            for j in range(8):
                if (i + j) % 2:
                    draw.rectangle([i * step, j * step, (i + 1) * step, (j + 1) * step], fill=accent)


def _draw_object(draw: ImageDraw.ImageDraw, obj: dict[str, str], size: int, rng: np.random.Generator) -> None:
    fx, fy = POSITIONS[obj["position"]]
    jitter = size * 0.03
    cx = fx * size + float(rng.uniform(-jitter, jitter))
    cy = fy * size + float(rng.uniform(-jitter, jitter))
    r = SIZES[obj["size"]] * size
    colour = RGB[obj["colour"]]
    shape = obj["shape"]
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "ellipse":
        if rng.random() < 0.5:
            draw.ellipse([cx - r, cy - r * 0.55, cx + r, cy + r * 0.55], fill=colour)
        else:
            draw.ellipse([cx - r * 0.55, cy - r, cx + r * 0.55, cy + r], fill=colour)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=colour, width=max(1, int(r * 0.35)))
    else:
        rotation = float(rng.uniform(-0.25, 0.25))
        draw.polygon(_shape_points(shape, cx, cy, r, rotation), fill=colour)


def _phrase(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def _describe(obj: dict[str, str], mentioned: dict[str, bool], rng: np.random.Generator) -> str:
    words = []
    if mentioned["size"]:
        words.append(_phrase(rng, SYNONYMS.get(obj["size"], (obj["size"],))))
    if mentioned["colour"]:
        words.append(obj["colour"])
    words.append(_phrase(rng, SYNONYMS.get(obj["shape"], (obj["shape"],))) if mentioned["shape"] else "shape")
    text = " ".join(words)
    if mentioned["position"]:
        text += " " + _phrase(rng, POSITION_PHRASES[obj["position"]])
    return text


def _article(text: str) -> str:
    return ("an " if text[:1] in "aeiou" else "a ") + text


def _caption(objects: list[dict[str, str]], texture: str, cfg: ShapesWorldConfig, rng: np.random.Generator
             ) -> tuple[str, list[dict[str, bool]], bool]:
    probs = {"shape": cfg.mention_shape, "colour": cfg.mention_colour, "size": cfg.mention_size, "position": cfg.mention_position}
    mentions = [{a: bool(rng.random() < p) for a, p in probs.items()} for _ in objects]
    parts = [_describe(o, m, rng) for o, m in zip(objects, mentions)]
    texture_mentioned = bool(rng.random() < cfg.mention_texture)
    if len(objects) == 1:
        caption = _phrase(rng, TEMPLATES_ONE).format(aobj=_article(parts[0]))
    else:
        listed = [_article(p) for p in parts]
        objs = ", ".join(listed[:-1]) + " and " + listed[-1]
        caption = _phrase(rng, TEMPLATES_MANY).format(objs=objs, n=NUMBER_WORDS[len(objects)])
    if texture_mentioned:
        caption += " " + _phrase(rng, TEXTURE_PHRASES[texture])
    return caption, mentions, texture_mentioned


def _other_value(attr: str, value: str, rng: np.random.Generator) -> str:
    pool = [v for v in vocabulary()[attr] if v != value]
    return pool[int(rng.integers(len(pool)))]


def render_sample(config: ShapesWorldConfig, index: int) -> Sample:
    """Record ``index`` of the world: image, caption, metadata and webdataset key."""
    rng = np.random.default_rng([config.seed, index, 7])
    objects = _sample_objects(config, rng)
    texture = config.textures[int(rng.integers(len(config.textures)))]
    big = config.image_size * config.supersample
    image = Image.new("RGB", (big, big))
    draw = ImageDraw.Draw(image)
    _background(draw, texture, big, rng)
    for obj in objects:
        _draw_object(draw, obj, big, rng)
    if config.supersample > 1:
        image = image.resize((config.image_size, config.image_size), Image.LANCZOS)
    caption_state = rng.bit_generator.state
    caption, mentions, texture_mentioned = _caption(objects, texture, config, rng)
    meta: dict[str, Any] = {
        "index": index, "seed": config.seed, "texture": texture, "texture_mentioned": texture_mentioned,
        "objects": [{**obj, "mentioned": [a for a, m in mention.items() if m]} for obj, mention in zip(objects, mentions)],
        "corrupted": False, "corruption": None, "clean_caption": caption,
    }
    if config.noise and rng.random() < config.noise:
        caption, corruption = _corrupt(config, index, objects, mentions, texture, caption_state, rng)
        meta.update(corrupted=True, corruption=corruption)
    return Sample(image=image, caption=caption, meta=meta, key=f"{config.seed:04d}{index:09d}", caption_state=caption_state)


def swapped_caption(config: ShapesWorldConfig, sample: Sample, rng: np.random.Generator,
                    binding_fraction: float = 0.5) -> str | None:
    """The sample's clean caption with one mentioned fact made false, worded identically otherwise.

    Either two objects exchange the value of an attribute the caption names for
    both (``binding_fraction`` of the time when a scene allows it: "a red
    circle and a blue square" -> "a blue circle and a red square"), or one
    named value becomes another. The caption is re-drawn from the clean
    caption's random state, so templates and synonyms stay the same and only
    the fact differs: a hard negative for contrastive training, which random
    ShapesWorld batches (told apart by colour alone) rarely provide. None when
    the caption names nothing that can change.
    """
    if sample.caption_state is None:
        raise VlsaeError("swapped_caption needs a sample from render_sample (it carries the caption's random state)")
    objects = [{a: v for a, v in o.items() if a != "mentioned"} for o in sample.meta["objects"]]
    mentioned = [set(o.get("mentioned", ())) for o in sample.meta["objects"]]
    exchanges = [(i, j, a) for i in range(len(objects)) for j in range(i + 1, len(objects))
                 for a in sorted(mentioned[i] & mentioned[j]) if objects[i][a] != objects[j][a]]
    changes = [(i, a) for i, m in enumerate(mentioned) for a in sorted(m)]
    if not exchanges and not changes:
        return None
    swapped = [dict(o) for o in objects]
    if exchanges and (not changes or rng.random() < binding_fraction):
        i, j, a = exchanges[int(rng.integers(len(exchanges)))]
        swapped[i][a], swapped[j][a] = objects[j][a], objects[i][a]
    else:
        i, a = changes[int(rng.integers(len(changes)))]
        swapped[i][a] = _other_value(a, objects[i][a], rng)
    return _replay_caption(objects, swapped, sample.meta["texture"], config, sample.caption_state)


class _RecordedDraws:
    """Stands in for the generator while a caption is drawn: records its draws, or plays them back.

    A caption draws its mentions with ``random()`` and its templates and
    synonyms with ``integers(n)``; ``integers(1)`` consumes nothing, so
    re-drawing from the same state with one value changed (whose synonym
    count differs) would shift every later choice. Playing back the recorded
    choice indices instead keeps the wording and changes only the value.
    """

    def __init__(self, rng: np.random.Generator | None = None, draws: list | None = None):
        self.rng, self.draws, self.cursor = rng, [] if draws is None else draws, 0

    def _next(self, draw: Callable[[], Any]) -> Any:
        if self.rng is None:  # playing back
            self.cursor += 1
            return self.draws[self.cursor - 1]
        self.draws.append(draw())
        return self.draws[-1]

    def random(self) -> float:
        return self._next(lambda: self.rng.random())

    def integers(self, n: int) -> int:
        return min(int(self._next(lambda: int(self.rng.integers(n)))), n - 1)


def _replay_caption(clean_objects: list[dict[str, str]], objects: list[dict[str, str]], texture: str,
                    config: ShapesWorldConfig, caption_state: dict) -> str:
    """The caption ``clean_objects`` got from ``caption_state``, worded the same for ``objects``."""
    rng = np.random.default_rng()
    rng.bit_generator.state = caption_state
    recorder = _RecordedDraws(rng=rng)
    _caption(clean_objects, texture, config, recorder)
    return _caption(objects, texture, config, _RecordedDraws(draws=recorder.draws))[0]


def render_tensors(config: ShapesWorldConfig, indices, swapped: bool = False) -> tuple[Any, list[str], list[dict]]:
    """Records ``indices`` as model-ready tensors: uint8 images (n, 3, H, W), captions, metadata.

    What the zoo models train and evaluate on; torch is imported here so that
    writing shards does not need it. ``swapped`` adds ``meta["swapped_caption"]``
    (see ``swapped_caption``; seeded by the record) for contrastive hard negatives.
    """
    import torch

    images, captions, metas = [], [], []
    for index in indices:
        sample = render_sample(config, int(index))
        images.append(torch.from_numpy(np.asarray(sample.image.convert("RGB"), dtype=np.uint8).copy()))
        captions.append(sample.caption)
        if swapped:
            rng = np.random.default_rng([config.seed, int(index), 11])
            sample.meta["swapped_caption"] = swapped_caption(config, sample, rng)
        metas.append(sample.meta)
    return torch.stack(images).permute(0, 3, 1, 2).contiguous(), captions, metas

def _corrupt(config: ShapesWorldConfig, index: int, objects, mentions, texture: str, caption_state: dict,
             rng: np.random.Generator) -> tuple[str, str]:
    """Half the corrupted pairs get another record's caption; half get one mentioned
    colour or shape swapped. The swapped caption is re-generated from the same random
    state, so it is the clean caption with exactly that one value changed."""
    candidates = [(i, a) for i, m in enumerate(mentions) for a in ("colour", "shape") if m[a]]
    if rng.random() < 0.5 or not candidates:
        other = index + 1 + int(rng.integers(1, 1_000_000))
        clean = ShapesWorldConfig(**{**to_dict(config), "noise": 0.0})
        return render_sample(clean, other).caption, "mismatch"
    i, attr = candidates[int(rng.integers(len(candidates)))]
    swapped = [dict(o) for o in objects]
    swapped[i][attr] = _other_value(attr, objects[i][attr], rng)
    return _replay_caption(objects, swapped, texture, config, caption_state), f"swap:{attr}"


def _encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _write_shard(args: tuple[dict[str, Any], str, int, int]) -> dict[str, Any]:
    config_dict, path, start, stop = args
    import webdataset as wds
    config = ShapesWorldConfig(**config_dict)
    counts: dict[str, dict[str, int]] = {a: {} for a in ("shape", "colour", "size", "position", "texture", "corruption")}
    with atomic_output(path) as tmp, open(tmp, "wb") as stream:
        writer = wds.TarWriter(stream)
        for index in range(start, stop):
            sample = render_sample(config, index)
            writer.write({"__key__": sample.key, "png": _encode_png(sample.image), "txt": sample.caption,
                          "json": json.dumps(sample.meta).encode()})
            for obj in sample.meta["objects"]:
                for attr in ("shape", "colour", "size", "position"):
                    counts[attr][obj[attr]] = counts[attr].get(obj[attr], 0) + 1
            counts["texture"][sample.meta["texture"]] = counts["texture"].get(sample.meta["texture"], 0) + 1
            if sample.meta["corrupted"]:
                kind = sample.meta["corruption"]
                counts["corruption"][kind] = counts["corruption"].get(kind, 0) + 1
        writer.close()
    return counts


def write_world(config: ShapesWorldConfig, out_dir: str | Path, n: int, shard_size: int = 5000,
                overwrite: bool = False, workers: int = 1, progress: bool = True) -> dict[str, Any]:
    """Write ``n`` pairs as webdataset shards ``out_dir/000000.tar`` ...; returns a summary.

    Each shard is written to a temporary name and renamed when complete; the folder
    is refused if it already holds files, unless ``overwrite``.
    """
    out = Path(out_dir)
    if n <= 0:
        raise VlsaeError(f"--n must be positive, got {n}")
    if shard_size <= 0:
        raise VlsaeError(f"--shard-size must be positive, got {shard_size}")
    check_writable_dir(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise VlsaeError(f"{out} is not empty; choose another --out or pass --overwrite to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(to_dict(config), str(out / f"{i:06d}.tar"), start, min(start + shard_size, n))
            for i, start in enumerate(range(0, n, shard_size))]
    from tqdm.auto import tqdm
    bar = tqdm(total=len(jobs), desc="world", unit="shard", disable=not progress)
    totals: dict[str, dict[str, int]] = {}
    if workers > 1 and len(jobs) > 1:
        import multiprocessing as mp
        with mp.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
            results = []
            for counts in pool.imap(_write_shard, jobs):
                results.append(counts)
                bar.update(1)
    else:
        results = []
        for job in jobs:
            results.append(_write_shard(job))
            bar.update(1)
    bar.close()
    for counts in results:
        for attr, values in counts.items():
            for value, count in values.items():
                totals.setdefault(attr, {})[value] = totals.setdefault(attr, {}).get(value, 0) + count
    summary = {"n": n, "shards": len(jobs), "shard_size": shard_size, "pattern": f"{out}/{{000000..{len(jobs) - 1:06d}}}.tar",
               "counts": totals, "corrupted": sum(totals.get("corruption", {}).values())}
    atomic_write_text(out / "world.json", json.dumps({"config": to_dict(config), "vocabulary": vocabulary(), "summary": summary}, indent=2))
    return summary
