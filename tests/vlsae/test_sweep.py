"""`vlsae train --sweep`: many SAEs on one stream of batches, each the SAE it would be alone; resume; refusals."""
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from vlsae.cli import main
from vlsae.training import sweep as sweep_module
from vlsae.training.sweep import arm_names, parse_sweep_flags, sweep_section
from vlsae.training.trainer import Trainer


def planted(n=3000, d=16, n_features=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(torch.randn(n_features, d, generator=g), dim=1)
    codes = (torch.rand(n, n_features, generator=g) < 0.06).float() * (0.5 + torch.rand(n, n_features, generator=g))
    return codes @ directions * 5.0 + 2.0


@pytest.fixture(scope="module")
def acts(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "acts.safetensors"
    save_file({"acts": planted()}, path)
    return path


def small(acts, *extra):
    return ["train", "--data", str(acts), "--latents", "32", "--k", "3", "--steps", "40", "--batch-size", "128",
            "--checkpoint-every", "10", "--quiet", "--set", "train.tensorboard=false", *extra]


# vsae draws noise from torch's generator every step: a sweep must give each arm its own generator states
ARMS = {"arch=topk,k=2": ["--arch", "topk", "--k", "2"], "arch=topk,k=4": ["--arch", "topk", "--k", "4"],
        "arch=vsae,k=2": ["--arch", "vsae", "--k", "2"], "arch=vsae,k=4": ["--arch", "vsae", "--k", "4"]}


@pytest.fixture(scope="module")
def swept(acts, tmp_path_factory):
    """A 4-arm sweep (arch x k) and the same four SAEs trained by four separate `vlsae train` runs."""
    root = tmp_path_factory.mktemp("sweep")
    assert main(small(acts, "--sweep", "arch=topk,vsae", "--sweep", "sae.k=2,4", "--out", str(root / "s"))) == 0
    for name, flags in ARMS.items():
        assert main(small(acts, *flags, "--out", str(root / "alone" / name))) == 0
    return root


def weights(folder):
    return load_file(folder / "sae.safetensors")


def assert_same_sae(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.allclose(wa[key], wb[key], atol=1e-6, rtol=0), (a, key, float((wa[key] - wb[key]).abs().max()))
    sa = json.loads((a / "training.json").read_text())["summary"]
    sb = json.loads((b / "training.json").read_text())["summary"]
    assert sa["fvu"] == pytest.approx(sb["fvu"], abs=1e-6) and sa["tokens"] == sb["tokens"]


def test_every_arm_is_the_sae_trained_alone(swept):
    for name in ARMS:
        assert_same_sae(swept / "s" / name, swept / "alone" / name)
    logs = {n: (swept / "s" / n / "metrics.jsonl").read_text() for n in ARMS}
    assert len(set(logs.values())) == 4  # the arms really differ


def test_the_sweep_writes_a_table_and_ordinary_run_folders(swept, capsys):
    record = json.loads((swept / "s" / "sweep.json").read_text())
    assert [a["name"] for a in record["arms"]] == list(ARMS)
    assert record["axes"] == {"arch": ["topk", "vsae"], "sae.k": [2, 4]}
    for arm in record["arms"]:
        assert {"fvu", "l0", "dead_fraction", "seconds"} <= set(arm) and 0.9 * arm["values"]["sae.k"] <= arm["l0"] <= arm["values"]["sae.k"]
    table = (swept / "s" / "sweep.md").read_text()
    assert table.startswith("| arm | arch | sae.k | fvu | l0 | dead_fraction | seconds |") and "arch=vsae,k=4" in table
    run_yaml = yaml.safe_load((swept / "s" / "arch=vsae,k=2" / "run.yaml").read_text())
    assert run_yaml["arch"] == "vsae" and run_yaml["sae"]["k"] == 2
    assert main(["info", str(swept / "s" / "arch=vsae,k=2")]) == 0


class Stop(RuntimeError):
    pass


def _interrupt_after(monkeypatch, calls):
    original, seen = Trainer.step, {"n": 0}

    def step(self, raw):
        seen["n"] += 1
        if seen["n"] > calls:
            raise Stop
        return original(self, raw)
    monkeypatch.setattr(Trainer, "step", step)


def test_an_interrupted_sweep_resumes_every_arm_to_the_same_saes(acts, swept, tmp_path, monkeypatch):
    out = tmp_path / "s"
    _interrupt_after(monkeypatch, 4 * 33)  # 4 arms in lock-step: stopped in step 34, last checkpoint at 30
    with pytest.raises(Stop):
        main(small(acts, "--sweep", "arch=topk,vsae", "--sweep", "sae.k=2,4", "--out", str(out)))
    monkeypatch.undo()
    steps = {n: json.loads((out / n / "checkpoint" / "state.json").read_text())["step"] for n in ARMS}
    assert set(steps.values()) == {30}  # every arm checkpointed at the same step
    # one arm lost (as if the crash came before its first checkpoint): it starts over, the others wait for it
    shutil.rmtree(out / "arch=topk,k=4")
    assert main(["train", "--out", str(out), "--resume", "--quiet"]) == 0
    for name in ARMS:
        assert_same_sae(out / name, swept / "s" / name)
    assert main(["train", "--out", str(out), "--resume"]) == 2  # finished: nothing to resume


def test_a_config_section_and_a_single_combination(acts, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"sweep": {"sae": {"k": 3}}, "train": {"tensorboard": False}}))
    out = tmp_path / "one"
    assert main(small(acts, "--config", str(config), "--out", str(out))) == 0
    assert sorted(p.name for p in out.iterdir()) == ["k=3", "sweep.json", "sweep.md", "sweep.yaml"]
    assert json.loads((out / "sweep.json").read_text())["arms"][0]["values"] == {"sae.k": 3}


@pytest.mark.parametrize("flag, words", [
    ("data.path=a.safetensors,b.safetensors", "data.path cannot vary within one sweep"),
    ("train.steps=10,20", "train.steps cannot vary within one sweep: every SAE of a sweep reads the same stream"),
    ("train.seed=0,1", "train.seed cannot vary"),
    ("train.checkpoint_every=5,10", "it is the sweep's setting"),
    ("train.lrr=1e-3,2e-3", "did you mean 'lr'"),
    ("sae.k=", "sae.k has no values"),
    ("sae.k", "must look like KEY=V1,V2"),
])
def test_keys_that_cannot_sweep_are_one_line_errors(acts, tmp_path, capsys, flag, words):
    assert main(small(acts, "--sweep", flag, "--out", str(tmp_path / "s"))) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vlsae train: error: ") and "\n" not in err and words in err, err
    assert not (tmp_path / "s").exists()


def test_sweep_folders_are_protected(acts, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(small(acts, "--sweep", "sae.k=2", "--steps", "4", "--out", str(out))) == 0
    assert main(small(acts, "--sweep", "sae.k=2", "--out", str(out))) == 2
    assert "holds a sweep; pass --resume" in capsys.readouterr().err
    assert main(["train", "--out", str(out), "--resume", "--sweep", "sae.k=3"]) == 2
    assert "drop --sweep" in capsys.readouterr().err


def test_values_and_names():
    axes = parse_sweep_flags(["sae.k=16,32", "train.lr=1e-3,3e-4", "train.betas=[0.9,0.99],[0.9,0.999]", "arch=topk"])
    assert axes == {"sae.k": [16, 32], "train.lr": [1e-3, 3e-4], "train.betas": [[0.9, 0.99], [0.9, 0.999]],
                    "arch": ["topk"]}
    assert sweep_section({"sae": {"k": [1, 2]}, "train.lr": 0.1}) == {"sae.k": [1, 2], "train.lr": [0.1]}
    assert arm_names([{"sae.k": 16, "sae.n_latents": 4096}, {"sae.k": 32, "sae.n_latents": 4096}]) == \
        ["k=16,n_latents=4096", "k=32,n_latents=4096"]
    names = arm_names([{"sae.lr": "a/b", "train.lr": [0.9, 0.99]}, {"sae.lr": "a b", "train.lr": True}])
    assert names == ["sae.lr=a_b,train.lr=0.9-0.99", "sae.lr=a_b,train.lr=true"]
    assert all("/" not in n and not n.startswith(".") for n in names)
    assert arm_names([{"sae.k": 1}, {"sae.k": "1"}]) == ["k=1", "k=1-2"]
    assert sweep_module.SWEEPABLE_TRAIN and "seed" not in sweep_module.SWEEPABLE_TRAIN


def test_a_sweep_runs_data_parallel_under_torchrun(acts, tmp_path):
    """2 CPU ranks (gloo): every arm the same SAE as in one process (TopK: up to float order); rank 0 alone writes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    args = small(acts, "--sweep", "sae.k=2,4")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                           str(port), "-m", "vlsae", *args, "--out", str(tmp_path / "two")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    for name in ("k=2", "k=4"):
        a = json.loads((tmp_path / "one" / name / "training.json").read_text())
        b = json.loads((tmp_path / "two" / name / "training.json").read_text())
        assert b["world_size"] == 2 and b["summary"]["fvu"] == pytest.approx(a["summary"]["fvu"], rel=1e-3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]
