"""shapes-llava's training and evaluation data: reading-order captions, yes/no questions, token
batches, and the parser that reads a generated caption back into attribute values.

Shared by the recipe (what the model learns to say) and the evaluation (whether
what it says matches the planted scene), so both read one definition of a
question and of a caption's phrases.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor

from multimodal.shapesworld import (POSITION_PHRASES, POSITIONS, SYNONYMS, ShapesWorldConfig, _caption, render_tensors,
                                    vocabulary)
from multimodal.zoo.shapes_llava.build import split_words
from multimodal.zoo.shapes_llava.config import BOS, CAPTION_ATTRIBUTES, IMAGE, PAD, QUESTION_TYPES


def render(world: ShapesWorldConfig, indices: Sequence[int]) -> tuple[Tensor, list[str], list[dict]]:
    """uint8 images (n, 3, H, W), captions and metadata of ShapesWorld records ``indices``."""
    return render_tensors(world, indices)


def reading_order_caption(world: ShapesWorldConfig, meta: dict, index: int) -> str:
    """A ShapesWorld caption of a record (same templates, synonyms and mention rates) that lists
    the objects in reading order (top left to bottom right) instead of the record's random order.

    With a fixed order the first object described is determined by the image, so
    the describe task has one answer up to wording; with the random order the
    model must also learn to stay with whichever object it started on.
    """
    order = list(POSITIONS)
    objects = sorted(({a: o[a] for a in CAPTION_ATTRIBUTES} for o in meta["objects"]),
                     key=lambda o: order.index(o["position"]))
    caption, _, _ = _caption(objects, meta["texture"], world, np.random.default_rng([world.seed, index, 11]))
    return caption

class Question(NamedTuple):
    """A yes/no question about a scene and the reply the model is trained to give."""

    text: str    # "is there a red circle"
    answer: bool  # whether the scene has what is asked
    kind: str    # colour_shape | shape | colour
    reply: str   # the asked words when the answer is yes ("red circle"), else "no"


def make_question(objects: list[dict[str, str]], rng: np.random.Generator) -> Question:
    """A yes/no question about a scene, true half of the time.

    Types: ``colour_shape`` ("is there a red circle"), ``shape`` ("is there a
    circle"), ``colour`` ("is any shape red"). A false colour+shape question
    keeps, half the time, the colour or the shape of an object in the scene, so
    the answer needs the binding of the two, not either alone.

    The reply to a true question names what was asked ("red circle"), to a
    false one it is "no"; the first reply word decides. Why not "yes": a "yes"
    needs the decoder to compare the question with the image, a product of two
    inputs that a from-scratch decoder learns only after thousands of steps (in
    a CPU budget of minutes it stays at chance). Saying the asked word is
    additive instead: the logit of the word is its own embedding (the last
    question word, in the residual stream) plus the image's evidence for it, so
    it is learnt within a hundred steps. For the same reason the question ends
    with an asked value, not with a question mark.
    """
    vocab = vocabulary()
    kind = QUESTION_TYPES[int(rng.choice(len(QUESTION_TYPES), p=[0.5, 0.25, 0.25]))]
    asked = {"colour_shape": ("colour", "shape"), "shape": ("shape",), "colour": ("colour",)}[kind]
    answer = bool(rng.random() < 0.5)
    present = {tuple(o[a] for a in asked) for o in objects}
    if answer:
        chosen = objects[int(rng.integers(len(objects)))]
        values = tuple(chosen[a] for a in asked)
    else:
        for _ in range(100):
            if kind == "colour_shape" and rng.random() < 0.5:
                anchor = objects[int(rng.integers(len(objects)))]
                keep = "colour" if rng.random() < 0.5 else "shape"
                values = tuple(anchor[a] if a == keep else str(rng.choice(vocab[a])) for a in asked)
            else:
                values = tuple(str(rng.choice(vocab[a])) for a in asked)
            if values not in present:
                break
        else:  # pragma: no cover - a scene of at most three objects always leaves a false question
            raise RuntimeError("no false question found")
    thing = " ".join(values)
    text = f"is any shape {thing}" if kind == "colour" else f"is there {'an' if thing[0] in 'aeiou' else 'a'} {thing}"
    return Question(text=text, answer=answer, kind=kind, reply=thing if answer else "no")


def encode_texts(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each text without ``<s>``: the pieces :func:`batch_sequences` puts after the image."""
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def batch_sequences(prompts: list[list[int]], answers: list[list[int]], n_image: int) -> tuple[Tensor, Tensor, Tensor]:
    """(input_ids, attention_mask, labels) of ``<s> <image>*n prompt answer``, right-padded.

    prompts: token ids after the image tokens; answers: token ids to learn
    (labels are -100 everywhere else).
    """
    rows = [[BOS] + [IMAGE] * n_image + p + a for p, a in zip(prompts, answers)]
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), PAD, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for i, (row, answer) in enumerate(zip(rows, answers)):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        labels[i, len(row) - len(answer): len(row)] = torch.tensor(answer)
    return ids, mask, labels


def _phrase_table() -> list[tuple[tuple[str, ...], str, str | None]]:
    """(words, attribute, value) for every phrase a caption uses, longest first."""
    vocab = vocabulary()
    table: list[tuple[tuple[str, ...], str, str | None]] = []
    for attribute in ("shape", "colour", "size"):
        for value in vocab[attribute]:
            for phrase in SYNONYMS.get(value, (value,)) if attribute != "colour" else (value,):
                table.append((tuple(split_words(phrase)), attribute, value))
    for value, phrases in POSITION_PHRASES.items():
        table += [(tuple(split_words(p)), "position", value) for p in phrases]
    table.append((("shape",), "shape", None))  # "a red shape": an object whose shape is not named
    return sorted(table, key=lambda entry: -len(entry[0]))


def parse_objects(text: str) -> list[dict[str, str | None]]:
    """The objects a caption describes, each with the attribute values it names (None: not named).

    Size and colour words belong to the next shape word; a position phrase
    belongs to the object named just before it.
    """
    table = _phrase_table()
    words = split_words(text.lower())
    objects: list[dict[str, str | None]] = []
    pending: dict[str, str | None] = {}
    i = 0
    while i < len(words):
        for phrase, attribute, value in table:
            if tuple(words[i: i + len(phrase)]) == phrase:
                if attribute == "shape":
                    objects.append({"shape": value, "colour": None, "size": None, "position": None, **pending})
                    pending = {}
                elif attribute == "position":
                    if objects and objects[-1]["position"] is None:
                        objects[-1]["position"] = value
                else:
                    pending[attribute] = value
                i += len(phrase)
                break
        else:
            i += 1
    return objects
