"""SAE-V's cross-modal feature weight and sample score, on hand-built codes whose answer is known."""
from __future__ import annotations

import math

import pytest
import torch

from multimodal.adapters.base import Extracted
from multimodal.cache import ActivationCache, ActivationWriter
from multimodal.filtering import CrossModalWeights, PairBatch, cross_modal_weights
from multimodal.filtering.scorers import saev as saev_module
from multimodal.filtering.scorers.saev import SaevScore
from vlsae.errors import VlsaeError
from vlsae.saes import create_sae
from vlsae.sparse import SparseCode
from vlsae.training import TrainConfig, train

D = 8  # width of the residual vectors


def _code(entries: list[dict[int, float]], n_latents: int, k: int = 3) -> SparseCode:
    """One row per dict latent -> value (padded with zero values)."""
    values = torch.zeros(len(entries), k)
    indices = torch.zeros(len(entries), k, dtype=torch.long)
    for row, entry in enumerate(entries):
        for slot, (latent, value) in enumerate(entry.items()):
            values[row, slot], indices[row, slot] = value, latent
    return SparseCode(values, indices, n_latents)


def _unit(i: int) -> torch.Tensor:
    v = torch.zeros(D)
    v[i % D] = 1.0
    return v


class _Rows:
    """A probe: text and image rows, their codes (one latent each here) and their residual vectors."""

    def __init__(self):
        self.entries = {"text": [], "image": []}
        self.vectors = {"text": [], "image": []}

    def add(self, modality: str, latent: int, value: float, vector: torch.Tensor) -> None:
        self.entries[modality].append({latent: value})
        self.vectors[modality].append(vector)

    def weights(self, n_latents: int, chunks: int = 1) -> CrossModalWeights:
        """Feed the rows (image rows get ids first, then text, as the scorer numbers them) in ``chunks`` pieces."""
        weights = CrossModalWeights(n_latents)
        offset = 0
        for modality in ("image", "text"):
            n = len(self.entries[modality])
            ids = torch.arange(offset, offset + n)
            for part in torch.arange(n).chunk(chunks):
                code = _code([self.entries[modality][i] for i in part.tolist()], n_latents)
                weights.update(code, ids[part], is_text=modality == "text")
            offset += n
        return weights

    def vector_table(self) -> dict[int, torch.Tensor]:
        rows = self.vectors["image"] + self.vectors["text"]
        return dict(enumerate(rows))


def _hand_built() -> tuple[_Rows, float]:
    """Latent 0: 40 activations, of which the top 30 are 20 text (values 100..81) and 10 image (79..70); its top-5
    text tokens point along e0, e1 and the weaker text along e7; its top-5 image tokens along e0, the weaker
    images along e5. Latent 1: 26 text and 4 image in its top 30, 8 more images below them (fails 5/5).
    Latent 2: text only. The expected weight of latent 0 is the mean cosine of its top-5 text x top-5 image."""
    rows = _Rows()
    for i in range(20):
        vector = _unit(0) if i < 3 else (_unit(1) if i < 5 else _unit(7))  # ranks 0-4 are the top-5 text
        rows.add("text", 0, 100.0 - i, vector)
    for i in range(10):
        rows.add("image", 0, 79.0 - i, _unit(0) if i < 5 else _unit(5))  # ranks 0-4: the top-5 image
    for i in range(10):
        rows.add("image", 0, 10.0 - 0.1 * i, _unit(1))  # below the top 30: never compared
    for i in range(26):
        rows.add("text", 1, 50.0 - i, _unit(2))
    for i in range(4):
        rows.add("image", 1, 49.5 - i, _unit(2))
    for i in range(8):
        rows.add("image", 1, 1.0 - 0.05 * i, _unit(2))  # 12 image activations in all, only 4 in the top 30
    for i in range(7):
        rows.add("text", 2, 5.0 + i, _unit(3))
    # top-5 text: 3 along e0 and 2 along e1; top-5 image: 5 along e0 -> cosines 1 (15 of 25) and 0 (10 of 25)
    return rows, 15 / 25


def test_weight_formula_on_a_hand_built_probe():
    rows, expected = _hand_built()
    weights = rows.weights(n_latents=4)
    text, image = weights.composition()
    assert (text[0].item(), image[0].item()) == (20, 10)  # the top 30 of latent 0, not its 40 activations
    assert (text[1].item(), image[1].item()) == (26, 4)
    assert weights.weighted_mask().tolist() == [True, False, False, False]  # latent 1 fails 5/5, 2 is text-only
    w, mask = weights.finish(rows.vector_table())
    assert w[0].item() == pytest.approx(expected)
    assert w[1:].abs().sum().item() == 0.0
    summary = weights.summary(w, mask)
    assert summary["weighted"] == 1 and summary["text_only"] == 1 and summary["fired"] == 3


def test_top5_are_the_strongest_of_each_modality():
    """Swapping which image rows point along e0 changes the weight: the top-5 image must be chosen by value."""
    rows, _ = _hand_built()
    weights = rows.weights(n_latents=4)
    assert sorted(weights.best["image"][1][0].tolist()) == [0, 1, 2, 3, 4]  # image ids come first
    text_ids = weights.best["text"][1][0].tolist()
    n_image = len(rows.entries["image"])
    assert sorted(text_ids) == [n_image + i for i in range(5)]


def test_streaming_in_chunks_gives_the_same_weights(monkeypatch):
    rows, expected = _hand_built()
    monkeypatch.setattr(saev_module, "DENSE_ELEMENTS", 12)  # three rows per dense chunk of four latents
    w, _ = rows.weights(n_latents=4, chunks=5).finish(rows.vector_table())
    assert w[0].item() == pytest.approx(expected)


def test_a_token_counts_only_for_its_own_top_latents():
    """With per_token=1 a row contributes to its strongest latent only."""
    weights = CrossModalWeights(n_latents=2, top=10, per_modality=1, per_token=1)
    code = SparseCode(torch.tensor([[5.0, 4.0]]), torch.tensor([[0, 1]]), 2)
    weights.update(code, torch.tensor([0]), is_text=True)
    text, _ = weights.composition()
    assert text.tolist() == [1, 0]


def test_fewer_than_thirty_activations_still_follow_the_five_five_rule():
    rows = _Rows()
    for i in range(5):
        rows.add("text", 0, 3.0 + i, _unit(0))
        rows.add("image", 0, 2.0 + i, _unit(0) * -1.0)
    weights = rows.weights(n_latents=1)
    w, mask = weights.finish(rows.vector_table())
    assert mask.tolist() == [True] and w[0].item() == pytest.approx(-1.0)
    rows.entries["image"].pop()
    rows.vectors["image"].pop()
    assert not rows.weights(n_latents=1).weighted_mask().any()  # 5 text and 4 image: no weight


class _Identity:
    """A stand-in SAE whose code of a row is the row's positive entries (latent i = coordinate i)."""

    modalities = ()
    n_latents = D

    def encode(self, x: torch.Tensor, modality=None) -> SparseCode:
        return SparseCode.from_dense(x.clamp_min(0), k=D)


def test_two_pass_probe_matches_the_direct_computation():
    """cross_modal_weights (top entries first, then the vectors they name) = CrossModalWeights fed directly."""
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(3):
        acts = {"image": torch.rand(12, D, generator=g), "text": torch.rand(10, D, generator=g)}
        index = {"image": torch.arange(4).repeat_interleave(3), "text": torch.arange(4).repeat_interleave(3)[:10]}
        batches.append((acts, index))

    def probe():
        for acts, index in batches:
            yield PairBatch(keys=[f"k{i}" for i in range(4)], acts=acts, pair_index=index, sae=_Identity())

    w, mask, summary = cross_modal_weights(probe, D)
    direct = CrossModalWeights(D)
    vectors, offset = {}, 0
    for acts, _ in batches:
        for modality in ("image", "text"):
            ids = torch.arange(offset, offset + acts[modality].shape[0])
            direct.update(_Identity().encode(acts[modality]), ids, is_text=modality == "text")
            vectors.update({int(i): v for i, v in zip(ids, acts[modality])})
            offset += acts[modality].shape[0]
    expected, expected_mask = direct.finish(vectors)
    assert torch.equal(mask, expected_mask) and mask.any()
    assert torch.allclose(w, expected)
    assert summary["weighted"] == int(mask.sum())


def test_sample_score_sums_the_weights_of_latents_active_on_both_sides():
    scorer = SaevScore()
    scorer.load_state({"weights": torch.tensor([0.5, 0.25, 2.0, 1.0], dtype=torch.float64),
                       "weighted": torch.tensor([1, 1, 1, 0], dtype=torch.uint8)})
    # pair 0: image tokens fire {0, 1, 2}, text tokens {1, 2 (at 0.2)}; pair 1: image {2}, text {2, 3} (3 weighs 0)
    acts = {"image": torch.zeros(3, D), "text": torch.zeros(3, D)}
    acts["image"][0, 0], acts["image"][1, 1], acts["image"][1, 2], acts["image"][2, 2] = 1.0, 1.0, 1.0, 3.0
    acts["text"][0, 1], acts["text"][0, 2], acts["text"][1, 2], acts["text"][2, 3] = 1.0, 0.2, 1.0, 1.0
    index = {"image": torch.tensor([0, 0, 1]), "text": torch.tensor([0, 1, 1])}

    class FourLatents(_Identity):
        n_latents = 4

        def encode(self, x, modality=None):
            return SparseCode.from_dense(x[:, :4].clamp_min(0), k=4)

    batch = PairBatch(keys=["a", "b"], acts=acts, pair_index=index, sae=FourLatents(), theta=0.0)
    assert scorer.score(batch).tolist() == [0.25 + 2.0, 2.0]  # pair 0: latents 1 and 2; pair 1: latents 2 and 3
    batch = PairBatch(keys=["a", "b"], acts=acts, pair_index=index, sae=FourLatents(), theta=0.5)
    assert scorer.score(batch).tolist() == [0.25, 2.0]  # latent 2 fires at 0.2 on pair 0's text: below theta
    assert math.isclose(scorer.info["mean_weight"], (0.5 + 0.25 + 2.0) / 3)


def test_a_token_cache_trains_one_sae_over_image_and_text_rows(tmp_path):
    """ActivationCache(modality='image+text'): SAE-V's single dictionary reads both modalities' token rows."""
    writer = ActivationWriter(tmp_path / "acts", {"source": "test", "hook": "layers.1", "tokens": "all", "data": ""},
                              ["image", "text"], {"image": D, "text": D}, torch.float32, shard_rows=40)
    g = torch.Generator().manual_seed(0)
    for start in range(0, 30, 10):
        image, text = torch.randn(30, D, generator=g), torch.randn(20, D, generator=g) + 3
        writer.add(Extracted(keys=[f"k{i}" for i in range(start, start + 10)], acts={"image": image, "text": text},
                             pair_index={"image": torch.arange(10).repeat_interleave(3),
                                         "text": torch.arange(10).repeat_interleave(2)}))
    writer.close()
    pooled = ActivationCache(tmp_path / "acts", modality="image+text")
    image = ActivationCache(tmp_path / "acts", modality="image").read_all()
    text = ActivationCache(tmp_path / "acts", modality="text").read_all()
    assert pooled.d_in == D and len(pooled) == image.shape[0] + text.shape[0] == 150
    rows = pooled.read_all()
    assert torch.equal(torch.sort(rows.sum(dim=1)).values, torch.sort(torch.cat([image, text]).sum(dim=1)).values)
    batch = next(pooled.batches(64, seed=0))
    assert batch.shape == (64, D) and (batch.mean(dim=1) > 1.5).any() and (batch.mean(dim=1) < 1.5).any()  # both kinds
    sae = train(create_sae("batchtopk", d_in=D, n_latents=16, k=2), pooled, TrainConfig(steps=3, batch_size=32,
                                                                                        progress=False)).sae
    assert sae.encode(text[:4]).values.shape[0] == 4
    with pytest.raises(VlsaeError, match="no modality 'audio'"):
        ActivationCache(tmp_path / "acts", modality="image+audio")
