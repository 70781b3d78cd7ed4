"""`vlsae ood` split over processes (torchrun): each set's extraction split, rank 0 scoring; one process's report."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vlsae import create_sae
from vlsae.training import TensorSource, TrainConfig, train

from multimodal.cache import ActivationCache
from multimodal.extract import ExtractConfig, extract
from multimodal.ood_data import write_ood_set
from multimodal.shapesworld import ShapesWorldConfig, write_world
from tests.torchrun import torchrun, torchrun_env

SHARD = 50  # every set has two shards: rank r of 2 extracts shard r


def vlsae_ood(world: SimpleNamespace, out: Path, *extra: str, ranks: int = 2) -> subprocess.CompletedProcess:
    """`vlsae ood` on the fixture's sets under torchrun with ``ranks`` processes (``ranks=0``: one plain process)."""
    launch = torchrun(ranks, "-m", "vlsae") if ranks else [sys.executable, "-m", "vlsae"]
    command = [*launch, "ood", "--sae", str(world.sae),
               "--model", "shapes-clip", "--fit", str(world.fit), "--id", str(world.id),
               "--ood", f"noise={world.noise}", "--classes", str(world.classes), "--bootstrap", "50",
               "--batch-size", "25", "--device", "cpu", "--no-figures", "--quiet", "--out", str(out), *extra]
    return subprocess.run(command, env=torchrun_env(), capture_output=True, text=True, timeout=180, check=False)


def assert_ok(run: subprocess.CompletedProcess) -> str:
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> SimpleNamespace:
    """Fit, ID and noise shards (two of 50 pairs each), a tiny VL-SAE trained on shapes-clip's embeddings of the
    fit set, a head's classes file, and the report of one plain process."""
    root = tmp_path_factory.mktemp("split-ood")
    write_world(ShapesWorldConfig(seed=0), root / "fit", n=2 * SHARD, shard_size=SHARD, progress=False)
    write_world(ShapesWorldConfig(seed=1), root / "id", n=2 * SHARD, shard_size=SHARD, progress=False)
    write_ood_set("noise", root / "noise", n=2 * SHARD, shard_size=SHARD)
    extract(ExtractConfig(model="shapes-clip", data=str(root / "fit"), out=str(root / "fit-acts"), hook="final",
                          device="cpu", progress=False))
    rows = ActivationCache(root / "fit-acts").read_all()
    torch.manual_seed(0)
    sae = create_sae("vl", d_in=rows["image"].shape[1], n_latents=16, k=4)
    train(sae, TensorSource(rows), TrainConfig(steps=30, batch_size=32, progress=False, tensorboard=False),
          out_dir=root / "sae")
    classes = root / "shapes.json"
    classes.write_text(json.dumps({"classes": ["circle", "square", "triangle", "star"], "attribute": "shape",
                                   "templates": ["a {}", "a photo of a {}"]}))
    world = SimpleNamespace(root=root, fit=root / "fit", id=root / "id", noise=root / "noise", sae=root / "sae",
                            classes=classes, single=root / "single")
    assert_ok(vlsae_ood(world, world.single, ranks=0))
    return world


def comparable(out: Path) -> dict:
    """results.json without what differs by run (times, the output folder)."""
    record = json.loads((out / "results.json").read_text())
    for key in ("seconds", "cpu_seconds"):
        record.pop(key)
    for score in record["scores"].values():
        score.pop("seconds")
    for entry in record["sets"].values():
        entry["cache"] = str(Path(entry["cache"]).relative_to(out))
    record["config"].pop("out")
    record["config"].pop("overwrite")
    return record


@pytest.fixture(scope="module")
def split(world) -> Path:
    """The report of two processes."""
    out = world.root / "split"
    printed = assert_ok(vlsae_ood(world, out))
    assert printed.count("report: ") == 1 and "noise:" in printed  # process 0 alone prints
    return out


def test_two_ranks_write_the_report_one_process_writes(world, split):
    assert (split / "scores.csv").read_text() == (world.single / "scores.csv").read_text()
    assert comparable(split) == comparable(world.single)
    for name in ("fit", "id", "noise"):  # each set was extracted in two parts, one per rank
        two, one = ActivationCache(split / "acts" / name), ActivationCache(world.single / "acts" / name)
        assert two.manifest["ranks"] == 2 and len(list((split / "acts" / name / "parts").iterdir())) == 2
        assert two.keys() == one.keys()
        assert torch.equal(two.read_all()["image"], one.read_all()["image"])
    assert len(list((split / "acts").glob("head-*.safetensors"))) == 1  # the head, written by rank 0 once


def test_a_rerun_under_torchrun_reuses_the_split_caches(world, split, tmp_path):
    """Caches extracted by two ranks are reused by a two-rank rerun; the report is the same."""
    out = tmp_path / "again"
    shutil.copytree(split, out)
    manifests = {p: p.stat().st_mtime_ns for p in (out / "acts").glob("*/manifest.json")}
    assert len(manifests) == 3
    printed = assert_ok(vlsae_ood(world, out, "--overwrite"))
    assert printed.count("report: ") == 1
    assert {p: p.stat().st_mtime_ns for p in manifests} == manifests
    assert comparable(out) == comparable(world.single)


@pytest.mark.parametrize("extra", [["--bootstrap", "-1"]])
def test_a_user_error_is_one_line_from_process_0(world, tmp_path, extra):
    run = vlsae_ood(world, tmp_path / "bad", *extra)
    assert run.returncode != 0
    errors = [line for line in run.stderr.splitlines() if line.startswith("vlsae ood: error:")]
    assert len(errors) == 1 and "--bootstrap must be 0" in errors[0], run.stderr[-2000:]
