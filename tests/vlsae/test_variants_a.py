"""mc, fc (with aux_zipf), gba, vsae, topafa: their formulas on hand-built batches, the
MC = BatchTopK identity, exact resume of the buffers they keep, and the CLI.

The contracts every architecture shares (shapes, save/load, scale folding, learning)
are in test_saes.py, whose parametrised lists include these five."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from tests.vlsae.test_training import Interrupted, StopsAt
from vlsae.checkpoint import load_sae
from vlsae.cli import main as cli_main
from vlsae.errors import VlsaeError
from vlsae.saes import TrainContext, create_sae
from vlsae.saes.choice import allocate, zipf_fit, zipf_under_used
from vlsae.saes.gba import group_targets
from vlsae.saes.topafa import afa_choice
from vlsae.saes.vsae import gaussian_kl
from vlsae.training import TensorSource, TrainConfig, train

D, N, K = 16, 64, 4


def planted(n, seed=0, n_features=24, active=3):
    g = torch.Generator().manual_seed(seed)
    dirs = F.normalize(torch.randn(n_features, D, generator=g), dim=1)
    which = torch.rand(n, n_features, generator=g).argsort(dim=1)[:, :active]
    codes = torch.zeros(n, n_features).scatter_(1, which, 0.5 + torch.rand(n, active, generator=g))
    return codes @ dirs * 3.0 + 1.0


def quick(**kw):
    base = dict(steps=120, batch_size=64, lr=3e-3, progress=False, log_every=20, tensorboard=False, eval_rows=256)
    base.update(kw)
    return TrainConfig(**base)


# ------------------------------------------------------------- Mutual Choice
def test_mc_selection_equals_batchtopk_on_the_same_batch():
    torch.manual_seed(0)
    mc = create_sae("mc", d_in=D, n_latents=N, k=K)
    btk = create_sae("batchtopk", d_in=D, n_latents=N, k=K)
    btk.load_state_dict({k: v for k, v in mc.state_dict().items() if k != "density"})
    with torch.no_grad():
        for sae in (mc, btk):
            sae.b_enc.normal_(0, 0.3)
        btk.b_enc.copy_(mc.b_enc)
    for seed in range(3):
        x = torch.randn(96, D, generator=torch.Generator().manual_seed(seed)) * 2
        a = mc.training_forward(x, TrainContext()).code
        b = btk.training_forward(x, TrainContext()).code
        assert torch.equal(a.to_dense(), b.to_dense())
        assert torch.equal(mc.threshold, btk.threshold)
        # and both are the definition: the B*k largest entries of the whole ReLU'd matrix
        pre = torch.relu(mc.pre_activations(x)).detach().flatten()
        reference = torch.zeros_like(pre)
        top = pre.topk(96 * K).indices
        reference[top] = pre[top]
        assert torch.allclose(a.to_dense().detach().flatten(), reference)
    mc.eval(), btk.eval()
    x = torch.randn(32, D)
    assert torch.equal(mc.encode(x).to_dense(), btk.encode(x).to_dense())


def test_mc_density_is_an_ema_of_firing_fractions():
    mc = create_sae("mc", d_in=D, n_latents=N, k=K, density_rate=0.5)
    assert torch.allclose(mc.density, torch.full((N,), K / N))
    x = torch.randn(64, D)
    code = mc.training_forward(x, TrainContext()).code
    fired = torch.zeros(N).index_add_(0, code.indices.flatten(), (code.values != 0).float().flatten()) / 64
    assert torch.allclose(mc.density, 0.5 * K / N + 0.5 * fired)


# ------------------------------------------------------------------ aux_zipf
def test_zipf_fit_recovers_a_planted_law():
    ranks = torch.arange(1, 201, dtype=torch.float64)
    density = 0.3 * ranks.pow(-1.2)
    log_c, alpha = zipf_fit(density[torch.randperm(200)], 0.5)
    assert alpha == pytest.approx(1.2, abs=1e-6) and math.exp(log_c) == pytest.approx(0.3, rel=1e-6)
    assert zipf_fit(torch.full((50,), 0.1), 0.5)[1] == pytest.approx(0.0, abs=1e-9)  # flat: alpha 0


def test_zipf_under_used_flags_the_sagging_tail_only():
    ranks = torch.arange(1, 101, dtype=torch.float64)
    density = (0.2 * ranks.pow(-1.0)).float()
    density[80:] *= 0.1  # the low end falls off the law
    under = zipf_under_used(density, fit_fraction=0.5, slack=2.0)
    assert under[80:].all() and not under[:80].any()
    assert not zipf_under_used(torch.full((40,), 0.1), 0.5, 2.0).any()
    assert not zipf_under_used(torch.zeros(40), 0.5, 2.0).any()


def test_aux_zipf_fits_under_used_latents_even_when_none_is_dead():
    torch.manual_seed(0)
    for arch in ("mc", "fc"):
        sae = create_sae(arch, d_in=D, n_latents=N, k=K, aux="zipf")
        plain = create_sae(arch, d_in=D, n_latents=N, k=K)
        with torch.no_grad():
            sae.density.copy_(0.2 * torch.arange(1, N + 1).float().pow(-1.0))
            sae.density[-10:] = 1e-5
        plain.load_state_dict(sae.state_dict())
        x = torch.randn(64, D)
        alive = TrainContext(dead_mask=torch.zeros(N, dtype=torch.bool))
        losses = sae.training_forward(x, alive).losses
        assert "aux_zipf" in losses and float(losses["aux_zipf"].detach()) > 0
        assert "auxk" not in plain.training_forward(x, alive).losses  # AuxK alone needs dead latents


# -------------------------------------------------------------- Feature Choice
def test_allocate_is_proportional_bounded_and_exact():
    m = allocate(torch.tensor([4.0, 2.0, 1.0, 1.0]), total=16, cap=100)
    assert m.tolist() == [8, 4, 2, 2]
    m = allocate(torch.arange(1, 101).double().pow(-1.0), total=400, cap=64)
    assert int(m.sum()) == 400 and int(m.min()) >= 1 and int(m.max()) <= 64
    assert bool((m[:-1] >= m[1:]).all())  # capacity falls with rank


def test_fc_each_latent_picks_its_own_top_rows_under_its_capacity():
    torch.manual_seed(0)
    for capacity in ("uniform", "zipf"):
        sae = create_sae("fc", d_in=D, n_latents=N, k=K, capacity=capacity)
        with torch.no_grad():
            sae.b_enc.normal_(0, 0.5)
            sae.demand.copy_(torch.rand(N))
        x = torch.randn(128, D)
        m = sae.capacities(128)
        assert int(m.sum()) == 128 * K and int(m.min()) >= 1
        if capacity == "zipf":
            order = sae.demand.argsort(descending=True)
            assert bool((m[order][:-1] >= m[order][1:]).all()) and int(m.max()) > int(m.min())
        else:
            assert (m == K * 128 // N).all()
        dense = sae.training_forward(x, TrainContext()).code.to_dense().detach()
        pre = torch.relu(sae.pre_activations(x)).detach()
        for j in range(N):  # brute force, latent by latent
            want = min(int(m[j]), int((pre[:, j] > 0).sum()))
            rows = pre[:, j].topk(want).indices
            expected = torch.zeros(128)
            expected[rows] = pre[rows, j]
            assert torch.allclose(dense[:, j], expected, atol=1e-6), j


def test_fc_thresholds_are_each_latents_smallest_choice_and_give_l0_near_k():
    torch.manual_seed(0)
    sae = create_sae("fc", d_in=D, n_latents=N, k=K, capacity="uniform", threshold_rate=0.5)
    x = torch.randn(256, D)
    dense = sae.training_forward(x, TrainContext()).code.to_dense().detach()
    first = torch.where(dense > 0, dense, torch.inf).min(dim=0).values
    assert torch.allclose(sae.threshold, torch.where(torch.isfinite(first), first, 0.0))
    x2 = torch.randn(256, D)
    dense2 = sae.training_forward(x2, TrainContext()).code.to_dense().detach()
    second = torch.where(dense2 > 0, dense2, torch.inf).min(dim=0).values
    assert torch.allclose(sae.threshold, 0.5 * first + 0.5 * second)
    sae.eval()
    assert 0.5 * K < float(sae.encode(torch.randn(2048, D)).l0().float().mean()) < 2 * K


def test_fc_leaves_no_latent_dead_where_topk_does():
    """Zipf-spectrum planted data, 4x more latents than features: every fc latent keeps
    firing (capacity >= 1), while TopK without AuxK leaves latents that never fire."""
    g = torch.Generator().manual_seed(1)
    n_features = 16
    dirs = F.normalize(torch.randn(n_features, D, generator=g), dim=1)
    freq = 0.6 / torch.arange(1, n_features + 1).float()
    x = ((torch.rand(4096, n_features, generator=g) < freq) * (0.5 + torch.rand(4096, n_features, generator=g))) @ dirs
    results = {}
    for arch, kw in (("fc", {}), ("topk", {"aux_coef": 0.0})):
        torch.manual_seed(0)
        sae = create_sae(arch, d_in=D, n_latents=N, k=2, **kw)
        results[arch] = train(sae, TensorSource(x), quick(steps=150)).summary["dead_fraction"]
    assert results["fc"] == 0.0 and results["topk"] > 0.1, results


# ------------------------------------------------------------------------ GBA
def test_gba_group_targets_are_geometric():
    group, target = group_targets(100, 10, 0.5, 1e-4)
    assert group.tolist() == [i // 10 for i in range(100)]
    levels = target[::10]
    assert levels[0] == pytest.approx(0.5) and levels[-1] == pytest.approx(1e-4, rel=1e-5)
    assert torch.allclose(levels[1:] / levels[:-1], torch.full((9,), (1e-4 / 0.5) ** (1 / 9)), rtol=1e-5)


def test_gba_bias_adaptation_rule_on_a_hand_built_window():
    sae = create_sae("gba", d_in=D, n_latents=20, groups=2, high_freq=0.5, low_freq=0.1, gamma_down=0.1, gamma_up=0.2,
                     bias_min=-1.0, dead_freq=1e-3)
    with torch.no_grad():
        sae.b_enc.copy_(torch.full((20,), -0.5))
        sae.b_enc[3] = -0.95
        sae.window_rows.fill_(1000)
        fires = torch.full((20,), 200.0)  # 0.2: fine for group 0 (target 0.5), too often for group 1 (0.1)
        fires[0], fires[3], fires[5] = 900, 600, 0  # too often, too often (hits the bound), silent
        fires[15] = 0  # silent in group 1
        sae.window_fires.copy_(fires)
        peak = torch.linspace(1.0, 3.0, 20)
        peak[5], peak[15] = -0.2, -0.7  # silent neurons peak below 0
        sae.window_peak.copy_(peak)
        sae.window_batches.fill_(sae.config.interval)
    b0, p = sae.b_enc.clone(), peak.clamp_min(0)
    group_mean = [float(p[:10][p[:10] > 0].mean()), float(p[10:][p[10:] > 0].mean())]
    sae.after_optimizer_step()
    expected = b0.clone()
    expected[0] = b0[0] - 0.1 * p[0]
    expected[3] = -1.0  # clamped at bias_min
    expected[5] = min(b0[5] + 0.2 * group_mean[0], 0.0)
    for m in range(10, 20):
        expected[m] = max(b0[m] - 0.1 * p[m], -1.0)
    expected[15] = min(b0[15] + 0.2 * group_mean[1], 0.0)
    assert torch.allclose(sae.b_enc, expected, atol=1e-6)
    assert float(sae.window_rows) == 0 and float(sae.window_batches) == 0 and float(sae.window_fires.sum()) == 0
    assert torch.isinf(sae.window_peak).all()


def test_gba_biases_get_no_gradient_and_adapt_only_every_interval():
    sae = create_sae("gba", d_in=D, n_latents=N, interval=3)
    assert "b_enc" not in dict(sae.named_parameters())
    x = planted(64)
    for step in range(3):
        before = sae.b_enc.clone()
        sae.training_forward(x, TrainContext()).loss.backward()
        sae.after_optimizer_step()
        if step < 2:
            assert torch.equal(sae.b_enc, before) and int(sae.window_batches) == step + 1
    assert not torch.equal(sae.b_enc, torch.zeros(N))  # b = 0 fires on ~half the rows: above every target but 0.5's
    assert int(sae.window_batches) == 0


def test_gba_code_is_scale_times_activation_with_bias_as_threshold():
    sae = create_sae("gba", d_in=D, n_latents=N)
    with torch.no_grad():
        sae.b_enc.uniform_(-1, 0)
        sae.scale.uniform_(0.5, 2)
    x = torch.randn(32, D)
    proj = (x - sae.b_dec) @ sae.W_dec.t()
    expected = torch.where(proj + sae.b_enc > 0, proj * sae.scale, torch.zeros(()))
    assert torch.allclose(sae.encode(x).to_dense(), expected.detach(), atol=1e-5)
    relu = create_sae("gba", d_in=D, n_latents=N, activation="relu")
    relu.load_state_dict(sae.state_dict())
    assert torch.allclose(relu.encode(x).to_dense(), (torch.relu(proj + sae.b_enc) * sae.scale).detach(), atol=1e-5)


# ----------------------------------------------------------------------- vSAE
def test_gaussian_kl_formula():
    mu = torch.tensor([[0.0, 1.0, 2.0]])
    log_var = torch.tensor([[0.0, math.log(2.0), -1.0]])
    by_hand = 0.5 * (0 + 0) + 0.5 * (1 + 2 - 1 - math.log(2)) + 0.5 * (4 + math.exp(-1) - 1 + 1)
    assert float(gaussian_kl(mu, log_var)) == pytest.approx(by_hand)
    assert float(gaussian_kl(mu, torch.zeros_like(mu))) == pytest.approx(0.5 * 5.0)  # sigma = 1: 1/2 ||mu||^2


@pytest.mark.parametrize("learned", [False, True])
def test_vsae_noise_in_training_only_and_kl_term(learned):
    torch.manual_seed(0)
    sae = create_sae("vsae", d_in=D, n_latents=N, k=K, learned_variance=learned, kl_coef=0.5, kl_warmup=0.5)
    x = torch.randn(48, D)
    sae.eval()
    mu = torch.relu(sae.pre_activations(x)).detach()
    a, b = sae.encode(x), sae.encode(x)
    assert torch.equal(a.to_dense(), b.to_dense())  # inference: the TopK of the means
    assert torch.allclose(a.to_dense(), torch.zeros_like(mu).scatter(1, mu.topk(K).indices, mu.topk(K).values))
    sae.train()
    torch.manual_seed(1)
    one = sae.training_forward(x, TrainContext(progress=0.1))
    torch.manual_seed(2)
    two = sae.training_forward(x, TrainContext(progress=0.1))
    assert not torch.equal(one.code.to_dense(), two.code.to_dense())  # reparameterised noise
    assert (one.code.values < 0).any()  # chosen by |z_hat|, sign kept
    log_var = sae.log_variance(x).detach()
    if learned:
        assert torch.allclose(log_var, torch.full_like(log_var, -2.0))
    variance = (x - x.mean(0)).pow(2).sum(1).mean()
    expected = 0.5 * 0.2 * gaussian_kl(mu, log_var).mean() / variance  # warm-up: 0.1 / 0.5 of kl_coef
    assert float(one.losses["kl"].detach()) == pytest.approx(float(expected), rel=1e-5)


# -------------------------------------------------------------------- top-AFA
def test_afa_choice_matches_the_code_norm_to_the_input_norm():
    pre = torch.tensor([[3.0, 0.0, 4.0, 0.1, -1.0, 0.2]])
    norms = torch.ones(6)
    indices, k_star = afa_choice(pre, norms, torch.tensor([5.0]), candidates=5)
    assert int(k_star) == 2 and set(indices[0, :2].tolist()) == {0, 2}  # sqrt(16 + 9) = 5
    _, k_star = afa_choice(pre, norms, torch.tensor([4.1]), candidates=5)
    assert int(k_star) == 1
    halved = torch.tensor([1.0, 1.0, 0.5, 1.0, 1.0, 1.0])  # decoder norms scale the activations: 3, 2, 0.2, 0.1
    _, k_star = afa_choice(pre, halved, torch.tensor([3.6]), candidates=5)
    assert int(k_star) == 2  # sqrt(9 + 4) = 3.606
    _, k_star = afa_choice(pre, halved, torch.tensor([5.0]), candidates=5)
    assert int(k_star) == 4  # the norm never reaches 5: every positive activation (the zero adds nothing)


def test_topafa_k_equals_the_true_support_on_an_orthonormal_dictionary():
    """A perfect orthonormal dictionary (W_enc = W_dec = the features, b_dec 0): k* is
    exactly each row's number of active features and ||f|| = ||x||."""
    n = 12
    sae = create_sae("topafa", d_in=D, n_latents=n)
    q, _ = torch.linalg.qr(torch.randn(D, n))
    with torch.no_grad():
        sae.W_dec.copy_(q.t())
        sae.W_enc.copy_(q.t())
        sae.b_dec.zero_()
    g = torch.Generator().manual_seed(0)
    s = torch.randint(1, n, (200,), generator=g)
    ranks = torch.rand(200, n, generator=g).argsort(1).argsort(1)
    h = (ranks < s[:, None]) * (0.5 + torch.rand(200, n, generator=g))
    x = h @ q.t()
    code = sae.encode(x)
    assert torch.equal((code.values > 1e-4).sum(dim=1), s)  # float noise may add a latent of value ~1e-7
    assert torch.allclose(code.to_dense(), h, atol=1e-5)
    out = sae.training_forward(x, TrainContext())
    assert float(out.losses["afa"].detach()) < 1e-8 and float(out.losses["mse"].detach()) < 1e-8
    assert sae.b_enc is None and "b_enc" not in sae.state_dict()


# ---------------------------------------------------------- resume and the CLI
@pytest.mark.parametrize("arch,kw", [("gba", {"interval": 7}), ("fc", {"k": K, "aux": "zipf"}), ("vsae", {"k": K})])
def test_resume_is_exact_with_the_buffers_the_arch_keeps(arch, kw, tmp_path):
    x = planted(3000)
    def fresh(seed):
        torch.manual_seed(seed)
        return create_sae(arch, d_in=D, n_latents=N, **kw)
    reference = train(fresh(1), TensorSource(x), quick(steps=200, checkpoint_every=50), out_dir=tmp_path / "ref")
    with pytest.raises(Interrupted):
        train(fresh(1), StopsAt(x, 130), quick(steps=200, checkpoint_every=50), out_dir=tmp_path / "run")
    resumed = train(fresh(5), TensorSource(x), quick(steps=200, checkpoint_every=50), out_dir=tmp_path / "run", resume=True)
    a, b = reference.sae.state_dict(), resumed.sae.state_dict()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6, rtol=0), name
    assert resumed.summary["fvu"] == pytest.approx(reference.summary["fvu"], abs=1e-6)


@pytest.mark.parametrize("arch", ["mc", "fc", "gba", "vsae", "topafa"])
def test_every_new_arch_trains_from_the_cli(arch, tmp_path, capsys):
    x = planted(2000)
    save_file({"x": x}, str(tmp_path / "acts.safetensors"))
    args = ["train", "--data", str(tmp_path / "acts.safetensors"), "--arch", arch, "--latents", "32", "--steps", "60",
            "--batch-size", "64", "--out", str(tmp_path / "run"), "--quiet"]
    if arch in ("mc", "fc", "vsae"):
        args += ["--k", "3"]
    assert cli_main(args) == 0
    assert f"saved {arch} SAE" in capsys.readouterr().out
    sae = load_sae(tmp_path / "run")
    assert sae.arch == arch and json.loads((tmp_path / "run" / "training.json").read_text())["summary"]["fvu"] < 1.0
    if arch in ("gba", "topafa"):  # no k to set: one line, exit 2, nothing written
        assert cli_main([*args[:-3], "--k", "3", "--out", str(tmp_path / "other"), "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "'k'" in err
        assert not (tmp_path / "other" / "sae.safetensors").exists()


def test_config_errors_are_one_line():
    with pytest.raises(VlsaeError, match="aux must be one of"):
        create_sae("mc", d_in=D, n_latents=N, k=K, aux="zipff")
    with pytest.raises(VlsaeError, match="capacity must be one of"):
        create_sae("fc", d_in=D, n_latents=N, k=K, capacity="zif")
    with pytest.raises(VlsaeError, match="unit sphere"):
        create_sae("gba", d_in=D, n_latents=N, unit_norm_decoder=False)
    with pytest.raises(VlsaeError, match="low_freq"):
        create_sae("gba", d_in=D, n_latents=N, low_freq=0.9, high_freq=0.5)
    with pytest.raises(VlsaeError, match="max_k"):
        create_sae("topafa", d_in=D, n_latents=N, max_k=N)
    with pytest.raises(VlsaeError, match="did you mean 'kl_coef'"):
        create_sae("vsae", {"d_in": D, "n_latents": N, "kl_coeff": 1.0})
