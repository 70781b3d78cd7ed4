"""`vlsae extract` when things go wrong: damaged shards, failed runs, unwritable --out, the help text."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vlsae.cli import build_parser, main

from multimodal.adapters import create_adapter, list_adapters
from multimodal.adapters.base import Extracted
from multimodal.cache import ActivationCache, ActivationWriter
from multimodal.extract import ExtractConfig
from multimodal.pairs import iter_pairs
from multimodal.shapesworld import ShapesWorldConfig, write_world

from .tiny import tiny_clip_config

N, SHARD = 200, 100


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> str:
    """A tiny random CLIP that another process (or this one) rebuilds exactly from its saved weights."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("clip")
    config = tiny_clip_config(folder, "vlsae-test-failures-clip")
    clip = create_adapter(f"open_clip:{config}:random", device="cpu")
    weights = folder / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in clip.model.state_dict().items()}, str(weights))
    return f"open_clip:{config}:{weights}"


def readable_before(shard: Path, size: int) -> int:
    """Records of ``shard`` whose every member lies in its first ``size`` bytes: what a reader can still get."""
    with tarfile.open(shard) as tar:
        ends: dict[str, int] = {}
        for member in tar.getmembers():
            key = member.name.split(".")[0]
            ends[key] = max(ends.get(key, 0), member.offset_data + member.size)
    return sum(end <= size for end in ends.values())


@pytest.fixture(scope="module")
def damaged(tmp_path_factory) -> SimpleNamespace:
    """200 ShapesWorld pairs in two shards, the first truncated mid-file (an interrupted copy)."""
    folder = tmp_path_factory.mktemp("world")
    summary = write_world(ShapesWorldConfig(image_size=32), folder, n=N, shard_size=SHARD, progress=False)
    shard = folder / "000000.tar"
    data = shard.read_bytes()
    size = int(len(data) * 0.37) + 100  # mid-member, off the 512-byte blocks
    lost = SHARD - readable_before(shard, size)
    shard.write_bytes(data[:size])
    return SimpleNamespace(pattern=summary["pattern"], shard=str(shard), lost=lost)


def cli(spec: str, data: str, out: Path, *extra: str) -> int:
    return main(["extract", "--model", spec, "--data", data, "--out", str(out), "--batch-size", "16",
                 "--no-progress", "--device", "cpu", *extra])


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_a_truncated_shard_fails_the_extraction_unless_allowed(spec, damaged, tmp_path, capsys):
    assert 50 < damaged.lost < 70  # the pairs after the cut, not the one or two records that failed
    assert cli(spec, damaged.pattern, tmp_path / "acts") == 2
    err = one_line(capsys)
    assert damaged.shard in err and f"{damaged.lost / N:.1%}" in err and "--max-skipped" in err
    assert not (tmp_path / "acts").exists()  # it failed before its first cache shard: nothing was written
    assert cli(spec, damaged.pattern, tmp_path / "acts", "--max-skipped", "0.5") == 0
    assert f"skipped {damaged.lost} pairs" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "acts" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["n_pairs"] == N - damaged.lost
    skipped = manifest["skipped"]
    assert skipped["pairs"] == damaged.lost and skipped["fraction"] == pytest.approx(damaged.lost / N)
    assert skipped["max_skipped"] == 0.5 and not skipped["lower_bound"]
    assert list(skipped["by_shard"]) == [damaged.shard]
    entry = skipped["by_shard"][damaged.shard]
    assert entry["expected"] == SHARD and entry["basis"] == "world.json" and entry["lost"] == damaged.lost
    assert ActivationCache(tmp_path / "acts").keys() == [r.key for r in iter_pairs(damaged.pattern)]
    capsys.readouterr()
    # a forked reader process sends its counts back: the manifest says the same
    assert cli(spec, damaged.pattern, tmp_path / "process", "--max-skipped", "0.5", "--reader-process") == 0
    assert json.loads((tmp_path / "process" / "manifest.json").read_text())["skipped"] == skipped
    assert cli(spec, damaged.pattern, tmp_path / "process-fails", "--reader-process") == 2
    assert damaged.shard in one_line(capsys)  # the reader process's error arrives as the same one line


def test_a_limit_counts_the_shards_it_read(spec, damaged, tmp_path, capsys):
    assert cli(spec, damaged.pattern, tmp_path / "past-the-cut", "--limit", "120") == 2
    assert damaged.shard in one_line(capsys)
    assert cli(spec, damaged.pattern, tmp_path / "before-the-cut", "--limit", "30") == 0
    manifest = json.loads((tmp_path / "before-the-cut" / "manifest.json").read_text())
    assert manifest["n_pairs"] == 30 and manifest["skipped"]["pairs"] == 0


def test_a_failure_after_finished_shards_says_how_to_resume(spec, damaged, tmp_path, capsys):
    out = tmp_path / "acts"
    assert cli(spec, damaged.pattern, out, "--shard-rows", "20") == 2
    err = one_line(capsys)
    assert damaged.shard in err and "re-run the command to resume" in err and "--overwrite" in err
    partial = json.loads((out / "manifest.json").read_text())
    assert not partial["complete"] and partial["n_pairs"] > 0 and f"{partial['n_pairs']} pairs" in err
    assert cli(spec, damaged.pattern, out, "--shard-rows", "20", "--max-skipped", "0.5") == 0
    assert f"resumed after {partial['n_pairs']}" in capsys.readouterr().out
    cache = ActivationCache(out)
    assert cache.keys() == [r.key for r in iter_pairs(damaged.pattern)]
    assert cache.manifest["skipped"]["pairs"] == damaged.lost


def small_cache(path: Path) -> None:
    writer = ActivationWriter(path, {"source": "old", "data": "old"}, ["image"], {"image": 4}, torch.float32)
    writer.add(Extracted(keys=["a", "b"], acts={"image": torch.ones(2, 4)}, pair_index={"image": torch.arange(2)}))
    writer.close()


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_failure_before_the_first_shard_leaves_out_as_it_was(spec, damaged, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli(spec, damaged.pattern, empty) == 2
    assert list(empty.iterdir()) == []
    nested = tmp_path / "new" / "deeper" / "acts"
    assert cli(spec, damaged.pattern, nested) == 2
    assert not (tmp_path / "new").exists()
    old = tmp_path / "old"
    small_cache(old)
    before = snapshot(old)
    assert cli(spec, damaged.pattern, old, "--overwrite") == 2  # the old cache goes only once a new shard is ready
    assert snapshot(old) == before
    capsys.readouterr()


def test_an_unfinished_manifest_without_shards_does_not_block_out(spec, damaged, tmp_path, capsys):
    """A stub (what a failed run used to leave) holds nothing to resume: another --data may use the folder."""
    out = tmp_path / "acts"
    out.mkdir()
    stub = {"format": "vlsae-activations", "version": 1, "complete": False, "source": "x", "data": "other",
            "modalities": ["image"], "width": {"image": 3}, "dtype": "fp32", "shards": [], "n_pairs": 0}
    (out / "manifest.json").write_text(json.dumps(stub))
    assert cli(spec, damaged.pattern, out) == 2
    assert "different 'data'" not in one_line(capsys)
    assert json.loads((out / "manifest.json").read_text()) == stub  # untouched by the failed run
    assert cli(spec, damaged.pattern, out, "--max-skipped", "0.5") == 0
    assert ActivationCache(out).manifest["data"] == damaged.pattern


def test_an_unwritable_out_fails_before_the_model_or_the_shards(damaged, monkeypatch, capsys):
    import multimodal.extract as extract_module

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded or a shard read before --out was checked")

    monkeypatch.setattr(extract_module, "create_adapter", never)
    monkeypatch.setattr(extract_module, "PairReader", never)
    monkeypatch.setattr(extract_module, "expand_urls", never)
    assert main(["extract", "--model", "shapes-clip", "--data", damaged.pattern, "--out", "/proc/vlsae-x"]) == 2
    err = one_line(capsys)
    assert "--out /proc/vlsae-x is not writable" in err
    assert main(["extract", "--data", damaged.pattern, "--out", "/tmp/vlsae-never", "--max-skipped", "2"]) == 2
    assert "between 0 and 1" in one_line(capsys)


def test_the_help_names_every_adapter_and_every_default():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "verb").choices["extract"]
    actions = {a.option_strings[0]: a for a in sub._actions if a.option_strings and a.dest != "help"}
    assert "--max-skipped" in actions and len(list_adapters()) >= 8
    for name in list_adapters():
        assert name in actions["--model"].help
    for flag, action in actions.items():
        assert "(default: " in action.help, flag
    assert actions["--max-skipped"].default == ExtractConfig().max_skipped == 0.01
    assert "%" not in sub.format_help().replace("1 %", "")  # argparse's own % escapes did not leak
