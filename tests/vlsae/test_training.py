"""The trainer: schedule, scale folding, metrics, dead tracking, logs, checkpoints and exact resume."""
import json
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vlsae import VlsaeError, create_sae
from vlsae.checkpoint import load_sae
from vlsae.saes.topk import TopKConfig, TopKSAE
from vlsae.training import TensorSource, TrainConfig, geometric_median, train
from vlsae.training.run import load_run_config
from vlsae.training.state import rng_from_flat, rng_to_flat


def planted(n=4000, d=16, n_features=48, seed=0):
    """Sparse non-negative combinations of random unit directions, scaled and offset
    (so input scaling and b_dec matter)."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(torch.randn(n_features, d, generator=g), dim=1)
    codes = (torch.rand(n, n_features, generator=g) < 0.06).float() * (0.5 + torch.rand(n, n_features, generator=g))
    return codes @ directions * 5.0 + 2.0


def quick(**kw):
    base = dict(steps=200, batch_size=128, lr=3e-3, progress=False, log_every=20, tensorboard=False)
    base.update(kw)
    return TrainConfig(**base)


def topk(seed=0, d=16, n=64, k=4):
    torch.manual_seed(seed)
    return create_sae("topk", d_in=d, n_latents=n, k=k)


def fvu(x, recon):
    return float(((x - recon) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


# ---------------------------------------------------------------- schedule
def test_schedule_warms_up_holds_and_decays_to_zero():
    cfg = TrainConfig(steps=100, warmup_steps=10, decay_fraction=0.2)
    f = [cfg.lr_factor(s) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(f[:9], f[1:10]))  # linear warm-up
    assert f[10:80] == [1.0] * 70  # constant
    assert f[80] == pytest.approx(1.0) and f[99] == pytest.approx(0.05)
    assert all(a > b for a, b in zip(f[80:], f[81:]))  # linear decay, reaching 0 after the last step
    short = TrainConfig(steps=10, warmup_steps=8, decay_fraction=0.5)
    assert all(short.lr_factor(s) <= 1.0 for s in range(10)) and short.lr_factor(9) == pytest.approx(0.2)


def test_defaults_follow_the_references():
    cfg = TrainConfig()
    assert cfg.resolved_lr(2 ** 14) == pytest.approx(2e-4)
    assert cfg.resolved_lr(2 ** 16) == pytest.approx(1e-4)
    assert cfg.adam_eps == 6.25e-10 and cfg.grad_clip == 1.0 and cfg.decay_fraction == 0.2
    assert cfg.resolved_warmup() == 100  # steps // 20
    assert TrainConfig(steps=10 ** 6, batch_size=4096).resolved_dead_tokens() == 10_000_000
    assert TrainConfig(steps=100, batch_size=100).resolved_dead_tokens() == 2000  # a fifth of a short run


def test_geometric_median_is_robust_and_minimises_distances():
    g = torch.Generator().manual_seed(0)
    bulk = torch.randn(500, 8, generator=g)
    x = torch.cat([bulk, torch.full((50, 8), 100.0)])
    med = geometric_median(x)
    assert med.norm() < 2.0 < x.mean(0).norm()  # outliers drag the mean, not the median
    cost = lambda c: float((x - c).norm(dim=1).sum())  # noqa: E731
    for shift in (torch.zeros(8), 0.05 * torch.randn(8, generator=g), x.mean(0) - med):
        assert cost(med) <= cost(med + shift) + 1e-3


# ------------------------------------------------------------- training
def test_training_folds_input_scale_and_reconstructs_raw_inputs(tmp_path):
    x = planted()
    result = train(topk(), TensorSource(x), quick(steps=400, tensorboard=True), out_dir=tmp_path / "run")
    s = result.summary
    assert s["fvu"] < 0.3 and s["l0"] == pytest.approx(4.0, abs=0.05)
    assert s["input_scale"] == pytest.approx(16 ** 0.5 / float(x.norm(dim=1).mean()), rel=0.05)
    assert s["steps"] == 400 and s["tokens"] == 400 * 128 and s["eval_split"] == "training sample"
    with torch.no_grad():
        recon = result.sae(x[:500])  # raw inputs in, raw reconstructions out
    assert fvu(x[:500], recon) < 0.3
    loaded = load_sae(tmp_path / "run")
    assert torch.allclose(loaded(x[:10]), recon[:10], atol=1e-5)
    record = json.loads((tmp_path / "run" / "training.json").read_text())
    assert record["input_scale"] == s["input_scale"] and record["train_config"]["steps"] == 400
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(20, 401, 20))
    assert {"loss", "loss_mse", "fvu", "l0", "dead_fraction", "lr"} <= set(lines[0])
    assert lines[-1]["fvu"] < lines[0]["fvu"]
    assert any((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert not (tmp_path / "run" / "checkpoint").exists()


def test_without_scaling_the_sae_trains_on_raw_inputs():
    x = planted(n=1000)
    result = train(topk(), TensorSource(x), quick(steps=100, normalize_input=False))
    assert result.summary["input_scale"] == 1.0


def test_held_out_rows_score_the_run():
    x = planted(n=3000)
    result = train(topk(), TensorSource(x[:2500]), quick(steps=100), eval_source=x[2500:])
    assert result.summary["eval_split"] == "held-out" and result.summary["eval_rows"] == 500
    with pytest.raises(VlsaeError, match="held-out data has width 8"):
        train(topk(), TensorSource(x), quick(steps=10), eval_source=x[:, :8])


def test_multimodal_training_reports_per_modality_figures(tmp_path):
    x = planted()
    result = train(create_sae("vl", d_in=16, n_latents=64, k=4), TensorSource({"image": x, "text": x * 0.3 - 1}),
                   quick(), out_dir=tmp_path / "vl")
    for key in ("fvu_image", "fvu_text", "l0_image", "l0_text", "shrinkage_text"):
        assert key in result.summary
    assert set(result.summary["input_scale"]) == {"image", "text"}
    assert result.summary["tokens"] == 200 * 128  # a pair is one token
    assert "fvu_text" in json.loads((tmp_path / "vl" / "metrics.jsonl").read_text().splitlines()[0])


class Recording(TopKSAE):
    """TopK that records what the trainer tells it and which latents fired."""

    def __init__(self, config):
        super().__init__(config)
        self.masks, self.fired = [], []

    def training_forward(self, x, ctx):
        self.masks.append(ctx.dead_mask.clone())
        out = super().training_forward(x, ctx)
        self.fired.append(out.code.active_mask())
        return out


def test_dead_mask_marks_latents_silent_for_dead_tokens():
    torch.manual_seed(0)
    sae = Recording(TopKConfig(d_in=16, n_latents=32, k=2))
    with torch.no_grad():  # latents 16.. can never win the top-k: they stay silent
        sae.W_enc[16:] = 0
        sae.b_enc[16:] = -1e3
    result = train(sae, TensorSource(planted(n=2000)), quick(steps=20, batch_size=32, dead_tokens=100))
    for step, mask in enumerate(sae.masks):
        assert bool(mask[16:].all()) == (32 * step > 100), step  # dead once more than 100 tokens passed
        if step:
            assert not bool((mask & sae.fired[step - 1]).any())  # what fired last batch is alive
    assert result.summary["dead_fraction"] >= 0.5 and result.summary["never_fired_fraction"] >= 0.5


# ------------------------------------------------------------ bad inputs
class Poisoned:
    """A clean sample for initialisation, then one bad value in the batch of ``bad_step``."""

    def __init__(self, x, bad_step, value=float("nan")):
        self.inner, self.bad_step, self.value = TensorSource(x), bad_step, value
        self.d_in = self.inner.d_in

    def __len__(self):
        return len(self.inner)

    def sample(self, n, seed=0):
        return self.inner.sample(n, seed)

    def batches(self, batch_size, seed, start=0):
        for step, batch in enumerate(self.inner.batches(batch_size, seed, start), start):
            if step == self.bad_step:
                batch = batch.clone()
                batch[3, 5] = self.value
            yield batch


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_bad_batch_names_its_step(tmp_path, value):
    with pytest.raises(VlsaeError, match="the data has NaN or inf values in the batch of step 7") as info:
        train(topk(), Poisoned(planted(n=1000), bad_step=7, value=value), quick(checkpoint_every=5),
              out_dir=tmp_path / "run")
    assert "\n" not in str(info.value)
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 5  # the bad step never reached a checkpoint


def test_bad_inputs_are_clear_errors():
    x = planted(n=1000)
    bad = x.clone()
    bad[:, 3] = float("nan")
    cases = [
        (lambda: train(topk(d=8, n=16, k=2), TensorSource(x), quick()), "width 16 but the SAE expects d_in=8"),
        (lambda: train(topk(), TensorSource(bad), quick()), "NaN or inf values in the rows sampled for initialisation"),
        (lambda: train(topk(), TensorSource(torch.zeros(10, 16)), quick()), "all zero"),
        (lambda: train(topk(), TensorSource({"image": x, "text": x}), quick()), "single-stream"),
        (lambda: train(create_sae("vl", d_in=16, n_latents=16, k=2), TensorSource(x), quick()), "paired data"),
        (lambda: load_run_config(None, ["train.stpes=3"]), "did you mean 'steps'.*valid keys: .*batch_size"),
        (lambda: load_run_config(None, ["arch=topkk"]), "registered: .*topk"),
        (lambda: TrainConfig(b_dec_init="median"), "geometric_median, mean or zeros"),
        (lambda: train(topk(), TensorSource(x), quick(device="cuda:7")) if not torch.cuda.is_available()
         else (_ for _ in ()).throw(VlsaeError("no CUDA device")), "no CUDA device"),
    ]
    for run, message in cases:
        with pytest.raises(VlsaeError, match=message) as info:
            run()
        assert "\n" not in str(info.value)


# --------------------------------------------------- runs and checkpoints
def test_existing_runs_are_never_overwritten(tmp_path):
    x = planted(n=1000)
    out = tmp_path / "run"
    train(topk(), TensorSource(x), quick(steps=20), out_dir=out)
    before = (out / "sae.safetensors").read_bytes()
    with pytest.raises(VlsaeError, match="already holds a finished run; choose another --out"):
        train(topk(), TensorSource(x), quick(steps=20), out_dir=out)
    with pytest.raises(VlsaeError, match="already finished"):
        train(topk(), TensorSource(x), quick(steps=20), out_dir=out, resume=True)
    with pytest.raises(VlsaeError, match="no checkpoint to resume"):
        train(topk(), TensorSource(x), quick(steps=20), out_dir=tmp_path / "new", resume=True)
    assert (out / "sae.safetensors").read_bytes() == before
    (out / "training.json").unlink()  # now a bare SAE checkpoint: still not overwritten
    with pytest.raises(VlsaeError, match="already holds an SAE checkpoint"):
        train(topk(), TensorSource(x), quick(steps=20), out_dir=out)
    (tmp_path / "file").write_text("x")
    with pytest.raises(VlsaeError, match="is a file"):
        train(topk(), TensorSource(x), quick(steps=20), out_dir=tmp_path / "file")


class Interrupted(Exception):
    pass


class StopsAt(Poisoned):
    """Dies (like a killed process) when asked for the batch of ``stop_step``."""

    def batches(self, batch_size, seed, start=0):
        for step, batch in enumerate(self.inner.batches(batch_size, seed, start), start):
            if step == self.bad_step:
                raise Interrupted
            yield batch


def _interrupted_run(x, out, stop_step=130, **kw):
    with pytest.raises(Interrupted):
        train(topk(seed=1), StopsAt(x, stop_step), quick(checkpoint_every=50, **kw), out_dir=out)
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 100


def test_resume_continues_exactly_where_the_checkpoint_left(tmp_path):
    x = planted(n=3000)
    reference = train(topk(seed=1), TensorSource(x), quick(checkpoint_every=50), out_dir=tmp_path / "ref")
    _interrupted_run(x, tmp_path / "run")
    with pytest.raises(VlsaeError, match="interrupted run; pass --resume"):
        train(topk(seed=1), TensorSource(x), quick(checkpoint_every=50), out_dir=tmp_path / "run")
    # a differently initialised SAE: every weight must come from the checkpoint
    resumed = train(topk(seed=99), TensorSource(x), quick(checkpoint_every=50), out_dir=tmp_path / "run", resume=True)
    a, b = load_file(tmp_path / "ref" / "sae.safetensors"), load_file(tmp_path / "run" / "sae.safetensors")
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6, rtol=0), name
    assert resumed.summary["tokens"] == reference.summary["tokens"]
    assert resumed.summary["fvu"] == pytest.approx(reference.summary["fvu"], abs=1e-6)
    ref_log = (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()
    run_log = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in run_log] == [json.loads(line)["step"] for line in ref_log]
    for r, s in zip(ref_log, run_log):
        assert json.loads(r)["loss"] == pytest.approx(json.loads(s)["loss"], abs=1e-6)


def test_resume_refuses_other_settings_and_damaged_checkpoints(tmp_path):
    x = planted(n=3000)
    out = tmp_path / "run"
    _interrupted_run(x, out)
    with pytest.raises(VlsaeError, match="train.steps=200, not 300"):
        train(topk(), TensorSource(x), quick(steps=300, checkpoint_every=50), out_dir=out, resume=True)
    with pytest.raises(VlsaeError, match="sae.k=4, but this run has 8"):
        train(topk(k=8), TensorSource(x), quick(checkpoint_every=50), out_dir=out, resume=True)
    state = out / "checkpoint" / "state.safetensors"
    good = state.read_bytes()
    state.write_bytes(good[: len(good) // 2])
    with pytest.raises(VlsaeError, match="corrupt or truncated"):
        train(topk(), TensorSource(x), quick(checkpoint_every=50), out_dir=out, resume=True)
    torch.save({"x": torch.zeros(2)}, state)
    with pytest.raises(VlsaeError, match="pickle"):
        train(topk(), TensorSource(x), quick(checkpoint_every=50), out_dir=out, resume=True)
    state.write_bytes(good)
    (out / "checkpoint" / "state.json").unlink()
    with pytest.raises(VlsaeError, match="incomplete"):
        train(topk(), TensorSource(x), quick(checkpoint_every=50), out_dir=out, resume=True)


def test_a_kill_between_the_checkpoint_renames_still_resumes(tmp_path):
    x = planted(n=3000)
    _interrupted_run(x, tmp_path / "run")
    (tmp_path / "run" / "checkpoint").rename(tmp_path / "run" / ".checkpoint.old")  # the state replace_dir can leave
    result = train(topk(), TensorSource(x), quick(checkpoint_every=50), out_dir=tmp_path / "run", resume=True)
    assert result.summary["steps"] == 200 and (tmp_path / "run" / "training.json").exists()


def test_checkpoint_files_hold_no_pickle_and_every_rng(tmp_path):
    x = planted(n=3000)
    _interrupted_run(x, tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoint"
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.json", "sae.safetensors", "state.json", "state.safetensors"]
    tensors = load_file(ckpt / "state.safetensors")
    assert {"last_fired", "rng_torch", "rng_numpy", "rng_python"} <= set(tensors)
    assert tensors["rng_torch"].dtype == torch.uint8 and tensors["rng_numpy"].dtype == torch.uint8
    assert any(k.startswith("optimizer.") and k.endswith(".exp_avg_sq") for k in tensors)
    meta = json.loads((ckpt / "state.json").read_text())
    assert meta["batches_consumed"] == 100 and meta["tokens"] == 100 * 128
    w = load_file(ckpt / "sae.safetensors")["W_dec"]  # mid-run weights: unit-norm decoder rows
    assert torch.allclose(w.norm(dim=1), torch.ones(w.shape[0]), atol=1e-5)


def test_rng_state_round_trips():
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    np.random.normal()  # leaves a cached gaussian in numpy's state
    tensors, meta = rng_to_flat(cuda=False)
    meta = json.loads(json.dumps(meta))
    first = (torch.rand(3), np.random.rand(3), random.random(), np.random.normal())
    torch.manual_seed(2)
    np.random.seed(2)
    random.seed(2)
    rng_from_flat(tensors, meta)
    again = (torch.rand(3), np.random.rand(3), random.random(), np.random.normal())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert first[2] == again[2] and first[3] == again[3]


# ------------------------------------------------- bf16 latent selection
@pytest.mark.parametrize("arch", ["topk", "batchtopk", "abstopk", "vl", "vl-shared", "vl-split"])
def test_bf16_selection_trains_as_well_as_fp32_and_leaves_inference_exact(arch):
    """``selection_dtype=bf16`` only changes which latents win near-ties: the learned
    model reconstructs as well, and the returned SAE chooses latents in fp32 again."""
    x = planted()
    data = {"image": x, "text": x + 0.1 * torch.randn_like(x)} if arch.startswith("vl") else x
    results = {}
    for sel in ("fp32", "bf16"):
        torch.manual_seed(0)
        sae = create_sae(arch, d_in=16, n_latents=64, k=4)
        results[sel] = train(sae, TensorSource(data), quick(selection_dtype=sel))
        assert results[sel].sae.selection_dtype is None
    key = "fvu_image" if arch.startswith("vl") else "fvu"
    assert results["bf16"].summary[key] == pytest.approx(results["fp32"].summary[key], abs=0.03)
    assert results["fp32"].summary[key] < 0.5


def test_selection_dtype_is_checked_and_resolved():
    from vlsae.training.trainer import resolve_selection_dtype
    with pytest.raises(VlsaeError, match="selection_dtype must be one of auto, fp32, bf16"):
        TrainConfig(selection_dtype="fp16")
    cpu = torch.device("cpu")
    assert resolve_selection_dtype("fp32", cpu) is None
    assert resolve_selection_dtype("bf16", cpu) is torch.bfloat16
    assert resolve_selection_dtype("bf16", torch.device("cuda")) is None  # autocast covers it there
