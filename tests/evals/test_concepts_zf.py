"""The ZF plot and epsilon_LBO (top-AFA's diagnostic) of the concept report, for any SAE."""
import torch

from evals.concepts.figures import write_figures
from evals.concepts.zf import zf_norms, zf_summary
from vlsae.concepts import summarize_concepts
from vlsae.saes import create_sae

D, N = 16, 12


def orthonormal_topk(bias: torch.Tensor | None = None):
    """A TopK SAE whose dictionary is exactly the (orthonormal) planted features."""
    q, _ = torch.linalg.qr(torch.randn(D, N, generator=torch.Generator().manual_seed(0)))
    sae = create_sae("topk", d_in=D, n_latents=N, k=N)
    with torch.no_grad():
        sae.W_dec.copy_(q.t())
        sae.W_enc.copy_(q.t())
        sae.b_enc.zero_()
        sae.b_dec.copy_(torch.zeros(D) if bias is None else bias)
    return sae.eval(), q


def codes(n=300, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, N, generator=g) < 0.3) * (0.5 + torch.rand(n, N, generator=g))


def test_a_perfect_orthonormal_dictionary_has_eps_lbo_zero():
    sae, q = orthonormal_topk()
    h = codes()
    norms = zf_norms(sae, {"image": h @ q.t()})["image"]
    assert torch.allclose(norms["code"], h.norm(dim=1), atol=1e-5)
    assert torch.allclose(norms["input"], norms["code"], atol=1e-5)
    assert float(norms["eps_lbo"][h.norm(dim=1) > 0].max()) < 1e-5


def test_the_bias_is_one_more_feature_and_shrinkage_shows_as_under_activation():
    bias = torch.zeros(D)
    bias[0] = 0.5
    sae, q = orthonormal_topk(bias)
    h = codes()
    x = h @ q.t() + bias
    norms = zf_norms(sae, {"text": x})["text"]
    expected = (sae.encode(x).to_dense().pow(2).sum(1) + 0.25).sqrt()
    assert torch.allclose(norms["code"], expected, atol=1e-5)
    with torch.no_grad():
        sae.W_dec.mul_(0.3)  # the code writes 30 % of what it reads: far under the cone
    low = zf_summary(zf_norms(sae, {"text": x}))["text"]
    assert low["under_activated"] > 0.9 and low["over_activated"] == 0.0
    eps = zf_norms(sae, {"text": x})["text"]["eps_lbo"]
    assert float(eps.median()) > 1e-2


def test_the_report_draws_the_zf_plot_for_a_multimodal_sae(tmp_path):
    sae = create_sae("vl", d_in=D, n_latents=N, k=3).eval()
    acts = {"image": torch.randn(200, D), "text": torch.randn(200, D)}
    norms = zf_norms(sae, acts)
    assert set(norms) == {"image", "text"} and norms["image"]["input"].shape == (200,)
    names = write_figures(tmp_path, summarize_concepts(sae, acts), {}, norms)
    assert names[-1] == "zf_plot.png" and (tmp_path / "zf_plot.png").stat().st_size > 1000
    assert write_figures(tmp_path, summarize_concepts(sae, acts), {}) == ["modality_score.png"]
