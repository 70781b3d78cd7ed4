"""Far-OOD shard writer: seeded, readable by the pair reader, one-line errors."""
import json

import numpy as np
import pytest

from multimodal.ood_data import SKIMAGE_PHOTOS, list_kinds, render_ood, write_ood_set
from multimodal.pairs import iter_pairs
from multimodal.shapesworld import ShapesWorldConfig
from vlsae.errors import VlsaeError


def test_kinds_are_registered_and_records_depend_only_on_kind_seed_index():
    assert {"noise", "texture", "photo", "greyscale"} <= set(list_kinds())
    for kind in ("noise", "texture", "greyscale"):
        key, image, caption, meta = render_ood(kind, 3, seed=1, image_size=32)
        again = render_ood(kind, 3, seed=1, image_size=32)
        assert key == again[0] and np.array_equal(np.asarray(image), np.asarray(again[1])) and caption == again[2]
        assert image.size == (32, 32) and image.mode == "RGB" and meta["kind"] == kind
        other = render_ood(kind, 4, seed=1, image_size=32)[1]
        assert not np.array_equal(np.asarray(image), np.asarray(other))


def test_greyscale_scenes_have_no_colour_and_keep_the_scene():
    _, image, caption, meta = render_ood("greyscale", 0, image_size=32,
                                         options={"world": ShapesWorldConfig(seed=5, image_size=32)})
    pixels = np.asarray(image).astype(int)
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    assert meta["scene"]["seed"] == 5 and "greyscale" in caption


def test_written_sets_read_back_as_pairs_with_unique_keys(tmp_path):
    summary = write_ood_set("texture", tmp_path / "t", n=25, shard_size=10, image_size=32, seed=2)
    assert summary["shards"] == 3 and json.loads((tmp_path / "t" / "ood.json").read_text())["n"] == 25
    records = list(iter_pairs(tmp_path / "t"))
    assert len(records) == 25 and len({r.key for r in records}) == 25
    assert records[0].meta["kind"] == "texture" and records[0].caption.endswith("texture")
    with pytest.raises(VlsaeError, match="not empty"):
        write_ood_set("texture", tmp_path / "t", n=5)
    write_ood_set("noise", tmp_path / "t", n=5, overwrite=True)
    assert len(list(iter_pairs(tmp_path / "t"))) == 5


def test_photo_crops_come_from_the_bundled_scikit_image_photographs(tmp_path):
    pytest.importorskip("skimage")
    summary = write_ood_set("photo", tmp_path / "p", n=12, image_size=32)
    assert summary["photos"] and set(summary["photos"]) <= set(SKIMAGE_PHOTOS)
    records = list(iter_pairs(tmp_path / "p"))
    assert all(r.meta["source"].startswith("skimage.data.") for r in records)
    assert all(np.asarray(r.image).std() > 0 for r in records)


def test_bad_requests_are_one_line_errors(tmp_path):
    with pytest.raises(VlsaeError, match="did you mean 'noise'"):
        write_ood_set("nosie", tmp_path / "x", n=3)
    with pytest.raises(VlsaeError, match="positive"):
        write_ood_set("noise", tmp_path / "x", n=0)
    assert not (tmp_path / "x").exists()
