"""Extraction split over processes (torchrun): the cache reads like a single-process one of the same shards."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vlsae.errors import VlsaeError

from multimodal.adapters import create_adapter
from multimodal.cache import ActivationCache
from multimodal.extract import ExtractConfig
from multimodal import extract_distributed as distributed
from multimodal.extract_distributed import PARTS, Exchange, Ranks, _Split, extract_distributed, merge_reads
from multimodal.pairs import ShardRead
from multimodal.shapesworld import ShapesWorldConfig, write_world
from tests.torchrun import torchrun, torchrun_env

MAIN = Path(__file__).with_name("_dist_extract_main.py")
N, SHARD = 200, 50  # four data shards: ranks 0 and 1 of 2 take two each


def launch(data: str, out: Path, *extra: str, ranks: int = 2) -> subprocess.CompletedProcess:
    """The entry script under torchrun with ``ranks`` processes (``ranks=0``: as one plain process)."""
    command = [*(torchrun(ranks) if ranks else [sys.executable]), str(MAIN), "--data", data, "--out", str(out), *extra]
    return subprocess.run(command, env=torchrun_env(), capture_output=True, text=True, timeout=180, check=False)


def assert_ok(run: subprocess.CompletedProcess) -> dict:
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def corrupt_record(shard: Path, record: int) -> str:
    """Replace the png of record ``record`` of ``shard`` with bytes that do not decode; its key."""
    with tarfile.open(shard) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    name = [n for n, _ in members if n.endswith(".png")][record]
    with tarfile.open(shard, "w") as tar:
        for n, data in members:
            data = b"not a png" if n == name else data
            info = tarfile.TarInfo(n)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return name.split(".")[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> SimpleNamespace:
    """Four clean ShapesWorld shards, a one-process cache and a two-process cache of them."""
    folder = tmp_path_factory.mktemp("split")
    pattern = write_world(ShapesWorldConfig(), folder / "world", n=N, shard_size=SHARD, progress=False)["pattern"]
    single = assert_ok(launch(pattern, folder / "single", ranks=0))
    split = assert_ok(launch(pattern, folder / "split"))
    return SimpleNamespace(folder=folder, pattern=pattern, single=folder / "single", split=folder / "split",
                           summaries=(single, split))


def test_two_ranks_write_the_cache_one_process_writes(world):
    one, two = ActivationCache(world.single), ActivationCache(world.split)
    assert len(one.keys()) == N and two.keys() == one.keys()  # same pairs, same order
    rows_one, rows_two = one.read_all(), two.read_all()
    for m in ("image", "text"):
        assert torch.equal(rows_two[m], rows_one[m])
    first = next(ActivationCache(world.split, modality="image").iter_shards())
    assert first.keys == one.keys()[:SHARD]  # part 0 holds data shard 0
    single, split = world.summaries
    assert split["pairs"] == single["pairs"] == N and split["rows"] == single["rows"] and split["skipped"] == 0
    a, b = one.manifest, two.manifest
    for k in ("source", "hook", "tokens", "data", "modalities", "width", "dtype", "n_pairs", "rows", "paired"):
        assert a[k] == b[k], k
    for m in ("image", "text"):
        torch.testing.assert_close(torch.tensor(b["stats"][m]["mean"]), torch.tensor(a["stats"][m]["mean"]),
                                   atol=1e-6, rtol=0)
        assert b["stats"][m]["count"] == a["stats"][m]["count"] == N
    assert b["skipped"]["shards_read"] == 4 and b["skipped"]["pairs"] == 0 and b["ranks"] == 2
    assert not (world.single / PARTS).exists()  # one process: the single-process layout, untouched


def test_one_manifest_written_after_every_part(world):
    manifests = sorted(p.relative_to(world.split) for p in world.split.rglob("manifest.json"))
    assert manifests[0] == Path("manifest.json")  # the cache's; the others are the parts' own
    assert all(p.parts[0] == PARTS and len(p.parts) == 3 for p in manifests[1:]) and len(manifests) == 5
    record = json.loads((world.split / "manifest.json").read_text())
    assert record["complete"]
    files = [world.split / e["file"] for e in record["shards"]]
    on_disk = sorted(world.split.glob(f"{PARTS}/*/shard-*.safetensors"))
    assert sorted(files) == on_disk and len(files) == 4  # every shard of every rank, each listed once
    assert [e["first_pair"] for e in record["shards"]] == [0, 50, 100, 150]
    manifest = world.split / "manifest.json"
    newest = max(f.stat().st_mtime_ns for f in world.split.rglob("*") if f.is_file() and f != manifest)
    assert manifest.stat().st_mtime_ns >= newest


def test_the_read_policy_counts_over_all_ranks(world, tmp_path):
    """One corrupt record in rank 1's shard: 1 of its 100 pairs (1 %), 1 of the 200 (0.5 %) over both ranks."""
    data = tmp_path / "world"
    shutil.copytree(Path(world.pattern).parent, data)
    key = corrupt_record(data / "000001.tar", 7)
    pattern = str(data / "{000000..000003}.tar")
    out = tmp_path / "acts"
    failed = launch(pattern, out, "--max-skipped", "0.004")
    assert failed.returncode != 0 and "lost 1 of 200 pairs (0.5%)" in failed.stderr, failed.stderr[-3000:]
    assert "000001.tar" in failed.stderr
    assert not (out / "manifest.json").exists()  # no manifest until every rank's counts pass the policy
    parts = sorted(out.glob(f"{PARTS}/*/shard-*.safetensors"))
    assert len(parts) == 4
    stamps = [p.stat().st_mtime_ns for p in parts]
    summary = assert_ok(launch(pattern, out, "--max-skipped", "0.007"))  # rank 1 alone (1 %) would fail this
    assert summary["skipped"] == 1 and summary["pairs"] == N - 1 and summary["resumed_from"] == N - 1
    assert [p.stat().st_mtime_ns for p in parts] == stamps  # resumed: the parts were merged, not redone
    cache = ActivationCache(out)
    skipped = cache.manifest["skipped"]
    assert skipped["read"] == N - 1 and skipped["fraction"] == pytest.approx(0.005)
    damaged = str(data / "000001.tar")
    assert list(skipped["by_shard"]) == [damaged] and skipped["by_shard"][damaged]["failed"] == 1
    clean = ActivationCache(world.single).keys()
    assert cache.keys() == [k for k in clean if k != key]


@pytest.fixture(scope="module")
def shapes_clip():
    return create_adapter("shapes-clip", device="cpu")


def config(world, out: Path, **kw) -> ExtractConfig:
    return ExtractConfig(data=world.pattern, out=str(out), batch_size=25, device="cpu", workers=1, progress=False, **kw)


def test_one_process_resumes_a_split_cache(world, shapes_clip, tmp_path):
    out = tmp_path / "acts"
    shutil.copytree(world.split, out)
    (out / "manifest.json").unlink()
    shutil.rmtree(out / PARTS / "000003")  # interrupted: rank 1 had not finished its second shard
    kept = {p: p.stat().st_mtime_ns for p in out.glob(f"{PARTS}/*/shard-*")}
    result = extract_distributed(config(world, out), adapter=shapes_clip, ranks=Ranks())
    assert result.resumed_from == 150 and result.n_pairs == N and result.manifest["ranks"] == 1
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    one, resumed = ActivationCache(world.single), ActivationCache(out)
    assert resumed.keys() == one.keys()
    torch.testing.assert_close(resumed.read_all()["image"], one.read_all()["image"])
    with pytest.raises(VlsaeError, match="already complete"):
        extract_distributed(config(world, out), adapter=shapes_clip, ranks=Ranks())


def test_one_process_without_parts_is_the_plain_extraction(world, shapes_clip, tmp_path):
    result = extract_distributed(config(world, tmp_path / "acts"), adapter=shapes_clip, ranks=Ranks())
    assert result.n_pairs == N and not (tmp_path / "acts" / PARTS).exists() and "ranks" not in result.manifest
    assert sorted(p.name for p in (tmp_path / "acts").iterdir()) == ["manifest.json", "shard-000000.safetensors"]


def test_a_split_run_refuses_a_limit_and_an_unfinished_single_process_cache(world, shapes_clip, tmp_path):
    two = Ranks(rank=1, world=2)
    with pytest.raises(VlsaeError, match="--limit does not split"):
        extract_distributed(config(world, tmp_path / "a", limit=10), adapter=shapes_clip, ranks=two)
    out = tmp_path / "b"
    shutil.copytree(world.single, out)
    record = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**record, "complete": False}))
    with pytest.raises(VlsaeError, match="unfinished single-process extraction"):
        extract_distributed(config(world, out), adapter=shapes_clip, ranks=two)


def test_merged_counts_are_those_of_one_reader():
    urls = ["a.tar", "b.tar", "c.tar"]
    parts = [{"index": 2, "url": "c.tar", "read": vars(ShardRead(pairs=10, finished=True))},
             {"index": 0, "url": "a.tar",
              "read": vars(ShardRead(pairs=4, failed=1, finished=True, error="ReadError: cut"))},
             {"index": 1, "url": "b.tar", "read": vars(ShardRead(pairs=10, finished=True))}]
    stats = merge_reads(urls, parts, max_skipped=0.5)
    assert list(stats.shards) == urls and stats.pairs == 24
    loss = stats.losses()["a.tar"]  # cut: its size comes from the other, complete shards
    assert loss["lost"] == 6 and loss["expected"] == 10 and loss["basis"] == "the largest complete shard"


def test_overwrite_of_a_split_cache_keeps_only_the_new_parts(world, shapes_clip, tmp_path):
    out = tmp_path / "acts"
    shutil.copytree(world.split, out)
    three = str(Path(world.pattern).parent / "{000000..000002}.tar")
    result = extract_distributed(ExtractConfig(**{**vars(config(world, out, overwrite=True)), "data": three}),
                                 adapter=shapes_clip, ranks=Ranks())
    assert result.n_pairs == 150 and result.resumed_from == 0
    assert sorted(p.name for p in (out / PARTS).iterdir()) == ["000000", "000001", "000002"]
    assert ActivationCache(out).keys() == ActivationCache(world.single).keys()[:150]


def test_an_error_on_one_rank_is_raised_on_every_rank(world):
    class Posted:  # what the store returns once rank 1 has failed
        def gather(self, value):
            return [value, {"error": "data shard 3 is unreadable"}]

    split = _Split(config(world, world.folder / "unused"), Ranks(rank=0, world=2))
    with pytest.raises(VlsaeError, match="^process 1 of 2: data shard 3 is unreadable$"):
        split._exchange(Posted(), lambda: [])
    assert Exchange(Ranks()).gather("alone") == ["alone"]


def test_the_extract_verb_runs_split_under_torchrun(world, tmp_path):
    """`torchrun -m vlsae extract` is the same split extraction; process 0 alone prints the summary line."""
    command = [*torchrun(2, "-m", "vlsae"), "extract", "--model", "shapes-clip",
               "--data", world.pattern, "--out", str(tmp_path / "cli"), "--batch-size", "25", "--no-progress"]
    run = subprocess.run(command, env=torchrun_env(), capture_output=True, text=True, timeout=180, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("wrote ") == 1 and f"{N} pairs" in run.stdout
    cache = ActivationCache(tmp_path / "cli")
    assert cache.keys() == ActivationCache(world.single).keys() and cache.manifest["ranks"] == 2


class _Board:
    """An in-process stand-in for the rendezvous store: the posts of ranks running as threads."""

    def __init__(self, world: int):
        self.world, self.posts, self.changed = world, {}, threading.Condition()

    def exchange(self, ranks: Ranks, name: str = "extract") -> _ThreadExchange:
        return _ThreadExchange(self, ranks)


class _ThreadExchange:
    def __init__(self, board: _Board, ranks: Ranks):
        self.board, self.rank, self.phases = board, ranks.rank, 0

    def gather(self, value):
        board = self.board
        self.phases += 1
        with board.changed:
            board.posts[self.phases, self.rank] = value
            board.changed.notify_all()
            assert board.changed.wait_for(lambda: all((self.phases, r) in board.posts for r in range(board.world)),
                                          timeout=120), "a rank never reached the exchange"
        return [board.posts[self.phases, r] for r in range(board.world)]


def test_a_slow_rank_sees_what_the_fast_one_saw(world, shapes_clip, tmp_path, monkeypatch):
    """Rank 1 starts only once rank 0 has either posted or written parts/: it must still make the same exchanges
    (it once saw rank 0's fresh parts/ as "a split cache being overwritten" and made one exchange more)."""
    board = _Board(world=2)
    monkeypatch.setattr(distributed, "Exchange", board.exchange)
    out = tmp_path / "acts"
    results, errors = {}, {}

    def rank(r: int) -> None:
        if r == 1:
            with board.changed:
                board.changed.wait_for(lambda: (out / PARTS).exists() or (1, 0) in board.posts, timeout=120)
        try:
            results[r] = extract_distributed(config(world, out, overwrite=True), adapter=shapes_clip,
                                             ranks=Ranks(rank=r, world=2))
        except Exception as exc:  # noqa: BLE001 - reported below with the rank
            errors[r] = exc
            with board.changed:  # the other rank must not wait for this one
                board.posts.update({(phase, r): {"error": repr(exc)} for phase in range(1, 10)})
                board.changed.notify_all()

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    assert results[0].n_pairs == results[1].n_pairs == N
    assert ActivationCache(out).keys() == ActivationCache(world.single).keys()
