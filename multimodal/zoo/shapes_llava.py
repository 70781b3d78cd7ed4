"""``shapes-llava``: a small transformers LLaVA trained to caption ShapesWorld and answer yes/no questions.

The model is a real ``transformers.LlavaForConditionalGeneration``: a small
CLIP vision tower (64x64 images, 16x16 patches), LLaVA's two-layer projector
and a small Llama decoder with tied word embeddings. Its 17 image tokens are
the class token and the 16 patches (LLaVA's ``full`` feature strategy). The
tokenizer is word-level, built offline with the ``tokenizers`` library from
every word a ShapesWorld caption or question can contain, and wrapped with a
``CLIPImageProcessor`` into a ``LlavaProcessor``; model and processor are saved
with ``save_pretrained``, so the folder loads with ``from_pretrained`` like any
LLaVA checkpoint (and as ``llava:FOLDER``).

Training, two stages:

1. :func:`pretrain_vision` stands in for LLaVA's pretrained CLIP and its
   feature-alignment stage: the vision tower, projector and word embeddings
   learn that each patch token names (in the decoder's word space) the colour,
   shape and size of the object its patch sees, and the class token the values
   present in the scene.
2. The whole LLaVA, teacher-forced, loss on the reply tokens only, two tasks per step:

   - describe: ``<image> describe :`` -> a ShapesWorld caption naming every
     object's shape, colour, size and position, objects in reading order
     (:func:`reading_order_caption`);
   - yes/no: ``<image> is there a red circle`` -> ``red circle`` (yes: the reply
     names what was asked) or ``no``, half of each; negatives are often one
     attribute away from an object in the image (see :func:`make_question` for
     why the reply is not the word "yes").

Evaluation on held-out ShapesWorld indices (never rendered for training):
caption attribute accuracy, by greedy generation on single-object scenes
parsed back into attributes (:func:`parse_objects`) and compared with the
planted ones; colour+shape recall and precision of generated captions of
1-3-object scenes; yes/no accuracy on 1-3-object scenes, overall and per
question type: the greedy first reply word must be the asked word for a true
question and "no" for a false one.
"""
from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor

from vlsae.config import from_dict, option, to_dict
from vlsae.errors import VlsaeError

from multimodal.quiet import quiet_transformers

from multimodal.zoo import REPORT, ZooModel, register_zoo_model, training_bar, training_world

NAME = "shapes-llava"
PROMPTS_FILE = "vlsae_prompts.json"  # read by the llava adapter: how a caption is put into the prompt
MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's image normalisation (the saved image processor's)
STD = (0.26862954, 0.26130258, 0.27577711)
SPECIALS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")
PAD, UNK, BOS, EOS, IMAGE = range(len(SPECIALS))
DESCRIBE_PROMPT = "{image} describe :"
CAPTION_PROMPT = "{image} describe : {caption}"  # the describe prompt holding its answer: the VL-SAE input
EVAL_OFFSET = 10_000_000  # held-out pairs are ShapesWorld indices from here on
MULTI_EVAL_OFFSET = 11_000_000  # held-out 1-3-object scenes (caption recall, yes/no)
# Captions that name every attribute of every object: "describe" then has one complete answer.
TRAIN_WORLD = {"mention_colour": 1.0, "mention_size": 1.0, "mention_position": 1.0}
CAPTION_ATTRIBUTES = ("shape", "colour", "size", "position")
QUESTION_TYPES = ("colour_shape", "shape", "colour")


@dataclass
class ShapesLlavaConfig:
    """Training settings of shapes-llava (``vlsae zoo train shapes-llava --set key=value``)."""

    seed: int = option(0, help="seed of the model init, the batch order and the questions (the pairs' seed is world.seed)")
    steps: int = option(2000, help="optimizer steps (each: one describe batch and one yes/no batch; 700 named the shape 16 %)")
    describe_batch: int = option(32, help="images per step trained to be described")
    question_batch: int = option(32, help="images per step asked a yes/no question")
    vision_steps: int = option(3000, help="steps of stage 1, the vision/word alignment (0: train end to end from scratch)")
    vision_batch: int = option(64, help="images per stage-1 step")
    vision_lr: float = option(3e-3, help="peak AdamW learning rate of stage 1 (linear warm-up, cosine decay)")
    lr: float = option(2e-3, help="peak AdamW learning rate of stage 2 (linear warm-up, cosine decay)")
    warmup: int = option(50, help="warm-up steps")
    weight_decay: float = option(0.05, help="AdamW weight decay on matrices")
    n_train: int = option(10_000, help="distinct ShapesWorld pairs rendered for training")
    n_eval: int = option(300, help="held-out scenes for each evaluation (captions of single-object scenes, "
                                   "captions of 1-3-object scenes, yes/no questions)")
    patch_size: int = option(16, help="vision patch size (64x64 images: 16 image tokens at 16)")
    vision_width: int = option(96, help="CLIP vision tower width")
    vision_layers: int = option(2, help="CLIP vision tower layers")
    text_width: int = option(128, help="Llama decoder width")
    text_layers: int = option(3, help="Llama decoder layers")
    heads: int = option(4, help="attention heads in both towers")
    mlp_ratio: int = option(2, help="MLP width / model width in both towers")
    tie_embeddings: bool = option(True, help="share the decoder's input and output word embeddings")
    max_new_tokens: int = option(48, help="longest generated caption in the evaluation (tokens)")
    world: dict = option(None, factory=lambda: dict(TRAIN_WORLD),
                         help="ShapesWorldConfig overrides for the training pairs (default: captions name every attribute)")
    threads: int = option(0, help="torch CPU threads while training (0: leave torch's setting)")


# -- vocabulary and processor -------------------------------------------------------------

def _split(text: str) -> list[str]:
    """The word-level tokenizer's pre-tokenisation: words and runs of punctuation."""
    return re.findall(r"\w+|[^\w\s]+", text)


def word_list() -> list[str]:
    """Every token a ShapesWorld caption, prompt or question can hold, special tokens first.

    Built from the ShapesWorld phrase tables, so a new synonym or template
    there is in the vocabulary of the next trained model.
    """
    from multimodal import shapesworld as sw

    texts: list[str] = []
    vocab = sw.vocabulary()
    for attribute in ("shape", "colour", "size", "position", "texture"):
        texts += list(vocab[attribute])
    texts += [w for options in sw.SYNONYMS.values() for w in options]
    texts += [w for options in sw.POSITION_PHRASES.values() for w in options]
    texts += [w for options in sw.TEXTURE_PHRASES.values() for w in options]
    texts += [re.sub(r"\{\w+\}", " ", t) for t in sw.TEMPLATES_ONE + sw.TEMPLATES_MANY]
    texts += list(sw.NUMBER_WORDS.values())
    texts += ["a an and , shape", DESCRIBE_PROMPT.format(image=""), "is there a any yes no"]
    words = sorted({w for text in texts for w in _split(text)})
    return list(SPECIALS) + words


def build_tokenizer(words: Sequence[str] | None = None):
    """A word-level ``PreTrainedTokenizerFast`` over ``words`` (default :func:`word_list`), offline.

    It prepends ``<s>``, maps unknown words to ``<unk>``, pads with ``<pad>``
    and knows ``<image>`` as the processor's image token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = list(words or word_list())
    if tuple(words[: len(SPECIALS)]) != SPECIALS:
        raise ValueError(f"the word list must start with {SPECIALS}")
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS)])
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})


def build_processor(tokenizer, image_size: int, patch_size: int):
    """The ``LlavaProcessor`` of shapes-llava: CLIP image processing at ``image_size`` + the word tokenizer."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size},
                                         image_mean=list(MEAN), image_std=list(STD))
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                          vision_feature_select_strategy="full", num_additional_image_tokens=1, image_token="<image>")


def build_model(cfg: ShapesLlavaConfig, vocab_size: int, image_size: int):
    """A randomly initialised ``LlavaForConditionalGeneration`` of the configured size."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    if image_size % cfg.patch_size:
        raise VlsaeError(f"patch_size {cfg.patch_size} does not divide the image size {image_size}")
    n_image_tokens = (image_size // cfg.patch_size) ** 2 + 1  # the patches and the class token
    vision = CLIPVisionConfig(image_size=image_size, patch_size=cfg.patch_size, hidden_size=cfg.vision_width,
                              intermediate_size=cfg.vision_width * cfg.mlp_ratio, num_hidden_layers=cfg.vision_layers,
                              num_attention_heads=cfg.heads)
    text = LlamaConfig(vocab_size=vocab_size, hidden_size=cfg.text_width, intermediate_size=cfg.text_width * cfg.mlp_ratio,
                       num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
                       max_position_embeddings=256, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
                       tie_word_embeddings=cfg.tie_embeddings)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE, image_seq_length=n_image_tokens,
                         vision_feature_layer=-1, vision_feature_select_strategy="full",
                         tie_word_embeddings=cfg.tie_embeddings)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = PAD
    model.generation_config.bos_token_id = BOS
    model.generation_config.eos_token_id = EOS
    return model


# -- data ---------------------------------------------------------------------------------

def render(world, indices) -> tuple[Tensor, list[str], list[dict]]:
    """uint8 images (n, 3, H, W), captions and metadata of ShapesWorld records ``indices``."""
    from multimodal.shapesworld import render_tensors

    return render_tensors(world, indices)


def reading_order_caption(world, meta: dict, index: int) -> str:
    """A ShapesWorld caption of a record (same templates, synonyms and mention rates) that lists
    the objects in reading order (top left to bottom right) instead of the record's random order.

    With a fixed order the first object described is determined by the image, so
    the describe task has one answer up to wording; with the random order the
    model must also learn to stay with whichever object it started on.
    """
    from multimodal.shapesworld import POSITIONS, _caption

    order = list(POSITIONS)
    objects = sorted(({a: o[a] for a in CAPTION_ATTRIBUTES} for o in meta["objects"]),
                     key=lambda o: order.index(o["position"]))
    caption, _, _ = _caption(objects, meta["texture"], world, np.random.default_rng([world.seed, index, 11]))
    return caption


def normalise(images: Tensor) -> Tensor:
    """uint8 (n, 3, H, W) -> the pixel values the saved CLIP image processor gives for same-size images."""
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


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
    from multimodal.shapesworld import vocabulary

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


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
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


# -- parsing generated captions -------------------------------------------------------------

def _phrase_table() -> list[tuple[tuple[str, ...], str, str | None]]:
    """(words, attribute, value) for every phrase a caption uses, longest first."""
    from multimodal.shapesworld import POSITION_PHRASES, SYNONYMS, vocabulary

    vocab = vocabulary()
    table: list[tuple[tuple[str, ...], str, str | None]] = []
    for attribute in ("shape", "colour", "size"):
        for value in vocab[attribute]:
            for phrase in SYNONYMS.get(value, (value,)) if attribute != "colour" else (value,):
                table.append((tuple(_split(phrase)), attribute, value))
    for value, phrases in POSITION_PHRASES.items():
        table += [(tuple(_split(p)), "position", value) for p in phrases]
    table.append((("shape",), "shape", None))  # "a red shape": an object whose shape is not named
    return sorted(table, key=lambda entry: -len(entry[0]))


def parse_objects(text: str) -> list[dict[str, str | None]]:
    """The objects a caption describes, each with the attribute values it names (None: not named).

    Size and colour words belong to the next shape word; a position phrase
    belongs to the object named just before it.
    """
    table = _phrase_table()
    words = _split(text.lower())
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


# -- training -------------------------------------------------------------------------------

def _lr_at(step: int, steps: int, warmup: int, lr: float) -> float:
    """Linear warm-up to ``lr``, then cosine decay to 0 at ``steps``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def patch_targets(metas: list[dict], image_size: int, patch_size: int) -> Tensor:
    """(n, patches, 3) int64: the colour, shape and size class + 1 of the object each patch sees (0: none).

    A patch sees an object when its centre lies within the object's radius plus
    half a patch of the object's planted centre (the nearest object wins), in
    the row-major patch order of the vision tower's tokens.
    """
    from multimodal.shapesworld import POSITIONS, SIZES, vocabulary

    vocab = vocabulary()
    grid = image_size // patch_size
    centres = (torch.arange(grid, dtype=torch.float32) + 0.5) * patch_size
    cy, cx = torch.meshgrid(centres, centres, indexing="ij")
    cx, cy = cx.reshape(-1), cy.reshape(-1)
    targets = torch.zeros(len(metas), grid * grid, 3, dtype=torch.long)
    for row, meta in enumerate(metas):
        nearest = torch.full((grid * grid,), float("inf"))
        for obj in meta["objects"]:
            fx, fy = POSITIONS[obj["position"]]
            distance = torch.hypot(cx - fx * image_size, cy - fy * image_size)
            sees = (distance <= SIZES[obj["size"]] * image_size + patch_size / 2) & (distance < nearest)
            nearest = torch.where(sees, distance, nearest)
            classes = torch.tensor([1 + vocab[a].index(obj[a]) for a in ("colour", "shape", "size")])
            targets[row, sees] = classes
    return targets


def image_features(model, pixel_values: Tensor) -> Tensor:
    """(batch, image tokens, vision width): the vision-tower states the projector reads (class token first)."""
    config = model.config
    hidden = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states[config.vision_feature_layer]
    return hidden[:, 1:] if config.vision_feature_select_strategy == "default" else hidden


def attribute_word_ids(tokenizer) -> list[Tensor]:
    """Token ids of the words naming each colour, shape and size (the first word of each value)."""
    from multimodal.shapesworld import vocabulary

    vocab = vocabulary()
    return [torch.tensor(tokenizer.convert_tokens_to_ids([_split(v)[0] for v in vocab[a]]))
            for a in ("colour", "shape", "size")]


def scene_words(metas: list[dict], word_ids: list[Tensor]) -> Tensor:
    """(n, colours + shapes + sizes) multi-hot: which attribute values some object of the scene has."""
    from multimodal.shapesworld import vocabulary

    vocab = vocabulary()
    offsets = np.cumsum([0] + [len(ids) for ids in word_ids])
    present = torch.zeros(len(metas), int(offsets[-1]))
    for row, meta in enumerate(metas):
        for obj in meta["objects"]:
            for k, attribute in enumerate(("colour", "shape", "size")):
                present[row, offsets[k] + vocab[attribute].index(obj[attribute])] = 1.0
    return present


def pretrain_vision(model, images: Tensor, metas: list[dict], cfg: ShapesLlavaConfig, generator: torch.Generator,
                    word_ids: list[Tensor], bar: Any = None) -> list[float]:
    """Stage 1: vision tower, projector and word embeddings learn that the image tokens name
    what the image shows, in the decoder's own word space. Returns the losses.

    - each patch token's dot products with the (input) word embeddings of the
      colours, shapes and sizes pick the object its patch sees (one softmax per
      attribute; patches that see no object are left out);
    - the class token's dot products with the same words say which values some
      object in the scene has (independent sigmoids).

    Real LLaVAs start from a pretrained CLIP vision tower and a feature-alignment
    stage that trains the projector to map its tokens into the LLM's word space;
    this stage stands in for both. Without it, a decoder trained from scratch
    spends a CPU budget of a few minutes ignoring the image. With it, reading the
    image tokens is reading words, and "is there a red shape ?" becomes asking
    whether the word in the question matches the class token.
    """
    targets = patch_targets(metas, int(images.shape[-1]), cfg.patch_size)
    present = scene_words(metas, word_ids)
    every_word = torch.cat(word_ids)
    embeddings = model.get_input_embeddings().weight
    params = [*model.model.vision_tower.parameters(), *model.model.multi_modal_projector.parameters(), embeddings]
    optimizer = torch.optim.AdamW(params, lr=cfg.vision_lr, betas=(0.9, 0.98), weight_decay=0.0)
    losses: list[float] = []
    for step in range(cfg.vision_steps):
        batch = torch.randint(images.shape[0], (cfg.vision_batch,), generator=generator)
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, cfg.vision_steps, min(cfg.warmup, cfg.vision_steps // 4), cfg.vision_lr)
        tokens = model.model.multi_modal_projector(image_features(model, normalise(images[batch])))
        cls, patches = tokens[:, 0], tokens[:, 1:]
        seen = targets[batch]
        shows = seen[..., 0] > 0
        patch_loss = sum(torch.nn.functional.cross_entropy(patches[shows] @ embeddings[ids].T, seen[..., k][shows] - 1)
                         for k, ids in enumerate(word_ids)) / len(word_ids)
        scene_loss = torch.nn.functional.binary_cross_entropy_with_logits(cls @ embeddings[every_word].T, present[batch])
        loss = patch_loss + scene_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if bar is not None:
            bar.update(1)
    return losses


def train_shapes_llava(out_dir: Path, cfg: ShapesLlavaConfig, progress: bool = True) -> dict[str, Any]:
    """Train into ``out_dir``; returns the report (settings, loss curves, evaluation)."""
    import transformers


    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    world = training_world(cfg.world, NAME)
    started = time.perf_counter()
    images, _, metas = render(world, range(cfg.n_train))
    captions = [reading_order_caption(world, meta, i) for i, meta in enumerate(metas)]
    render_seconds = time.perf_counter() - started
    image_size = int(images.shape[-1])

    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer, image_size, cfg.patch_size)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, len(tokenizer), image_size)
    n_image = model.config.image_seq_length
    describe_ids = _encode(tokenizer, [DESCRIBE_PROMPT.format(image="")])[0]
    caption_ids = [ids + [EOS] for ids in _encode(tokenizer, captions)]
    unknown = sum(ids.count(UNK) for ids in caption_ids)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "embed" in n]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    rng = np.random.default_rng([cfg.seed, 2])
    per_step = cfg.describe_batch + cfg.question_batch
    if per_step < 1 or per_step > cfg.n_train:
        raise VlsaeError(f"describe_batch + question_batch must be between 1 and n_train ({cfg.n_train})")
    losses: dict[str, list[float]] = {"describe": [], "yes_no": []}
    bar = training_bar(cfg.vision_steps + cfg.steps, f"train {NAME}", progress)
    model.train()
    train_started = time.perf_counter()
    losses["vision"] = pretrain_vision(model, images, metas, cfg, generator, attribute_word_ids(tokenizer), bar)
    vision_seconds = time.perf_counter() - train_started
    order, cursor = torch.randperm(cfg.n_train, generator=generator), 0
    for step in range(cfg.steps):
        if cursor + per_step > cfg.n_train:
            order, cursor = torch.randperm(cfg.n_train, generator=generator), 0
        chosen = order[cursor: cursor + per_step]
        cursor += per_step
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, cfg.steps, cfg.warmup, cfg.lr)
        optimizer.zero_grad(set_to_none=True)
        tasks = []
        if cfg.describe_batch:
            picked = chosen[: cfg.describe_batch].tolist()
            tasks.append(("describe", picked, [describe_ids] * len(picked), [caption_ids[i] for i in picked]))
        if cfg.question_batch:
            picked = chosen[cfg.describe_batch:].tolist()
            asked = [make_question(metas[i]["objects"], rng) for i in picked]
            prompts = _encode(tokenizer, [q.text for q in asked])
            answers = [ids + [EOS] for ids in _encode(tokenizer, [q.reply for q in asked])]
            tasks.append(("yes_no", picked, prompts, answers))
        for task, picked, prompts, answers in tasks:
            ids, mask, labels = batch_sequences(prompts, answers, n_image)
            out = model(input_ids=ids, attention_mask=mask, pixel_values=normalise(images[picked]), labels=labels)
            (out.loss * len(picked) / per_step).backward()
            losses[task].append(out.loss.item())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if bar is not None:
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix({k: f"{np.mean(v[-20:]):.3f}" for k, v in losses.items() if v})
    if bar is not None:
        bar.close()
    train_seconds = time.perf_counter() - train_started
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    with quiet_transformers():
        model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    (out_dir / PROMPTS_FILE).write_text(json.dumps(prompts_record(), indent=1))

    eval_started = time.perf_counter()
    metrics = evaluate(model, tokenizer, world, cfg)
    eval_seconds = time.perf_counter() - eval_started
    curves: dict[str, list[float]] = {}
    for task, values in losses.items():
        if not values:
            continue
        window = max(1, len(values) // 20)
        curves[task] = [round(float(np.mean(values[i: i + window])), 4) for i in range(0, len(values), window)]
        metrics[f"first_loss_{task}"] = float(np.mean(values[:window]))
        metrics[f"final_loss_{task}"] = float(np.mean(values[-window:]))
    metrics["unknown_caption_tokens"] = unknown
    return {
        "config": to_dict(cfg),
        "world": to_dict(world),
        "parameters": sum(p.numel() for p in model.parameters()),
        "metrics": metrics,
        "loss_curve": curves,
        "timing": {"render_s": round(render_seconds, 1), "vision_s": round(vision_seconds, 1),
                   "train_s": round(train_seconds, 1),
                   "eval_s": round(eval_seconds, 1), "threads": torch.get_num_threads()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }


def prompts_record() -> dict[str, str]:
    """What ``vlsae_prompts.json`` holds: ``prompt`` (how the llava adapter puts a caption after the
    image) and the two training prompts, with ``{image}`` for the image token."""
    return {"prompt": CAPTION_PROMPT, "describe": DESCRIBE_PROMPT, "question": "{image} {question}"}


# -- evaluation -------------------------------------------------------------------------------

def eval_world(world, single: bool):
    """A held-out split of the training world without caption noise: single-object scenes
    (one label per attribute) or the world's own 1-3-object scenes."""
    from multimodal.shapesworld import ShapesWorldConfig

    changes: dict[str, Any] = {"noise": 0.0, "holdout_only": False, "holdout": ()}
    if single:
        changes.update(min_objects=1, max_objects=1)
    return ShapesWorldConfig(**{**to_dict(world), **changes})


@torch.no_grad()
def generate_captions(model, tokenizer, images: Tensor, max_new_tokens: int = 48, batch_size: int = 500) -> list[str]:
    """Greedy captions of uint8 images (n, 3, H, W) from the describe prompt."""
    n_image = model.config.image_seq_length
    prompt = [BOS] + [IMAGE] * n_image + _encode(tokenizer, [DESCRIBE_PROMPT.format(image="")])[0]
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
def answer_questions(model, tokenizer, images: Tensor, questions: list[str], batch_size: int = 500) -> list[str]:
    """The greedy first reply word of each (image, question): the asked word (yes) or "no"."""
    n_image = model.config.image_seq_length
    device = next(model.parameters()).device
    prompts = _encode(tokenizer, questions)
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


def evaluate(model, tokenizer, world, cfg: ShapesLlavaConfig) -> dict[str, Any]:
    """Caption attribute accuracy, caption colour+shape recall/precision and yes/no accuracy on held-out scenes."""
    from multimodal.shapesworld import vocabulary

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


# -- the zoo entry -----------------------------------------------------------------------------

@dataclass
class LoadedLlava:
    """A trained shapes-llava: the transformers model, its processor and the caption prompt."""

    model: Any
    processor: Any
    prompt: str
    path: Path
    report: dict[str, Any] = field(default_factory=dict)


@register_zoo_model(NAME)
class ShapesLlava(ZooModel):
    summary = "small transformers LLaVA (CLIP vision tower + Llama) trained to caption ShapesWorld and answer yes/no"
    files = ("config.json", "model.safetensors", "processor_config.json", "tokenizer.json", PROMPTS_FILE)
    config_class = ShapesLlavaConfig

    @classmethod
    def train(cls, out_dir: Path, overrides: dict[str, Any], progress: bool = True) -> dict[str, Any]:
        cfg = from_dict(cls.config_class, overrides, where=f"{NAME} training config")
        return train_shapes_llava(out_dir, cfg, progress=progress)

    @classmethod
    def load(cls, folder: Path, device: Any = "cpu") -> LoadedLlava:
        from transformers import AutoProcessor, LlavaForConditionalGeneration


        folder = cls.require_files(folder)
        # dtype: a shipped copy stores fp16 weights; the model runs in fp32
        with quiet_transformers():
            model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32, use_safetensors=True,
                                                                  local_files_only=True)
        processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
        prompt = json.loads((folder / PROMPTS_FILE).read_text())["prompt"]
        report = json.loads((folder / REPORT).read_text()) if (folder / REPORT).is_file() else {}
        return LoadedLlava(model=model.to(device).eval(), processor=processor, prompt=prompt, path=folder, report=report)

    @classmethod
    def evaluate(cls, folder: Path, device: Any = "cpu") -> dict[str, Any]:
        loaded = cls.load(folder, device=device)
        cfg = from_dict(cls.config_class, loaded.report.get("config", {}), where=f"{NAME} training config")
        return evaluate(loaded.model, loaded.processor.tokenizer, training_world(cfg.world, NAME), cfg)

    @classmethod
    def describe_report(cls, report: dict[str, Any]) -> str:
        metrics = report.get("metrics", {})
        lines = ["caption attribute accuracy (greedy captions of held-out single-object scenes):"]
        for attribute, r in metrics.get("caption", {}).items():
            lines.append(f"  {attribute:<10} {r['accuracy']:6.1%}   (named {r['named']:.0%}, chance {r['chance']:.1%}, "
                         f"{r['classes']} classes, n={r['n']})")
        objects = metrics.get("caption_objects")
        if objects:
            lines.append(f"1-3-object captions: colour+shape recall {objects['colour_shape_recall']:.1%}, precision "
                         f"{objects['colour_shape_precision']:.1%}, object count {objects['object_count_accuracy']:.1%} "
                         f"(n={objects['n']})")
        yes_no = metrics.get("yes_no")
        if yes_no:
            kinds = ", ".join(f"{k} {v:.1%}" for k, v in yes_no["by_type"].items())
            lines.append(f"yes/no accuracy {yes_no['accuracy']:.1%} (chance 50%, n={yes_no['n']}; {kinds})")
        for task in ("vision", "describe", "yes_no"):
            if f"final_loss_{task}" in metrics:
                lines.append(f"{task} loss {metrics[f'first_loss_{task}']:.3f} -> {metrics[f'final_loss_{task}']:.3f}")
        return "\n".join(lines)

