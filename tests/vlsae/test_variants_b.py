"""Issue 15, part B: g-SAE (gradient-aware TopK), ITDA (one-pass dictionary), and the trainer's readout."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from vlsae.checkpoint import load_sae, save_sae
from vlsae.cli import main
from vlsae.errors import VlsaeError
from vlsae.saes import TrainContext, create_sae
from vlsae.saes.mp import merge_repeats
from vlsae.training import TensorSource, TrainConfig, train
from vlsae.training.readout import LinearReadout, as_readout, build_readout, list_readouts
from vlsae.training.sources import DataSpec

D, N, K = 16, 64, 4
QUIET = dict(progress=False, tensorboard=False)


def planted(n, seed, n_features=24, active=3, d=D):
    g = torch.Generator().manual_seed(seed)
    dirs = F.normalize(torch.randn(n_features, d, generator=g), dim=1)
    which = torch.rand(n, n_features, generator=g).argsort(dim=1)[:, :active]
    codes = torch.zeros(n, n_features).scatter_(1, which, 0.5 + torch.rand(n, active, generator=g))
    return codes @ dirs, dirs


# ------------------------------------------------------------------ readout
def test_readout_loss_and_gradient_values_and_logits():
    w = torch.randn(D)
    r = as_readout(LinearReadout(w))
    x = torch.randn(8, D)
    assert torch.allclose(r.loss(x), x @ w, atol=1e-5)
    assert torch.allclose(r.input_gradient(x), w.expand(8, D), atol=1e-6)  # a scalar readout's gradient is its direction
    W = torch.randn(5, D)
    logits = as_readout(LinearReadout(W))
    assert logits.kind_of(logits(x)) == "logits"
    p = torch.softmax(x @ W.t(), dim=1)
    onehot = F.one_hot((x @ W.t()).argmax(dim=1), 5).float()
    assert torch.allclose(logits.input_gradient(x), (p - onehot) @ W, atol=1e-5)  # CE against its own prediction


def test_readout_fidelity_figures():
    r = as_readout(LinearReadout(torch.randn(D)))
    x = torch.randn(100, D)
    assert r.fidelity(x, x)["readout_fvu"] == 0.0
    assert r.fidelity(x, torch.zeros_like(x))["readout_fvu"] > 0.9
    logits = as_readout(LinearReadout(torch.randn(4, D)))
    same = logits.fidelity(x, x)
    assert same["readout_agreement"] == 1.0 and abs(same["readout_ce_increase"]) < 1e-6 and abs(same["readout_kl"]) < 1e-6
    worse = logits.fidelity(x, x + 3 * torch.randn_like(x))
    assert worse["readout_ce_increase"] > 0 and worse["readout_kl"] > 0 and worse["readout_agreement"] < 1


def test_readout_errors_are_one_line(tmp_path):
    bad = as_readout(lambda t: t @ torch.randn(D + 1))
    with pytest.raises(VlsaeError, match="width 16"):
        bad.check(torch.randn(4, D))
    with pytest.raises(VlsaeError, match="shape"):
        as_readout(lambda t: t[:2]).check(torch.randn(4, D))
    spec = DataSpec(path="x.safetensors")
    with pytest.raises(VlsaeError, match="needs a kind"):
        build_readout({"path": "w"}, spec, D)
    with pytest.raises(VlsaeError, match="did you mean 'linear'"):
        build_readout({"kind": "linaer"}, spec, D)
    with pytest.raises(VlsaeError, match="no option 'weights'"):
        build_readout({"kind": "linear", "weights": "w"}, spec, D)
    from safetensors.torch import save_file
    save_file({"weight": torch.randn(3, D + 2)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(VlsaeError, match="input width 18"):
        build_readout({"kind": "linear", "path": str(tmp_path / "w.safetensors")}, spec, D)
    save_file({"weight": torch.randn(3, D), "bias": torch.randn(3)}, str(tmp_path / "ok.safetensors"))
    r = build_readout({"kind": "linear", "path": str(tmp_path / "ok.safetensors")}, spec, D)
    assert r(torch.randn(2, D)).shape == (2, 3) and r.info["kind"] == "linear"
    assert {"linear", "planted", "zeroshot"} <= set(list_readouts())  # the evals readouts come in by entry point


def test_planted_readout_reads_the_suites_direction():
    from evals.synthetic import generate
    spec = DataSpec(synthetic="independent", preset="light", seed=3)
    r = build_readout({"kind": "planted", "feature": 5}, spec, 64)
    v = generate("independent", seed=3, n_train=500, n_test=50, preset="light").directions[5]
    assert torch.allclose(r.fn.weight[0], v)  # the dictionary is drawn before any sample
    with pytest.raises(VlsaeError, match="data.synthetic"):
        build_readout({"kind": "planted"}, DataSpec(path="a.npy"), 64)
    with pytest.raises(VlsaeError, match="0..511"):
        build_readout({"kind": "planted", "feature": 512}, spec, 64)


# --------------------------------------------------------------------- gsae
def gsae(**kw):
    sae = create_sae("gsae", d_in=D, n_latents=N, k=K, **kw)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
    return sae


def test_gsae_score_formula_on_a_hand_built_batch():
    sae = gsae(beta=2.0)
    pre = torch.tensor([[1.0, 0.5, -0.2, 0.1] + [-5.0] * (N - 4)])
    grad = torch.randn(1, D)
    cos = (F.normalize(grad, dim=1) @ sae.W_dec.detach().t()).abs()[0]  # unit decoder rows: the effect is a cosine
    s = sae.guided_scores(pre, grad)[0]
    for i in range(4):
        z = max(float(pre[0, i]), 0.0)
        assert math.isclose(float(s[i]), float(pre[0, i]) + 2.0 * z * float(cos[i].detach()), rel_tol=1e-5, abs_tol=1e-6)
    raw = gsae(beta=2.0, grad_norm="none")
    raw.load_state_dict(sae.state_dict())
    s_raw = raw.guided_scores(pre, grad)[0]
    assert math.isclose(float(s_raw[0]), 1.0 + 2.0 * abs(float(grad[0] @ sae.W_dec.detach()[0])), rel_tol=1e-5)
    assert torch.equal(sae.guided_scores(pre, None), pre)


def test_gsae_gradient_promotes_a_small_latent_and_keeps_original_values():
    sae = gsae(beta=50.0)
    x = torch.randn(32, D)
    pre = sae.pre_activations(x).detach()
    plain = pre.topk(K, dim=1).indices
    # the latent ranked K + 2 (positive, left out by TopK), the gradient along its decoder row
    small = pre.topk(K + 2, dim=1).indices[:, -1]
    assert (pre.gather(1, small[:, None]) > 0).all()
    grad = sae.W_dec.detach()[small]
    out = sae.train().training_forward(x, TrainContext(downstream_grad=grad))
    chosen = out.code.indices
    promoted = (chosen == small[:, None]).any(dim=1)
    assert promoted.float().mean() > 0.7
    assert not (plain == small[:, None]).any()
    assert torch.allclose(out.code.values, torch.relu(pre.gather(1, chosen)), atol=1e-5)  # values are z, not s
    assert float(out.metrics["guided_swaps"]) > 0


def test_gsae_without_a_gradient_is_topk_exactly():
    sae = gsae()
    topk = create_sae("topk", d_in=D, n_latents=N, k=K)
    topk.load_state_dict(sae.state_dict())
    x = torch.randn(48, D)
    dead = torch.zeros(N, dtype=torch.bool)
    dead[::4] = True
    a = sae.training_forward(x, TrainContext(dead_mask=dead))
    b = topk.training_forward(x, TrainContext(dead_mask=dead))
    assert torch.equal(a.code.indices.sort(dim=1).values, b.code.indices.sort(dim=1).values)
    assert all(torch.allclose(a.losses[name], b.losses[name]) for name in b.losses)
    assert torch.equal(sae.encode(x).indices, topk.encode(x).indices)  # inference is TopK


def test_gsae_guided_choice_survives_folding_the_input_scale():
    sae = gsae(beta=3.0).eval()
    before = copy.deepcopy(sae)
    sae.fold_input_scale(2.5)
    x, g = torch.randn(16, D), torch.randn(16, D)
    a = sae.encode_guided(x / 2.5, g * 2.5)  # raw input and the gradient with respect to it
    b = before.encode_guided(x, g)
    assert torch.equal(a.indices.sort(dim=1).values, b.indices.sort(dim=1).values)
    with pytest.raises(VlsaeError, match="shape"):
        sae.encode_guided(x, g[:, :3])


def test_gsae_trains_only_with_a_readout_and_reports_its_fidelity():
    x, dirs = planted(2048, seed=0)
    cfg = TrainConfig(steps=30, batch_size=256, **QUIET)
    with pytest.raises(VlsaeError, match="needs a readout"):
        train(gsae(), TensorSource(x), cfg)
    result = train(gsae(), TensorSource(x), cfg, readout=LinearReadout(dirs[0]))
    assert "readout_fvu" in result.summary and result.summary["readout"]["name"] == "LinearReadout"
    assert "guided_swaps" in result.history[-1] and "readout_fvu" in result.history[-1]
    with pytest.raises(VlsaeError, match="paired"):
        train(gsae(), TensorSource({"image": x, "text": x}), cfg, readout=LinearReadout(dirs[0]))


def test_trainer_hands_gsae_the_gradient_in_the_scaled_space(monkeypatch):
    """The batch the SAE sees is c * x; the gradient it gets is dL/d(c x) = (dL/dx) / c."""
    x, dirs = planted(512, seed=1)
    w = dirs[0] * 3.0
    seen = []
    sae = gsae()
    original = type(sae).training_forward

    def spy(self, batch, ctx):
        seen.append(ctx.downstream_grad.clone())
        return original(self, batch, ctx)

    monkeypatch.setattr(type(sae), "training_forward", spy)
    result = train(sae, TensorSource(x), TrainConfig(steps=2, batch_size=128, **QUIET), readout=LinearReadout(w))
    c = result.summary["input_scale"]
    assert torch.allclose(seen[0], (w / c).expand_as(seen[0]), atol=1e-6)


# --------------------------------------------------------------------- itda
def itda(**kw):
    return create_sae("itda", d_in=D, n_latents=N, **{"k": K, **kw})


def test_itda_pursuit_is_signed_and_projects_on_orthonormal_atoms():
    sae = itda(threshold=0.0)
    basis = torch.linalg.qr(torch.randn(D, D))[0].t()  # orthonormal rows
    sae.add_rows(basis[:6] * 2.0)  # six atoms, each its own row's direction
    assert sae.n_atoms == 6 and torch.equal(sae.atom_labels(), torch.arange(6))
    coef = torch.tensor([[1.5, -0.7, 0.0, 0.2, 0.0, 0.0]])
    x = coef @ basis[:6]
    code = sae.encode(x)
    assert torch.allclose(code.to_dense()[0, :6], coef[0], atol=1e-5)  # negative coefficients allowed
    assert torch.allclose(sae.decode(code), x, atol=1e-5) and float(sae.b_dec.abs().sum()) == 0
    atoms, coefs = sae.pursue(torch.randn(8, D), 3)
    residual = torch.randn(8, D)
    atoms, coefs = sae.pursue(residual, 3)
    left = residual - sae.decode(merge_repeats(atoms, coefs, N))
    last = sae.W_dec[atoms[:, -1]]
    assert (left * last).sum(dim=1).abs().max() < 1e-4  # the residual is orthogonal to the last atom chosen


def test_itda_adds_atoms_only_where_the_residual_is_unexplained():
    sae = itda(threshold=0.05, chunk=4)
    u = F.normalize(torch.randn(3, D), dim=1)
    rows = torch.stack([u[0], 2 * u[0], u[1], -u[1] * 0.5, u[2], u[0] + u[1]])
    sae.add_rows(rows)
    # chunk 1 (rows 0-3): rows 0 and 2 are new; 1 (same direction as 0) and 3 (as 2) are dropped as duplicates
    # chunk 2 (rows 4-5): row 4 is new, row 5 = u0 + u1 is explained by the atoms of chunk 1
    assert sae.atom_labels().tolist() == [0, 2, 4]
    assert int(sae.seen) == 6
    assert torch.allclose(sae.W_dec[:3].norm(dim=1), torch.ones(3))
    full = itda(threshold=0.0)
    full.add_rows(torch.randn(3 * N, D))
    assert full.n_atoms == N and full.full and bool((full.labels >= 0).all())


def test_itda_is_rotation_invariant():
    x, _ = planted(1500, seed=2)
    q = torch.linalg.qr(torch.randn(D, D))[0]
    a, b = itda(threshold=0.2, k=3), itda(threshold=0.2, k=3)
    a.add_rows(x)
    b.add_rows(x @ q)
    assert a.n_atoms > 5 and torch.equal(a.atom_labels(), b.atom_labels())


def test_itda_finds_every_planted_feature_from_single_feature_rows():
    g = torch.Generator().manual_seed(4)
    dirs = F.normalize(torch.randn(12, D, generator=g), dim=1)
    which = torch.randint(0, 12, (400,), generator=g)
    x = dirs[which] * (0.5 + torch.rand(400, 1, generator=g))  # one feature per row
    sae = itda(threshold=0.1, k=2)
    sae.add_rows(x)
    cos = (F.normalize(sae.W_dec[:sae.n_atoms], dim=1) @ dirs.t()).abs().max(dim=0).values
    assert (cos > 0.9).all() and sae.n_atoms <= 24


def test_itda_save_load_and_fold_contract(tmp_path):
    x, _ = planted(600, seed=5)
    sae = itda(threshold=0.3)
    sae.add_rows(x)
    save_sae(sae, tmp_path / "ck")
    loaded = load_sae(tmp_path / "ck")
    assert set(loaded.state_dict()) == {"W_dec", "b_dec", "labels", "size", "seen"}
    assert loaded.n_atoms == sae.n_atoms and torch.equal(loaded.atom_labels(), sae.atom_labels())
    assert torch.allclose(loaded(x[:32]), sae(x[:32]), atol=1e-6)
    before = copy.deepcopy(sae)
    sae.fold_input_scale(4.0)
    assert torch.allclose(sae(x[:32] / 4.0), before(x[:32]) / 4.0, atol=1e-5)
    assert torch.allclose(sae.encode(x[:32] / 4.0).to_dense(), before.encode(x[:32]).to_dense(), atol=1e-4)


def test_itda_builds_in_one_pass_through_the_trainer_and_resumes_exactly(tmp_path):
    x, _ = planted(2000, seed=6)
    cfg = TrainConfig(steps=1000, batch_size=100, checkpoint_every=7, log_every=5, **QUIET)
    build = lambda: create_sae("itda", d_in=D, n_latents=2048, k=K, threshold=0.15)  # noqa: E731 - never full here
    whole = train(build(), TensorSource(x), cfg, out_dir=tmp_path / "a")
    assert whole.summary["steps"] == 20 and whole.summary["tokens"] == 2000  # one pass: len // batch_size batches
    assert whole.summary["training"] == "one pass, no gradients"
    assert whole.history[-1]["atoms"] == whole.sae.n_atoms > 50
    # an interrupted build (checkpoint at batch 14) continues to the same dictionary
    import vlsae.training.trainer as trainer
    calls = {"n": 0}
    original = trainer._mark_fired

    def stop(*args):
        calls["n"] += 1
        if calls["n"] == 16:
            raise KeyboardInterrupt
        return original(*args)

    trainer._mark_fired = stop
    try:
        with pytest.raises(KeyboardInterrupt):
            train(build(), TensorSource(x), cfg, out_dir=tmp_path / "b")
    finally:
        trainer._mark_fired = original
    resumed = train(build(), TensorSource(x), cfg, out_dir=tmp_path / "b", resume=True)
    for name, tensor in whole.sae.state_dict().items():
        assert torch.equal(tensor, resumed.sae.state_dict()[name]), name
    with pytest.raises(VlsaeError, match="does not apply"):
        train(itda(), TensorSource(x), cfg, readout=LinearReadout(torch.randn(D)))


def test_cli_trains_gsae_with_a_planted_readout_and_itda_in_one_pass(tmp_path, capsys):
    base = ["train", "--synthetic", "independent", "--set", "data.n_train=2000", "--set", "data.n_test=500",
            "--latents", "128", "--k", "4", "--batch-size", "250", "--quiet"]
    assert main([*base, "--arch", "gsae", "--steps", "10", "--set", "readout.kind=planted",
                 "--set", "readout.feature=3", "--out", str(tmp_path / "g")]) == 0
    info = load_sae(tmp_path / "g")
    assert info.arch == "gsae"
    import json
    summary = json.loads((tmp_path / "g" / "training.json").read_text())["summary"]
    assert summary["readout"]["kind"] == "planted" and summary["readout"]["feature"] == 3 and "readout_fvu" in summary
    assert main([*base, "--arch", "itda", "--out", str(tmp_path / "i")]) == 0
    built = load_sae(tmp_path / "i")
    assert built.arch == "itda" and 0 < built.n_atoms <= 128
    capsys.readouterr()
    assert main([*base, "--arch", "gsae", "--steps", "5", "--out", str(tmp_path / "g2")]) == 2
    err = capsys.readouterr().err
    assert "needs a readout" in err and len(err.strip().splitlines()) == 1
    assert main([*base, "--arch", "itda", "--set", "readout.kind=planted", "--out", str(tmp_path / "i2")]) == 2
    err = capsys.readouterr().err
    assert "does not apply" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "g2").exists() and not (tmp_path / "i2").exists()  # refused before any work
