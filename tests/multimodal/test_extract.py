"""Extraction: adapter -> cache, pairing by key, resume after interruption."""
from __future__ import annotations

import json

import pytest
import torch

from vlsae.errors import VlsaeError

from multimodal.adapters import create_adapter
from multimodal.cache import ActivationCache
from multimodal.extract import drop_first_pairs, extract_pairs

from .tiny import GRID, synthetic_pairs, tiny_clip_config

PAIRS = synthetic_pairs(45, seed=1)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    config = tiny_clip_config(tmp_path_factory.mktemp("clip"), "vlsae-test-extract-clip")
    return create_adapter(f"open_clip:{config}:random", device="cpu")


class Interrupt(Exception):
    pass


def interrupted(records, after):
    for i, record in enumerate(records):
        if i == after:
            raise Interrupt
        yield record


def assert_same_cache(a, b):
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    assert ma["shards"] == mb["shards"] and ma["rows"] == mb["rows"] and ma["n_pairs"] == mb["n_pairs"]
    assert ma["stats"] == mb["stats"]
    modality = ma["modalities"][0] if len(ma["modalities"]) == 1 or not ma["paired"] else None
    for x, y in zip(ActivationCache(a, modality=modality).iter_shards(), ActivationCache(b, modality=modality).iter_shards()):
        assert x.keys == y.keys
        for m in x.acts:
            assert torch.equal(x[m], y[m]) and torch.equal(x.pair_index[m], y.pair_index[m])


def test_cache_holds_the_adapter_outputs_by_key(clip, tmp_path):
    result = extract_pairs(clip, PAIRS, tmp_path / "acts", batch_size=8, shard_rows=20, progress=False, data="mem")
    assert result.n_pairs == 45 and result.rows == {"image": 45, "text": 45} and result.batches == 6
    cache = ActivationCache(tmp_path / "acts")
    assert cache.d_in == {"image": 24, "text": 24}
    assert cache.keys() == [p["key"] for p in PAIRS]
    direct = clip.extract(PAIRS[20:28])
    stored = cache.read_all()
    torch.testing.assert_close(stored["image"][20:28], direct["image"])
    torch.testing.assert_close(stored["text"][20:28], direct["text"])
    manifest = cache.manifest
    assert manifest["source"] == clip.spec and manifest["hook"] == "final" and manifest["tokens"] == "cls"
    assert manifest["hook_points"] == {"image": "final", "text": "final"} and manifest["data"] == "mem"


def test_patch_tokens_keep_their_pair(clip, tmp_path):
    extract_pairs(clip, PAIRS[:10], tmp_path / "acts", hook="visual.blocks.1,text.blocks.1", tokens="patch",
                  batch_size=4, shard_rows=50, progress=False)
    image = ActivationCache(tmp_path / "acts", modality="image")
    text = ActivationCache(tmp_path / "acts", modality="text")
    assert len(image) == 10 * GRID
    assert len(text) == sum(len(p["caption"].split()) for p in PAIRS[:10])
    direct = clip.extract(PAIRS[3:4], "text.blocks.1", "patch")
    for shard in text.iter_shards():
        if "pair00003" in shard.keys:
            i = shard.keys.index("pair00003")
            torch.testing.assert_close(shard["text"][shard.pair_index["text"] == i], direct["text"])


def test_one_modality_hook(clip, tmp_path):
    result = extract_pairs(clip, PAIRS[:6], tmp_path / "acts", hook="text.final", batch_size=4, progress=False)
    assert result.rows == {"text": 6}
    cache = ActivationCache(tmp_path / "acts")
    assert cache.d_in == 24 and next(cache.batches(3, seed=0)).shape == (3, 24)


@pytest.mark.parametrize("hook,tokens,stop", [("final", "cls", 27), ("final", "cls", 40), ("visual.blocks.0", "all", 23)])
def test_interrupted_extraction_resumes_to_the_same_cache(clip, tmp_path, hook, tokens, stop):
    kwargs = dict(hook=hook, tokens=tokens, batch_size=8, shard_rows=10 if tokens == "cls" else 10 * (GRID + 1),
                  progress=False, data="mem")
    extract_pairs(clip, PAIRS, tmp_path / "straight", **kwargs)
    with pytest.raises(Interrupt):
        extract_pairs(clip, interrupted(PAIRS, stop), tmp_path / "resumed", **kwargs)
    partial = json.loads((tmp_path / "resumed" / "manifest.json").read_text())
    # batches finished before the interruption were written; of those, only whole shards (10 pairs) survive
    assert not partial["complete"] and partial["n_pairs"] == (stop // 8 * 8) // 10 * 10
    result = extract_pairs(clip, PAIRS, tmp_path / "resumed", **kwargs)
    assert result.resumed_from == partial["n_pairs"] > 0
    assert_same_cache(tmp_path / "straight", tmp_path / "resumed")


def test_reader_process_and_threads_write_the_same_cache(clip, tmp_path):
    kwargs = dict(batch_size=8, shard_rows=10, progress=False, data="mem")
    extract_pairs(clip, PAIRS, tmp_path / "process", reader_process=True, **kwargs)
    extract_pairs(clip, PAIRS, tmp_path / "threads", reader_process=False, **kwargs)
    assert_same_cache(tmp_path / "process", tmp_path / "threads")
    with pytest.raises(Interrupt):  # an error while reading reaches the caller from either reader
        extract_pairs(clip, interrupted(PAIRS, 25), tmp_path / "p2", reader_process=True, **kwargs)
    with pytest.raises(VlsaeError, match="data changed"):  # one-line errors keep their type across the process
        extract_pairs(clip, synthetic_pairs(45, seed=1, start=1000), tmp_path / "p2", reader_process=True, **kwargs)


def test_resume_checks_the_data(clip, tmp_path):
    with pytest.raises(Interrupt):
        extract_pairs(clip, interrupted(PAIRS, 25), tmp_path / "acts", batch_size=8, shard_rows=10, progress=False, data="mem")
    other = synthetic_pairs(45, seed=1, start=1000)
    with pytest.raises(VlsaeError, match="data changed"):
        extract_pairs(clip, other, tmp_path / "acts", batch_size=8, shard_rows=10, progress=False, data="mem")
    with pytest.raises(VlsaeError, match="different 'data'"):
        extract_pairs(clip, PAIRS, tmp_path / "acts", batch_size=8, shard_rows=10, progress=False, data="other")
    with pytest.raises(VlsaeError, match="has 5 pairs"):
        extract_pairs(clip, PAIRS[:5], tmp_path / "acts", batch_size=8, shard_rows=10, progress=False, data="mem")


def test_limit_and_bad_inputs(clip, tmp_path):
    result = extract_pairs(clip, PAIRS, tmp_path / "acts", batch_size=8, limit=13, progress=False)
    assert result.n_pairs == 13
    with pytest.raises(VlsaeError, match="no pairs"):
        extract_pairs(clip, [], tmp_path / "empty", progress=False)
    with pytest.raises(VlsaeError, match="valid hook points"):
        extract_pairs(clip, PAIRS, tmp_path / "bad", hook="visual.blocks.9", progress=False)
    no_caption = [{"key": "x", "image": PAIRS[0]["image"], "caption": None}]
    with pytest.raises(VlsaeError, match="no caption"):
        extract_pairs(clip, no_caption, tmp_path / "bad2", progress=False)


def test_drop_first_pairs_reindexes(clip):
    batch = clip.extract(PAIRS[:4], "text.blocks.0", "all")
    dropped = drop_first_pairs(batch, 3)
    assert dropped.keys == [PAIRS[3]["key"]]
    assert dropped.pair_index["text"].unique().tolist() == [0]
    torch.testing.assert_close(dropped["text"], batch["text"][batch.pair_index["text"] == 3])


# -- the CLI on ShapesWorld shards ------------------------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from multimodal.shapesworld import ShapesWorldConfig, write_world

    out = tmp_path_factory.mktemp("world")
    summary = write_world(ShapesWorldConfig(image_size=32), out, n=24, shard_size=10, progress=False)
    return summary["pattern"]


def saved_spec(clip, folder):
    """A spec that rebuilds exactly ``clip`` in another process (its weights saved as safetensors)."""
    from safetensors.torch import save_file

    weights = folder / "tiny-clip.safetensors"
    save_file({k: v.contiguous() for k, v in clip.model.state_dict().items()}, str(weights))
    return f"open_clip:{clip.spec.split(':')[1]}:{weights}"


def test_cli_extract_on_world_shards(clip, world, tmp_path, capsys):
    from multimodal.pairs import iter_pairs
    from vlsae.cli import main

    spec = saved_spec(clip, tmp_path)
    args = ["extract", "--model", spec, "--data", world, "--out", str(tmp_path / "acts"), "--batch-size", "8",
            "--shard-rows", "10", "--no-progress", "--device", "cpu"]
    assert main(args) == 0
    assert "24 pairs" in capsys.readouterr().out
    cache = ActivationCache(tmp_path / "acts")
    records = list(iter_pairs(world))
    assert cache.keys() == [r.key for r in records]
    torch.testing.assert_close(cache.read_all()["text"][:8], clip.extract(records[:8])["text"])
    assert main(args) == 2
    assert "already complete" in capsys.readouterr().err
    assert main([*args[:6], str(tmp_path / "process"), *args[7:], "--reader-process"]) == 0
    assert ActivationCache(tmp_path / "process").keys() == cache.keys()
    assert main(["extract", "--model", clip.spec, "--data", world, "--out", str(tmp_path / "b"), "--hook", "text.blocks.5"]) == 2
    assert "valid hook points" in capsys.readouterr().err
    assert main(["extract", "--model", clip.spec, "--out", str(tmp_path / "c")]) == 2
    assert "no --data" in capsys.readouterr().err
    assert main(["extract", "--model", clip.spec, "--list-hooks"]) == 0
    assert "visual.blocks.1" in capsys.readouterr().out


@pytest.mark.slow
def test_killed_cli_extraction_resumes_to_the_same_cache(clip, tmp_path):
    """SIGKILL a real `vlsae extract` process mid-way, rerun it, compare with an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from multimodal.shapesworld import ShapesWorldConfig, write_world

    pattern = write_world(ShapesWorldConfig(image_size=32), tmp_path / "world", n=1500, shard_size=500, progress=False)["pattern"]

    spec = saved_spec(clip, tmp_path)

    def command(out):
        return [sys.executable, "-m", "vlsae", "extract", "--model", spec, "--data", pattern, "--out", str(out),
                "--batch-size", "1", "--shard-rows", "100", "--workers", "1", "--no-progress", "--device", "cpu"]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command(tmp_path / "killed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = tmp_path / "killed" / "manifest.json"
    deadline = time.time() + 120
    while time.time() < deadline:
        if manifest.is_file() and len(json.loads(manifest.read_text())["shards"]) >= 2:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    partial = json.loads(manifest.read_text())
    assert not partial["complete"] and 0 < partial["n_pairs"] < 1500
    subprocess.run(command(tmp_path / "killed"), env=env, check=True, capture_output=True)
    subprocess.run(command(tmp_path / "straight"), env=env, check=True, capture_output=True)
    assert_same_cache(tmp_path / "straight", tmp_path / "killed")
