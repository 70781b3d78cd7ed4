"""Tiny models and synthetic pairs shared by the adapter, cache and extraction tests."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

TINY_CLIP = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
GRID = (32 // 8) ** 2  # patches per image of the tiny CLIP

WORDS = ["red", "green", "blue", "circle", "square", "small", "large", "left", "right", "top"]


def tiny_clip_config(folder: Path, name: str = "vlsae-test-tiny-clip", vision_cfg: dict | None = None) -> Path:
    """Write the tiny CLIP config as ``folder/name.json`` (register it via the spec); ``vision_cfg``
    replaces its ViT tower (e.g. a ResNet or a timm trunk)."""
    path = Path(folder) / f"{name}.json"
    path.write_text(json.dumps(TINY_CLIP if vision_cfg is None else {**TINY_CLIP, "vision_cfg": vision_cfg}))
    return path


def synthetic_pairs(n: int, seed: int = 0, size: int = 32, start: int = 0) -> list[dict]:
    """n pair records (key, PIL image, caption of 1-4 words) with varied content."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for i in range(start, start + n):
        pixels = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()
        words = [WORDS[int(j)] for j in torch.randint(0, len(WORDS), (1 + i % 4,), generator=g)]
        pairs.append({"key": f"pair{i:05d}", "image": Image.fromarray(pixels), "caption": "a " + " ".join(words)})
    return pairs
