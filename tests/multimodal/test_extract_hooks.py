"""Several hooks from one extraction pass (`vlsae extract --hook a,b,c`) and one SAE per hook (`vlsae train`)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from vlsae.cli import main
from vlsae.errors import VlsaeError

from multimodal.adapters import create_adapter
from multimodal.cache import ActivationCache
from multimodal.extract import ExtractConfig, extract
from multimodal.extract_hooks import HOOKS_JSON, extract_hooks, hook_caches, split_hooks
from multimodal.shapesworld import ShapesWorldConfig, write_world

HOOKS = ["visual.blocks.0", "visual.blocks.1", "final", "text.blocks.0"]


@pytest.fixture(scope="module")
def clip():
    return create_adapter("shapes-clip", device="cpu")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hooks")
    return write_world(ShapesWorldConfig(), folder / "world", n=120, shard_size=40, progress=False)["pattern"]


def config(world, out, **kw) -> ExtractConfig:
    return ExtractConfig(model="shapes-clip", data=world, out=str(out), batch_size=32, device="cpu", workers=1,
                         progress=False, shard_rows=50, **kw)


def test_which_hooks_a_value_names(clip):
    assert split_hooks(clip, "final") == ["final"]
    assert split_hooks(clip, "visual.blocks.0,text.blocks.0") == ["visual.blocks.0,text.blocks.0"]  # one per modality
    assert split_hooks(clip, "visual.blocks.0,visual.blocks.1,final") == ["visual.blocks.0", "visual.blocks.1", "final"]
    assert split_hooks(clip, ["final", "visual.blocks.1"]) == ["final", "visual.blocks.1"]
    with pytest.raises(VlsaeError, match="names final twice"):
        split_hooks(clip, ["final", "final"])
    with pytest.raises(VlsaeError, match="unknown hook point 'visual.blocks.99'"):
        split_hooks(clip, "visual.blocks.0,visual.blocks.99")


def test_one_pass_writes_the_caches_one_hook_at_a_time_writes(clip, world, tmp_path):
    calls = []
    handle = clip.model.visual.register_forward_pre_hook(lambda _m, args: calls.append(len(args[0])))
    try:
        results = extract_hooks(config(world, tmp_path / "acts"), HOOKS, adapter=clip)
    finally:
        handle.remove()
    # one pass of the image tower per batch of 32 (120 pairs) for all three image hooks (1-row calls: width probes)
    assert [n for n in calls if n > 1] == [32, 32, 32, 24]
    record = json.loads((tmp_path / "acts" / HOOKS_JSON).read_text())
    assert record["complete"] and [h["hook"] for h in record["hooks"]] == HOOKS and record["n_pairs"] == 120
    assert [c.hook for c in hook_caches(tmp_path / "acts")] == HOOKS
    for hook in HOOKS:
        alone = extract(config(world, tmp_path / "alone" / hook, hook=hook), adapter=clip)
        assert results[hook].n_pairs == alone.n_pairs == 120
        for modality in alone.rows:
            got = ActivationCache(results[hook].path, modality=modality)
            want = ActivationCache(alone.path, modality=modality)
            assert got.keys() == want.keys() and torch.equal(got.read_all(), want.read_all())


def test_a_finished_or_different_extraction_is_refused_and_a_failed_one_leaves_nothing(clip, world, tmp_path):
    out = tmp_path / "acts"
    extract_hooks(config(world, out), HOOKS[:2], adapter=clip)
    with pytest.raises(VlsaeError, match="already holds a finished extraction"):
        extract_hooks(config(world, out), HOOKS[:2], adapter=clip)
    replaced = extract_hooks(config(world, out, overwrite=True), HOOKS[1:3], adapter=clip)
    assert sorted(p.name for p in out.iterdir()) == ["final", HOOKS_JSON, "visual.blocks.1"]
    assert replaced["final"].n_pairs == 120
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "000000.tar").write_bytes(b"")
    with pytest.raises(VlsaeError):
        extract_hooks(config(str(empty / "000000.tar"), tmp_path / "never"), HOOKS[:2], adapter=clip)
    assert not (tmp_path / "never").exists()


def test_cli_extracts_several_hooks_and_trains_one_sae_per_hook(world, tmp_path, capsys):
    acts, runs = tmp_path / "acts", tmp_path / "runs"
    assert main(["extract", "--model", "shapes-clip", "--data", world, "--out", str(acts), "--hook",
                 "visual.blocks.0,visual.blocks.1", "--hook", "final", "--no-progress"]) == 0
    assert "wrote 3 caches from one pass" in capsys.readouterr().out
    assert main(["train", "--acts", str(acts), "--set", "data.modality=image", "--latents", "32", "--k", "4",
                 "--steps", "20", "--batch-size", "32", "--quiet", "--out", str(runs)]) == 0
    printed = capsys.readouterr().out
    assert "saved 3 topk SAEs, one per hook" in printed and "| visual.blocks.1 |" in printed
    summary = json.loads((runs / "hooks.json").read_text())
    assert [r["hook"] for r in summary["runs"]] == ["visual.blocks.0", "visual.blocks.1", "final"]
    assert all((runs / r["hook"] / "training.json").is_file() for r in summary["runs"])
    assert main(["train", "--acts", str(acts), "--set", "data.modality=image", "--steps", "20", "--quiet",
                 "--out", str(runs)]) == 2  # the runs exist: refused before any training
    # --resume keeps the finished runs and trains the missing one (an interrupted one continues)
    kept = (runs / "final" / "training.json").stat().st_mtime_ns
    shutil.rmtree(runs / "visual.blocks.1")
    assert main(["train", "--acts", str(acts), "--set", "data.modality=image", "--latents", "32", "--k", "4",
                 "--steps", "20", "--batch-size", "32", "--quiet", "--out", str(runs), "--resume"]) == 0
    assert (runs / "final" / "training.json").stat().st_mtime_ns == kept
    again = json.loads((runs / "hooks.json").read_text())["runs"]
    assert [r["fvu"] for r in again] == [r["fvu"] for r in summary["runs"]]  # the same seed: the same SAE
