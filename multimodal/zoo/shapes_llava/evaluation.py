"""shapes-llava's evaluation on held-out ShapesWorld indices (never rendered for training).

Caption attribute accuracy, by greedy generation on single-object scenes
parsed back into attributes (:func:`multimodal.zoo.shapes_llava.data.parse_objects`)
and compared with the planted ones; colour+shape recall and precision of
generated captions of 1-3-object scenes; yes/no accuracy on 1-3-object
scenes, overall and per question type: the greedy first reply word must be
the asked word for a true question and "no" for a false one. Its own module
because two callers need it: the recipe, right after training, and the zoo
entry (``vlsae zoo eval``).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from vlsae.config import to_dict

from multimodal.shapesworld import ShapesWorldConfig, vocabulary
from multimodal.zoo.shapes_llava.build import normalise
from multimodal.zoo.shapes_llava.config import (BOS, CAPTION_ATTRIBUTES, DESCRIBE_PROMPT, EOS, EVAL_OFFSET, IMAGE,
                                                MULTI_EVAL_OFFSET, PAD, QUESTION_TYPES, ShapesLlavaConfig)
from multimodal.zoo.shapes_llava.data import batch_sequences, encode_texts, make_question, parse_objects, render


def eval_world(world: ShapesWorldConfig, single: bool) -> ShapesWorldConfig:
    """A held-out split of the training world without caption noise: single-object scenes
    (one label per attribute) or the world's own 1-3-object scenes."""
    changes: dict[str, Any] = {"noise": 0.0, "holdout_only": False, "holdout": ()}
    if single:
        changes.update(min_objects=1, max_objects=1)
    return ShapesWorldConfig(**{**to_dict(world), **changes})


@torch.no_grad()
def generate_captions(model: Any, tokenizer: Any, images: Tensor, max_new_tokens: int = 48,
                      batch_size: int = 500) -> list[str]:
    """Greedy captions of uint8 images (n, 3, H, W) from the describe prompt."""
    n_image = model.config.image_seq_length
    prompt = [BOS] + [IMAGE] * n_image + encode_texts(tokenizer, [DESCRIBE_PROMPT.format(image="")])[0]
    device = next(model.parameters()).device
    texts: list[str] = []
    for start in range(0, images.shape[0], batch_size):
        chunk = images[start: start + batch_size]
        ids = torch.tensor([prompt] * chunk.shape[0], device=device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=normalise(chunk).to(device),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=PAD, eos_token_id=EOS)
        texts += tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
    return texts


@torch.no_grad()
def answer_questions(model: Any, tokenizer: Any, images: Tensor, questions: list[str],
                     batch_size: int = 500) -> list[str]:
    """The greedy first reply word of each (image, question): the asked word (yes) or "no"."""
    n_image = model.config.image_seq_length
    device = next(model.parameters()).device
    prompts = encode_texts(tokenizer, questions)
    words: list[str] = []
    for start in range(0, len(questions), batch_size):
        chunk = prompts[start: start + batch_size]
        ids, mask, _ = batch_sequences(chunk, [[] for _ in chunk], n_image)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                       pixel_values=normalise(images[start: start + batch_size]).to(device)).logits
        last = mask.sum(dim=1) - 1
        predicted = logits[torch.arange(ids.shape[0]), last.to(device)].argmax(dim=-1).tolist()
        words += tokenizer.convert_ids_to_tokens(predicted)
    return words


def evaluate(model: Any, tokenizer: Any, world: ShapesWorldConfig, cfg: ShapesLlavaConfig) -> dict[str, Any]:
    """Caption attribute accuracy, caption colour+shape recall/precision and yes/no accuracy on held-out scenes."""
    was_training = model.training
    model.eval()
    vocab = vocabulary()
    results: dict[str, Any] = {}

    images, _, metas = render(eval_world(world, single=True), range(EVAL_OFFSET, EVAL_OFFSET + cfg.n_eval))
    captions = generate_captions(model, tokenizer, images, cfg.max_new_tokens)
    accuracy: dict[str, dict[str, float]] = {}
    for attribute in CAPTION_ATTRIBUTES:
        truth = [meta["objects"][0][attribute] for meta in metas]
        named = [(parse_objects(c) or [{}])[0].get(attribute) for c in captions]
        counts = {v: truth.count(v) for v in vocab[attribute]}
        accuracy[attribute] = {"accuracy": float(np.mean([n == t for n, t in zip(named, truth)])),
                               "named": float(np.mean([n is not None for n in named])),
                               "chance": max(counts.values()) / len(truth), "classes": len(vocab[attribute]),
                               "n": len(truth)}
    results["caption"] = accuracy
    results["caption_examples"] = [{"planted": {a: metas[i]["objects"][0][a] for a in CAPTION_ATTRIBUTES},
                                    "generated": captions[i]} for i in range(min(5, len(captions)))]

    images, _, metas = render(eval_world(world, single=False), range(MULTI_EVAL_OFFSET, MULTI_EVAL_OFFSET + cfg.n_eval))
    captions = generate_captions(model, tokenizer, images, cfg.max_new_tokens)
    planted = [{(o["colour"], o["shape"]) for o in meta["objects"]} for meta in metas]
    said = [{(o["colour"], o["shape"]) for o in parse_objects(c)} for c in captions]
    hits = sum(len(p & s) for p, s in zip(planted, said))
    results["caption_objects"] = {
        "colour_shape_recall": hits / max(1, sum(len(p) for p in planted)),
        "colour_shape_precision": hits / max(1, sum(len(s) for s in said)),
        "object_count_accuracy": float(np.mean([len(parse_objects(c)) == len(m["objects"])
                                                for c, m in zip(captions, metas)])),
        "n": len(metas)}

    rng = np.random.default_rng([cfg.seed, 3])
    asked = [make_question(meta["objects"], rng) for meta in metas]
    replies = answer_questions(model, tokenizer, images, [q.text for q in asked])
    correct = [r == q.reply.split()[0] for r, q in zip(replies, asked)]
    results["yes_no"] = {"accuracy": float(np.mean(correct)), "n": len(correct),
                         "yes_fraction": float(np.mean([q.answer for q in asked])),
                         "by_type": {kind: float(np.mean([c for c, q in zip(correct, asked) if q.kind == kind]))
                                     for kind in QUESTION_TYPES if any(q.kind == kind for q in asked)}}
    model.train(was_training)
    return results
