"""vlsae filter end to end on a small noisy ShapesWorld: byte identity, untouched input, atomic output,
resume, sharded scoring, the keep rule, the read policy and the one-line errors."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from multimodal.filtering import FilterConfig, PairBatch, filter_dataset, staging_dir
from multimodal.filtering import run as run_module
from multimodal.filtering.scorers.codes import CooccurringL0, MeanL0, VlJaccard, VlOverlap
from multimodal.filtering.scoring import Scoring
from multimodal.filtering.shards import iter_tar_records
from multimodal.filtering.spill import (KeepMask, ShardScores, kth_largest_cut, read_shard_scores, score_file,
                                        threshold_cut, write_scores)
from multimodal.shapesworld import ShapesWorldConfig, write_world
from vlsae.checkpoint import save_sae
from vlsae.cli import main
from vlsae.errors import VlsaeError
from vlsae.saes import create_sae
from vlsae.sparse import SparseCode

N, SHARD = 60, 20


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("filter") / "noisy"
    write_world(ShapesWorldConfig(seed=3, noise=0.4), out, n=N, shard_size=SHARD, progress=False)
    return out


def _sha(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as archive:
        return [(m.name, archive.extractfile(m).read()) for m in archive.getmembers() if m.isfile()]


def _table(out: Path) -> list[dict[str, str]]:
    with open(out / "scores.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _random(world: Path, out: Path, **extra) -> FilterConfig:
    return FilterConfig(**{"scorer": "random", "data": str(world), "out": str(out), "keep": 0.5, "progress": False,
                           **extra})


def test_kept_records_are_byte_identical_and_the_input_untouched(world, tmp_path):
    before = _sha(world)
    result = filter_dataset(_random(world, tmp_path / "out"))
    assert _sha(world) == before
    out = tmp_path / "out"
    rows = _table(out)
    assert len(rows) == N and sum(int(r["kept"]) for r in rows) == N // 2 == result.summary["counts"]["kept"]
    kept = {r["key"] for r in rows if r["kept"] == "1"}
    scores = {r["key"]: float(r["score"]) for r in rows}
    assert min(scores[k] for k in kept) >= max(s for k, s in scores.items() if k not in kept)  # the best half
    for i, shard in enumerate(sorted(world.glob("*.tar"))):
        expected = [(info.name, data) for record in iter_tar_records(shard) if record.key in kept
                    for info, data in record.members]
        assert _members(out / f"{i:06d}.tar") == expected  # same members, same bytes, input order
        assert _members(out / f"{i:06d}.tar") == [m for m in _members(shard) if m[0].split(".")[0] in kept]
    recorded = {Path(s["input"]).name: s["sha256"] for s in json.loads((out / "filter.json").read_text())["shards"]}
    assert recorded == {k: v for k, v in before.items() if k.endswith(".tar")}
    assert not staging_dir(out).exists()
    assert not (out / "world.json").exists()  # the input's declared sizes would make the output read as damaged


class _Interrupt(BaseException):
    pass


def test_an_interrupted_run_leaves_no_output_and_the_rerun_continues(world, tmp_path, monkeypatch):
    out = tmp_path / "out"
    original = Scoring.score_shard
    calls = []

    def failing(self, url, sha256, bar=None):
        calls.append(url)
        if len(calls) == 2:
            raise _Interrupt
        return original(self, url, sha256, bar)

    monkeypatch.setattr(Scoring, "score_shard", failing)
    with pytest.raises(_Interrupt):
        filter_dataset(_random(world, out))
    assert not out.exists()  # nothing half-written where the dataset goes
    assert len(list((staging_dir(out) / "scores").glob("*.safetensors"))) == 1
    monkeypatch.setattr(Scoring, "score_shard", original)
    resumed = filter_dataset(_random(world, out))
    assert resumed.summary["timing"]["reused_shards"] == 1 and resumed.summary["timing"]["pairs"] == N - SHARD
    fresh = filter_dataset(_random(world, tmp_path / "fresh"))
    assert _table(out) == _table(tmp_path / "fresh")
    for a, b in zip(sorted((out / "scores").iterdir()), sorted((tmp_path / "fresh" / "scores").iterdir())):
        a, b = read_shard_scores(a), read_shard_scores(b)
        assert (a.keys, a.sha256, a.read) == (b.keys, b.sha256, b.read) and np.array_equal(a.scores, b.scores)

    # an interruption while the shards are written: still no output, and every score is kept for the rerun
    out2 = tmp_path / "out2"
    monkeypatch.setattr(run_module, "copy_kept", lambda *a, **k: (_ for _ in ()).throw(_Interrupt()))
    with pytest.raises(_Interrupt):
        filter_dataset(_random(world, out2))
    assert not out2.exists()
    monkeypatch.undo()
    again = filter_dataset(_random(world, out2))
    assert again.summary["timing"]["pairs"] == 0 and again.summary["timing"]["reused_shards"] == 3
    assert fresh.summary["counts"] == again.summary["counts"]


def test_other_settings_start_clean(world, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    monkeypatch.setattr(run_module, "copy_kept", lambda *a, **k: (_ for _ in ()).throw(_Interrupt()))
    with pytest.raises(_Interrupt):
        filter_dataset(_random(world, out))
    monkeypatch.undo()
    result = filter_dataset(_random(world, out, seed=1, progress=True))
    assert "starting clean" in capsys.readouterr().err
    assert result.summary["timing"]["pairs"] == N


def test_overwrite_with_a_new_keep_reuses_the_scores(world, tmp_path):
    out = tmp_path / "out"
    filter_dataset(_random(world, out))
    with pytest.raises(VlsaeError, match="not empty"):
        filter_dataset(_random(world, out, keep=0.25))
    result = filter_dataset(_random(world, out, keep=0.25, overwrite=True))
    assert result.summary["timing"]["pairs"] == 0 and result.summary["counts"]["kept"] == 15


def test_sharded_scoring_then_merge_equals_one_run(world, tmp_path):
    out = tmp_path / "out"
    first = filter_dataset(_random(world, out, shards="0/2"))
    second = filter_dataset(_random(world, out, shards="1/2"))
    assert not first.complete and first.summary["scored_shards"] == [0, 2] and second.summary["scored_shards"] == [1]
    assert not out.exists()
    merged = filter_dataset(_random(world, out))
    assert merged.summary["timing"]["pairs"] == 0
    filter_dataset(_random(world, tmp_path / "single"))
    assert _table(out) == _table(tmp_path / "single")


def test_threshold_keeps_every_pair_at_or_above_it(world, tmp_path):
    result = filter_dataset(_random(world, tmp_path / "out", keep=None, threshold=0.7))
    rows = _table(tmp_path / "out")
    assert all((float(r["score"]) >= 0.7) == (r["kept"] == "1") for r in rows)
    assert result.summary["counts"]["kept"] == sum(float(r["score"]) >= 0.7 for r in rows)


def _files(tmp_path: Path, shards: list[list[float]]) -> list[Path]:
    paths = []
    for i, scores in enumerate(shards):
        path = score_file(tmp_path, i)
        write_scores(path, ShardScores(f"s{i}", "0", [f"k{i}-{j}" for j in range(len(scores))], np.array(scores), {}))
        paths.append(path)
    return paths


def test_keep_fraction_is_exact_with_ties_broken_in_input_order(tmp_path):
    paths = _files(tmp_path, [[1.0, 2.0, 2.0], [2.0, 3.0], [2.0, -np.inf]])
    cut = kth_largest_cut(paths, 3)
    assert (cut.threshold, cut.ties_kept) == (2.0, 2)
    mask = KeepMask(cut)
    flags = [mask(np.array(s)).tolist() for s in ([1.0, 2.0, 2.0], [2.0, 3.0], [2.0, -np.inf])]
    assert flags == [[False, True, True], [False, True], [False, False]]
    assert threshold_cut(paths, 2.0).kept == 5


def test_radix_select_agrees_with_a_sort(tmp_path):
    rng = np.random.default_rng(0)
    for trial in range(20):
        scores = np.concatenate([rng.normal(size=rng.integers(1, 300)) * 10.0 ** rng.integers(-5, 5),
                                 rng.choice([0.0, -0.0, 1.5, np.inf, -np.inf], size=rng.integers(0, 20))])
        path = tmp_path / f"{trial}.safetensors"
        write_scores(path, ShardScores("x", "0", [str(i) for i in range(scores.size)], scores, {}))
        k = int(rng.integers(1, scores.size + 1))
        cut = kth_largest_cut([path], k)
        assert cut.threshold == np.sort(scores)[::-1][k - 1]
        assert int(KeepMask(cut)(scores).sum()) == k


def test_pooled_codes_take_each_latents_largest_value_over_a_pairs_rows():
    class Identity:
        modalities = ()

        def encode(self, x, modality=None):
            return SparseCode.from_dense(x.clamp_min(0), k=x.shape[1])

    image = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 0.5]])
    text = torch.tensor([[0.0, 3.0, 0.0], [0.2, 0.0, 0.0], [0.0, 0.0, 0.9]])
    batch = PairBatch(keys=["a", "b"], acts={"image": image, "text": text},
                      pair_index={"image": torch.tensor([0, 0, 1]), "text": torch.tensor([0, 0, 1])},
                      sae=Identity(), theta=0.1)
    assert batch.pooled("image").tolist() == [[1.0, 2.0, 0.0], [0.0, 0.0, 0.5]]
    assert batch.co_active().tolist() == [[True, True, False], [False, False, True]]
    assert CooccurringL0().score(batch).tolist() == [2.0, 1.0]
    assert VlJaccard().score(batch).tolist() == [1.0, 1.0]
    assert MeanL0().score(batch).tolist() == [1.0, 1.0]  # one active latent per row
    overlap = VlOverlap().score(batch)
    assert overlap[1].item() == pytest.approx(1.0)
    assert overlap[0].item() == pytest.approx((1 * 0.2 + 2 * 3) / (5 ** 0.5 * (9.04 ** 0.5)))


def test_vl_overlap_with_a_vl_sae_on_shapes_clip(world, tmp_path):
    torch.manual_seed(0)
    save_sae(create_sae("vl", d_in=128, n_latents=16, k=4, modalities=["image", "text"]), tmp_path / "vl")
    for scorer, bounds in (("vl-overlap", (-1, 1)),):
        result = filter_dataset(FilterConfig(scorer=scorer, sae=str(tmp_path / "vl"), model="shapes-clip", data=str(world),
                                             keep=0.5, out=str(tmp_path / scorer), progress=False))
        scores = [float(r["score"]) for r in _table(tmp_path / scorer)]
        assert len(scores) == N and bounds[0] <= min(scores) <= max(scores) <= bounds[1]
        assert result.summary["sae"]["n_latents"] == 16 and result.summary["hook"] == "final"


def test_clipscore_separates_corrupted_captions(world, tmp_path):
    from sklearn.metrics import roc_auc_score

    result = filter_dataset(FilterConfig(scorer="clipscore", model="shapes-clip", data=str(world), keep=0.5,
                                         out=str(tmp_path / "out"), progress=False))
    scores, clean, kept = result.truth
    assert clean.size == N and 0 < clean.sum() < N
    assert roc_auc_score(clean, scores) > 0.65
    assert kept.sum() == N // 2


def test_saev_on_shapes_llava_fits_weights_and_resumes_them(world, tmp_path):
    torch.manual_seed(0)
    sae = create_sae("topk", d_in=128, n_latents=32, k=4)
    save_sae(sae, tmp_path / "sae")
    config = FilterConfig(scorer="saev", sae=str(tmp_path / "sae"), model="shapes-llava", hook="layers.1", tokens="all",
                          data=str(world), keep=0.5, probe_pairs=20, out=str(tmp_path / "out"), progress=False)
    result = filter_dataset(config)
    fit = result.summary["scorer_fit"]
    assert fit["latents"] == 32 and 0 <= fit["weighted"] <= 32
    assert (tmp_path / "out" / "scorer_state.safetensors").is_file()
    again = filter_dataset(FilterConfig(**{**config.__dict__, "keep": 0.25, "overwrite": True}))
    assert again.summary["timing"]["pairs"] == 0 and again.summary["scorer_fit"] == fit


def _corrupt_shard(world: Path, tmp_path: Path) -> Path:
    """A copy of the world whose first shard's second record has a corrupt png."""
    folder = tmp_path / "damaged"
    folder.mkdir()
    for shard in sorted(world.glob("*.tar")):
        members = _members(shard)
        if shard.name == "000000.tar":
            name = next(n for n, _ in members if n.endswith(".png") and n != members[0][0])
            members = [(n, b"not a png" if n == name else d) for n, d in members]
        with tarfile.open(folder / shard.name, "w") as archive:
            for n, d in members:
                info = tarfile.TarInfo(n)
                info.size = len(d)
                archive.addfile(info, io.BytesIO(d))
    return folder


def test_corrupt_records_follow_the_read_policy(world, tmp_path, capsys):
    damaged = _corrupt_shard(world, tmp_path)
    code = main(["filter", "--scorer", "clipscore", "--model", "shapes-clip", "--data", str(damaged), "--keep", "0.5",
                 "--out", str(tmp_path / "strict"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--max-skipped" in err and "lost 1 of 60" in err
    assert not (tmp_path / "strict").exists()
    result = filter_dataset(FilterConfig(scorer="clipscore", model="shapes-clip", data=str(damaged), keep=0.5,
                                         max_skipped=0.05, out=str(tmp_path / "lenient"), progress=False))
    assert result.summary["counts"]["pairs_scored"] == N - 1 and result.summary["lost"]["pairs"] == 1
    assert len(_table(tmp_path / "lenient")) == N - 1


def _cli_error(capsys, *argv: str) -> str:
    code = main(["filter", *argv, "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    return err


def test_bad_inputs_are_one_line_errors(world, tmp_path, capsys):
    data, out = str(world), str(tmp_path / "out")
    assert "--sae" in _cli_error(capsys, "--scorer", "vl-overlap", "--model", "shapes-clip", "--data", data, "--keep",
                                 "0.5", "--out", out)
    for keep in ("0", "1.5", "-0.2"):
        assert "(0, 1]" in _cli_error(capsys, "--scorer", "random", "--data", data, "--keep", keep, "--out", out)
    assert "--keep" in _cli_error(capsys, "--scorer", "random", "--data", data, "--out", out)
    empty = tmp_path / "empty"
    empty.mkdir()
    tarfile.open(empty / "000000.tar", "w").close()
    assert "no readable" in _cli_error(capsys, "--scorer", "random", "--data", str(empty), "--keep", "0.5", "--out", out)
    assert "no .tar shards" in _cli_error(capsys, "--scorer", "random", "--data", str(tmp_path), "--keep", "0.5",
                                          "--out", out)
    assert "holds the input" in _cli_error(capsys, "--scorer", "random", "--data", data, "--keep", "0.5", "--out",
                                           str(world.parent))
    save_sae(create_sae("vl", d_in=7, n_latents=8, k=2, modalities=["image", "text"]), tmp_path / "narrow")
    err = _cli_error(capsys, "--scorer", "vl-overlap", "--sae", str(tmp_path / "narrow"), "--model", "shapes-clip",
                     "--data", data, "--keep", "0.5", "--out", out)
    assert "width 7" in err and "128" in err
    assert "i/n" in _cli_error(capsys, "--scorer", "random", "--data", data, "--shards", "2/2", "--out", out)
    assert "did you mean" in _cli_error(capsys, "--scorer", "clipscore", "--model", "shapes-clp", "--data", data,
                                        "--keep", "0.5", "--out", out)
    assert not Path(out).exists() and not staging_dir(Path(out)).exists()
