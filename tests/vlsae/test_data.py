"""Activation sources: deterministic shuffled batches, O(1) resume, paired rows, tensor files."""
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from vlsae import VlsaeError
from vlsae.training import ActivationSource, TensorSource, open_tensor_file


def rows(n=100, d=1):
    return torch.arange(float(n * d)).reshape(n, d)


def take(stream, n):
    return [next(stream) for _ in range(n)]


def test_batches_cover_each_epoch_once_and_reshuffle():
    src = TensorSource(rows(100))
    batches = take(src.batches(8, seed=3), 24)  # 12 full batches per epoch; 4 rows wait for a later epoch
    epoch0 = torch.cat(batches[:12]).flatten().tolist()
    epoch1 = torch.cat(batches[12:]).flatten().tolist()
    assert len(set(epoch0)) == 96 and len(set(epoch1)) == 96
    assert epoch0 != epoch1  # each epoch has its own shuffle
    assert all(b.shape == (8, 1) for b in batches)


def test_batches_are_a_pure_function_of_seed_and_position():
    src = TensorSource(rows(100))
    a = take(src.batches(8, seed=3), 30)
    b = take(src.batches(8, seed=3), 30)
    c = take(src.batches(8, seed=4), 30)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    for start in (0, 1, 11, 12, 17, 29):  # inside an epoch and across epoch boundaries
        assert torch.equal(next(src.batches(8, seed=3, start=start)), a[start])


def test_resume_position_is_found_without_replaying():
    # replaying 10^12 batches would never finish; arithmetic finds the batch at once
    batch = next(TensorSource(rows(100)).batches(8, seed=0, start=10 ** 12))
    assert batch.shape == (8, 1)


def test_paired_batches_keep_rows_aligned():
    x = rows(50, 3)
    src = TensorSource({"image": x, "text": -2 * x[:, :2]})
    assert src.d_in == {"image": 3, "text": 2} and len(src) == 50
    for batch in take(src.batches(7, seed=1), 10):
        assert torch.equal(batch["text"], -2 * batch["image"][:, :2])
    sample = src.sample(20, seed=5)
    assert torch.equal(sample["text"], -2 * sample["image"][:, :2])


def test_sample_draws_distinct_rows_deterministically():
    src = TensorSource(rows(100))
    s = src.sample(30, seed=2)
    assert s.shape == (30, 1) and len(set(s.flatten().tolist())) == 30
    assert torch.equal(s, src.sample(30, seed=2))
    assert src.sample(1000).shape == (100, 1)  # up to n rows


def test_fewer_rows_than_a_batch_gives_the_whole_set():
    batch = next(TensorSource(rows(5)).batches(8, seed=0))
    assert sorted(batch.flatten().tolist()) == [0, 1, 2, 3, 4]


def test_split_holds_out_the_tail():
    train, held = TensorSource(rows(100)).split(0.1)
    assert len(train) == 90 and len(held) == 10
    assert held.data.flatten().tolist() == list(range(90, 100))
    same, none = TensorSource(rows(5)).split(0.1)
    assert none is None and len(same) == 5
    tr, ho = TensorSource({"image": rows(20), "text": rows(20) + 1}).split(0.25)
    assert len(ho) == 5 and torch.equal(ho.data["text"], ho.data["image"] + 1)
    with pytest.raises(VlsaeError, match="held-out fraction"):
        TensorSource(rows(10)).split(1.0)


def test_sources_follow_the_protocol():
    assert isinstance(TensorSource(rows(4)), ActivationSource)


def test_bad_tensors_are_clear_errors():
    with pytest.raises(VlsaeError, match="empty"):
        TensorSource(torch.zeros(0, 4))
    with pytest.raises(VlsaeError, match="2-D"):
        TensorSource(torch.zeros(4))
    with pytest.raises(VlsaeError, match="same number of rows"):
        TensorSource({"image": torch.zeros(4, 2), "text": torch.zeros(5, 2)})
    with pytest.raises(VlsaeError, match="no modalities"):
        TensorSource({})
    assert TensorSource(torch.ones(3, 2, dtype=torch.int64)).data.dtype == torch.float32


def test_tensor_files(tmp_path):
    x = rows(50, 16)
    save_file({"acts": x}, tmp_path / "a.safetensors")
    src = open_tensor_file(tmp_path / "a.safetensors")
    assert src.d_in == 16 and torch.equal(src.data, x)
    save_file({"image": x, "text": x[:, :8].contiguous()}, tmp_path / "p.safetensors")
    assert open_tensor_file(tmp_path / "p.safetensors").d_in == {"image": 16, "text": 8}
    np.save(tmp_path / "a.npy", x.numpy().astype(np.float16))
    loaded = open_tensor_file(tmp_path / "a.npy")
    assert len(loaded) == 50 and loaded.data.dtype == torch.float32


@pytest.mark.parametrize("name, make, message", [
    ("missing.safetensors", None, "not found"),
    ("o.npy", lambda p: np.save(p, np.array([{"a": 1}], dtype=object)), "unpickling"),
    ("s.npy", lambda p: np.save(p, np.array(["a", "b"])), "numeric"),
    ("e.npy", lambda p: np.save(p, np.zeros((0, 4), dtype=np.float32)), "empty"),
    ("w.safetensors", lambda p: torch.save({"x": torch.zeros(2, 2)}, p), "pickle"),
    ("w.pt", lambda p: torch.save({"x": torch.zeros(2, 2)}, p), "unsupported"),
    ("t.safetensors", lambda p: (save_file({"a": torch.zeros(64, 64)}, p), p.write_bytes(p.read_bytes()[:200])),
     "corrupt or truncated"),
    ("u.safetensors", lambda p: save_file({"image": torch.zeros(4, 2), "text": torch.zeros(5, 2)}, p), "same number of rows"),
])
def test_bad_tensor_files_are_one_line_errors(tmp_path, name, make, message):
    path = tmp_path / name
    if make is not None:
        make(path)
    with pytest.raises(VlsaeError, match=message) as info:
        open_tensor_file(path)
    assert "\n" not in str(info.value)


def test_a_folder_points_to_the_cache_flag(tmp_path):
    with pytest.raises(VlsaeError, match="--acts"):
        open_tensor_file(tmp_path)
