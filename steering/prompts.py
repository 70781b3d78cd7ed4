"""Prompt sets for steering: ShapesWorld's single-object prompts, prompt files, caption-only shards.

An attribute value is "named" by a prompt when one of its words is in it
(ShapesWorld's synonyms count: "plus sign" names ``cross``, "big" names
``large``), which is all attribute discovery needs to know about a prompt: it
works the same on ShapesWorld prompts and on a user's prompt file. A prompt
file (one prompt a line) becomes caption-only webdataset shards with
:func:`write_prompt_shards`, which ``vlsae extract --model diffusers-text:... ``
reads without any image (its reader is text-only for text adapters).
"""
from __future__ import annotations

import io
import re
import tarfile
from pathlib import Path
from typing import Sequence

from vlsae.errors import VlsaeError
from vlsae.files import atomic_output, check_writable_dir

from multimodal.shapesworld import SYNONYMS, vocabulary

#: the attributes steering knows values of (the judges read colour and shape; size has no judge)
ATTRIBUTES = ("colour", "shape", "size")


def attribute_values(attribute: str) -> list[str]:
    """The ShapesWorld values of ``attribute`` (``color`` is ``colour``); one-line error for another name."""
    attribute = "colour" if attribute == "color" else attribute
    if attribute not in ATTRIBUTES:
        raise VlsaeError(f"unknown attribute '{attribute}'; steering knows {', '.join(ATTRIBUTES)}")
    return list(vocabulary()[attribute])


def check_value(attribute: str, value: str) -> str:
    """``value`` if it is one of ``attribute``'s values, else a one-line error listing them."""
    values = attribute_values(attribute)
    if value not in values:
        raise VlsaeError(f"'{value}' is not a {attribute} value; choose from {', '.join(values)}")
    return value


def value_words(value: str) -> tuple[str, ...]:
    """The words that name ``value`` in a prompt (itself and its ShapesWorld synonyms)."""
    return tuple(dict.fromkeys((value,) + SYNONYMS.get(value, ())))


def names_value(prompt: str, value: str) -> bool:
    """Whether ``prompt`` names ``value`` (a whole-word match of the value or a synonym, any case)."""
    text = prompt.lower()
    return any(re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text) for word in value_words(value))


def article(text: str) -> str:
    return ("an " if text[:1] in "aeiou" else "a ") + text


def shapes_prompts(colours: Sequence[str] | None = None, shapes: Sequence[str] | None = None,
                   size: str = "") -> tuple[list[str], list[dict[str, str]]]:
    """"a [SIZE] COLOUR SHAPE" for every colour and shape asked (default: all), with the attributes each names.

    The prompts shapes-diffusion is evaluated on (it draws one large object in the centre).
    """
    vocab = vocabulary()
    prompts, attributes = [], []
    for colour in colours or vocab["colour"]:
        for shape in shapes or vocab["shape"]:
            words = " ".join(w for w in (size, colour, shape) if w)
            prompts.append(article(words))
            attributes.append({"colour": colour, "shape": shape, **({"size": size} if size else {})})
    return prompts, attributes


def prompt_attributes(prompt: str, attributes: Sequence[str] = ATTRIBUTES) -> dict[str, str]:
    """attribute -> the first value of it that ``prompt`` names (attributes it names none of are left out):
    what a judge should still read in a steered image of the prompt."""
    out = {}
    for attribute in attributes:
        named = [v for v in attribute_values(attribute) if names_value(prompt, v)]
        if named:
            out[attribute] = named[0]
    return out


def describe(colour: str, shape: str) -> str:
    """The prompt "a COLOUR SHAPE"."""
    return article(f"{colour} {shape}")


def read_prompts(path: str | Path) -> list[str]:
    """The non-empty lines of a prompt file (one prompt a line), in order; one-line errors for a missing
    or empty file."""
    path = Path(path)
    if not path.is_file():
        raise VlsaeError(f"prompt file not found: {path}")
    try:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise VlsaeError(f"could not read the prompt file {path}: {exc}") from None
    if not prompts:
        raise VlsaeError(f"{path} holds no prompts (one prompt a line)")
    return prompts


def write_prompt_shards(prompts: Sequence[str], out: str | Path, shard_size: int = 5000,
                        overwrite: bool = False) -> dict[str, object]:
    """Caption-only webdataset shards ``out/000000.tar`` ... (``KEY.txt`` per prompt) for ``vlsae extract``.

    Each shard is written to a temporary name and renamed when complete; a
    non-empty ``out`` is refused unless ``overwrite``. Returns the shard pattern.
    """
    if shard_size < 1:
        raise VlsaeError(f"shard size must be at least 1, got {shard_size}")
    if not prompts:
        raise VlsaeError("no prompts to write")
    out = check_writable_dir(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise VlsaeError(f"{out} is not empty; choose another --out or pass --overwrite to replace it")
        for old in out.glob("*.tar"):
            old.unlink()
    out.mkdir(parents=True, exist_ok=True)
    shards = 0
    for shards, start in enumerate(range(0, len(prompts), shard_size), start=1):
        with atomic_output(out / f"{shards - 1:06d}.tar") as tmp, tarfile.open(tmp, "w") as tar:
            for i, prompt in enumerate(prompts[start: start + shard_size], start=start):
                data = prompt.encode("utf-8")
                info = tarfile.TarInfo(f"{i:08d}.txt")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    pattern = str(out / ("000000.tar" if shards == 1 else f"{{000000..{shards - 1:06d}}}.tar"))
    return {"prompts": len(prompts), "shards": shards, "pattern": pattern}


__all__ = ["ATTRIBUTES", "attribute_values", "check_value", "value_words", "names_value", "article", "shapes_prompts",
           "prompt_attributes", "describe", "read_prompts", "write_prompt_shards"]
