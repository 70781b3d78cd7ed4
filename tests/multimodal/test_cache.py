"""Activation cache: shard writing, resumable layout, shuffled constant-memory reading."""
from __future__ import annotations

import itertools
import json

import pytest
import torch

from vlsae.errors import VlsaeError

from multimodal.adapters.base import Extracted
from multimodal.cache import ActivationCache, ActivationWriter, decode_keys, encode_keys

WIDTH = {"image": 6, "text": 4}


def paired_batch(start: int, n: int) -> Extracted:
    """Pair i: image row = i + small offsets, text row = -i; rows identify their pair."""
    ids = torch.arange(start, start + n, dtype=torch.float32)
    image = ids[:, None] + torch.linspace(0, 0.5, WIDTH["image"])
    text = -ids[:, None].expand(n, WIDTH["text"]).clone()
    return Extracted(keys=[f"k{i:04d}" for i in range(start, start + n)], acts={"image": image, "text": text},
                     pair_index={"image": torch.arange(n), "text": torch.arange(n)})


def write_paired(path, n=100, batch=7, shard_rows=16, **kw):
    writer = ActivationWriter(path, {"source": "test", "hook": "final", "tokens": "cls", "data": "mem"},
                              ["image", "text"], WIDTH, torch.float32, shard_rows=shard_rows, **kw)
    for lo in range(0, n, batch):
        writer.add(paired_batch(lo, min(batch, n - lo)))
    return writer.close()


@pytest.fixture()
def cache_dir(tmp_path):
    write_paired(tmp_path / "acts")
    return tmp_path / "acts"


def test_keys_round_trip_utf8():
    keys = ["a", "ümlaut/ß", "", "x" * 40]
    assert decode_keys(encode_keys(keys)) == keys


def test_manifest_counts_and_statistics(cache_dir):
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    assert manifest["complete"] and manifest["paired"]
    assert manifest["n_pairs"] == 100 and manifest["rows"] == {"image": 100, "text": 100}
    assert [s["pairs"] for s in manifest["shards"]] == [16] * 6 + [4]
    cache = ActivationCache(cache_dir)
    full = cache.read_all()
    for m in ("image", "text"):
        stats = manifest["stats"][m]
        assert stats["count"] == 100
        torch.testing.assert_close(torch.tensor(stats["mean"]), full[m].mean(0), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.tensor(stats["std"]), full[m].std(0, unbiased=False), atol=1e-4, rtol=1e-4)
        assert stats["mean_norm"] == pytest.approx(float(full[m].norm(dim=1).mean()), rel=1e-5)


def test_shard_boundaries_do_not_depend_on_batch_size(tmp_path):
    write_paired(tmp_path / "a", batch=3)
    write_paired(tmp_path / "b", batch=11)
    a, b = ActivationCache(tmp_path / "a"), ActivationCache(tmp_path / "b")
    assert a.manifest["shards"] == b.manifest["shards"]
    for x, y in zip(a.iter_shards(), b.iter_shards()):
        assert x.keys == y.keys and torch.equal(x["image"], y["image"]) and torch.equal(x["text"], y["text"])


def test_paired_protocol_keeps_rows_aligned(cache_dir):
    cache = ActivationCache(cache_dir, buffer_rows=20)
    assert cache.d_in == {"image": 6, "text": 4} and len(cache) == 100
    for batch in itertools.islice(cache.batches(32, seed=3), 8):
        assert batch["image"].shape == (32, 6) and batch["text"].shape == (32, 4)
        torch.testing.assert_close(batch["image"][:, 0], -batch["text"][:, 0])


def test_every_epoch_is_a_permutation_and_seeded(cache_dir):
    cache = ActivationCache(cache_dir, modality="text", buffer_rows=20)
    assert cache.d_in == 4 and len(cache) == 100
    rows = torch.cat(list(itertools.islice(cache.batches(10, seed=0), 20)))[:, 0]
    first, second = rows[:100], rows[100:]
    assert sorted(first.tolist()) == sorted((-torch.arange(100.0)).tolist())
    assert sorted(second.tolist()) == sorted(first.tolist())
    assert not torch.equal(first, second)  # reshuffled with seed + epoch
    again = torch.cat(list(itertools.islice(cache.batches(10, seed=0), 20)))[:, 0]
    assert torch.equal(rows, again)
    other = torch.cat(list(itertools.islice(cache.batches(10, seed=1), 10)))[:, 0]
    assert not torch.equal(other, first)


@pytest.mark.parametrize("batch_size,start", [(7, 0), (7, 5), (7, 16), (32, 3), (100, 2)])
def test_start_resumes_exactly(cache_dir, batch_size, start):
    cache = ActivationCache(cache_dir, buffer_rows=24)
    stream = list(itertools.islice(cache.batches(batch_size, seed=5), start + 4))
    resumed = list(itertools.islice(cache.batches(batch_size, seed=5, start=start), 4))
    for a, b in zip(stream[start:], resumed):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["text"], b["text"])


@pytest.mark.parametrize("batch_size,world", [(7, 2), (10, 3), (32, 4)])
def test_a_rank_gathers_its_slice_of_every_batch(cache_dir, batch_size, world, monkeypatch):
    """part=(rank, world): the ranks' slices of each batch are the batch cut by tensor_split, across shuffle
    buffers and epochs, and each rank gathers only its own rows."""
    cache = ActivationCache(cache_dir, buffer_rows=24)
    whole = list(itertools.islice(cache.batches(batch_size, seed=2, start=3), 30))
    gathered = []
    original = cache._pack
    monkeypatch.setattr(cache, "_pack", lambda data, index=None: gathered.append(len(index)) or original(data, index))
    parts = [list(itertools.islice(cache.batches(batch_size, seed=2, start=3, part=(r, world)), 30))
             for r in range(world)]
    for i, batch in enumerate(whole):
        for m in ("image", "text"):
            assert torch.equal(torch.cat([p[i][m] for p in parts]), batch[m])
            assert [len(p[i][m]) for p in parts] == [len(t) for t in batch[m].tensor_split(world)]
    assert sum(gathered) == 30 * batch_size  # every row gathered once, by the rank that trains on it


def test_reading_is_streaming(cache_dir, monkeypatch):
    """With a small buffer the first batch loads one shard, not the cache."""
    cache = ActivationCache(cache_dir, buffer_rows=1)
    loads = []
    original = cache._load
    monkeypatch.setattr(cache, "_load", lambda i: loads.append(i) or original(i))
    next(cache.batches(8, seed=0))
    assert len(loads) == 1
    next(cache.batches(8, seed=0, start=11))  # start inside the epoch: only that buffer is read
    assert len(loads) == 2


def test_sample_draws_distinct_rows(cache_dir):
    cache = ActivationCache(cache_dir)
    sample = cache.sample(30, seed=1)
    ids = sample["text"][:, 0]
    assert ids.shape == (30,) and len(set(ids.tolist())) == 30
    torch.testing.assert_close(sample["image"][:, 0], -ids)
    assert torch.equal(cache.sample(30, seed=1)["text"], sample["text"])
    assert cache.sample(1000, seed=0)["image"].shape == (100, 6)


def test_keys_and_ordered_shards(cache_dir):
    cache = ActivationCache(cache_dir)
    assert cache.keys() == [f"k{i:04d}" for i in range(100)]
    shard = next(cache.iter_shards())
    assert shard.keys[:2] == ["k0000", "k0001"] and shard["text"][1, 0] == -1


def test_several_rows_per_pair(tmp_path):
    writer = ActivationWriter(tmp_path / "acts", {"source": "t"}, ["image", "text"], {"image": 2, "text": 2},
                              torch.float32, shard_rows=10)
    for b in range(4):  # pairs have 3 image rows and b % 2 + 1 text rows
        keys = [f"p{b}{j}" for j in range(2)]
        image = torch.arange(6, dtype=torch.float32).repeat_interleave(2).reshape(6, 2) + 100 * b
        text_counts = torch.tensor([b % 2 + 1, 1])
        text_index = torch.repeat_interleave(torch.arange(2), text_counts)
        writer.add(Extracted(keys=keys, acts={"image": image, "text": torch.ones(len(text_index), 2)},
                             pair_index={"image": torch.arange(2).repeat_interleave(3), "text": text_index}))
    manifest = writer.close()
    assert manifest["rows"] == {"image": 24, "text": 10} and not manifest["paired"]
    assert all(s["rows"]["image"] <= 10 + 2 for s in manifest["shards"])
    with pytest.raises(VlsaeError, match="modality='image'"):
        ActivationCache(tmp_path / "acts")
    image = ActivationCache(tmp_path / "acts", modality="image")
    assert len(image) == 24 and next(image.batches(5, seed=0)).shape == (5, 2)
    shards = list(image.iter_shards())
    assert sum(len(s.keys) for s in shards) == 8
    assert all(torch.bincount(s.pair_index["image"]).tolist() == [3] * len(s.keys) for s in shards)


def test_bf16_storage_reads_as_float32(tmp_path):
    writer = ActivationWriter(tmp_path / "acts", {"source": "t"}, ["image"], {"image": 6}, torch.bfloat16, shard_rows=50)
    writer.add(Extracted(keys=["a", "b"], acts={"image": torch.randn(2, 6)}, pair_index={"image": torch.arange(2)}))
    writer.close()
    cache = ActivationCache(tmp_path / "acts")
    assert cache.manifest["dtype"] == "bf16" and cache.d_in == 6
    assert next(cache.batches(2, seed=0)).dtype == torch.float32


def test_bad_caches_are_one_line_errors(tmp_path, cache_dir):
    with pytest.raises(VlsaeError, match="not found"):
        ActivationCache(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VlsaeError, match="no manifest.json"):
        ActivationCache(tmp_path / "empty")
    with pytest.raises(VlsaeError, match="no modality 'audio'"):
        ActivationCache(cache_dir, modality="audio")
    shard = cache_dir / "shard-000002.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    cache = ActivationCache(cache_dir, buffer_rows=1000)
    with pytest.raises(VlsaeError, match="shard-000002.safetensors is corrupt"):
        next(cache.batches(8, seed=0))
    shard.unlink()
    with pytest.raises(VlsaeError, match="shard-000002.safetensors is missing"):
        ActivationCache(cache_dir)
    (cache_dir / "manifest.json").write_text("{not json")
    with pytest.raises(VlsaeError, match="not valid JSON"):
        ActivationCache(cache_dir)


def test_writer_protects_existing_data(tmp_path, cache_dir):
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(VlsaeError, match="not an activation cache"):
        write_paired(other)
    with pytest.raises(VlsaeError, match="already complete"):
        write_paired(cache_dir)
    manifest = write_paired(cache_dir, n=20, overwrite=True)
    assert manifest["n_pairs"] == 20 and len(list(cache_dir.glob("shard-*"))) == 2


def test_unfinished_cache_resumes_and_refuses_other_settings(tmp_path):
    path = tmp_path / "acts"
    writer = ActivationWriter(path, {"source": "test", "hook": "final"}, ["image", "text"], WIDTH, torch.float32,
                              shard_rows=16)
    for lo in range(0, 40, 8):
        writer.add(paired_batch(lo, 8))
    # interrupted: two shards (32 pairs) finished, 8 pending pairs lost
    with pytest.raises(VlsaeError, match="unfinished"):
        ActivationCache(path)
    with pytest.raises(VlsaeError, match="different 'hook'"):
        ActivationWriter(path, {"source": "test", "hook": "visual.blocks.0"}, ["image", "text"], WIDTH, torch.float32,
                         shard_rows=16)
    with pytest.raises(VlsaeError, match="different 'shard_rows'"):
        ActivationWriter(path, {"source": "test", "hook": "final"}, ["image", "text"], WIDTH, torch.float32, shard_rows=8)
    resumed = ActivationWriter(path, {"source": "test", "hook": "final"}, ["image", "text"], WIDTH, torch.float32,
                               shard_rows=16)
    assert resumed.resume_position == 32 and resumed.last_key == "k0031"
    resumed.add(paired_batch(32, 68))
    resumed.close()
    write_paired(tmp_path / "straight", n=100, batch=8, shard_rows=16)
    a, b = ActivationCache(path), ActivationCache(tmp_path / "straight")
    assert a.keys() == b.keys()
    assert torch.equal(a.read_all()["image"], b.read_all()["image"])


def test_the_trainer_consumes_the_cache(tmp_path):
    """Paired cache -> VL-SAE and one-modality cache -> TopK through vlsae.training.train."""
    from vlsae.saes import create_sae
    from vlsae.training import ActivationSource, TrainConfig, train

    g = torch.Generator().manual_seed(0)
    writer = ActivationWriter(tmp_path / "acts", {"source": "t"}, ["image", "text"], {"image": 8, "text": 8},
                              torch.float32, shard_rows=64)
    for lo in range(0, 256, 32):
        writer.add(Extracted(keys=[f"k{i}" for i in range(lo, lo + 32)],
                             acts={"image": torch.randn(32, 8, generator=g), "text": torch.randn(32, 8, generator=g)},
                             pair_index={"image": torch.arange(32), "text": torch.arange(32)}))
    writer.close()
    cache = ActivationCache(tmp_path / "acts", buffer_rows=100)
    assert isinstance(cache, ActivationSource)
    config = TrainConfig(steps=20, batch_size=32, init_rows=128, eval_rows=128, checkpoint_every=0, log_every=10,
                         tensorboard=False, progress=False, device="cpu")
    paired = train(create_sae("vl", d_in=8, n_latents=32, k=4), cache, config)
    assert paired.summary["steps"] == 20 and paired.summary["fvu"] == paired.summary["fvu"]
    single = train(create_sae("topk", d_in=8, n_latents=32, k=4), ActivationCache(tmp_path / "acts", modality="text"),
                   config)
    assert single.summary["steps"] == 20
