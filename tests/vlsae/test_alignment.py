"""The alignment stage aligns unaligned modalities and travels with the SAE."""
import pytest
import torch
import torch.nn.functional as F

from vlsae import VlsaeError, create_sae
from vlsae.alignment import AlignedSAE, ContrastiveProjector, ProjectedSource, ProjectorConfig, ProjectorTrainConfig, train_projector
from vlsae.checkpoint import load_sae, save_sae


class PairedTensors:
    """Minimal paired ActivationSource for the test (the trainer has the real one)."""

    def __init__(self, data):
        self.data = data
        self.d_in = {m: t.shape[1] for m, t in data.items()}

    def __len__(self):
        return next(iter(self.data.values())).shape[0]

    def batches(self, batch_size, seed, start=0):
        g = torch.Generator().manual_seed(seed)
        while True:
            idx = torch.randint(0, len(self), (batch_size,), generator=g)
            yield {m: t[idx] for m, t in self.data.items()}

    def sample(self, n, seed=0):
        return {m: t[:n] for m, t in self.data.items()}


def unaligned_pairs(n=2000, seed=0):
    g = torch.Generator().manual_seed(seed)
    concepts = (torch.rand(n, 24, generator=g) < 0.15).float()
    image = concepts @ torch.randn(24, 20, generator=g) + 0.05 * torch.randn(n, 20, generator=g)
    text = concepts @ torch.randn(24, 12, generator=g) + 0.05 * torch.randn(n, 12, generator=g)
    return {"image": image, "text": text}


def test_projector_learns_cross_modal_retrieval():
    source = PairedTensors(unaligned_pairs())
    projector, summary = train_projector(source, ProjectorTrainConfig(steps=300, batch_size=128, lr=3e-3, progress=False), d_shared=16)
    assert summary["retrieval_acc_after"] > 0.3  # chance is 1/128
    held = source.sample(128)
    assert projector.retrieval_accuracy(held) > 0.3


def test_cosine_is_default_and_dot_is_a_flag():
    proj = ContrastiveProjector(ProjectorConfig(widths={"image": 4, "text": 3}))
    a, b = torch.randn(5, 4), torch.randn(5, 4)
    assert torch.allclose(proj.logits(a, b), F.normalize(a, dim=1) @ F.normalize(b, dim=1).t() / 0.07)
    dot = ContrastiveProjector(ProjectorConfig(widths={"image": 4, "text": 3}, similarity="dot"))
    assert torch.allclose(dot.logits(a, b), a @ b.t() / 0.07)
    with pytest.raises(VlsaeError):
        ProjectorConfig(widths={"image": 4}, d_shared=4)


def test_aligned_sae_round_trips_through_a_checkpoint(tmp_path):
    proj = ContrastiveProjector(ProjectorConfig(widths={"image": 6, "text": 5}, d_shared=8))
    sae = create_sae("vl", d_in=8, n_latents=16, k=3)
    save_sae(sae, tmp_path / "run")
    proj.save(tmp_path / "run")
    loaded = load_sae(tmp_path / "run")
    assert isinstance(loaded, AlignedSAE)
    x = torch.randn(4, 5)
    expected = proj.from_shared(sae.decode(sae.encode(proj.to_shared(x, "text"), "text"), "text"), "text")
    assert torch.allclose(loaded(x, "text"), expected, atol=1e-6)
    with pytest.raises(VlsaeError, match="shape"):
        loaded.encode(torch.randn(4, 6), "text")
    wide = ContrastiveProjector(ProjectorConfig(widths={"image": 20, "text": 12}, d_shared=8))
    projected = ProjectedSource(PairedTensors(unaligned_pairs(50)), wide)
    batch = next(projected.batches(8, seed=0))
    assert batch["image"].shape == (8, 8) and batch["text"].shape == (8, 8)
