"""The lost-pairs rule of the pair reader: truncated shards count what they should have held."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from vlsae.errors import VlsaeError

from multimodal.pairs import DEFAULT_MAX_SKIPPED, PairReader, ReadStats, ShardRead, check_max_skipped, iter_pairs
from multimodal.shapesworld import ShapesWorldConfig, write_world


def world(folder: Path, n: int, shard_size: int) -> list[str]:
    """ShapesWorld shards (small images: quick to write and read); their paths in order."""
    write_world(ShapesWorldConfig(image_size=32), folder, n=n, shard_size=shard_size, progress=False)
    return sorted(str(p) for p in folder.glob("*.tar"))


def cut(shard: str, fraction: float) -> None:
    """Truncate a shard's bytes mid-file, the way an interrupted copy or download leaves it."""
    data = Path(shard).read_bytes()
    Path(shard).write_bytes(data[: int(len(data) * fraction)])


def cut_before_record(shard: str, record: int) -> None:
    """Truncate a shard exactly at the header of a record's first member: tarfile reads that as a clean end."""
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    first = sorted({m.name.split(".")[0] for m in members})[record]
    offset = next(m.offset for m in members if m.name.split(".")[0] == first)
    cut(shard, offset / Path(shard).stat().st_size)


def read(shards, **kw) -> PairReader:
    reader = PairReader(shards, **kw)
    list(reader)
    return reader


def test_a_truncated_shard_loses_what_world_json_says_it_held(tmp_path, capsys):
    shards = world(tmp_path / "w", n=200, shard_size=100)
    cut(shards[1], 0.37)
    reader = read(shards)
    loss = reader.stats.losses()[shards[1]]
    assert loss["expected"] == 100 and loss["basis"] == "world.json" and not loss["lower_bound"]
    assert reader.read == loss["read"] + 100 and loss["lost"] == 100 - loss["read"] > 60
    assert reader.skipped == loss["lost"]  # pairs, not the one or two records that failed
    summary = reader.stats.summary()
    assert summary["pairs"] == loss["lost"] and summary["fraction"] == pytest.approx(loss["lost"] / 200)
    assert list(summary["by_shard"]) == [shards[1]] and loss["error"]  # a read error or a missing tar end
    warning = capsys.readouterr().err
    assert f"skipped {loss['lost']} pairs" in warning and shards[1] in warning
    with pytest.raises(VlsaeError) as caught:
        read(shards, max_skipped=DEFAULT_MAX_SKIPPED)
    message = str(caught.value)
    assert "\n" not in message and shards[1] in message and f"{loss['lost'] / 200:.1%}" in message
    assert "--max-skipped" in message
    read(shards, max_skipped=0.5)  # within the limit: no error


def test_without_a_declared_size_the_other_shards_give_it(tmp_path):
    shards = world(tmp_path / "w", n=250, shard_size=100)
    (tmp_path / "w" / "world.json").unlink()
    cut(shards[0], 0.5)
    loss = read(shards).stats.losses()[shards[0]]
    assert loss["expected"] == 100 and loss["basis"] == "the largest complete shard" and not loss["lower_bound"]
    assert loss["lost"] == 100 - loss["read"]


def test_a_cut_last_shard_without_a_basis_is_a_lower_bound(tmp_path):
    shards = world(tmp_path / "w", n=150, shard_size=100)
    (tmp_path / "w" / "world.json").unlink()
    cut(shards[1], 0.5)  # the last shard may be short: its size is unknown
    reader = read(shards)
    loss = reader.stats.losses()[shards[1]]
    assert loss["expected"] is None and loss["lower_bound"] and loss["lost"] == loss["failed"]
    assert reader.stats.summary()["lower_bound"]
    assert "at least" in reader.stats.warning()


def test_a_cut_at_a_record_boundary_is_still_seen(tmp_path):
    shards = world(tmp_path / "w", n=60, shard_size=30)
    cut_before_record(shards[0], 12)
    reader = read(shards)
    loss = reader.stats.losses()[shards[0]]
    assert loss["read"] == 12 and loss["failed"] == 0 and loss["lost"] == 18
    assert "end-of-archive" in loss["error"]


def test_img2dataset_stats_files_declare_shard_sizes(tmp_path):
    shards = world(tmp_path / "w", n=40, shard_size=20)
    (tmp_path / "w" / "world.json").unlink()
    for shard in shards:
        Path(shard.replace(".tar", "_stats.json")).write_text(json.dumps({"count": 25, "successes": 20}))
    cut(shards[1], 0.4)
    loss = read(shards).stats.losses()[shards[1]]
    assert loss["expected"] == 20 and loss["basis"] == "000001_stats.json"


def test_clean_shards_lose_only_their_corrupt_records(tmp_path, capsys):
    shards = world(tmp_path / "w", n=20, shard_size=10)
    reader = read(shards, max_skipped=0.0)
    assert reader.read == 20 and reader.stats.losses() == {} and reader.stats.warning() is None
    assert capsys.readouterr().err == ""


def test_stats_from_a_reader_process_replace_the_local_ones():
    local, remote = ReadStats(["a.tar"]), ReadStats(["a.tar"])
    remote.shards["a.tar"] = ShardRead(pairs=7, failed=3, finished=True)
    local.absorb(remote)
    assert local.pairs == 7 and local.lost == 3 and local.fraction == pytest.approx(0.3)


@pytest.mark.parametrize("bad", [-0.1, 1.5, "0.1", True])
def test_max_skipped_is_a_fraction(bad):
    with pytest.raises(VlsaeError, match="between 0 and 1"):
        check_max_skipped(bad)
    assert check_max_skipped(0) == 0.0 and check_max_skipped(None) is None


def test_iter_pairs_applies_the_policy(tmp_path):
    shards = world(tmp_path / "w", n=20, shard_size=10)
    cut(shards[0], 0.5)
    assert len(list(iter_pairs(shards))) < 20  # the plain reader warns only
    with pytest.raises(VlsaeError, match="more than --max-skipped 0.1 allows"):
        list(iter_pairs(shards, max_skipped=0.1))
