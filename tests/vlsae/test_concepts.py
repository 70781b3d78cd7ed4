"""The concept API summarises latents and pairs correctly."""
import math

import pytest
import torch

from vlsae import VlsaeError, create_sae
from vlsae.concepts import latent_activations, summarize_concepts


def test_summary_on_a_constructed_vl_sae():
    sae = create_sae("vl", d_in=4, n_latents=4, k=1)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(4))
    # pair 0: image and text both on axis 0; pair 1: image axis 1, text axis 2; pair 2: both axis 1
    image = torch.tensor([[1.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 1.0, 0, 0]])
    text = torch.tensor([[3.0, 0, 0, 0], [0, 0, 1.0, 0], [0, 1.0, 0, 0]])
    s = summarize_concepts(sae, {"image": image, "text": text}, top_n=2, batch_size=2)
    assert torch.allclose(s.pair_overlap, torch.tensor([1.0, 0.0, 1.0]))
    assert s.fire_rate["image"].tolist() == pytest.approx([1 / 3, 2 / 3, 0, 0])
    assert s.modality_score[0].item() == pytest.approx(0.5)
    assert s.modality_score[2].item() == pytest.approx(0.0)
    assert math.isnan(s.modality_score[3].item())
    assert s.agreement[1].item() == pytest.approx(0.5)  # fires on both in 1 of the 2 pairs where it fires at all
    assert set(s.top_rows["image"][1, :2].tolist()) == {1, 2}
    assert s.top_rows["image"][2].tolist() == [-1, -1]
    assert s.l0["text"] == pytest.approx(1.0)
    assert s.alive().tolist() == [True, True, True, False]


def test_single_stream_sae_and_dense_helper():
    sae = create_sae("topk", d_in=6, n_latents=12, k=2)
    x = torch.randn(20, 6)
    s = summarize_concepts(sae, {"x": x})
    assert s.l0["x"] == pytest.approx(2.0, abs=1e-6) or s.l0["x"] <= 2.0
    dense = latent_activations(sae, x, batch_size=7)
    assert dense.shape == (20, 12)
    assert torch.allclose(dense, sae.encode(x).to_dense())


def test_bad_inputs():
    sae = create_sae("vl", d_in=4, n_latents=4, k=1)
    with pytest.raises(VlsaeError, match="same number of rows"):
        summarize_concepts(sae, {"image": torch.randn(3, 4), "text": torch.randn(2, 4)})
    with pytest.raises(VlsaeError, match="empty"):
        summarize_concepts(sae, {"image": torch.randn(0, 4), "text": torch.randn(0, 4)})
