"""ITDA Jaccard, linear CKA and layer matching (evals/similarity, vlsae similarity)."""
import json

import pytest
import torch
import torch.nn.functional as F

from evals.similarity import ITDASettings, build_itda, compare, jaccard, layer_matching, linear_cka
from multimodal.adapters.base import Extracted
from multimodal.cache import ActivationWriter
from vlsae.cli import main
from vlsae.errors import VlsaeError
from vlsae.saes import create_sae
from vlsae.training import TensorSource, TrainConfig, train


def write_cache(path, rows: torch.Tensor, keys=None, modality="image"):
    writer = ActivationWriter(path, {"source": "test", "hook": "final", "tokens": "cls", "data": "mem"}, [modality],
                              {modality: rows.shape[1]}, torch.float32, shard_rows=256)
    keys = keys or [f"k{i:05d}" for i in range(rows.shape[0])]
    for lo in range(0, rows.shape[0], 100):
        part = rows[lo:lo + 100]
        writer.add(Extracted(keys=keys[lo:lo + 100], acts={modality: part}, pair_index={modality: torch.arange(len(part))}))
    writer.close()
    return path


def sparse_rows(n, d, seed, n_features=40, active=3):
    g = torch.Generator().manual_seed(seed)
    dirs = F.normalize(torch.randn(n_features, d, generator=g), dim=1)
    which = torch.rand(n, n_features, generator=g).argsort(dim=1)[:, :active]
    codes = torch.zeros(n, n_features).scatter_(1, which, 0.5 + torch.rand(n, active, generator=g))
    return codes @ dirs


def test_jaccard_and_cka_values():
    assert jaccard(torch.tensor([1, 2, 3]), torch.tensor([2, 3, 4, 5])) == 2 / 5
    assert jaccard(set(), set()) == 1.0
    x = torch.randn(500, 12)
    q = torch.linalg.qr(torch.randn(12, 12))[0]
    assert abs(linear_cka(x, 3.0 * x @ q) - 1.0) < 1e-9  # invariant to rotation and isotropic scale
    assert linear_cka(x, torch.randn(500, 7)) < 0.1
    with pytest.raises(ValueError):
        linear_cka(x, x[:10])


def test_layer_matching_counts_both_directions():
    s = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.5, 0.6], [0.0, 0.3, 0.8]])
    m = layer_matching(s)
    assert m["a_to_b"] == pytest.approx(2 / 3)  # row 1 prefers column 2
    assert m["b_to_a"] == pytest.approx(1.0)  # every column's best row is its own
    assert m["accuracy"] == pytest.approx(5 / 6)
    assert layer_matching(torch.ones(2, 2))["accuracy"] == 0.0  # a tie is not a match


def test_itda_similarity_of_rotated_copies_is_one_and_of_other_data_is_low(tmp_path):
    x = sparse_rows(1200, 16, seed=0)
    q = torch.linalg.qr(torch.randn(16, 16))[0]
    a = write_cache(tmp_path / "a", x)
    b = write_cache(tmp_path / "b", x @ q * 2.0)  # another "model": rotated and rescaled
    c = write_cache(tmp_path / "c", sparse_rows(1200, 16, seed=1))
    settings = ITDASettings(k=3, threshold=0.2, capacity=512)
    same = compare([str(a)], [str(b)], settings=settings)
    assert same["jaccard"][0][0] > 0.99 and same["cka"][0][0] > 0.99 and same["atoms"]["a"][0] > 10
    other = compare([str(a)], [str(c)], settings=settings)
    assert other["jaccard"][0][0] < 0.5


def test_layer_matching_between_two_stacks_of_layers(tmp_path):
    base = sparse_rows(800, 16, seed=2)
    layers_a, layers_b = [], []
    for i, mix in enumerate((0.0, 0.6, 1.2)):  # three "layers": progressively different nonlinear views
        h = torch.tanh(base * (1 + mix)) + mix * base.roll(1, dims=1)
        layers_a.append(str(write_cache(tmp_path / f"a{i}", h)))
        layers_b.append(str(write_cache(tmp_path / f"b{i}", h @ torch.linalg.qr(torch.randn(16, 16))[0])))
    result = compare(layers_a, layers_b, settings=ITDASettings(k=3, threshold=0.2, capacity=512))
    assert result["layer_matching"]["itda"]["accuracy"] == 1.0
    assert set(result["layer_matching"]) == {"itda", "cka"}


def test_bad_inputs_are_one_line_errors(tmp_path):
    x = sparse_rows(300, 8, seed=3)
    a = write_cache(tmp_path / "a", x)
    short = write_cache(tmp_path / "short", x[:200])
    other_keys = write_cache(tmp_path / "keys", x, keys=[f"z{i}" for i in range(300)])
    with pytest.raises(VlsaeError, match="300 rows but .* has 200"):
        compare([str(a)], [str(short)])
    with pytest.raises(VlsaeError, match="different pairs"):
        compare([str(a)], [str(other_keys)])
    assert compare([str(a)], [str(short)], max_rows=200, cka=False)["cka"] is None  # the first N rows of each
    topk = create_sae("topk", d_in=8, n_latents=16, k=2)
    run = train(topk, TensorSource(x), TrainConfig(steps=2, batch_size=64, progress=False, tensorboard=False),
                out_dir=tmp_path / "topk")
    with pytest.raises(VlsaeError, match="'topk' SAE"):
        compare([str(run.out_dir)], [str(a)])
    with pytest.raises(VlsaeError, match="neither"):
        compare([str(tmp_path)], [str(a)])
    with pytest.raises(VlsaeError, match="threshold"):
        compare([str(a)], [str(a)], settings=ITDASettings(threshold=1.5))


def test_itda_runs_compare_by_their_atom_labels(tmp_path):
    x = sparse_rows(1000, 16, seed=4)
    q = torch.linalg.qr(torch.randn(16, 16))[0]
    cfg = TrainConfig(steps=100, batch_size=100, progress=False, tensorboard=False)
    runs = []
    for name, data in (("a", x), ("b", x @ q)):
        sae = create_sae("itda", d_in=16, n_latents=1024, k=3, threshold=0.2)
        runs.append(str(train(sae, TensorSource(data), cfg, out_dir=tmp_path / name).out_dir))
    result = compare([runs[0]], [runs[1]])
    assert result["kind"] == "run" and result["jaccard"][0][0] > 0.99 and result["cka"] is None
    shuffled = train(create_sae("itda", d_in=16, n_latents=1024, k=3, threshold=0.2), TensorSource(x),
                     TrainConfig(steps=100, batch_size=100, seed=7, progress=False, tensorboard=False),
                     out_dir=tmp_path / "c")
    with pytest.raises(VlsaeError, match="different training streams"):
        compare([runs[0]], [str(shuffled.out_dir)])
    with pytest.raises(VlsaeError, match="mixing"):
        compare([runs[0]], [str(write_cache(tmp_path / "acts", x))])


def test_build_itda_labels_are_row_positions():
    x = sparse_rows(500, 16, seed=5)
    sae = build_itda(x, ITDASettings(k=3, threshold=0.2, capacity=256))
    labels = sae.atom_labels()
    assert bool((labels[1:] > labels[:-1]).all()) and int(labels[0]) == 0
    assert torch.allclose(F.normalize(x[labels], dim=1), sae.W_dec[: sae.n_atoms], atol=1e-6)


def test_cli_similarity(tmp_path, capsys):
    x = sparse_rows(600, 16, seed=6)
    a = write_cache(tmp_path / "a", x)
    b = write_cache(tmp_path / "b", x * 3.0)
    assert main(["similarity", "--a", str(a), "--b", str(b), "--k", "3", "--threshold", "0.2", "--out",
                 str(tmp_path / "sim.json")]) == 0
    out = capsys.readouterr().out
    assert "ITDA Jaccard" in out and "linear CKA" in out
    saved = json.loads((tmp_path / "sim.json").read_text())
    assert saved["jaccard"][0][0] > 0.99
    short = write_cache(tmp_path / "short", x[:500])
    assert main(["similarity", "--a", str(a), "--b", str(short)]) == 2
    err = capsys.readouterr().err
    assert "600 rows" in err and len(err.strip().splitlines()) == 1
    assert main(["similarity", "--a", str(a), "--b", str(b), "--out", str(tmp_path / "sim.json")]) == 2
    assert "exists" in capsys.readouterr().err
