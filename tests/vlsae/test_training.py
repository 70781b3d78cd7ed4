"""Trainer, data sources, run configs and the train/info CLI."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from vlsae import VlsaeError, create_sae
from vlsae.checkpoint import load_sae
from vlsae.cli import main
from vlsae.training import TensorSource, TrainConfig, open_tensor_file, train
from vlsae.training.run import load_run_config, run_training

REPO = Path(__file__).resolve().parents[2]


def planted(n=4000, d=16, n_features=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(torch.randn(n_features, d, generator=g), dim=1)
    codes = (torch.rand(n, n_features, generator=g) < 0.06).float() * (0.5 + torch.rand(n, n_features, generator=g))
    return codes @ directions * 5.0 + 2.0


def quick(**kw):
    base = dict(steps=200, batch_size=128, lr=3e-3, progress=False, log_every=20, tensorboard=False)
    base.update(kw)
    return TrainConfig(**base)


def test_schedule_warms_up_and_decays_to_zero():
    cfg = TrainConfig(steps=100, warmup_steps=10, decay_fraction=0.2)
    factors = [cfg.lr_factor(s) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[50] == 1.0 and factors[80] == pytest.approx(1.0) and factors[99] == pytest.approx(0.05)
    assert all(a >= b for a, b in zip(factors[80:], factors[81:]))


def test_tensor_source_is_deterministic_and_resumes_in_place():
    x = torch.arange(100.0).unsqueeze(1)
    src = TensorSource(x)
    stream = src.batches(8, seed=3)
    first = [next(stream) for _ in range(30)]  # crosses epoch boundaries (12 batches per epoch)
    resumed = src.batches(8, seed=3, start=17)
    assert torch.equal(next(resumed), first[17])
    epoch0 = torch.cat(first[:12]).squeeze(1)
    assert len(set(epoch0.tolist())) == 96  # no repeats within an epoch
    paired = TensorSource({"image": x, "text": -x})
    b = next(paired.batches(5, seed=0))
    assert torch.equal(b["image"], -b["text"])


def test_training_folds_input_scale_and_reconstructs_raw_inputs(tmp_path):
    x = planted()
    sae = create_sae("topk", d_in=16, n_latents=64, k=4)
    result = train(sae, TensorSource(x), quick(steps=400), out_dir=tmp_path / "run")
    assert result.summary["fvu"] < 0.3
    assert result.summary["input_scale"] != pytest.approx(1.0)
    with torch.no_grad():
        recon = result.sae(x[:500])
    assert float(((x[:500] - recon) ** 2).sum() / ((x[:500] - x[:500].mean(0)) ** 2).sum()) < 0.3
    loaded = load_sae(tmp_path / "run")
    assert torch.allclose(loaded(x[:10]), recon[:10], atol=1e-5)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(20, 401, 20))
    assert not (tmp_path / "run" / "checkpoint").exists()


def test_multimodal_training_reports_per_modality_figures():
    x = planted()
    sae = create_sae("vl", d_in=16, n_latents=64, k=4)
    result = train(sae, TensorSource({"image": x, "text": x * 0.3 - 1}), quick())
    for key in ("fvu_image", "fvu_text", "l0_image", "l0_text", "shrinkage_text"):
        assert key in result.summary
    assert set(result.summary["input_scale"]) == {"image", "text"}


def test_bad_inputs_are_clear_errors(tmp_path):
    x = planted()
    with pytest.raises(VlsaeError, match="width 16 but the SAE expects d_in=8"):
        train(create_sae("topk", d_in=8, n_latents=16, k=2), TensorSource(x), quick())
    bad = x.clone()
    bad[1000:1100, 3] = float("nan")
    with pytest.raises(VlsaeError, match="NaN or inf"):
        train(create_sae("topk", d_in=16, n_latents=16, k=2), TensorSource(bad), quick(init_rows=64))
    with pytest.raises(VlsaeError, match="empty"):
        TensorSource(torch.zeros(0, 4))
    with pytest.raises(VlsaeError, match="single-stream"):
        train(create_sae("topk", d_in=16, n_latents=16, k=2), TensorSource({"image": x, "text": x}), quick())
    with pytest.raises(VlsaeError, match="valid keys"):
        load_run_config(None, ["train.stpes=3"])
    with pytest.raises(VlsaeError, match="registered"):
        load_run_config(None, ["arch=topkk"])


def test_existing_runs_are_never_overwritten(tmp_path):
    x = planted(n=1000)
    out = tmp_path / "run"
    train(create_sae("topk", d_in=16, n_latents=16, k=2), TensorSource(x), quick(steps=20), out_dir=out)
    before = (out / "sae.safetensors").read_bytes()
    with pytest.raises(VlsaeError, match="already holds a finished run"):
        train(create_sae("topk", d_in=16, n_latents=16, k=2), TensorSource(x), quick(steps=20), out_dir=out)
    with pytest.raises(VlsaeError, match="already finished"):
        train(create_sae("topk", d_in=16, n_latents=16, k=2), TensorSource(x), quick(steps=20), out_dir=out, resume=True)
    with pytest.raises(VlsaeError, match="no checkpoint to resume"):
        train(create_sae("topk", d_in=16, n_latents=16, k=2), TensorSource(x), quick(steps=20), out_dir=tmp_path / "new", resume=True)
    assert (out / "sae.safetensors").read_bytes() == before


def test_tensor_files(tmp_path):
    x = planted(n=50)
    save_file({"acts": x}, tmp_path / "a.safetensors")
    assert open_tensor_file(tmp_path / "a.safetensors").d_in == 16
    save_file({"image": x, "text": x[:, :8].contiguous()}, tmp_path / "p.safetensors")
    assert open_tensor_file(tmp_path / "p.safetensors").d_in == {"image": 16, "text": 8}
    np.save(tmp_path / "a.npy", x.numpy())
    assert len(open_tensor_file(tmp_path / "a.npy")) == 50
    np.save(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object))
    with pytest.raises(VlsaeError, match="unpickling"):
        open_tensor_file(tmp_path / "o.npy")
    torch.save({"x": x}, tmp_path / "w.safetensors")
    with pytest.raises(VlsaeError, match="pickle"):
        open_tensor_file(tmp_path / "w.safetensors")
    (tmp_path / "t.safetensors").write_bytes((tmp_path / "a.safetensors").read_bytes()[:100])
    with pytest.raises(VlsaeError, match="corrupt or truncated"):
        open_tensor_file(tmp_path / "t.safetensors")


def test_cli_errors_exit_2_with_one_line(tmp_path, capsys):
    x = planted(n=200)
    save_file({"acts": x}, tmp_path / "a.safetensors")
    cases = [
        ["train", "--data", str(tmp_path / "missing.safetensors"), "--latents", "8", "--k", "2", "--quiet"],
        ["train", "--data", str(tmp_path / "a.safetensors"), "--arch", "nope", "--quiet"],
        ["train", "--data", str(tmp_path / "a.safetensors"), "--set", "sae.kk=2", "--quiet"],
        ["info", str(tmp_path / "nothing")],
    ]
    for argv in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("vlsae ") and "\n" not in err, err


def test_cli_train_then_info(tmp_path, capsys):
    x = planted(n=2000)
    save_file({"acts": x}, tmp_path / "a.safetensors")
    out = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "a.safetensors"), "--arch", "batchtopk", "--latents", "32", "--k", "3",
                 "--steps", "60", "--batch-size", "128", "--out", str(out), "--quiet"]) == 0
    assert (out / "run.yaml").exists() and (out / "training.json").exists()
    assert main(["info", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "batchtopk" in shown and "fvu" in shown
    assert (out / "tensorboard").is_dir()


def test_synthetic_config_runs():
    run = load_run_config(REPO / "configs" / "synth-topk.yaml", ["train.steps=50", "train.progress=false", "out=null",
                                                                 "data.n_train=2000"])
    from vlsae.cli.sources import resolve_data
    result = run_training(run, resolve_data=resolve_data)
    assert result.summary["l0"] <= 2.0 + 1e-6


SCRIPT = """
import sys, torch
from vlsae.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _train_argv(data, out):
    return [sys.executable, "-c", SCRIPT, "train", "--data", str(data), "--arch", "topk", "--latents", "64", "--k", "4",
            "--steps", "1500", "--batch-size", "64", "--seed", "7", "--out", str(out), "--quiet",
            "--set", "train.checkpoint_every=50", "--set", "train.tensorboard=false"]


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    x = planted(n=3000)
    save_file({"acts": x}, tmp_path / "a.safetensors")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    reference = tmp_path / "reference"
    subprocess.run(_train_argv(tmp_path / "a.safetensors", reference), check=True, env=env)
    victim = tmp_path / "victim"
    proc = subprocess.Popen(_train_argv(tmp_path / "a.safetensors", victim), env=env)
    deadline = time.time() + 120
    while not (victim / "checkpoint" / "state.json").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (victim / "training.json").exists(), "the run finished before it could be killed; make it longer"
    assert main(["train", "--out", str(victim), "--resume", "--quiet"]) == 0
    a = load_file(reference / "sae.safetensors")
    b = load_file(victim / "sae.safetensors")
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name
