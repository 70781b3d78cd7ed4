"""The baselines every SAE scorer is measured against: CLIPScore and a seeded random ranking.

CLIPScore (Hessel et al. 2021) is ``w · max(cos(E_image, E_caption), 0)``; the
ranking uses the cosine itself, since the clip at 0 and the scale w = 2.5 only
tie or stretch the scores of a ranking (many poor pairs tied at 0 would then be
kept or dropped by input order). It is the non-SAE alignment score SAE-V's
reviewers asked to compare with.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch
from torch import Tensor

from vlsae.errors import VlsaeError

from multimodal.filtering.scorers import register_scorer
from multimodal.filtering.scorers.base import PairBatch, Scorer


@register_scorer("clipscore")
class ClipScore(Scorer):
    summary = "cosine of the raw image and caption embeddings (CLIPScore's ranking, no SAE)"
    one_row_per_pair = True

    def score(self, batch: PairBatch) -> Tensor:
        for modality in ("image", "text"):
            if modality not in batch.acts:
                raise VlsaeError(f"clipscore needs image and text embeddings; the hook gives {', '.join(batch.acts)} only")
            if batch.acts[modality].shape[0] != len(batch):
                raise VlsaeError("clipscore needs one embedding per pair and modality; use --hook final with --tokens "
                                 "cls (or --tokens mean)")
        image = batch.acts["image"][torch.argsort(batch.pair_index["image"])].double()
        text = batch.acts["text"][torch.argsort(batch.pair_index["text"])].double()
        return torch.nn.functional.cosine_similarity(image, text, dim=1, eps=1e-12)


def key_uniform(keys: list[str], seed: int) -> Tensor:
    """(len(keys),) float64 in [0, 1): a hash of (seed, key), so a key's number does not depend on its
    position, the shard it is in or how the dataset was split across processes."""
    out = np.empty(len(keys), dtype=np.float64)
    for i, key in enumerate(keys):
        digest = hashlib.blake2b(f"{seed}\x00{key}".encode(), digest_size=8).digest()
        out[i] = int.from_bytes(digest, "big") / 2.0 ** 64
    return torch.from_numpy(out)


@register_scorer("random")
class RandomScore(Scorer):
    summary = "a seeded uniform number per pair key (the random-subset baseline; reads no image)"
    needs_model = False

    def score(self, batch: PairBatch) -> Tensor:
        return key_uniform(batch.keys, self.seed)
