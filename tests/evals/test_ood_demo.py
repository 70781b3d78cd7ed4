"""The demo's OOD pass on a tiny stand-in of the demo folder (world/, acts/, vl/, topk-image/)."""
import json

import pytest

from evals.ood.demo import run_demo_ood
from multimodal.cache import ActivationCache
from multimodal.extract import ExtractConfig, extract
from multimodal.shapesworld import ShapesWorldConfig, write_world
from tests.multimodal.tiny import tiny_clip_config
from vlsae import create_sae
from vlsae.errors import VlsaeError
from vlsae.training import TensorSource, TrainConfig, train


@pytest.mark.slow  # embeds all 9,240 ShapesWorld descriptions with the tiny CLIP
def test_demo_ood_pass_writes_both_reports_and_an_index(tmp_path):
    demo = tmp_path / "demo"
    spec = f"open_clip:{tiny_clip_config(tmp_path, 'vlsae-test-ood-demo-clip')}:random"
    write_world(ShapesWorldConfig(seed=0, image_size=32), demo / "world", n=80, shard_size=40, progress=False)
    extract(ExtractConfig(model=spec, data=str(demo / "world"), out=str(demo / "acts"), hook="final", progress=False))
    acts = ActivationCache(demo / "acts").read_all()
    config = TrainConfig(steps=20, batch_size=32, progress=False, tensorboard=False)
    train(create_sae("vl", d_in=acts["image"].shape[1], n_latents=16, k=4), TensorSource(acts), config, out_dir=demo / "vl")
    train(create_sae("topk", d_in=acts["image"].shape[1], n_latents=32, k=4), TensorSource(acts["image"]), config,
          out_dir=demo / "topk-image")
    result = run_demo_ood(demo, n_id=30, n_ood=20, bootstrap=20)
    assert set(result["best"]) == {"vl", "topk-image"}
    assert {"noise", "texture", "greyscale"} <= set(result["best"]["vl"])
    assert result["rows"]["id"] == 30 and result["rows"]["fit"] == 80
    page = (demo / "ood" / "index.html").read_text()
    assert 'href="vl/index.html"' in page and (demo / "ood" / "topk-image" / "results.json").exists()
    assert json.loads((demo / "ood" / "vl" / "results.json").read_text())["sets"]["fit"]["rows"] == 80


def test_demo_ood_pass_needs_a_finished_demo(tmp_path):
    with pytest.raises(VlsaeError, match="run vlsae demo"):
        run_demo_ood(tmp_path)
