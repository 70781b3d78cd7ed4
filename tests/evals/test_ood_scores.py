"""Every OOD score on an easy synthetic split: "higher = in-distribution", so each must reach AUROC > 0.9.

ID embeddings are four tight clusters (one per class) in a 4-dimensional subspace of R^16, with
a small common offset; OOD embeddings are clusters in the orthogonal complement. The zero-shot
head's prompts are the ID class directions, so MSP/MCM see ID rows match a class and OOD rows
match none; the SAEs are trained on the fit rows only.
"""
import pytest
import torch
import torch.nn.functional as F

from evals.ood.context import Reference, ScoreSettings
from evals.ood.metrics import ood_metrics
from evals.ood.scores import get_score, list_scores, missing_inputs
from evals.zeroshot.head import ZeroShotHead
from vlsae import create_sae
from vlsae.errors import VlsaeError
from vlsae.training import TensorSource, TrainConfig, train

D = 16


def _clusters(centres: torch.Tensor, n: int, generator: torch.Generator, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """n rows around the centres; ``noise``: (D, D) maps unit Gaussian noise into the embedding space."""
    labels = torch.randint(0, centres.shape[0], (n,), generator=generator)
    return centres[labels] + torch.randn(n, D, generator=generator) @ noise, labels


@pytest.fixture(scope="module")
def split():
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(D, D, generator=g))[0]
    offset = 0.5 * basis[:, 8]
    id_centres = 3 * basis[:, :4].T + offset          # four ID classes
    ood_centres = 3 * basis[:, 4:8].T + offset        # four directions the ID data never takes
    # ID rows vary mostly within their own subspace (as embeddings of one domain do), OOD rows likewise in theirs
    id_noise = basis @ torch.diag(torch.tensor([0.15] * 4 + [0.0] * 12)) @ basis.T
    ood_noise = basis @ torch.diag(torch.tensor([0.0] * 4 + [0.15] * 4 + [0.0] * 8)) @ basis.T
    fit, fit_labels = _clusters(id_centres, 1500, g, id_noise)
    held_out, _ = _clusters(id_centres, 400, g, id_noise)
    ood, _ = _clusters(ood_centres, 400, g, ood_noise)
    text = id_centres[fit_labels] + torch.randn(1500, D, generator=g) @ id_noise  # each fit pair's caption side
    head = ZeroShotHead(attributes=["class"], classes={"class": ["a", "b", "c", "d"]},
                        text=F.normalize(id_centres, dim=1), raw=id_centres.clone(),
                        prompt_class={"class": torch.arange(4)}, logit_scale=100.0, prompts=["a", "b", "c", "d"])
    torch.manual_seed(0)  # the SAEs' initialisation (this module fixture runs before the per-test seed)
    config = TrainConfig(steps=300, batch_size=128, lr=3e-3, progress=False, tensorboard=False)
    topk = train(create_sae("topk", d_in=D, n_latents=16, k=2), TensorSource(fit), config).sae.eval()
    vl = train(create_sae("vl", d_in=D, n_latents=16, k=2), TensorSource({"image": fit, "text": text}), config).sae.eval()
    return {"fit": fit, "id": held_out, "ood": ood, "head": head, "saes": {"topk": topk, "vl": vl}}


# A TopK SAE's latents that never fire on the fit rows keep random encoder directions, and rows in
# directions the fit data never takes fire them strongly: the sum of its top activations is no OOD
# score there (AUROC 0.83-1.0 over SAE seeds on this split); vl's nearest-concept energy is (1.0).
NOT_FOR = {"topk": {"concept-energy"}, "vl": set()}


@pytest.mark.parametrize("arch", ["topk", "vl"])
def test_every_score_separates_an_easy_split(split, arch):
    ref = Reference(split["saes"][arch], split["fit"], split["head"], ScoreSettings(k=5))
    id_features, ood_features = ref.features(split["id"]), ref.features(split["ood"])
    names = list_scores()
    assert {"recon", "concept-energy", "code-knn", "cap", "concept-mcm", "msp", "mcm", "energy", "knn",
            "mahalanobis", "mahalanobis-1"} <= set(names)
    for name in names:
        if name in NOT_FOR[arch]:
            continue
        score = get_score(name)
        assert missing_inputs(score, ref) is None
        id_scores, ood_scores = score(ref, id_features), score(ref, ood_features)
        assert id_scores.shape == (400,) and torch.isfinite(id_scores).all()
        auroc = ood_metrics(id_scores.numpy(), ood_scores.numpy())["auroc"]
        assert auroc > 0.9, f"{arch} {name}: AUROC {auroc:.3f}"


def test_concept_mcm_at_lambda_zero_is_mcm_exactly(split):
    ref = Reference(split["saes"]["vl"], split["fit"], split["head"], ScoreSettings(lam=0.0))
    features = ref.features(split["ood"])
    assert torch.equal(get_score("concept-mcm")(ref, features), get_score("mcm")(ref, features))
    mixed = Reference(split["saes"]["vl"], split["fit"], split["head"], ScoreSettings(lam=0.5))
    assert not torch.equal(get_score("concept-mcm")(mixed, mixed.features(split["ood"])), get_score("mcm")(ref, features))


def test_scores_share_one_pass_over_a_set(split):
    ref = Reference(split["saes"]["topk"], split["fit"], split["head"])
    features = ref.features(split["id"])
    get_score("recon")(ref, features)
    code = features.code
    get_score("code-knn")(ref, features)
    get_score("cap")(ref, features)
    assert features.code is code  # computed once, read by every SAE score


def test_wrong_width_and_missing_head_are_one_line_errors(split):
    with pytest.raises(VlsaeError, match="width"):
        Reference(split["saes"]["topk"], torch.randn(10, D + 1))
    ref = Reference(split["saes"]["topk"], split["fit"], head=None)
    assert missing_inputs(get_score("msp"), ref) and missing_inputs(get_score("recon"), ref) is None
    with pytest.raises(VlsaeError, match="k must be"):
        Reference(split["saes"]["topk"], split["fit"][:3], settings=ScoreSettings(k=5))
