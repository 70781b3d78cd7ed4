"""`vlsae train` and `vlsae info`: run configs, one-line errors, run protection, SIGKILL + --resume."""
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

from vlsae.cli import main
from vlsae.training.run import load_run_config

REPO = Path(__file__).resolve().parents[2]


def planted(n=2000, d=16, n_features=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(torch.randn(n_features, d, generator=g), dim=1)
    codes = (torch.rand(n, n_features, generator=g) < 0.06).float() * (0.5 + torch.rand(n, n_features, generator=g))
    return codes @ directions * 5.0 + 2.0


@pytest.fixture
def acts(tmp_path):
    path = tmp_path / "acts.safetensors"
    save_file({"acts": planted()}, path)
    return path


def small(*extra):
    return ["--latents", "32", "--k", "3", "--steps", "60", "--batch-size", "128", "--quiet", *extra]


def one_line_error(capsys, argv):
    assert main(argv) == 2, argv
    err = capsys.readouterr().err.strip()
    assert err.startswith("vlsae ") and "error: " in err and "\n" not in err, err
    return err


def test_train_then_info(tmp_path, acts, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(acts), "--arch", "batchtopk", *small("--out", str(out))]) == 0
    printed = capsys.readouterr().out
    assert f"saved batchtopk SAE to {out}" in printed and "held-out" in printed
    assert {"run.yaml", "training.json", "sae.safetensors", "config.json", "metrics.jsonl"} <= {p.name for p in out.iterdir()}
    assert (out / "tensorboard").is_dir()
    summary = json.loads((out / "training.json").read_text())["summary"]
    assert summary["eval_split"] == "held-out" and summary["eval_rows"] == 100  # the last 5% of 2000 rows
    assert main(["info", str(out)]) == 0
    shown = capsys.readouterr().out
    for word in ("batchtopk", "finished", "16 x 32", "fvu", "dead_fraction", "input_scale"):
        assert word in shown, word
    assert main(["info", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["training"]["summary"]["steps"] == 60


def test_summary_table_is_printed_without_quiet(tmp_path, acts, capsys):
    argv = ["train", "--data", str(acts), *small("--out", str(tmp_path / "run"))]
    argv.remove("--quiet")
    assert main(argv + ["--set", "train.tensorboard=false"]) == 0
    shown = capsys.readouterr().out
    assert "topk SAE" in shown and "never_fired_fraction" in shown and "tokens_per_s" in shown


def test_yaml_flags_and_set_overrides(tmp_path, acts):
    config = tmp_path / "run.yaml"
    config.write_text(f"arch: topk\nsae: {{n_latents: 32, k: 8}}\ndata: {{path: {acts}}}\n"
                      "train: {steps: 30, batch_size: 64, seed: 3}\n")
    run = load_run_config(config, ["sae.k=2", "train.lr=0.001"], base=None)
    assert run.sae == {"n_latents": 32, "k": 2} and run.train.lr == 0.001 and run.train.seed == 3
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--k", "4", "--set", "sae.k=5", "--out", str(out), "--quiet"]) == 0
    assert json.loads((out / "config.json").read_text())["config"]["k"] == 5  # --set beats flags beats the file


@pytest.mark.parametrize("case", ["missing", "pickle", "truncated", "nan", "empty", "arch", "key", "sae_key",
                                  "two_sources", "no_data", "resume_nothing", "bad_yaml"])
def test_bad_input_exits_2_with_one_line(tmp_path, acts, capsys, case, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default --out is runs/ARCH-TIME under the working directory
    data = str(acts)
    if case == "pickle":
        data = str(tmp_path / "w.safetensors")
        torch.save({"x": planted(10)}, data)
    elif case == "truncated":
        data = str(tmp_path / "t.safetensors")
        Path(data).write_bytes(acts.read_bytes()[:300])
    elif case == "nan":
        x = planted().numpy()
        x[:, 2] = np.nan
        data = str(tmp_path / "nan.npy")
        np.save(data, x)
    elif case == "empty":
        data = str(tmp_path / "empty.npy")
        np.save(data, np.zeros((0, 16), dtype=np.float32))
    argv = {
        "missing": ["train", "--data", str(tmp_path / "nope.safetensors"), *small()],
        "arch": ["train", "--data", data, "--arch", "topkk", *small()],
        "key": ["train", "--data", data, *small("--set", "train.stpes=3")],
        "sae_key": ["train", "--data", data, "--arch", "relu", *small()],
        "two_sources": ["train", "--data", data, "--synthetic", "hierarchical", *small()],
        "no_data": ["train", *small()],
        "resume_nothing": ["train", "--out", str(tmp_path / "fresh"), "--resume", "--quiet"],
        "bad_yaml": ["train", "--config", str(tmp_path / "bad.yaml"), "--quiet"],
    }.get(case, ["train", "--data", data, *small()])
    (tmp_path / "bad.yaml").write_text("arch: [unclosed\n")
    expected = {
        "missing": "not found", "pickle": "pickle", "truncated": "corrupt or truncated", "nan": "NaN or inf",
        "empty": "empty", "arch": "unknown SAE architecture 'topkk'; registered: ", "key": "did you mean 'steps'",
        "sae_key": "unknown key 'k' in sae config \\(relu\\)", "two_sources": "exactly one source",
        "no_data": "no training data", "resume_nothing": "no checkpoint to resume", "bad_yaml": "not valid YAML",
    }[case]
    err = one_line_error(capsys, argv)
    import re
    assert re.search(expected, err), err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir()), "a refused run left a folder"


def test_runs_are_protected(tmp_path, acts, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(acts), *small("--out", str(out))]) == 0
    weights = (out / "sae.safetensors").read_bytes()
    err = one_line_error(capsys, ["train", "--data", str(acts), *small("--out", str(out))])
    assert "already holds a finished run" in err and "--out" in err and "--resume" in err
    assert "already finished" in one_line_error(capsys, ["train", "--out", str(out), "--resume", "--quiet"])
    assert (out / "sae.safetensors").read_bytes() == weights


def test_info_errors_are_one_line(tmp_path, acts, capsys):
    assert "run not found" in one_line_error(capsys, ["info", str(tmp_path / "nothing")])
    (tmp_path / "empty").mkdir()
    assert "no config.json" in one_line_error(capsys, ["info", str(tmp_path / "empty")])
    out = tmp_path / "run"
    assert main(["train", "--data", str(acts), *small("--out", str(out))]) == 0
    (out / "training.json").write_text("{not json")
    assert "training.json is damaged" in one_line_error(capsys, ["info", str(out)])
    (out / "training.json").unlink()
    weights = (out / "sae.safetensors").read_bytes()
    (out / "sae.safetensors").write_bytes(weights[:100])
    assert "corrupt or truncated" in one_line_error(capsys, ["info", str(out)])
    (out / "sae.safetensors").unlink()
    assert "incomplete" in one_line_error(capsys, ["info", str(out)])
    (out / "config.json").write_text("[]")
    assert "not a vlsae SAE checkpoint" in one_line_error(capsys, ["info", str(out)])


def test_synthetic_config_runs_on_held_out_rows(tmp_path):
    pytest.importorskip("evals.synthetic")
    from vlsae.training.run import run_training
    run = load_run_config(REPO / "configs" / "synth-topk.yaml",
                          ["train.steps=50", "train.progress=false", "out=null", "data.n_train=2000", "data.n_test=500"])
    result = run_training(run)
    assert result.summary["l0"] <= 2.0 + 1e-6 and result.summary["d_in"] == 20
    assert result.summary["eval_split"] == "held-out" and result.summary["eval_rows"] == 500


# ------------------------------------------------------------- SIGKILL
# The victim sleeps 10 ms per batch (numerics untouched) so it is reliably still
# running when its first checkpoint lands; the reference and the resumed half
# run in this process.
SCRIPT = """
import sys, time, torch
torch.set_num_threads(1)
from vlsae.training import data
plain = data.TensorSource.batches
def slow(self, *args, **kwargs):
    for batch in plain(self, *args, **kwargs):
        time.sleep(0.01)
        yield batch
data.TensorSource.batches = slow
from vlsae.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _argv(data, out):
    return ["train", "--data", str(data), "--arch", "topk", "--latents", "32", "--k", "4", "--steps", "300",
            "--batch-size", "64", "--seed", "7", "--out", str(out), "--quiet",
            "--set", "train.checkpoint_every=25", "--set", "train.log_every=10", "--set", "train.tensorboard=false"]


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, acts, capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(_argv(acts, tmp_path / "reference")) == 0
        victim = tmp_path / "victim"
        proc = subprocess.Popen([sys.executable, "-c", SCRIPT, *_argv(acts, victim)],
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.time() + 120
        while not (victim / "checkpoint" / "state.json").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        time.sleep(0.15)  # some steps past the checkpoint, logged but not saved
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
        assert not (victim / "training.json").exists(), "the run finished before it was killed"
        assert main(["info", str(victim)]) == 0
        assert "interrupted at step" in capsys.readouterr().out
        assert main(["train", "--out", str(victim), "--resume", "--quiet"]) == 0
    finally:
        torch.set_num_threads(threads)
    a = load_file(tmp_path / "reference" / "sae.safetensors")
    b = load_file(victim / "sae.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6, rtol=0), name
    ref_steps = [json.loads(line)["step"] for line in (tmp_path / "reference" / "metrics.jsonl").read_text().splitlines()]
    run_steps = [json.loads(line)["step"] for line in (victim / "metrics.jsonl").read_text().splitlines()]
    assert run_steps == ref_steps  # each step logged once, the killed tail dropped


@pytest.mark.parametrize("config", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(config):
    run = load_run_config(config)
    assert run.out and (run.data.path or run.data.synthetic or run.data.acts)


def test_training_on_an_activation_cache(tmp_path, capsys):
    cache = pytest.importorskip("multimodal.cache")
    from multimodal.adapters.base import Extracted
    x = planted(n=600)
    writer = cache.ActivationWriter(tmp_path / "acts", {"source": "test", "hook": "final", "tokens": "cls", "data": "mem"},
                                    ["image", "text"], {"image": 16, "text": 16}, torch.float32, shard_rows=256)
    for lo in range(0, 600, 100):
        writer.add(Extracted(keys=[f"k{i}" for i in range(lo, lo + 100)],
                             acts={"image": x[lo:lo + 100], "text": 0.5 * x[lo:lo + 100] - 1},
                             pair_index={"image": torch.arange(100), "text": torch.arange(100)}))
    writer.close()
    args = ["--latents", "32", "--k", "3", "--steps", "30", "--batch-size", "64", "--quiet"]
    assert main(["train", "--acts", str(tmp_path / "acts"), "--modality", "image", *args, "--out", str(tmp_path / "a")]) == 0
    assert main(["train", "--acts", str(tmp_path / "acts"), "--arch", "vl", *args, "--out", str(tmp_path / "b")]) == 0
    summary = json.loads((tmp_path / "b" / "training.json").read_text())["summary"]
    assert {"fvu_image", "fvu_text"} <= set(summary) and summary["tokens"] == 30 * 64
    assert "paired" in one_line_error(capsys, ["train", "--acts", str(tmp_path / "acts"), *args])
