"""shapes-llava's training recipe, two stages.

1. :func:`pretrain_vision` stands in for LLaVA's pretrained CLIP and its
   feature-alignment stage: the vision tower, projector and word embeddings
   learn that each patch token names (in the decoder's word space) the colour,
   shape and size of the object its patch sees, and the class token the values
   present in the scene.
2. The whole LLaVA, teacher-forced, loss on the reply tokens only, two tasks
   per step: describe (a reading-order caption) and yes/no (the asked words or
   "no"; see :func:`multimodal.zoo.shapes_llava.data.make_question` for why).

Only ``vlsae zoo train shapes-llava`` runs this.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vlsae.config import to_dict
from vlsae.errors import VlsaeError

from multimodal.quiet import quiet_transformers
from multimodal.shapesworld import POSITIONS, SIZES, vocabulary
from multimodal.zoo import cosine_lr, training_bar, training_world
from multimodal.zoo.shapes_llava.build import build_model, build_processor, build_tokenizer, normalise, split_words
from multimodal.zoo.shapes_llava.config import (DESCRIBE_PROMPT, EOS, NAME, PROMPTS_FILE, UNK, ShapesLlavaConfig,
                                                prompts_record)
from multimodal.zoo.shapes_llava.data import (batch_sequences, encode_texts, make_question, reading_order_caption,
                                              render)
from multimodal.zoo.shapes_llava.evaluation import evaluate


def patch_targets(metas: list[dict], image_size: int, patch_size: int) -> Tensor:
    """(n, patches, 3) int64: the colour, shape and size class + 1 of the object each patch sees (0: none).

    A patch sees an object when its centre lies within the object's radius plus
    half a patch of the object's planted centre (the nearest object wins), in
    the row-major patch order of the vision tower's tokens.
    """
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


def image_features(model: Any, pixel_values: Tensor) -> Tensor:
    """(batch, image tokens, vision width): the vision-tower states the projector reads (class token first)."""
    config = model.config
    hidden = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states[config.vision_feature_layer]
    return hidden[:, 1:] if config.vision_feature_select_strategy == "default" else hidden


def attribute_word_ids(tokenizer: Any) -> list[Tensor]:
    """Token ids of the words naming each colour, shape and size (the first word of each value)."""
    vocab = vocabulary()
    return [torch.tensor(tokenizer.convert_tokens_to_ids([split_words(v)[0] for v in vocab[a]]))
            for a in ("colour", "shape", "size")]


def scene_words(metas: list[dict], word_ids: list[Tensor]) -> Tensor:
    """(n, colours + shapes + sizes) multi-hot: which attribute values some object of the scene has."""
    vocab = vocabulary()
    offsets = np.cumsum([0] + [len(ids) for ids in word_ids])
    present = torch.zeros(len(metas), int(offsets[-1]))
    for row, meta in enumerate(metas):
        for obj in meta["objects"]:
            for k, attribute in enumerate(("colour", "shape", "size")):
                present[row, offsets[k] + vocab[attribute].index(obj[attribute])] = 1.0
    return present


def pretrain_vision(model: Any, images: Tensor, metas: list[dict], cfg: ShapesLlavaConfig, generator: torch.Generator,
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
            group["lr"] = cosine_lr(step, cfg.vision_steps, cfg.vision_lr, warmup=min(cfg.warmup, cfg.vision_steps // 4))
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
    describe_ids = encode_texts(tokenizer, [DESCRIBE_PROMPT.format(image="")])[0]
    caption_ids = [ids + [EOS] for ids in encode_texts(tokenizer, captions)]
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
            group["lr"] = cosine_lr(step, cfg.steps, cfg.lr, warmup=cfg.warmup)
        optimizer.zero_grad(set_to_none=True)
        tasks = []
        if cfg.describe_batch:
            picked = chosen[: cfg.describe_batch].tolist()
            tasks.append(("describe", picked, [describe_ids] * len(picked), [caption_ids[i] for i in picked]))
        if cfg.question_batch:
            picked = chosen[cfg.describe_batch:].tolist()
            asked = [make_question(metas[i]["objects"], rng) for i in picked]
            prompts = encode_texts(tokenizer, [q.text for q in asked])
            answers = [ids + [EOS] for ids in encode_texts(tokenizer, [q.reply for q in asked])]
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
