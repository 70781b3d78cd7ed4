"""ShapesWorld: deterministic, planted, captioned, held out, corrupted on request; shards readable."""
import io
import tarfile

import numpy as np
import pytest

from multimodal.pairs import iter_pairs
from multimodal.shapesworld import RGB, ShapesWorldConfig, render_sample, vocabulary, write_world
from vlsae import VlsaeError
from vlsae.cli import main


def test_vocabulary_has_the_planted_attribute_families():
    v = vocabulary()
    assert len(v["shape"]) >= 9 and len(v["colour"]) >= 8 and len(v["size"]) == 3
    assert len(v["position"]) >= 5 and len(v["texture"]) >= 3
    assert set(v["families"]["shape"]) == {"round", "polygon", "other"}
    assert set(v["families"]["colour"]) == {"warm", "cool", "neutral"}


def test_same_seed_and_index_give_the_same_record():
    cfg = ShapesWorldConfig(seed=3)
    a, b = render_sample(cfg, 11), render_sample(cfg, 11)
    assert a.caption == b.caption and a.meta == b.meta and a.image.tobytes() == b.image.tobytes()
    assert render_sample(ShapesWorldConfig(seed=4), 11).image.tobytes() != a.image.tobytes()


def test_captions_name_exactly_what_the_json_says_is_mentioned():
    cfg = ShapesWorldConfig()
    for i in range(200):
        s = render_sample(cfg, i)
        for obj in s.meta["objects"]:
            if "colour" in obj["mentioned"]:
                assert obj["colour"] in s.caption
            if "shape" in obj["mentioned"] and obj["shape"] not in ("cross",):
                assert obj["shape"] in s.caption
        colours_named = {c for c in vocabulary()["colour"] if f" {c} " in f" {s.caption} "}
        mentioned = {o["colour"] for o in s.meta["objects"] if "colour" in o["mentioned"]}
        assert colours_named == mentioned, s.caption


def test_planted_colour_is_visible_in_single_object_images():
    cfg = ShapesWorldConfig(max_objects=1, textures=("plain",))
    hits = 0
    for i in range(60):
        s = render_sample(cfg, i)
        obj = s.meta["objects"][0]
        pixels = np.asarray(s.image).reshape(-1, 3).astype(float)
        dist = {c: np.linalg.norm(pixels - np.array(rgb), axis=1) for c, rgb in RGB.items()}
        # the planted colour is the palette colour with the most pixels within distance 40
        names = list(RGB)
        close = {names[j]: int(((np.stack(list(dist.values()))[j]) < 40).sum()) for j in range(len(names))}
        hits += max(close, key=close.get) == obj["colour"]
    assert hits >= 57


def test_holdout_and_ood_split():
    cfg = ShapesWorldConfig(holdout=("shape=star", "shape=circle+colour=blue"))
    for i in range(300):
        for o in render_sample(cfg, i).meta["objects"]:
            assert o["shape"] != "star" and not (o["shape"] == "circle" and o["colour"] == "blue")
    ood = ShapesWorldConfig(holdout=("shape=star",), holdout_only=True)
    assert all(render_sample(ood, i).meta["objects"][0]["shape"] == "star" for i in range(50))
    with pytest.raises(VlsaeError, match="not a ShapesWorld shape"):
        ShapesWorldConfig(holdout=("shape=dodecahedron",))


def test_noise_fraction_and_flags():
    cfg = ShapesWorldConfig(noise=0.3)
    samples = [render_sample(cfg, i) for i in range(600)]
    rate = np.mean([s.meta["corrupted"] for s in samples])
    assert 0.24 < rate < 0.36  # binomial sd ~0.019
    for s in samples:
        if s.meta["corrupted"]:
            assert s.meta["corruption"] == "mismatch" or s.meta["corruption"].startswith("swap:")
            assert s.caption != s.meta["clean_caption"] or s.meta["corruption"] == "mismatch"
        else:
            assert s.caption == s.meta["clean_caption"]


def _changed_words(a: str, b: str) -> set[str]:
    """Words whose counts differ between two captions."""
    from collections import Counter
    ca, cb = Counter(a.replace(",", "").split()), Counter(b.replace(",", "").split())
    return set((ca - cb) + (cb - ca))


def test_swapped_captions_change_one_fact_and_keep_the_wording():
    from multimodal.shapesworld import POSITION_PHRASES, SYNONYMS, swapped_caption

    cfg = ShapesWorldConfig(mention_size=1.0, mention_position=1.0)
    value_words = {w for phrases in list(POSITION_PHRASES.values()) + list(SYNONYMS.values()) for p in phrases for w in p.split()}
    value_words |= {w for attr in ("shape", "colour", "size") for w in vocabulary()[attr]}
    kinds = set()
    for i in range(200):
        sample = render_sample(cfg, i)
        swapped = swapped_caption(cfg, sample, np.random.default_rng(i))
        assert swapped is not None and swapped != sample.caption
        changed = _changed_words(sample.caption, swapped)
        # only attribute words move: templates, articles, objects' order and the texture phrase stay
        assert changed <= value_words | {"a", "an"}, (sample.caption, swapped)
        kinds.add("binding" if sorted(sample.caption.split()) == sorted(swapped.split()) else "value")
    assert kinds == {"binding", "value"}
    again = swapped_caption(cfg, render_sample(cfg, 3), np.random.default_rng(3))
    assert again == swapped_caption(cfg, render_sample(cfg, 3), np.random.default_rng(3))


def test_swap_corruptions_differ_from_the_clean_caption_in_the_swapped_value_only():
    cfg = ShapesWorldConfig(noise=1.0)
    vocab = vocabulary()
    seen = 0
    for i in range(300):
        s = render_sample(cfg, i)
        if s.meta["corruption"] and s.meta["corruption"].startswith("swap:"):
            attr = s.meta["corruption"].split(":")[1]
            changed = _changed_words(s.meta["clean_caption"], s.caption) - {"a", "an", "sign", "plus"}
            assert changed and changed <= set(vocab[attr]) | {"cross"}, (s.meta["clean_caption"], s.caption)
            seen += 1
    assert seen > 100


def test_write_read_and_refuse_overwrite(tmp_path):
    out = tmp_path / "w"
    summary = write_world(ShapesWorldConfig(), out, n=30, shard_size=8, progress=False)
    assert summary["shards"] == 4 and (out / "world.json").exists()
    records = list(iter_pairs(str(out / "{000000..000003}.tar")))
    assert len(records) == 30 and records[0].image.size == (64, 64)
    assert records[5].caption == render_sample(ShapesWorldConfig(), 5).caption
    assert list(iter_pairs(out))[0].key == records[0].key  # a folder works too
    with pytest.raises(VlsaeError, match="not empty"):
        write_world(ShapesWorldConfig(), out, n=5, shard_size=5, progress=False)


def test_corrupt_records_are_skipped_and_counted(tmp_path, capsys):
    out = tmp_path / "w"
    write_world(ShapesWorldConfig(), out, n=10, shard_size=10, progress=False)
    bad = tmp_path / "bad.tar"
    with tarfile.open(out / "000000.tar") as src, tarfile.open(bad, "w") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read()
            if member.name.startswith("0000000000003") and member.name.endswith(".png"):
                data = b"not a png"
            info = tarfile.TarInfo(member.name)
            info.size = len(data)
            dst.addfile(info, io.BytesIO(data))
    records = list(iter_pairs(str(bad)))
    assert len(records) == 9
    assert "skipped 1" in capsys.readouterr().err
    # a text-only reader (text hooks) neither decodes images nor loses the record whose image is broken
    captions = list(iter_pairs(str(bad), require_image=False))
    assert len(captions) == 10 and all(r.image is None for r in captions)
    assert "skipped" not in capsys.readouterr().err
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"\x00" * 100)
    with pytest.raises(VlsaeError, match="no readable"):
        list(iter_pairs(str(garbage)))
    with pytest.raises(VlsaeError, match="shard not found"):
        list(iter_pairs(str(tmp_path / "{000000..000001}.tar")))


def test_world_cli(tmp_path):
    assert main(["world", "--out", str(tmp_path / "w"), "--n", "12", "--shard-size", "6", "--quiet", "--noise", "0.5"]) == 0
    assert (tmp_path / "w" / "000001.tar").exists()
    assert main(["world", "--out", str(tmp_path / "w"), "--n", "12", "--quiet"]) == 2
    assert main(["world", "--out", str(tmp_path / "x"), "--n", "3", "--holdout", "colour=plaid", "--quiet"]) == 2
