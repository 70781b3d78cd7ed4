"""`vlsae filter` split over processes (torchrun): the output is that of one process, byte for byte."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vlsae.errors import VlsaeError
from vlsae.files import read_safetensors
from vlsae.saes import create_sae
from vlsae.training import TensorSource, TrainConfig, train

from multimodal.cache import ActivationCache
from multimodal.extract import ExtractConfig, extract
from multimodal.filtering import FilterConfig, filter_dataset, filter_distributed, staging_dir
from multimodal.filtering import distributed
from multimodal.filtering.distributed import merged_timing
from multimodal.filtering.spill import read_shard_scores
from multimodal.ranks import Ranks
from multimodal.shapesworld import ShapesWorldConfig, write_world
from tests.torchrun import torchrun, torchrun_env

N, SHARD = 150, 50  # three shards: rank 0 of 2 scores shards 0 and 2, rank 1 shard 1


def vlsae_filter(*argv: str, ranks: int = 2) -> subprocess.CompletedProcess:
    """`vlsae filter ARGV` under torchrun with ``ranks`` processes (``ranks=0``: one plain process)."""
    launch = torchrun(ranks, "-m", "vlsae") if ranks else [sys.executable, "-m", "vlsae"]
    command = [*launch, "filter", *argv, "--quiet"]
    return subprocess.run(command, env=torchrun_env(), capture_output=True, text=True, timeout=180, check=False)


def saev_args(world: SimpleNamespace, out: Path) -> list[str]:
    return ["--scorer", "saev", "--sae", str(world.sae), "--model", "shapes-clip", "--hook", "final",
            "--tokens", "cls", "--probe-pairs", "60", "--data", str(world.data), "--keep", "0.5",
            "--batch-size", "25", "--device", "cpu", "--out", str(out)]


def assert_ok(run: subprocess.CompletedProcess) -> str:
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> SimpleNamespace:
    """Three noisy ShapesWorld shards, a tiny SAE trained on shapes-clip's final embeddings of them, and
    the SAE-V filter of one plain process."""
    folder = tmp_path_factory.mktemp("split-filter")
    data = folder / "noisy"
    write_world(ShapesWorldConfig(seed=3, noise=0.4), data, n=N, shard_size=SHARD, progress=False)
    extract(ExtractConfig(model="shapes-clip", data=str(data), out=str(folder / "acts"), hook="final", device="cpu",
                          progress=False))
    rows = ActivationCache(folder / "acts").read_all()
    torch.manual_seed(0)
    sae = create_sae("topk", d_in=128, n_latents=32, k=4)
    train(sae, TensorSource(torch.cat([rows["image"], rows["text"]])),
          TrainConfig(steps=30, batch_size=32, progress=False, tensorboard=False), out_dir=folder / "sae")
    world = SimpleNamespace(folder=folder, data=data, sae=folder / "sae", single=folder / "single")
    assert_ok(vlsae_filter(*saev_args(world, world.single), ranks=0))
    return world


def table(out: Path) -> list[dict[str, str]]:
    with open(out / "scores.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def same_output(split: Path, single: Path) -> dict:
    """Assert the two output folders agree (shards and score files byte for byte); the split run's filter.json."""
    tars = sorted(p.name for p in single.glob("*.tar"))
    assert tars == sorted(p.name for p in split.glob("*.tar")) and len(tars) == N // SHARD
    for name in tars:
        assert (split / name).read_bytes() == (single / name).read_bytes(), name
    assert table(split) == table(single)
    for path in sorted((single / "scores").iterdir()):  # the same contents (safetensors' header order varies)
        one, two = read_shard_scores(path), read_shard_scores(split / "scores" / path.name)
        assert (two.url, two.sha256, two.keys, two.read) == (one.url, one.sha256, one.keys, one.read), path.name
        assert two.scores.tobytes() == one.scores.tobytes(), path.name
    one, two = (json.loads((folder / "filter.json").read_text()) for folder in (single, split))
    for key in ("counts", "shards", "threshold", "ties_kept", "score", "lost", "scorer_fit", "settings"):
        assert two[key] == one[key], key
    assert not staging_dir(split).exists()
    return two


def test_two_ranks_filter_like_one_process(world, tmp_path):
    """SAE-V's weights are fitted once on rank 0, each rank scores its shards, rank 0 decides and writes."""
    out = tmp_path / "split"
    printed = assert_ok(vlsae_filter(*saev_args(world, out)))
    assert printed.count("saev: kept 75 of 150 pairs") == 1 and printed.count("report: ") == 1  # process 0 prints
    record = same_output(out, world.single)
    state, reference = (read_safetensors(folder / "scorer_state.safetensors") for folder in (out, world.single))
    assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in state)
    timing = record["timing"]
    assert timing["pairs"] == N and timing["processes"] == 2 and timing["reused_shards"] == 0
    assert record["scorer_fit"]["latents"] == 32
    assert (out / "index.html").is_file()


def test_a_split_run_scores_only_what_is_missing(world, tmp_path):
    """A staging folder holding shards 0 and 2 (a `--shards 0/2` run): the two ranks score shard 1 alone."""
    out = tmp_path / "resumed"
    random = dict(scorer="random", data=str(world.data), keep=0.5, progress=False)
    filter_dataset(FilterConfig(**random, out=str(out), shards="0/2"))
    filter_dataset(FilterConfig(**random, out=str(tmp_path / "single")))
    printed = assert_ok(vlsae_filter("--scorer", "random", "--data", str(world.data), "--keep", "0.5",
                                     "--out", str(out)))
    assert "reused the scores of 2 shards" in printed
    timing = same_output(out, tmp_path / "single")["timing"]
    assert timing["pairs"] == SHARD and timing["reused_shards"] == 2


def test_a_split_run_refuses_shards_by_hand(world, tmp_path):
    config = FilterConfig(scorer="random", data=str(world.data), keep=0.5, out=str(tmp_path / "out"), shards="0/2",
                          progress=False)
    with pytest.raises(VlsaeError, match="drop --shards"):
        filter_distributed(config, ranks=Ranks(rank=1, world=2))
    assert not staging_dir(tmp_path / "out").exists()


def test_merged_timing_is_one_runs():
    timings = [{"pairs": 100, "seconds": 4.0, "forward_seconds": 3.0, "fit": {"latents": 8}},
               {"pairs": 50, "seconds": 2.0, "forward_seconds": 1.5, "fit": {"latents": 8}}]
    merged = merged_timing(timings, reused=1)
    assert merged == {"pairs": 150, "seconds": 4.0, "forward_seconds": 4.5, "pairs_per_second": 37.5,
                      "fit": {"latents": 8}, "processes": 2, "reused_shards": 1}


def test_an_error_on_rank_1_is_raised_on_rank_0_and_the_scores_stay(world, tmp_path, monkeypatch):
    """Rank 0 of 2 with a store in which rank 1 checked fine, then failed while scoring its shard."""
    class Posted:  # what the store returns once rank 1 has posted
        def __init__(self, ranks, name):
            self.stages = iter([{"result": None}, {"error": "shard 1 is unreadable"}])

        def gather(self, value):
            return [value, next(self.stages)]

    monkeypatch.setattr(distributed, "Exchange", Posted)
    out = tmp_path / "out"
    config = FilterConfig(scorer="random", data=str(world.data), keep=0.5, out=str(out), progress=False)
    with pytest.raises(VlsaeError, match="^process 1 of 2: shard 1 is unreadable$"):
        filter_distributed(config, ranks=Ranks(rank=0, world=2))
    assert sorted(p.name for p in (staging_dir(out) / "scores").iterdir()) == ["000000.safetensors",
                                                                               "000002.safetensors"]
    assert not out.exists()  # nothing written: the rerun scores shard 1 and writes
