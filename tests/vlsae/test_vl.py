"""VL-SAE family: encoder math, ablations, checkpoints."""
import pytest
import torch
import torch.nn.functional as F

from vlsae import VlsaeError, create_sae
from vlsae.checkpoint import load_sae, save_sae
from vlsae.saes.base import TrainContext


def test_active_latents_are_the_k_nearest_directions():
    sae = create_sae("vl", d_in=12, n_latents=40, k=5, center_inputs=False)
    x = torch.randn(30, 12) * 7.0  # norm must not matter
    code = sae.encode(x)
    cos = F.normalize(x, dim=1) @ F.normalize(sae.W_enc, dim=1).t()
    nearest = cos.topk(5, dim=1).indices
    assert torch.equal(code.indices.sort(dim=1).values, nearest.sort(dim=1).values)
    expected = 2 - torch.sqrt(torch.clamp(2 - 2 * cos.gather(1, code.indices), min=1e-6))
    assert torch.allclose(code.values, expected, atol=1e-5)
    assert bool((code.values >= 0).all()) and bool((code.values <= 2).all())
    # scaling an input does not change its code
    assert torch.equal(sae.encode(x * 0.01).indices.sort(1).values, code.indices.sort(1).values)


def test_gradients_finite_when_input_equals_a_concept_direction():
    sae = create_sae("vl", d_in=8, n_latents=16, k=3, center_inputs=False)
    x = {"image": sae.W_enc.detach()[:4].clone() * 3.0, "text": sae.W_enc.detach()[4:8].clone()}
    out = sae.training_forward(x, TrainContext())
    out.loss.backward()
    for name, p in sae.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("arch", ["vl", "vl-split", "vl-shared"])
def test_training_reduces_loss_and_round_trips(arch, tmp_path):
    torch.manual_seed(0)
    d, n_concepts = 16, 24
    concepts = F.normalize(torch.randn(n_concepts, d), dim=1)
    def batch(n=256):
        z = (torch.rand(n, n_concepts) < 0.1).float() * (0.5 + torch.rand(n, n_concepts))
        return {"image": z @ concepts + 0.3, "text": z @ concepts * 2.0 - 0.1}
    sae = create_sae(arch, d_in=d, n_latents=64, k=4)
    opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
    losses = []
    for step in range(300):
        out = sae.training_forward(batch(), TrainContext(step=step))
        opt.zero_grad()
        out.loss.backward()
        sae.before_optimizer_step()
        opt.step()
        sae.after_optimizer_step()
        losses.append(float(out.loss.detach()))
    assert sum(losses[-20:]) / 20 < 0.6 * sum(losses[:20]) / 20
    assert set(out.recon) == {"image", "text"}
    assert out.code.values.shape[0] == 512
    save_sae(sae, tmp_path / "ck")
    again = load_sae(tmp_path / "ck")
    x = batch(10)["text"]
    assert torch.allclose(sae(x, "text"), again(x, "text"), atol=1e-6)


def test_split_ablation_has_one_encoder_per_modality_and_checkpoint_names():
    sae = create_sae("vl-split", d_in=8, n_latents=16, k=2)
    names = set(sae.state_dict())
    assert {"W_dec.image", "W_dec.text", "b_dec.image", "b_dec.text", "enc.image.weight", "enc.text.weight"} <= names
    vl = create_sae("vl", d_in=8, n_latents=16, k=2)
    assert set(vl.state_dict()) == {"W_enc", "W_dec.image", "W_dec.text", "b_dec.image", "b_dec.text"}


def test_fold_input_scales_matches_scaled_inputs():
    for arch in ["vl", "vl-split"]:
        sae = create_sae(arch, d_in=8, n_latents=16, k=3)
        with torch.no_grad():
            for b in sae.b_dec.values():
                b.normal_()
        x = torch.randn(5, 8)
        before = {m: sae(x * 4.0, m) / 4.0 for m in ("image", "text")}
        sae.fold_input_scales({"image": 4.0, "text": 4.0})
        for m in ("image", "text"):
            assert torch.allclose(sae(x, m), before[m], atol=1e-5), arch


def test_bad_inputs_are_one_line_errors():
    sae = create_sae("vl", d_in=8, n_latents=16, k=2)
    with pytest.raises(VlsaeError, match="paired batches"):
        sae.training_forward(torch.randn(4, 8), TrainContext())
    with pytest.raises(VlsaeError, match="pass modality"):
        sae.encode(torch.randn(3, 8))  # centring needs the modality's bias
    with pytest.raises(VlsaeError, match="pass modality"):
        sae.decode(sae.encode(torch.randn(3, 8), "image"))
    with pytest.raises(VlsaeError, match="unknown modality"):
        sae(torch.randn(3, 8), "audio")
    with pytest.raises(VlsaeError, match="shape"):
        sae.encode(torch.randn(3, 9), "image")
    with pytest.raises(VlsaeError, match="k must be"):
        create_sae("vl", d_in=8, n_latents=16, k=17)


def test_centred_encoder_ignores_the_modality_offset():
    sae = create_sae("vl", d_in=6, n_latents=12, k=2)
    offset = torch.tensor([5.0, 0, 0, 0, 0, 0])
    with torch.no_grad():
        sae.b_dec["image"].copy_(offset)
    x = torch.randn(10, 6)
    a = sae.encode(x + offset, "image").indices.sort(1).values
    b = sae.encode(x, "text").indices.sort(1).values
    assert torch.equal(a, b)
