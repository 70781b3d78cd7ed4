"""Does filtering buy a better model? Train shapes-clip's contrastive recipe on given shards and measure it.

The recipe is shapes-clip's own (:mod:`multimodal.zoo.shapes_clip`: the open_clip
``CLIP`` class, symmetric InfoNCE with identical captions as shared positives,
AdamW with warm-up and cosine decay, :func:`contrastive_steps`), trained from
scratch on the records of webdataset shards instead of on pairs rendered in
memory, and without the rendered hard-negative groups (an arm sees its shards
and nothing else). Every arm of an experiment uses the same seed, steps,
batch size and architecture, so the data is the only difference.

Measured on clean held-out ShapesWorld scenes the training never saw:

* zero-shot accuracy per attribute (shape, colour, size, position) on
  single-object scenes, shapes-clip's own protocol (:func:`zero_shot_accuracy`);
* in-batch retrieval R@1 on 1-3-object scenes: for each image of a batch, is
  its own caption (or an identical one) the most similar of the batch's captions,
  and the same from captions to images.

The trained model is saved as an open_clip folder, so it loads as
``open_clip:FOLDER`` (the bootstrap regime scores with it).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from multimodal.pairs import iter_pairs
from multimodal.shapesworld import ShapesWorldConfig, render_tensors
from multimodal.zoo.shapes_clip import (EVAL_OFFSET, WEIGHTS, ShapesClipConfig, TrainingPairs, contrastive_steps,
                                        create_untrained, model_config, normalise, write_folder, zero_shot_accuracy)
from vlsae.config import from_dict, to_dict
from vlsae.errors import VlsaeError

ARM_ARCH = "vlsae-filter-arm"  # the open_clip config name arms register (not shapes-clip's, which stays as shipped)
RETRIEVAL_OFFSET = 12_000_000  # held-out 1-3-object scenes for retrieval
ARM_DEFAULTS = {"embed_dim": 64, "vision_width": 64, "vision_layers": 2, "text_width": 64, "text_layers": 2,
                "steps": 400, "batch_size": 128, "warmup": 40, "hard_fraction": 0.0, "n_eval": 1000, "threads": 1}


@dataclass
class ArmResult:
    """One trained arm: its data, the zero-shot accuracy per attribute, retrieval R@1, timing."""

    name: str
    pairs: int
    zero_shot: dict[str, float]
    retrieval: dict[str, float]
    seconds: float
    folder: str

    @property
    def mean_zero_shot(self) -> float:
        return float(np.mean(list(self.zero_shot.values())))

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "pairs": self.pairs, "zero_shot": self.zero_shot, "mean_zero_shot": self.mean_zero_shot,
                "retrieval": self.retrieval, "seconds": round(self.seconds, 1), "folder": self.folder}


def arm_config(overrides: dict[str, Any] | None = None) -> ShapesClipConfig:
    """The recipe's settings for an arm: shapes-clip's, shortened and narrowed (``ARM_DEFAULTS``), plus overrides."""
    return from_dict(ShapesClipConfig, {**ARM_DEFAULTS, **(overrides or {})}, where="filtering arm config")


def read_shard_pairs(data: str | Path) -> tuple[torch.Tensor, list[str]]:
    """uint8 images (n, 3, H, W) and captions of every record of the shards, in order."""
    images, captions = [], []
    for record in iter_pairs(data):
        images.append(torch.from_numpy(np.asarray(record.image, dtype=np.uint8).copy()))
        captions.append(record.caption)
    if not images:
        raise VlsaeError(f"no pairs in {data}")
    sizes = {tuple(i.shape) for i in images}
    if len(sizes) != 1:
        raise VlsaeError(f"the shards' images have several sizes {sorted(sizes)[:3]}; the recipe needs one")
    return torch.stack(images).permute(0, 3, 1, 2).contiguous(), captions


def _register(folder: Path, cfg: ShapesClipConfig, image_size: int) -> None:
    import open_clip

    write_folder(folder, ARM_ARCH, model_config(cfg, image_size), image_size)
    open_clip.add_model_config(folder / f"{ARM_ARCH}.json")


@torch.no_grad()
def retrieval_r1(model: Any, tokenizer: Any, world: ShapesWorldConfig, n: int = 1024, batch: int = 256) -> dict[str, float]:
    """In-batch R@1 image->text and text->image on clean held-out 1-3-object scenes (identical captions count)."""
    model.eval()
    clean = ShapesWorldConfig(**{**to_dict(world), "noise": 0.0})
    images, captions, _ = render_tensors(clean, range(RETRIEVAL_OFFSET, RETRIEVAL_OFFSET + n))
    hits = {"image_to_text": 0, "text_to_image": 0}
    for lo in range(0, n, batch):
        chunk = captions[lo: lo + batch]
        image = model.encode_image(normalise(images[lo: lo + batch]), normalize=True)
        text = model.encode_text(tokenizer(chunk), normalize=True)
        similar = image @ text.T
        same = torch.tensor([[a == b for b in chunk] for a in chunk])
        rows = torch.arange(len(chunk))
        hits["image_to_text"] += int(same[rows, similar.argmax(dim=1)].sum())
        hits["text_to_image"] += int(same[rows, similar.argmax(dim=0)].sum())
    return {k: v / n for k, v in hits.items()}


def train_arm(name: str, data: str | Path, folder: str | Path, world: ShapesWorldConfig,
              overrides: dict[str, Any] | None = None, progress: bool = True) -> ArmResult:
    """Train the recipe on the shards ``data`` into ``folder`` (reused when it holds a finished arm)."""
    folder = Path(folder)
    record = folder / "arm.json"
    if record.is_file():
        saved = json.loads(record.read_text())
        return ArmResult(saved["name"], saved["pairs"], saved["zero_shot"], saved["retrieval"], saved["seconds"],
                         str(folder))
    import open_clip

    cfg = arm_config(overrides)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    started = time.perf_counter()
    images, captions = read_shard_pairs(data)
    _register(folder, cfg, int(images.shape[-1]))
    torch.manual_seed(cfg.seed)
    model = create_untrained(ARM_ARCH)
    tokenizer = open_clip.get_tokenizer(ARM_ARCH)
    ids = tokenizer(captions)
    pairs = TrainingPairs(images=images, captions=captions, n_train=len(captions), groups=[], n_hard=0, seconds=0.0)
    model.train()
    contrastive_steps(model, pairs, ids, lambda batch: model.encode_text(ids[batch], normalize=True), cfg,
                      f"train {name}", progress)
    model.eval()
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(folder / WEIGHTS))
    accuracy = zero_shot_accuracy(model, tokenizer, world, range(EVAL_OFFSET, EVAL_OFFSET + cfg.n_eval))
    zero_shot = {attribute: r["accuracy"] for attribute, r in accuracy.items()}
    result = ArmResult(name, len(captions), zero_shot, retrieval_r1(model, tokenizer, world),
                       time.perf_counter() - started, str(folder))
    record.write_text(json.dumps({**result.as_dict(), "config": to_dict(cfg)}, indent=1))
    return result


def mean_interval(zero_shot: dict[str, float], n: int) -> float:
    """Half-width of a 95 % binomial interval of the mean zero-shot accuracy over the attributes, from the
    evaluation's sampling alone (n scenes per attribute; one training seed, so seed variance is not in it)."""
    variance = sum(p * (1 - p) / n for p in zero_shot.values()) / len(zero_shot) ** 2
    return 1.96 * math.sqrt(variance)
